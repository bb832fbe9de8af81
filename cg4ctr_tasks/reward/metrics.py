"""The paper's offline metrics (Eq 18-21), with deterministic ties and bootstrap intervals.

A "list" is the unit the ranking is made within: an item (the paper), or an (item, user group)
pair when the reward model has the user-group token. Every function takes flat per-creative
arrays plus a list label, so the same code serves logged clicks and the simulator's true CTR.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from cg4ctr_tasks.errors import UserError


def rank_within_lists(lists: pd.Series, creative_ids: pd.Series, scores: np.ndarray) -> np.ndarray:
    """0-based rank of each row within its list: highest score first, ties by creative id."""
    frame = pd.DataFrame(
        {"list": lists.to_numpy(), "creative": creative_ids.astype(str).to_numpy(), "s": -scores}
    )
    order = frame.sort_values(["list", "s", "creative"], kind="mergesort").index.to_numpy()
    ranks = np.empty(len(frame), dtype=np.int64)
    ranks[order] = frame.loc[order].groupby("list", sort=False).cumcount().to_numpy()
    return ranks


@dataclass(frozen=True)
class TopKSums:
    """Per-list sums of clicks and impressions over each list's top-k (k = 1..K) and all rows."""

    clicks: np.ndarray  # (lists, K)
    impressions: np.ndarray  # (lists, K)
    clicks_all: np.ndarray  # (lists,)
    impressions_all: np.ndarray  # (lists,)


def topk_sums(
    lists: pd.Series,
    creative_ids: pd.Series,
    scores: np.ndarray,
    clicks: np.ndarray,
    impressions: np.ndarray,
    max_k: int,
) -> TopKSums:
    """Eq 19/20 numerators and denominators per list; a list shorter than k uses all its rows."""
    if len(lists) == 0:
        raise UserError("no creatives to evaluate")
    ranks = rank_within_lists(lists, creative_ids, np.asarray(scores, dtype=np.float64))
    codes, _ = pd.factorize(lists, sort=True)
    n = int(codes.max()) + 1
    clicks = np.asarray(clicks, dtype=np.float64)
    impressions = np.asarray(impressions, dtype=np.float64)
    top_c = np.zeros((n, max_k))
    top_i = np.zeros((n, max_k))
    for k in range(1, max_k + 1):
        chosen = ranks < k
        top_c[:, k - 1] = np.bincount(codes[chosen], clicks[chosen], minlength=n)
        top_i[:, k - 1] = np.bincount(codes[chosen], impressions[chosen], minlength=n)
    return TopKSums(
        clicks=top_c,
        impressions=top_i,
        clicks_all=np.bincount(codes, clicks, minlength=n),
        impressions_all=np.bincount(codes, impressions, minlength=n),
    )


def uplift_from_sums(sums: TopKSums, weights: np.ndarray | None = None) -> np.ndarray:
    """Eq 18: pooled top-k CTR over the pooled CTR of all creatives, minus 1, for k = 1..K.

    ``weights`` (a count per list) lets the bootstrap reuse the sums without re-ranking.
    """
    w = np.ones(len(sums.clicks_all)) if weights is None else np.asarray(weights, np.float64)
    base = (w @ sums.clicks_all) / (w @ sums.impressions_all)
    if base <= 0:
        raise UserError("the evaluation set has no clicks: uplift is undefined")
    topk = (w @ sums.clicks) / (w @ sums.impressions)
    return np.asarray(topk / base - 1.0)


def uplift_at_k(
    lists: pd.Series,
    creative_ids: pd.Series,
    scores: np.ndarray,
    clicks: np.ndarray,
    impressions: np.ndarray,
    max_k: int = 5,
) -> np.ndarray:
    """uplift_1..uplift_K (Eq 18-20) as fractions."""
    return uplift_from_sums(topk_sums(lists, creative_ids, scores, clicks, impressions, max_k))


def _resampled_uplift(sums: TopKSums, counts: np.ndarray) -> np.ndarray:
    """uplift_k for each row of list counts (bootstrap draws), shape (draws, K)."""
    base = (counts @ sums.clicks_all) / np.maximum(counts @ sums.impressions_all, 1e-12)
    topk = (counts @ sums.clicks) / np.maximum(counts @ sums.impressions, 1e-12)
    return np.asarray(topk / np.maximum(base, 1e-12)[:, None] - 1.0)


def _list_counts(n: int, samples: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.multinomial(n, np.full(n, 1.0 / n), size=samples).astype(np.float64)


def _percentiles(draws: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
    tail = (1.0 - level) / 2.0
    return np.quantile(draws, tail, axis=0), np.quantile(draws, 1.0 - tail, axis=0)


def bootstrap_interval(
    sums: TopKSums, samples: int, seed: int, level: float = 0.95
) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval of uplift_k from resampling whole lists with replacement."""
    if samples == 0:
        point = uplift_from_sums(sums)
        return point, point
    counts = _list_counts(len(sums.clicks_all), samples, seed)
    return _percentiles(_resampled_uplift(sums, counts), level)


def paired_difference(
    a: TopKSums, b: TopKSums, samples: int, seed: int, level: float = 0.95
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """uplift_k(a) - uplift_k(b) for two rankers of the same lists, with a percentile interval
    from resampling the lists once for both: the noise they share (which lists happen to be
    easy) cancels, so a gap too small for two separate intervals can still be told from 0."""
    if len(a.clicks_all) != len(b.clicks_all) or not np.array_equal(a.clicks_all, b.clicks_all):
        raise UserError("a paired comparison needs both rankers scored on the same lists")
    point = uplift_from_sums(a) - uplift_from_sums(b)
    if samples == 0:
        return point, point, point
    counts = _list_counts(len(a.clicks_all), samples, seed)
    low, high = _percentiles(_resampled_uplift(a, counts) - _resampled_uplift(b, counts), level)
    return point, low, high


def concat_sums(parts: list[TopKSums]) -> TopKSums:
    """The lists of several evaluation sets as one (e.g. pooled over world seeds)."""
    return TopKSums(
        clicks=np.concatenate([p.clicks for p in parts]),
        impressions=np.concatenate([p.impressions for p in parts]),
        clicks_all=np.concatenate([p.clicks_all for p in parts]),
        impressions_all=np.concatenate([p.impressions_all for p in parts]),
    )


def list_mse(lists: pd.Series, truth: np.ndarray, predicted: np.ndarray) -> float:
    """Eq 21: the mean over lists of the within-list mean squared error."""
    frame = pd.DataFrame(
        {"list": lists.to_numpy(), "e": (np.asarray(truth) - np.asarray(predicted)) ** 2}
    )
    return float(frame.groupby("list", sort=False)["e"].mean().mean())


def true_ctr_sums(
    lists: pd.Series,
    creative_ids: pd.Series,
    scores: np.ndarray,
    true_ctr: np.ndarray,
    max_k: int = 5,
) -> TopKSums:
    """Eq 19/20 sums with the simulator's true CTR as clicks and one impression per creative.

    Their uplift (:func:`uplift_from_sums`) is the mean true CTR of each list's top-k over that
    of all its creatives: the uplift if the kept creatives were shown to the same traffic.
    Evaluation only (the oracle rule).
    """
    ones = np.ones(len(lists))
    return topk_sums(lists, creative_ids, scores, np.asarray(true_ctr), ones, max_k)
