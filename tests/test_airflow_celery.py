"""Scale-out: the DAGs on a real CeleryExecutor deployment (Postgres + Redis on localhost).

One session-scoped cluster (tests/fixtures_airflow.py) serves every test here. The probe DAG
proves the harness end to end (REST trigger, default and ``gpu`` queues, ``gpu`` pool, plugin
macros on the worker); the nightly test runs two consecutive rounds of the real DAGs.
"""

from __future__ import annotations

import json
import subprocess
from datetime import date, timedelta

import pytest

from tests.fixtures_airflow import CeleryCluster

pytestmark = pytest.mark.integration


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


@pytest.mark.slow
def test_nightly_two_rounds_on_celery(airflow_celery: CeleryCluster) -> None:
    from cg4ctr_tasks.rounds import history_end, read_ledger
    from cg4ctr_tasks.sim.world import init_world
    from cg4ctr_tasks.workspace import Workspace

    api, root = airflow_celery.api, airflow_celery.workspace
    ws = Workspace.open(root)
    init_world(ws, seed=13)
    first = date.fromisoformat(history_end(ws)) + timedelta(days=1)
    days = [first.isoformat(), (first + timedelta(days=1)).isoformat()]
    for dag_id in ("cg4ctr_bootstrap", "cg4ctr_nightly"):
        api.wait_for_dag(dag_id)
    api.unpause("cg4ctr_bootstrap")
    run_id, state = airflow_celery.run_dag("cg4ctr_bootstrap", days[0], timeout_s=900)
    assert state == "success", (api.task_states("cg4ctr_bootstrap", run_id), airflow_celery.logs())
    api.unpause("cg4ctr_nightly")
    trained = {}
    for day in days:
        run_id, state = airflow_celery.run_dag("cg4ctr_nightly", day, timeout_s=1500)
        states = api.task_states("cg4ctr_nightly", run_id)
        assert state == "success", (states, airflow_celery.logs())
        trained[day] = {t for t in ("train_lora", "train_prompt") if states[t] == "success"}

    ledger = {info.id: info for info in read_ledger(ws)}
    assert [(ledger[i].date, ledger[i].mode) for i in (1, 2)] == [
        (days[0], "lora"),
        (days[1], "prompt"),
    ]
    assert trained == {days[0]: {"train_lora"}, days[1]: {"train_prompt"}}
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
