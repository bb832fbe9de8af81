"""The online step of a simulated round: show the kept creatives, log the clicks, measure.

The kept creatives of each (item, user group) are displayed with epsilon-greedy exploration
(cold-start order by the reward score, the platform's own prior), clicks come from the oracle and
are written as the round's day of raw logs, which the next round ingests: the loop closes through
real files. The round's true CTR (evaluation, oracle) is recorded in ``metrics.json``.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np
import pandas as pd

from cg4ctr_tasks import storage
from cg4ctr_tasks.errors import UserError
from cg4ctr_tasks.rounds import RoundInfo
from cg4ctr_tasks.sim.clicks import ClickHistory, simulate_day
from cg4ctr_tasks.sim.world import GroundTruth, true_ctr_table
from cg4ctr_tasks.workspace import Workspace


def _history(ws: Workspace, before: str) -> ClickHistory:
    history = ClickHistory()
    fs, root = storage.url_to_fs(ws.raw_logs)
    for path in sorted(fs.glob(f"{root}/dt=*/*.csv")):
        day = path.split("dt=")[-1].split("/")[0]
        if day < before:
            with fs.open(path, "rb") as handle:
                history.add(pd.read_csv(handle))
    return history


def _round_rng(seed: int, round_id: int) -> np.random.Generator:
    digest = hashlib.sha256(f"online:{seed}:{round_id}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def baseline_metrics(ws: Workspace) -> dict[str, Any]:
    """Round 0: the true CTR of the initial creatives (what ran before any self-cycling)."""
    creatives = storage.read_parquet(ws.creatives_table)
    table = true_ctr_table(ws, creatives.assign(user_group=None))
    metrics = _summarise(table, round_id=0)
    storage.write_text(
        storage.join(ws.round_dir(0), "metrics.json"), json.dumps(metrics, indent=2, sort_keys=True)
    )
    return metrics


def _summarise(table: pd.DataFrame, round_id: int) -> dict[str, Any]:
    per_group = table.groupby("user_group")["true_ctr"].mean()
    return {
        "round": round_id,
        "true_ctr": float(table["true_ctr"].mean()),
        "true_ctr_per_group": {str(g): float(v) for g, v in per_group.items()},
    }


def online_round(ws: Workspace, info: RoundInfo, force: bool = False) -> dict[str, Any]:
    """Display round ``info.id``'s kept creatives for its day; write logs and metrics."""
    round_dir = ws.round_dir(info.id)
    metrics_path = storage.join(round_dir, "metrics.json")
    logs_path = storage.join(ws.raw_log_partition(info.date), "part-0000.csv")
    if not force and storage.exists(metrics_path) and storage.exists(logs_path):
        loaded: dict[str, Any] = json.loads(storage.read_bytes(metrics_path))
        return loaded
    part_path = storage.join(round_dir, "partition.parquet")
    if not storage.exists(part_path):
        raise UserError(f"round {info.id} has no partition: run `cg4ctr select --round {info.id}`")
    kept = storage.read_parquet(part_path)
    kept = kept[kept["kept"]]
    candidates = storage.read_parquet(storage.join(round_dir, "candidates.parquet"))
    shown = kept.merge(candidates[["candidate_id", "image_uri"]], on="candidate_id", how="left")
    if shown["image_uri"].isna().any():
        raise UserError(f"round {info.id}: kept candidates missing from candidates.parquet")

    table = true_ctr_table(ws, shown[["item_id", "image_uri", "user_group"]])
    table["creative_id"] = shown["candidate_id"].to_numpy()
    true_ctr = {
        (str(c), str(g)): float(v)
        for c, g, v in table[["creative_id", "user_group", "true_ctr"]].itertuples(index=False)
    }
    truth = GroundTruth.load(ws)
    displayed = shown.rename(columns={"candidate_id": "creative_id", "score": "prior"})
    world = ws.params.world
    logs = simulate_day(
        truth.oracle,
        displayed[["item_id", "creative_id", "user_group", "prior"]],
        true_ctr,
        info.date,
        world.impressions_per_day,
        world.epsilon,
        _history(ws, info.date),
        _round_rng(ws.params.seed, info.id),
    )
    storage.write_text(logs_path, logs.to_csv(index=False))
    metrics = {
        **_summarise(table, info.id),
        "mode": info.mode,
        "date": info.date,
        "kept": int(len(shown)),
        "logged_impressions": int(logs["impressions"].sum()),
        "logged_ctr": float(logs["clicks"].sum() / max(int(logs["impressions"].sum()), 1)),
    }
    storage.write_text(metrics_path, json.dumps(metrics, indent=2, sort_keys=True))
    return metrics
