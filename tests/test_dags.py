"""The DAG files: they import cleanly, have the designed shape, and parse without heavy imports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

DAGS = Path(__file__).resolve().parents[1] / "dags"


@pytest.fixture(scope="module")
def dagbag(tmp_path_factory: pytest.TempPathFactory, tiny_world: Path) -> Any:
    home = tmp_path_factory.mktemp("airflow-home")
    env = {
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "CG4CTR_WORKSPACE": str(tiny_world),
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    sys.path.insert(0, str(DAGS))  # Airflow puts the DAG bundle on sys.path the same way
    try:
        from airflow.dag_processing.dagbag import DagBag

        yield DagBag(dag_folder=str(DAGS))
    finally:
        sys.path.remove(str(DAGS))
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def test_every_dag_imports_without_errors(dagbag: Any) -> None:
    assert dagbag.import_errors == {}
    assert {"cg4ctr_nightly", "cg4ctr_bootstrap", "cg4ctr_reward"} <= set(dagbag.dag_ids)


def test_nightly_shape(dagbag: Any) -> None:
    dag = dagbag.dags["cg4ctr_nightly"]
    assert dag.max_active_runs == 1
    assert dag.catchup is False
    down = {t.task_id: set(t.downstream_task_ids) for t in dag.tasks}
    chain = [
        "previous_run_finished",
        "round_info",
        "ingest",
        "reward_due",
        "train_reward",
        "saliency",
        "prompts",
        "generate",
        "merge_candidates",
        "inspect",
        "merge_inspection",
        "caption",
        "score",
        "select",
        "choose_training",
    ]
    for upstream, downstream in zip(chain, chain[1:], strict=False):
        assert downstream in down[upstream], f"{upstream} -> {downstream} missing"
    assert down["choose_training"] == {"train_lora", "train_prompt", "online"}
    assert "online" in down["train_lora"] and "online" in down["train_prompt"]
    assert down["online"] == {"version"} and down["version"] == {"report"}
    tasks = {t.task_id: t for t in dag.tasks}
    assert tasks["generate"].pool == "gpu" and tasks["generate"].queue == "gpu"
    assert tasks["inspect"].pool == "gpu" and tasks["inspect"].queue == "gpu"
    assert "inspect" in down["inspect_shards"]
    assert tasks["train_lora"].queue == "gpu"
    assert tasks["version"].pool == "dvc"
    assert "saliency" in down["saliency_shards"] and "generate" in down["generate_shards"]
    wait = tasks["previous_run_finished"]
    assert wait.mode == "reschedule" and not wait.upstream_task_ids
    for task in dag.tasks:
        assert task.retries >= 1, task.task_id
    assert tasks["online"].trigger_rule == "none_failed_min_one_success"


def test_bootstrap_and_reward_shapes(dagbag: Any) -> None:
    boot = dagbag.dags["cg4ctr_bootstrap"]
    assert boot.schedule is None or boot.timetable.summary in ("None", "")
    order = [
        "ingest",
        "caption_creatives",
        "train_reward",
        "train_prompt",
        "label_availability",
        "train_inspector",
        "baseline",
        "version",
    ]
    down = {t.task_id: set(t.downstream_task_ids) for t in boot.tasks}
    for upstream, downstream in zip(order, order[1:], strict=False):
        assert down[upstream] == {downstream}
    reward = dagbag.dags["cg4ctr_reward"]
    assert {t.task_id for t in reward.tasks} == {"ingest", "train_reward", "eval_reward"}


def test_parsing_imports_no_heavy_library(tiny_world: Path, tmp_path: Path) -> None:
    probe = (
        "import sys, json\n"
        f"sys.path.insert(0, {str(DAGS)!r})\n"
        "from airflow.dag_processing.dagbag import DagBag\n"
        f"bag = DagBag(dag_folder={str(DAGS)!r})\n"
        "heavy = [m for m in ('torch', 'diffusers', 'transformers', 'timm', 'peft',\n"
        "         'great_expectations', 'dvc') if m in sys.modules]\n"
        "print(json.dumps({'errors': list(bag.import_errors), 'heavy': heavy}))\n"
    )
    env = {
        **os.environ,
        "AIRFLOW_HOME": str(tmp_path),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "CG4CTR_WORKSPACE": str(tiny_world),
    }
    out = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"errors": [], "heavy": []}
