"""Top-k partition of a round's scored candidates into positives G and negatives B.

Per (item, user group) list, the k candidates with the highest reward score are kept (G) and the
rest are negatives (B): the paper keeps 5 of 10. Ties are broken by candidate id so the partition,
and everything trained on it, is deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from cg4ctr_tasks import storage
from cg4ctr_tasks.errors import UserError
from cg4ctr_tasks.workspace import Workspace

PARTITION_COLUMNS = ["candidate_id", "item_id", "user_group", "score", "rank", "kept"]


@dataclass(frozen=True)
class PartitionSummary:
    round: int
    lists: int
    candidates: int
    kept: int
    path: str

    def as_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


def partition(scores: pd.DataFrame, k: int) -> pd.DataFrame:
    """Rank each (item, group) list by score (desc), ties by candidate id; the top k are kept."""
    missing = {"candidate_id", "item_id", "user_group", "score"} - set(scores.columns)
    if missing:
        raise UserError(f"scores table lacks columns {sorted(missing)}")
    if scores["candidate_id"].duplicated().any():
        dup = scores.loc[scores["candidate_id"].duplicated(), "candidate_id"].iloc[0]
        raise UserError(f"scores table lists candidate {dup!r} twice")
    if scores["score"].isna().any():
        raise UserError("scores table has missing scores")
    ordered = scores.sort_values(
        ["item_id", "user_group", "score", "candidate_id"], ascending=[True, True, False, True]
    ).reset_index(drop=True)
    ordered["rank"] = ordered.groupby(["item_id", "user_group"]).cumcount() + 1
    ordered["kept"] = ordered["rank"] <= k
    return ordered[PARTITION_COLUMNS]


def select_round(ws: Workspace, round_id: int, force: bool = False) -> PartitionSummary:
    """Write ``partition.parquet`` for a round from its ``scores.parquet``."""
    round_dir = ws.round_dir(round_id)
    target = storage.join(round_dir, "partition.parquet")
    scores_path = storage.join(round_dir, "scores.parquet")
    if not storage.exists(scores_path):
        raise UserError(f"round {round_id} has no scores: run `cg4ctr score --round {round_id}`")
    if force or not storage.exists(target):
        scores = storage.read_parquet(scores_path)
        storage.write_parquet(target, partition(scores, ws.params.select.k))
    table = storage.read_parquet(target)
    return PartitionSummary(
        round=round_id,
        lists=int(table.groupby(["item_id", "user_group"]).ngroups),
        candidates=len(table),
        kept=int(table["kept"].sum()),
        path=target,
    )
