"""Scale-out: the DAGs on a real CeleryExecutor deployment (Postgres + Redis on localhost).

One session-scoped cluster (tests/fixtures_airflow.py) serves every test here. The probe DAG
proves the harness end to end (REST trigger, default and ``gpu`` queues, ``gpu`` pool, plugin
macros on the worker); the nightly test runs two consecutive rounds of the real DAGs, each
triggered through the REST API, and the backfill test runs the same two dates as one
``airflow backfill create`` in a second workspace of the same world and compares the artifacts.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path

import pytest

from tests.fixtures_airflow import CeleryCluster, sim_workspace

pytestmark = pytest.mark.integration
SEED = 13
# Backfills need a periodic schedule; a start date far ahead keeps the scheduler from starting
# a run for today when the nightly is unpaused (backfill runs ignore the start date). The
# second date's run waits for the first: poke often.
BACKFILL = 'airflow:\n  schedule: "@daily"\n  start_date: "2100-01-01"\n  previous_run_poke_s: 5\n'


def test_probe_dag_runs_on_celery_workers(airflow_celery: CeleryCluster) -> None:
    api = airflow_celery.api
    api.wait_for_dag("cg4ctr_probe")
    api.unpause("cg4ctr_probe")
    for day in ("2026-03-01", "2026-03-02"):
        run_id, state = airflow_celery.run_dag("cg4ctr_probe", day, timeout_s=300)
        states = api.task_states("cg4ctr_probe", run_id)
        assert state == "success", (states, airflow_celery.logs())
        assert states == {"hello": "success", "on_gpu": "success"}
        tis = {ti["task_id"]: ti for ti in api.task_instances("cg4ctr_probe", run_id)}
        assert tis["on_gpu"]["queue"] == "gpu" and tis["on_gpu"]["pool"] == "gpu"
        assert tis["hello"]["queue"] == "default"
        assert tis["on_gpu"]["hostname"]  # ran on the Celery worker
        log = api.call(
            "GET", f"/api/v2/dags/cg4ctr_probe/dagRuns/{run_id}/taskInstances/on_gpu/logs/1"
        )
        assert f"gpu task {day} round=[]" in json.dumps(log)  # plugin macro rendered on the worker
        assert api.call("GET", f"/api/v2/dags/cg4ctr_probe/dagRuns/{run_id}")[
            "logical_date"
        ].startswith(day)
    pools = {p["name"]: p["slots"] for p in api.call("GET", "/api/v2/pools")["pools"]}
    assert pools["gpu"] == 1 and pools["dvc"] == 1
    # the project's DAGs parse in the deployment too (copies beside the probe)
    for dag_id in ("cg4ctr_nightly", "cg4ctr_bootstrap", "cg4ctr_reward"):
        api.wait_for_dag(dag_id)


@dataclass
class TwoRounds:
    workspace: Path
    days: list[str]
    bootstrap: str  # its run's terminal state
    runs: dict[str, tuple[str, dict[str, str | None]]]  # day -> (state, task states)


def _bootstrap(cluster: CeleryCluster, folder: Path) -> tuple[list[str], str]:
    """Switch the cluster to ``folder`` and run the bootstrap DAG there (dateless: round 0 has
    no date); the two days after the click history, and the bootstrap's state."""
    from cg4ctr_tasks.rounds import history_end
    from cg4ctr_tasks.workspace import Workspace

    cluster.use_workspace(folder)
    first = date.fromisoformat(history_end(Workspace.open(folder))) + timedelta(days=1)
    cluster.api.wait_for_dag("cg4ctr_bootstrap")
    cluster.api.unpause("cg4ctr_bootstrap")
    _, state = cluster.run_dag("cg4ctr_bootstrap", None, timeout_s=900)
    return [first.isoformat(), (first + timedelta(days=1)).isoformat()], state


@pytest.fixture(scope="module")
def triggered(airflow_celery: CeleryCluster) -> TwoRounds:
    """The nightly for two consecutive dates, each run triggered through the REST API."""
    folder = sim_workspace(airflow_celery.workspace.parent / "workspaces" / "triggered", SEED)
    days, bootstrap = _bootstrap(airflow_celery, folder)
    api = airflow_celery.api
    api.wait_for_dag("cg4ctr_nightly")
    api.unpause("cg4ctr_nightly")
    runs = {}
    for day in days:
        run_id, state = airflow_celery.run_dag("cg4ctr_nightly", day, timeout_s=1500)
        runs[day] = (state, api.task_states("cg4ctr_nightly", run_id))
        if state != "success":
            break
    return TwoRounds(folder, days, bootstrap, runs)


def _trained(rounds: TwoRounds) -> dict[str, set[str]]:
    return {
        day: {t for t in ("train_lora", "train_prompt") if states[t] == "success"}
        for day, (_, states) in rounds.runs.items()
    }


@pytest.mark.slow
def test_nightly_two_rounds_on_celery(airflow_celery: CeleryCluster, triggered: TwoRounds) -> None:
    from cg4ctr_tasks.rounds import read_ledger
    from cg4ctr_tasks.workspace import Workspace

    root, days = triggered.workspace, triggered.days
    assert triggered.bootstrap == "success", airflow_celery.logs()
    for day in days:
        state, states = triggered.runs[day]
        assert state == "success", (day, states, airflow_celery.logs())

    ledger = {info.id: info for info in read_ledger(Workspace.open(root))}
    assert [(ledger[i].date, ledger[i].mode) for i in (1, 2)] == [
        (days[0], "lora"),
        (days[1], "prompt"),
    ]
    assert _trained(triggered) == {days[0]: {"train_lora"}, days[1]: {"train_prompt"}}
    models = root / "models"
    assert (models / "lora" / "round-001").is_dir() and not (models / "lora" / "round-002").exists()
    assert (models / "prompt" / "round-002").is_dir()
    assert not (models / "prompt" / "round-001").exists()
    for round_id in (1, 2):
        folder = root / "data" / "rounds" / f"round-{round_id:03d}"
        assert (folder / "partition.parquet").is_file()
        assert json.loads((folder / "metrics.json").read_text())["round"] == round_id
    tags = subprocess.run(
        ["git", "tag", "--list", "round-*"], cwd=root, capture_output=True, text=True, check=True
    ).stdout.split()
    assert {"round-001", "round-002"} <= set(tags)


# The round artifacts a backfill must reproduce: tables by content, weights by tensor, the rest
# by bytes. Reports, ingest/train summaries (timings) and DVC/git bookkeeping are not compared.
ARTIFACTS = (
    "data/rounds/ledger.json",
    "data/rounds/round-*/**/*.parquet",
    "data/rounds/round-*/**/*.png",
    "data/rounds/round-*/metrics.json",
    "data/raw/logs/**/*.csv",
    "data/ctr/*.parquet",
    "models/**/*.safetensors",
)


def _artifacts(root: Path) -> set[str]:
    return {
        str(path.relative_to(root))
        for pattern in ARTIFACTS
        for path in root.glob(pattern)
        if "parts" not in path.relative_to(root).parts  # shard parts: merged into the tables
    }


def _difference(a: Path, b: Path) -> str | None:
    """None when equal; else what differs, telling float drift from different contents."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    if a.suffix == ".parquet":
        left, right = pq.read_table(a), pq.read_table(b)
        if left.equals(right):
            return None
        if left.schema != right.schema or left.num_rows != right.num_rows:
            return f"schema/rows {left.schema.names}x{left.num_rows} vs {right.num_rows}"
        cols = [c for c in left.schema.names if not left.column(c).equals(right.column(c))]
        drift = {
            c: float(np.max(np.abs(left.column(c).to_numpy() - right.column(c).to_numpy())))
            for c in cols
            if pa.types.is_floating(left.schema.field(c).type)
        }
        return f"columns {cols}; max |float drift| {drift}"
    if a.suffix == ".safetensors":
        from safetensors.torch import load_file

        left_t, right_t = load_file(a), load_file(b)
        if left_t.keys() != right_t.keys():
            return "different tensor names"
        gaps = [float((left_t[k].float() - right_t[k].float()).abs().max()) for k in left_t]
        changed = [d for d in gaps if d > 0]
        return f"{len(changed)} tensors differ, max {max(changed):g}" if changed else None
    if a.read_bytes() == b.read_bytes():
        return None
    if a.suffix == ".png":
        from PIL import Image

        pixels = [np.asarray(Image.open(p), dtype=np.int16) for p in (a, b)]
        return f"max pixel difference {int(np.abs(pixels[0] - pixels[1]).max())}"
    return "bytes differ"


@pytest.mark.slow
def test_backfill_matches_triggered_runs(
    airflow_celery: CeleryCluster, triggered: TwoRounds
) -> None:
    """``airflow backfill create`` over two dates, run by the scheduler, in a second workspace
    of the same world: the same rounds, dates and branches, and the same artifacts."""
    from cg4ctr_tasks.rounds import read_ledger
    from cg4ctr_tasks.workspace import Workspace

    api, days = airflow_celery.api, triggered.days
    assert [state for state, _ in triggered.runs.values()] == ["success", "success"]
    folder = sim_workspace(
        airflow_celery.workspace.parent / "workspaces" / "backfill", SEED, BACKFILL
    )
    assert _bootstrap(airflow_celery, folder) == (days, "success"), airflow_celery.logs()
    api.wait_for_dag(
        "cg4ctr_nightly", timeout_s=300, until=lambda d: d["timetable_summary"] is not None
    )  # parsed from this workspace's params.yaml: @daily
    for old in api.runs("cg4ctr_nightly"):  # the triggered runs hold these logical dates
        api.delete_run("cg4ctr_nightly", old["dag_run_id"])
    airflow_celery.airflow(
        "backfill",
        "create",
        "--dag-id",
        "cg4ctr_nightly",
        "--from-date",
        days[0],
        "--to-date",
        days[1],  # the backfill's default max-active-runs (10) starts both dates at once
    )
    runs = api.runs("cg4ctr_nightly")
    assert [(r["run_type"], r["logical_date"][:10]) for r in runs] == [
        ("backfill", day) for day in days
    ]
    backfilled: dict[str, tuple[str, dict[str, str | None]]] = {}
    for run in runs:
        state = airflow_celery.wait("cg4ctr_nightly", run["dag_run_id"], timeout_s=1500)
        backfilled[run["logical_date"][:10]] = (
            state,
            api.task_states("cg4ctr_nightly", run["dag_run_id"]),
        )
        assert state == "success", (backfilled, airflow_celery.logs())
    assert _trained(TwoRounds(folder, days, "success", backfilled)) == _trained(triggered)
    first, second = (
        api.call("GET", f"/api/v2/dags/cg4ctr_nightly/dagRuns/{run['dag_run_id']}") for run in runs
    )
    tasks = {
        ti["task_id"]: ti for ti in api.task_instances("cg4ctr_nightly", runs[1]["dag_run_id"])
    }
    # both runs started at once; the second date's run waited for the first before its round
    assert second["start_date"] < first["end_date"]
    assert first["end_date"] <= tasks["previous_run_finished"]["end_date"]
    assert first["end_date"] <= tasks["round_info"]["start_date"]

    ledger = [(r.id, r.date, r.mode) for r in read_ledger(Workspace.open(folder))]
    assert ledger == [(1, days[0], "lora"), (2, days[1], "prompt")]
    files = _artifacts(folder)
    assert files == _artifacts(triggered.workspace)
    assert any(name.endswith("round-002/partition.parquet") for name in files)
    assert any(name.startswith("models/prompt/round-002/") for name in files)
    differing = {
        name: why
        for name in sorted(files)
        if (why := _difference(folder / name, triggered.workspace / name)) is not None
    }
    assert not differing, differing
