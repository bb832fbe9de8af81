"""The Airflow plugin: the rounds page behind Airflow's auth, traversal-proof file serving, macros.

The page is tested through a real ``airflow api-server`` (SimpleAuthManager, SQLite) with a token
from its login endpoint; listing, path guards and macros also directly, without a server.
"""

from __future__ import annotations

import importlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import jwt
import pytest

from tests.fixtures_airflow import REPO, api_server

CANARY = "CANARY-outside-the-rounds-folder"
REPORT = "<!doctype html><html><body><h1>round-001 report</h1></body></html>"


@pytest.fixture(scope="module")
def plugin() -> Iterator[ModuleType]:
    sys.path.insert(0, str(REPO / "plugins"))  # Airflow puts the plugins folder on sys.path
    try:
        yield importlib.import_module("cg4ctr_plugin")
    finally:
        sys.path.remove(str(REPO / "plugins"))


@pytest.fixture(scope="module")
def rounds_ws(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small world with a baseline, two ledger rounds (one versioned and reported) and traps:
    a secret beside the rounds folder, a symlinked file and a symlinked round folder."""
    from cg4ctr_tasks import storage
    from cg4ctr_tasks.rounds import round_for_date
    from cg4ctr_tasks.sim.online import baseline_metrics
    from cg4ctr_tasks.sim.world import init_world
    from cg4ctr_tasks.versioning import version_round
    from cg4ctr_tasks.workspace import Workspace

    root = tmp_path_factory.mktemp("rounds-ws")
    (root / "params.yaml").write_text("world:\n  items: 6\n  days: 2\n")
    ws = Workspace.open(root)
    init_world(ws, seed=5)
    base = baseline_metrics(ws)["true_ctr"]
    first = round_for_date(ws, "2026-06-01")
    round_for_date(ws, "2026-06-02")
    metrics = {
        "round": 1,
        "true_ctr": base * 1.25,
        "true_ctr_per_group": {"g0": 0.04, "g1": 0.05},
        "mode": first.mode,
        "date": first.date,
        "kept": 30,
        "logged_ctr": 0.031,
    }
    storage.write_text(storage.join(ws.round_dir(1), "metrics.json"), json.dumps(metrics))
    storage.write_text(storage.join(ws.round_dir(1), "report.html"), REPORT)
    version_round(ws, 1)
    data = root / "data"
    (data / "secret.json").write_text(json.dumps({"secret": CANARY}))
    (data / "private").mkdir()
    (data / "private" / "metrics.json").write_text(json.dumps({"true_ctr": 0.9, "x": CANARY}))
    (data / "private" / "report.html").write_text(CANARY)
    (data / "rounds" / "round-002").mkdir(exist_ok=True)
    (data / "rounds" / "round-002" / "leak.json").symlink_to(data / "secret.json")
    (data / "rounds" / "round-003").symlink_to(data / "private", target_is_directory=True)
    return root


@pytest.fixture()
def in_workspace(rounds_ws: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("CG4CTR_WORKSPACE", str(rounds_ws))
    return rounds_ws


def test_rounds_listing(plugin: ModuleType, rounds_ws: Path) -> None:
    from cg4ctr_tasks.workspace import Workspace

    rows = {row.round: row for row in plugin.list_rounds(Workspace.open(rounds_ws))}
    assert sorted(rows) == [0, 1, 2, 3]
    assert rows[1].tag == "round-001" and rows[1].commit
    assert rows[1].mode == "lora" and rows[2].mode == "prompt" and rows[1].date == "2026-06-01"
    assert rows[1].uplift == pytest.approx(0.25)
    assert rows[1].report and not rows[2].report and rows[2].true_ctr is None
    assert rows[0].true_ctr is not None and rows[0].tag is None
    # the symlinked round folder lists as a round but shows nothing from where it points
    assert rows[3].true_ctr is None and not rows[3].report
    page = plugin.render_page(list(rows.values()), rounds_ws, overall_report=False)
    assert "not yet" in page and "+25.00%" in page and CANARY not in page


@pytest.mark.parametrize(
    ("round_dir", "name"),
    [
        ("round-001", "../../secret.json"),
        ("round-001", "..%2F..%2Fsecret.json"),
        ("round-001", "/etc/passwd.json"),
        ("round-001", "..json"),
        ("..", "secret.json"),
        ("round-1", "report.html"),
        ("/etc", "passwd.json"),
        ("round-001", "report.py"),
        ("round-002", "leak.json"),
        ("round-003", "metrics.json"),
        ("round-003", "report.html"),
    ],
)
def test_round_files_never_leave_the_round(
    plugin: ModuleType, rounds_ws: Path, round_dir: str, name: str
) -> None:
    from cg4ctr_tasks.errors import RejectedInput
    from cg4ctr_tasks.workspace import Workspace

    with pytest.raises(RejectedInput):
        plugin.round_file(Workspace.open(rounds_ws), round_dir, name)


def test_macros_map_dates_without_writing(plugin: ModuleType, in_workspace: Path) -> None:
    ledger = in_workspace / "data" / "rounds" / "ledger.json"
    before = ledger.read_bytes()
    assert plugin.round_id_for("2026-06-02") == 2
    assert plugin.round_tag_for("2026-06-01") == "round-001"
    assert plugin.round_id_for("2026-07-01") is None and plugin.round_tag_for("2026-07-01") == ""
    assert ledger.read_bytes() == before


TRAVERSALS = [
    "/cg4ctr/rounds/round-001/..%2F..%2Fsecret.json",
    "/cg4ctr/rounds/round-001/%2E%2E%2F%2E%2E%2Fsecret.json",
    "/cg4ctr/rounds/..%2F..%2Fdata/secret.json",
    "/cg4ctr/rounds/%2E%2E/secret.json",
    "/cg4ctr/rounds/round-001/%2Fetc%2Fpasswd",
    "/cg4ctr/rounds/%2Fetc/passwd.json",
    "/cg4ctr/rounds/round-001/..%5C..%5Csecret.json",
    "/cg4ctr/rounds/round-002/leak.json",
    "/cg4ctr/rounds/round-003/metrics.json",
    "/cg4ctr/rounds/round-003/report.html",
    "/cg4ctr/rounds/round-1/report.html",
]


@pytest.mark.integration
def test_rounds_page_in_a_real_api_server(rounds_ws: Path, tmp_path: Path) -> None:
    env = {"CG4CTR_WORKSPACE": str(rounds_ws)}
    with api_server(tmp_path / "airflow", extra_env=env) as api:
        page, listing = "/cg4ctr/", "/cg4ctr/api/rounds"
        report = "/cg4ctr/rounds/round-001/report.html"
        for path in (page, listing, report, "/cg4ctr/report.html", *TRAVERSALS):
            anonymous = api.request("GET", path)
            assert CANARY not in anonymous.text and "round-001" not in anonymous.text
            # refused before anything is read; only a URL that no route matches is a plain 404
            allowed = (401, 403, 404) if path in TRAVERSALS else (401, 403)
            assert anonymous.status_code in allowed, (path, anonymous.status_code)
        forged = jwt.encode({"sub": "cg4ctr", "role": "ADMIN"}, "not-the-secret" * 5, "HS512")
        resp = api.client.get(api.base_url + listing, headers={"Authorization": f"Bearer {forged}"})
        assert resp.status_code in (401, 403)
        with httpx.Client(cookies={"_token": forged}) as browser:
            assert browser.get(api.base_url + page).status_code in (401, 403)

        token = api.login()
        html = api.request("GET", page)
        assert html.status_code == 200, html.text
        for shown in ("round-000", "round-001", "round-002", "lora", "2026-06-01", "+25.00%"):
            assert shown in html.text
        assert "round-001/report.html" in html.text and "not yet" in html.text
        with httpx.Client(cookies={"_token": token}) as browser:  # the UI's session cookie
            rows: list[dict[str, Any]] = browser.get(api.base_url + listing).json()
        assert [row["name"] for row in rows][:3] == ["round-000", "round-001", "round-002"]
        assert rows[1]["tag"] == "round-001" and rows[1]["kept"] == 30
        served = api.request("GET", report)
        assert served.status_code == 200 and served.text == REPORT
        assert "sandbox" in served.headers["content-security-policy"]
        assert api.request("GET", "/cg4ctr/rounds/round-002/report.html").status_code == 404
        assert api.request("GET", "/cg4ctr/report.html").status_code == 404

        for path in TRAVERSALS:
            resp = api.request("GET", path)
            assert resp.status_code in (400, 404), (path, resp.status_code)
            assert CANARY not in resp.text and "root:" not in resp.text, path

        plugins = api.call("GET", "/api/v2/plugins")["plugins"]
        ours = next(p for p in plugins if p["name"] == "cg4ctr")
        assert ours["external_views"][0]["href"] == "/cg4ctr/"
        assert any("round_tag_for" in macro for macro in ours["macros"])
