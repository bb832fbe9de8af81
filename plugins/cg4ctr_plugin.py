"""cg4ctr Airflow plugin: the rounds page inside the Airflow 3 UI, and round-id macros.

The page (a FastAPI app the API server mounts at ``/cg4ctr``, linked from the navigation) lists
the rounds of the workspace in ``$CG4CTR_WORKSPACE``: ledger date and mode, DVC tag (git tag
``round-NNN`` in the workspace repository), the round's metrics (true CTR in the simulated world,
uplift over round 0, logged CTR, kept creatives) and a link to its HTML report.

Security: Airflow does not protect plugin apps, so every route depends on Airflow's own
``requires_access_dag`` (the API server's JWT check: ``Authorization: Bearer`` or the ``_token``
cookie, then the auth manager's permission to read ``cg4ctr_nightly`` runs). A round id in a URL
must be ``round-NNN`` and a file name a safe id with an allowed suffix, and the resolved path must
stay inside that round's folder (symlinks included); reports are served with a sandboxing CSP.
"""

from __future__ import annotations

import html
import json
import os
import re
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from airflow.plugins_manager import AirflowPlugin
from fastapi import Depends, FastAPI, HTTPException
from fastapi.responses import HTMLResponse, Response

from cg4ctr_tasks import storage
from cg4ctr_tasks.errors import RejectedInput, UserError
from cg4ctr_tasks.workspace import WORKSPACE_ENV, Workspace, round_name

URL_PREFIX = "/cg4ctr"
NIGHTLY_DAG = "cg4ctr_nightly"
ROUND_PATTERN = re.compile(r"^round-(\d{3})$")
SERVED_SUFFIXES = {".html": "text/html; charset=utf-8", ".json": "application/json"}
# Reports are ours but carry data-derived text: no scripts, no fetches, an opaque origin.
REPORT_CSP = (
    "sandbox; default-src 'none'; img-src data:; style-src 'unsafe-inline'; frame-ancestors 'self'"
)


@dataclass(frozen=True)
class RoundRow:
    """One line of the rounds page; None where the round has not produced that yet."""

    round: int
    name: str
    date: str | None
    mode: str | None
    tag: str | None
    commit: str | None
    true_ctr: float | None
    uplift: float | None
    logged_ctr: float | None
    kept: int | None
    true_ctr_per_group: dict[str, float]
    report: bool


def open_workspace() -> Workspace:
    """The workspace the API server was started for; never a default folder."""
    root = os.environ.get(WORKSPACE_ENV)
    if not root:
        raise UserError(f"${WORKSPACE_ENV} is not set for the Airflow API server")
    return Workspace.open(root)


def _round_ids_on_disk(ws: Workspace) -> set[int]:
    fs, root = storage.url_to_fs(storage.join(ws.data, "rounds"))
    if not fs.exists(root):
        return set()
    names = (str(path).rstrip("/").rsplit("/", 1)[-1] for path in fs.ls(root, detail=False))
    return {int(m.group(1)) for m in map(ROUND_PATTERN.match, names) if m}


def round_tags(ws: Workspace) -> dict[int, tuple[str, str]]:
    """``round-NNN`` git tags of the workspace repository (made by `cg4ctr version`)."""
    if not (ws.root / ".git").exists():
        return {}
    proc = subprocess.run(
        ["git", "for-each-ref", "--format=%(refname:short) %(objectname:short)", "refs/tags/"],
        cwd=ws.root,
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "GIT_TERMINAL_PROMPT": "0"},
    )
    tags = {}
    for line in proc.stdout.splitlines():
        tag, _, commit = line.partition(" ")
        if match := ROUND_PATTERN.match(tag):
            tags[int(match.group(1))] = (tag, commit)
    return tags


def round_path(ws: Workspace, round_id: int, name: str) -> str:
    """``rounds/round-NNN/<name>``, refused when it resolves elsewhere (symlinked file or folder;
    ``data/rounds`` itself may be a link)."""
    path = storage.join(ws.round_dir(round_id), storage.safe_id(name, "file name"))
    if not storage.is_remote(path):
        inside = Path(storage.join(ws.data, "rounds")).resolve() / round_name(round_id)
        if not Path(path).resolve().is_relative_to(inside):
            raise RejectedInput(f"{round_name(round_id)}/{name} leaves its round folder")
    return path


def _existing(ws: Workspace, round_id: int, name: str) -> str | None:
    try:
        path = round_path(ws, round_id, name)
    except RejectedInput:
        return None
    return path if storage.exists(path) else None


def _metrics(ws: Workspace, round_id: int) -> dict[str, Any]:
    path = _existing(ws, round_id, "metrics.json")
    loaded = json.loads(storage.read_bytes(path)) if path else {}
    return loaded if isinstance(loaded, dict) else {}


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def list_rounds(ws: Workspace) -> list[RoundRow]:
    """Every round the ledger, the rounds folder or a git tag knows, oldest first."""
    from cg4ctr_tasks.rounds import read_ledger

    ledger = {info.id: info for info in read_ledger(ws)}
    tags = round_tags(ws)
    rows = []
    base: float | None = None
    for round_id in sorted(set(ledger) | _round_ids_on_disk(ws) | set(tags)):
        metrics = _metrics(ws, round_id)
        info = ledger.get(round_id)
        true_ctr = _number(metrics.get("true_ctr"))
        if round_id == 0:
            base = true_ctr
        per_group = metrics.get("true_ctr_per_group")
        tag, commit = tags.get(round_id, (None, None))
        rows.append(
            RoundRow(
                round=round_id,
                name=round_name(round_id),
                date=info.date if info else metrics.get("date"),
                mode=info.mode
                if info
                else metrics.get("mode", "bootstrap" if not round_id else None),
                tag=tag,
                commit=commit,
                true_ctr=true_ctr,
                uplift=true_ctr / base - 1.0 if true_ctr is not None and base else None,
                logged_ctr=_number(metrics.get("logged_ctr")),
                kept=int(metrics["kept"]) if _number(metrics.get("kept")) is not None else None,
                true_ctr_per_group={
                    str(k): float(v)
                    for k, v in (per_group.items() if isinstance(per_group, dict) else [])
                    if _number(v) is not None
                },
                report=_existing(ws, round_id, "report.html") is not None,
            )
        )
    return rows


def round_file(ws: Workspace, round_dir_name: str, file_name: str) -> tuple[bytes, str]:
    """Bytes and media type of one file directly inside a round folder, or RejectedInput."""
    match = ROUND_PATTERN.match(round_dir_name)
    if not match:
        raise RejectedInput(f"not a round: {round_dir_name!r} (expected round-NNN)")
    media = SERVED_SUFFIXES.get(Path(file_name).suffix)
    if media is None:
        raise RejectedInput(f"only {', '.join(sorted(SERVED_SUFFIXES))} files are served")
    path = round_path(ws, int(match.group(1)), file_name)
    if not storage.exists(path):
        raise FileNotFoundError(f"{round_dir_name}/{file_name}")
    return storage.read_bytes(path), media


def round_id_for(ds: str) -> int | None:
    """Macro: the round a logical date already has in the ledger (never assigns one)."""
    from cg4ctr_tasks.rounds import read_ledger

    return next((info.id for info in read_ledger(open_workspace()) if info.date == ds), None)


def round_tag_for(ds: str) -> str:
    """Macro: ``round-NNN`` for a logical date known to the ledger, else an empty string."""
    round_id = round_id_for(ds)
    return "" if round_id is None else round_name(round_id)


def _fmt(value: float | None, pattern: str = "{:.5f}") -> str:
    return "" if value is None else pattern.format(value)


def render_page(rows: list[RoundRow], workspace: Path, overall_report: bool) -> str:
    """The rounds table as a small standalone HTML page (every value escaped)."""
    head = (
        "<tr><th>round</th><th>date</th><th>trains</th><th>DVC tag</th><th>true CTR</th>"
        "<th>uplift vs round 0</th><th>logged CTR</th><th>kept</th><th>true CTR per group</th>"
        "<th>report</th></tr>"
    )
    lines = []
    for row in rows:
        esc = {k: html.escape(str(v)) for k, v in asdict(row).items() if v is not None}
        tag = f"{esc['tag']} <code>{esc['commit']}</code>" if row.tag else "not versioned"
        groups = ", ".join(
            f"{html.escape(g)}: {v:.4f}" for g, v in sorted(row.true_ctr_per_group.items())
        )
        report = (
            f"<a href='rounds/{esc['name']}/report.html'>report</a>" if row.report else "not yet"
        )
        lines.append(
            f"<tr><td>{esc['name']}</td><td>{esc.get('date', '')}</td><td>{esc.get('mode', '')}"
            f"</td><td>{tag}</td><td>{_fmt(row.true_ctr)}</td>"
            f"<td>{_fmt(row.uplift, '{:+.2%}')}</td><td>{_fmt(row.logged_ctr)}</td>"
            f"<td>{esc.get('kept', '')}</td><td>{groups}</td><td>{report}</td></tr>"
        )
    overall = "<a href='report.html'>full report</a>" if overall_report else "report: not yet"
    body = "".join(lines) or "<tr><td colspan='10'>no rounds yet</td></tr>"
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>cg4ctr rounds</title><style>"
        "body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:.3em .6em;text-align:left}</style></head><body>"
        f"<h1>cg4ctr rounds</h1><p>workspace <code>{html.escape(str(workspace))}</code> · "
        f"{overall} · <a href='api/rounds'>JSON</a></p><table>{head}{body}</table></body></html>"
    )


def _workspace_or_503() -> Workspace:
    try:
        return open_workspace()
    except UserError as exc:
        raise HTTPException(status_code=503, detail=str(exc)) from None


def _report_response(data: bytes, media: str) -> Response:
    headers = {"Content-Security-Policy": REPORT_CSP, "X-Content-Type-Options": "nosniff"}
    return Response(content=data, media_type=media, headers=headers)


def create_app() -> FastAPI:
    """The rounds app; every route requires an Airflow user allowed to read the nightly runs."""
    from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity
    from airflow.api_fastapi.core_api.security import requires_access_dag

    guard = Depends(requires_access_dag("GET", DagAccessEntity.RUN, param_dag_id=NIGHTLY_DAG))
    app = FastAPI(title="cg4ctr rounds", dependencies=[guard], docs_url=None, redoc_url=None)

    @app.get("/", response_class=HTMLResponse)
    def rounds_page() -> HTMLResponse:
        ws = _workspace_or_503()
        overall = storage.exists(storage.join(ws.data, "report.html"))
        return HTMLResponse(render_page(list_rounds(ws), ws.root, overall))

    @app.get("/api/rounds")
    def rounds_json() -> list[dict[str, Any]]:
        return [asdict(row) for row in list_rounds(_workspace_or_503())]

    @app.get("/report.html")
    def overall_report() -> Response:
        ws = _workspace_or_503()
        path = storage.join(ws.data, "report.html")
        if not storage.exists(path):
            raise HTTPException(status_code=404, detail="no report yet: run `cg4ctr report`")
        return _report_response(storage.read_bytes(path), SERVED_SUFFIXES[".html"])

    @app.get("/rounds/{round_dir}/{file_name}")
    def round_document(round_dir: str, file_name: str) -> Response:
        try:
            data, media = round_file(_workspace_or_503(), round_dir, file_name)
        except RejectedInput as exc:
            raise HTTPException(status_code=400, detail=str(exc)) from None
        except FileNotFoundError:
            raise HTTPException(status_code=404, detail="not yet written") from None
        return _report_response(data, media)

    return app


class Cg4ctrPlugin(AirflowPlugin):
    """Registers the rounds page, its navigation link and the round macros."""

    name = "cg4ctr"
    fastapi_apps = [{"app": create_app(), "url_prefix": URL_PREFIX, "name": "cg4ctr rounds"}]
    external_views = [
        {
            "name": "CG4CTR rounds",
            "href": f"{URL_PREFIX}/",
            "url_route": "cg4ctr-rounds",
            "destination": "nav",
            "category": "browse",
        }
    ]
    macros = [round_id_for, round_tag_for]
