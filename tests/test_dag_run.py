"""`airflow dags test`: the real nightly DAG runs one round on a tiny world, in-process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cg4ctr_tasks.cycle import cg4ctr_command
from tests.test_cycle import TINY

pytestmark = [pytest.mark.slow, pytest.mark.integration]
DAGS = Path(__file__).resolve().parents[1] / "dags"


def test_nightly_dag_runs_a_round_and_versions_it(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "params.yaml").write_text(TINY)
    cli = cg4ctr_command()
    subprocess.run([*cli, "sim", "init", "-w", str(ws), "--seed", "8"], check=True)
    subprocess.run([*cli, "round", "--round", "0", "-w", str(ws)], check=True)  # bootstrap

    env = {
        **os.environ,
        "AIRFLOW_HOME": str(tmp_path / "airflow"),
        "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "CG4CTR_WORKSPACE": str(ws),
        "CG4CTR_BIN": str(Path(sys.executable).with_name("cg4ctr")),
        "OMP_NUM_THREADS": "1",
    }
    airflow = str(Path(sys.executable).with_name("airflow"))
    subprocess.run([airflow, "db", "migrate"], env=env, check=True, capture_output=True)
    run = subprocess.run(
        [airflow, "dags", "test", "cg4ctr_nightly", "2026-01-05"],
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]

    ledger = json.loads((ws / "data/rounds/ledger.json").read_text())["rounds"]
    assert ledger == [{"id": 1, "date": "2026-01-05", "mode": "lora"}]
    round_dir = ws / "data/rounds/round-001"
    for name in (
        "saliency",
        "prompts.parquet",
        "candidates.parquet",
        "inspection.parquet",
        "captions.parquet",
        "scores.parquet",
        "partition.parquet",
        "metrics.json",
        "report.html",
    ):
        assert (round_dir / name).exists(), name
    assert (ws / "models/lora/round-001").is_dir()  # odd round: the LoRA branch ran
    assert not (ws / "models/prompt/round-001").exists()
    assert (ws / "data/raw/logs/dt=2026-01-05/part-0000.csv").exists()  # the online day
    tags = subprocess.run(["git", "tag"], cwd=ws, capture_output=True, text=True).stdout.split()
    assert "round-001" in tags
