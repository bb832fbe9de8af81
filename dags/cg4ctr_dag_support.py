"""Shared pieces of the cg4ctr DAGs: the CLI call, defaults from params.yaml, assets, pools.

Parsing stays light: this module imports Airflow's SDK and our params model (pydantic + yaml)
only; torch, diffusers and transformers load inside the `cg4ctr` processes the tasks start.
Workers find the workspace in ``$CG4CTR_WORKSPACE`` and the CLI as ``$CG4CTR_BIN`` (default
``cg4ctr`` on PATH), so one DAG file serves a laptop and a Celery/Kubernetes deployment.
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from airflow.sdk import Asset

from cg4ctr_tasks.params import Params, load_params

GPU_POOL = "gpu"  # generation slots; size it to the GPU workers
GPU_QUEUE = "gpu"  # Celery queue served by GPU workers
DVC_POOL = "dvc"  # one slot: DVC's repo lock does not wait

CLI = '"${CG4CTR_BIN:-cg4ctr}"'

ROUND_ASSETS = {
    "logs": Asset(name="cg4ctr_ctr_tables", uri="cg4ctr://workspace/data/ctr"),
    "candidates": Asset(name="cg4ctr_candidates", uri="cg4ctr://workspace/data/rounds/candidates"),
    "partition": Asset(name="cg4ctr_partition", uri="cg4ctr://workspace/data/rounds/partition"),
    "lora": Asset(name="cg4ctr_lora", uri="cg4ctr://workspace/models/lora"),
    "prompt": Asset(name="cg4ctr_prompt_model", uri="cg4ctr://workspace/models/prompt"),
    "reward": Asset(name="cg4ctr_reward_model", uri="cg4ctr://workspace/models/reward"),
    "round": Asset(name="cg4ctr_round", uri="cg4ctr://workspace/data/rounds"),
}


def workspace_dir() -> Path:
    return Path(os.environ.get("CG4CTR_WORKSPACE", ".")).resolve()


def params() -> Params:
    return load_params(workspace_dir() / "params.yaml")


def cli(*args: str) -> str:
    """A bash command running one `cg4ctr` stage; the workspace comes from the environment."""
    return " ".join([CLI, *args])


def dag_settings(p: Params, doc: str | None) -> dict[str, Any]:
    """What every cg4ctr DAG shares: one run at a time, retries with back-off, no catchup."""
    return {
        "start_date": datetime.fromisoformat(p.airflow.start_date),
        "catchup": False,
        "max_active_runs": 1,
        "tags": ["cg4ctr"],
        "doc_md": doc,
        "default_args": {
            "owner": "cg4ctr",
            "retries": p.airflow.retries,
            "retry_delay": timedelta(seconds=p.airflow.retry_delay_s),
            "retry_exponential_backoff": True,
            "max_retry_delay": timedelta(hours=1),
        },
    }
