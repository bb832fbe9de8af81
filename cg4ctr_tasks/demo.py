"""The README's main job: a full run on the embedded simulated world, CPU, offline.

It grows with the pipeline: today it builds (or reuses) the world and measures the true CTR of
the initial creatives, the round-0 baseline of every later uplift.
"""

from __future__ import annotations

from typing import Any

from cg4ctr_tasks import storage
from cg4ctr_tasks.sim.world import evaluate_creatives, init_world
from cg4ctr_tasks.workspace import Workspace


def run_demo(ws: Workspace, seed: int) -> dict[str, Any]:
    summary = init_world(ws, seed)
    baseline = evaluate_creatives(ws, storage.read_parquet(ws.creatives_table))
    return {
        "workspace": str(ws.root),
        "world": summary.as_dict(),
        "round_0_true_ctr": baseline["overall"],
        "round_0_true_ctr_per_group": baseline["per_group"],
    }
