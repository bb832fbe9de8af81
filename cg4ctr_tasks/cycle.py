"""The self-cycle as a list of `cg4ctr` commands: one definition for every orchestrator.

`cg4ctr cycle` runs these commands in order, `dvc.yaml` names the same commands as stages and
the Airflow DAG runs them as tasks. Each command is idempotent; the cycle also records a done
marker per finished stage, so a killed run (even ``kill -9``) re-run with the same arguments
resumes at the first unfinished stage and ends with the same outputs as an uninterrupted run.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cg4ctr_tasks import storage
from cg4ctr_tasks.errors import UserError
from cg4ctr_tasks.rounds import RoundInfo, round_info
from cg4ctr_tasks.workspace import Workspace


@dataclass(frozen=True)
class Stage:
    name: str
    args: list[str]  # `cg4ctr` arguments, without --workspace


def bootstrap_stages(ws: Workspace, version: bool = True) -> list[Stage]:
    """Round 0: learn from the click history before any generation (and, when the inspector
    is on, train it on a labelled set of generations)."""
    stages = [
        Stage("ingest", ["ingest", "--pending"]),
        Stage("caption", ["caption", "--creatives"]),
        Stage("train-reward", ["train-reward"]),
        Stage("train-prompt", ["train-prompt", "--bootstrap"]),
    ]
    if ws.params.inspector.enabled:
        # The inspector's labelled set: annotators in production, the world's labeller here.
        if (ws.sim / "oracle.json").exists():
            stages.append(Stage("label-availability", ["sim", "label-availability"]))
        stages.append(Stage("train-inspector", ["train-inspector"]))
    if (ws.sim / "oracle.json").exists():
        stages.append(Stage("evaluate", ["sim", "baseline"]))
    if version and ws.params.versioning.enabled:
        stages.append(Stage("version", ["version", "--round", "0"]))
    return stages


def round_stages(ws: Workspace, info: RoundInfo, version: bool = True) -> list[Stage]:
    """Round N: ingest, (reward refresh), saliency, prompts, generate, (inspect), caption,
    score, select, train (odd: LoRA, even: prompt model), online (simulated world), version,
    report."""
    n = str(info.id)
    every = ws.params.cycle.reward_refresh_every
    stages = [Stage("ingest", ["ingest", "--pending"])]
    if ws.params.cycle.train and every and info.id % every == 0:
        stages.append(Stage("train-reward", ["train-reward", "--round", n]))
    stages += [
        Stage("saliency", ["saliency", "--round", n]),
        Stage("prompts", ["prompts", "--round", n]),
        Stage("generate", ["generate", "--round", n]),
    ]
    if ws.params.inspector.enabled:
        stages.append(Stage("inspect", ["inspect", "--round", n]))
    stages += [
        Stage("caption", ["caption", "--round", n]),
        Stage("score", ["score", "--round", n]),
        Stage("select", ["select", "--round", n]),
    ]
    if ws.params.cycle.train:
        command = "train-lora" if info.mode == "lora" else "train-prompt"
        stages.append(Stage(command, [command, "--round", n]))
    if (ws.sim / "oracle.json").exists():
        stages.append(Stage("online", ["sim", "online", "--round", n]))
    if version and ws.params.versioning.enabled:
        stages.append(Stage("version", ["version", "--round", n]))
    stages.append(Stage("report", ["report"]))
    return stages


def shard_specs(ws: Workspace, shard_size: int) -> list[str]:
    """``i/n`` shard arguments over the item table, at most ``airflow.max_shards`` of them."""
    import math

    import pyarrow.parquet as pq

    fs, path = storage.url_to_fs(ws.items_table)
    with fs.open(path, "rb") as handle:
        items = pq.ParquetFile(handle).metadata.num_rows
    count = max(1, min(ws.params.airflow.max_shards, math.ceil(items / shard_size)))
    return [f"{i}/{count}" for i in range(count)]


def _marker(ws: Workspace, round_id: int, stage: str) -> str:
    return storage.join(ws.round_dir(round_id), ".stages", f"{stage}.done")


def cg4ctr_command() -> list[str]:
    """How to call the CLI from here: the installed script beside this Python, else -m."""
    script = Path(sys.executable).with_name("cg4ctr")
    return [str(script)] if script.exists() else [sys.executable, "-m", "cg4ctr_tasks.cli"]


def run_stage(ws: Workspace, round_id: int, stage: Stage, log: Callable[[str], None]) -> bool:
    """Run one stage unless its marker says it finished; returns whether it ran."""
    marker = _marker(ws, round_id, stage.name)
    if storage.exists(marker):
        return False
    log(f"round {round_id}: {stage.name} ...")
    argv = [*cg4ctr_command(), *stage.args, "--workspace", str(ws.root)]
    proc = subprocess.run(argv, env={**os.environ}, check=False)
    if proc.returncode != 0:
        raise UserError(f"round {round_id}: stage {stage.name} failed ({' '.join(stage.args)})")
    storage.write_text(marker, "done\n")
    return True


def run_round(
    ws: Workspace, round_id: int, log: Callable[[str], None], version: bool = True
) -> None:
    """Run one round's stages (round 0: the bootstrap); finished stages are skipped."""
    if round_id == 0:
        stages = bootstrap_stages(ws, version)
    else:
        stages = round_stages(ws, round_info(ws, round_id), version)
    for stage in stages:
        run_stage(ws, round_id, stage, log)


def run_cycle(ws: Workspace, rounds: int, log: Callable[[str], None]) -> list[int]:
    """Bootstrap (once) and run rounds 1..``rounds``; resumable stage by stage."""
    for round_id in range(rounds + 1):
        run_round(ws, round_id, log)
    return list(range(1, rounds + 1))
