"""The README's main job: a full self-cycling run on the embedded simulated world, CPU, offline.

It builds (or reuses) the world, bootstraps round 0 from the click history, runs the configured
rounds (resumable: re-run after an interruption and it continues) and returns the analogue of
the paper's online Table 1: the true CTR of what was shown with no self-cycling (round 0), after
half the rounds and after all of them, with the relative uplift, plus the HTML report's path.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from cg4ctr_tasks.cycle import run_cycle
from cg4ctr_tasks.report import metrics_table, write_report
from cg4ctr_tasks.sim.world import init_world
from cg4ctr_tasks.workspace import Workspace


def uplift_table(ws: Workspace, rounds: int) -> list[dict[str, Any]]:
    """Rows of Table 1: round 0, the middle round and the last round, uplift vs round 0."""
    true_ctr = metrics_table(ws).set_index("round")["true_ctr"].astype(float).to_dict()
    base = true_ctr[0]
    picks = sorted({0, max(1, rounds // 2), rounds})
    rows = []
    for round_id in picks:
        value = true_ctr[round_id]
        label = "no self-cycling" if round_id == 0 else f"after {round_id} round(s)"
        rows.append(
            {"round": round_id, "shown": label, "true_ctr": value, "uplift": value / base - 1.0}
        )
    return rows


def run_demo(ws: Workspace, seed: int, rounds: int, log: Callable[[str], None]) -> dict[str, Any]:
    summary = init_world(ws, seed)
    log(f"world: {summary.items} items, {summary.log_rows} log rows (reused: {summary.reused})")
    run_cycle(ws, rounds, log)
    report = write_report(ws)
    return {
        "workspace": str(ws.root),
        "seed": seed,
        "rounds": rounds,
        "table": uplift_table(ws, rounds),
        "report": report.path,
    }
