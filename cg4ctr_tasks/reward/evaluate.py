"""Held-out evaluation of the reward model (`cg4ctr eval-reward`): Eq 18-21 on the test split.

The test split (by item) is read here and nowhere in training. In the simulated world the
same uplift is also computed on the oracle's true CTR; that is evaluation code, the only place
besides tests allowed to read the world's ground truth.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from cg4ctr_tasks.errors import UserError
from cg4ctr_tasks.params import RewardParams
from cg4ctr_tasks.reward import metrics
from cg4ctr_tasks.reward.data import build_reward_data
from cg4ctr_tasks.reward.score import load_reward, predict
from cg4ctr_tasks.workspace import Workspace

MAX_K = 5


def oracle_ctr(ws: Workspace, rows: pd.DataFrame, by_group: bool) -> np.ndarray | None:
    """True CTR per row (its group's, or the mean over groups); None outside the sim world."""
    if not (ws.sim / "oracle.json").exists():
        return None
    from cg4ctr_tasks.sim.world import true_ctr_table

    images = rows[["item_id", "image_uri"]].drop_duplicates("image_uri")
    truth = true_ctr_table(ws, images)  # every group, one image read each
    if by_group:
        keyed = truth.set_index(["image_uri", "user_group"])["true_ctr"]
        keys = pd.MultiIndex.from_arrays([rows["image_uri"], rows["user_group"].astype(str)])
        return keyed.reindex(keys).to_numpy()
    mean = truth.groupby("image_uri")["true_ctr"].mean()
    return mean.reindex(rows["image_uri"]).to_numpy()


def ranking_sums(
    rows: pd.DataFrame, scores: np.ndarray, truth: np.ndarray | None
) -> dict[str, metrics.TopKSums]:
    """One ranker's top-k sums on logged clicks and, in the simulated world, on true CTR."""
    lists, creatives = rows["list_id"], rows["creative_id"]
    clicks, impressions = rows["clicks"].to_numpy(), rows["impressions"].to_numpy()
    sums = {"logged": metrics.topk_sums(lists, creatives, scores, clicks, impressions, MAX_K)}
    if truth is not None:
        sums["oracle"] = metrics.true_ctr_sums(lists, creatives, scores, truth, MAX_K)
    return sums


def evaluate_scores(
    ws: Workspace,
    rows: pd.DataFrame,
    scores: np.ndarray,
    truth: np.ndarray | None,
    by_group: bool,
    params: RewardParams,
    with_mse: bool = True,
) -> tuple[dict[str, Any], dict[str, metrics.TopKSums]]:
    """Uplift top-1..5 (fractions) with bootstrap 95 % intervals, MSE, and oracle uplift
    (``truth``: :func:`oracle_ctr`, read once per split), and the sums they came from."""
    sums = ranking_sums(rows, scores, truth)
    point = metrics.uplift_from_sums(sums["logged"])
    low, high = metrics.bootstrap_interval(sums["logged"], params.bootstrap_samples, ws.params.seed)
    out: dict[str, Any] = {f"top{k}": float(point[k - 1]) for k in range(1, MAX_K + 1)}
    out["ci95"] = {f"top{k}": [float(low[k - 1]), float(high[k - 1])] for k in range(1, MAX_K + 1)}
    raw_ctr = (rows["clicks"] / rows["impressions"]).to_numpy()
    out["mse"] = metrics.list_mse(rows["list_id"], raw_ctr, scores) if with_mse else None
    if "oracle" in sums:
        true_uplift = metrics.uplift_from_sums(sums["oracle"])
        out["oracle"] = {f"top{k}": float(true_uplift[k - 1]) for k in range(1, MAX_K + 1)}
    out.update(
        {
            "split": "test",
            "lists": int(rows["list_id"].nunique()),
            "lists_by": "item,user_group" if by_group else "item",
            "creatives": int(len(rows)),
            "min_impressions": params.min_impressions,
            "base_ctr": float(rows["clicks"].sum() / rows["impressions"].sum()),
            "bootstrap_samples": params.bootstrap_samples,
        }
    )
    return out, sums


def held_out_rows(ws: Workspace, params: RewardParams) -> tuple[pd.DataFrame, bool]:
    data = build_reward_data(ws, params)
    return data.split("test"), data.by_group


def eval_reward(
    ws: Workspace, model_dir: str | None = None, params: RewardParams | None = None
) -> dict[str, Any]:
    """Score the held-out items with the trained model and compute the paper's metrics."""
    params = params or ws.params.reward
    model, encoders, folder = load_reward(ws, model_dir)
    by_group = bool(model.config.user_groups)
    rows, _ = held_out_rows(ws, params.model_copy(update={"user_group_token": by_group}))
    if rows.empty:
        raise UserError("the test split is empty: add items or raise reward.test_fraction")
    scores = predict(model, encoders, rows, params.batch_size)
    truth = oracle_ctr(ws, rows, by_group)
    figures, _ = evaluate_scores(ws, rows, scores, truth, by_group, params)
    return {**figures, "model_dir": folder}
