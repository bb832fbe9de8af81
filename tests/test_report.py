from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cg4ctr_tasks import storage
from cg4ctr_tasks.report import write_report
from cg4ctr_tasks.sim.online import baseline_metrics
from cg4ctr_tasks.sim.world import init_world
from cg4ctr_tasks.workspace import Workspace


def _round_from_initial_creatives(ws: Workspace, round_id: int, true_ctr: float) -> None:
    """A stand-in round: the initial creatives as candidates, scored, partitioned."""
    creatives = storage.read_parquet(ws.creatives_table)
    rows = []
    for group in ("g0", "g1"):
        for rank, rec in enumerate(creatives.to_dict("records"), start=1):
            rows.append(
                {
                    "candidate_id": f"{rec['creative_id']}-{group}",
                    "item_id": rec["item_id"],
                    "user_group": group,
                    "image_uri": rec["image_uri"],
                    "score": 1.0 / rank,
                }
            )
    table = pd.DataFrame(rows)
    round_dir = ws.round_dir(round_id)
    storage.write_parquet(storage.join(round_dir, "candidates.parquet"), table)
    part = table.assign(rank=table.groupby(["item_id", "user_group"]).cumcount() + 1)
    part["kept"] = part["rank"] <= 2
    columns = ["candidate_id", "item_id", "user_group", "score", "rank", "kept"]
    storage.write_parquet(storage.join(round_dir, "partition.parquet"), part[columns])
    storage.write_parquet(
        storage.join(round_dir, "captions.parquet"),
        table.assign(caption="blue soft striped")[["candidate_id", "caption"]],
    )
    metrics = {
        "round": round_id,
        "mode": "lora",
        "true_ctr": true_ctr,
        "true_ctr_per_group": {"g0": true_ctr, "g1": true_ctr},
        "logged_ctr": 0.03,
    }
    storage.write_text(storage.join(round_dir, "metrics.json"), json.dumps(metrics))


def test_report_has_rounds_images_plot_params_and_plot_table(workspace: Path) -> None:
    ws = Workspace.open(workspace)
    init_world(ws, seed=4)
    base = baseline_metrics(ws)["true_ctr"]
    _round_from_initial_creatives(ws, 1, base * 1.1)
    result = write_report(ws)
    page = Path(result.path).read_text()
    assert result.rounds == 1
    assert "Round 1" in page and "blue soft striped" in page
    assert page.count("data:image/png;base64,") > 10  # originals, kept candidates, the plot
    assert "Parameters" in page and "&quot;lambda_r&quot;: 0.1" in page
    assert "http://" not in page and "https://" not in page  # self-contained
    table = pd.read_csv(result.metrics_table)
    assert list(table["round"]) == [0, 1]
    assert table.loc[1, "uplift"] == pytest.approx(0.1, rel=1e-6)
    assert (workspace / "data/rounds/round-001/report.html").exists()


def test_report_survives_a_missing_image(workspace: Path) -> None:
    ws = Workspace.open(workspace)
    init_world(ws, seed=4)
    _round_from_initial_creatives(ws, 1, 0.05)
    next((workspace / "data/images/creatives/round-000").glob("*.png")).write_bytes(b"broken")
    page = Path(write_report(ws).path).read_text()
    assert "missing" in page


@pytest.mark.integration
def test_report_renders_in_headless_chromium(workspace: Path, tmp_path_factory) -> None:  # type: ignore[no-untyped-def]
    import shutil

    from tests.fixtures_airflow import apt_install

    if shutil.which("chromium") is None:
        apt_install("chromium")
    chromium = shutil.which("chromium")
    assert chromium, "chromium not found after installing it"
    ws = Workspace.open(workspace)
    init_world(ws, seed=4)
    baseline_metrics(ws)
    _round_from_initial_creatives(ws, 1, 0.05)
    page = Path(write_report(ws).path)
    shot = tmp_path_factory.mktemp("shot") / "report.png"
    profile = tmp_path_factory.mktemp("chromium-profile")
    subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            "--window-size=1200,1600",
            f"--screenshot={shot}",
            page.as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    with Image.open(shot) as image:
        pixels = np.asarray(image.convert("RGB"))
    assert pixels.shape[0] >= 1000 and pixels.shape[1] >= 1000
    # a rendered page, not a blank one: many distinct colours (images and the plot)
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 200
