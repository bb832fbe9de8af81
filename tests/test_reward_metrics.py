"""Eq 14-21 against hand-computed cases: ties, single-creative lists, padding, weights."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from cg4ctr_tasks.errors import UserError
from cg4ctr_tasks.reward import metrics
from cg4ctr_tasks.reward.data import fit_beta_prior, split_of
from cg4ctr_tasks.reward.train import Lists, reward_loss


def _case() -> pd.DataFrame:
    # list A: a1 and a2 tie on score (a1 wins by id); list B has a single creative.
    return pd.DataFrame(
        {
            "list": ["A", "A", "A", "B"],
            "creative": ["a1", "a2", "a3", "b1"],
            "score": [0.9, 0.9, 0.1, 0.2],
            "clicks": [5, 1, 2, 3],
            "impressions": [100, 50, 50, 100],
        }
    )


def _uplift(frame: pd.DataFrame) -> np.ndarray:
    return metrics.uplift_at_k(
        frame["list"],
        frame["creative"],
        frame["score"].to_numpy(),
        frame["clicks"].to_numpy(),
        frame["impressions"].to_numpy(),
        max_k=4,
    )


def test_uplift_matches_hand_computation_with_ties_and_single_creative_lists() -> None:
    base = 11 / 300
    expected = [(8 / 200) / base - 1, (9 / 250) / base - 1, 0.0, 0.0]  # k >= list length: all
    assert _uplift(_case()) == pytest.approx(expected)
    assert expected[0] == pytest.approx(1 / 11)


def test_ties_are_broken_by_creative_id_whatever_the_row_order() -> None:
    frame = _case()
    for seed in range(5):
        shuffled = frame.sample(frac=1.0, random_state=seed).reset_index(drop=True)
        assert _uplift(shuffled) == pytest.approx(_uplift(frame))
    renamed = frame.assign(creative=["a2", "a1", "a3", "b1"])  # now the 1-click creative wins
    assert _uplift(renamed)[0] == pytest.approx((4 / 150) / (11 / 300) - 1)


def test_rank_within_lists() -> None:
    frame = _case()
    ranks = metrics.rank_within_lists(frame["list"], frame["creative"], frame["score"].to_numpy())
    assert ranks.tolist() == [0, 1, 2, 0]


def test_list_mse_is_the_mean_over_lists_of_within_list_means() -> None:
    lists = pd.Series(["A", "A", "A", "B"])
    truth = np.array([0.05, 0.02, 0.04, 0.03])
    pred = np.array([0.06, 0.02, 0.01, 0.05])
    expected = ((1e-4 + 0 + 9e-4) / 3 + 4e-4) / 2
    assert metrics.list_mse(lists, truth, pred) == pytest.approx(expected)


def test_uplift_on_true_ctr_uses_equal_traffic() -> None:
    frame = _case()
    true_ctr = np.array([0.06, 0.02, 0.04, 0.03])
    sums = metrics.true_ctr_sums(
        frame["list"], frame["creative"], frame["score"].to_numpy(), true_ctr, max_k=1
    )
    got = metrics.uplift_from_sums(sums)
    assert got[0] == pytest.approx(((0.06 + 0.03) / 2) / (0.15 / 4) - 1)


def _noisy_lists(n: int, rng: np.random.Generator) -> pd.DataFrame:
    """n lists of 3 creatives with 50-199 impressions and 5 % Bernoulli clicks."""
    frame = pd.DataFrame(
        {
            "list": np.repeat(np.arange(n), 3).astype(str),
            "creative": np.tile(["x", "y", "z"], n),
            "impressions": rng.integers(50, 200, 3 * n),
        }
    )
    frame["clicks"] = rng.binomial(frame["impressions"], 0.05)
    return frame


def _sums(frame: pd.DataFrame, scores: np.ndarray, max_k: int = 2) -> metrics.TopKSums:
    return metrics.topk_sums(
        frame["list"],
        frame["creative"],
        scores,
        frame["clicks"].to_numpy(),
        frame["impressions"].to_numpy(),
        max_k,
    )


def test_bootstrap_interval_is_deterministic_and_brackets_the_estimate() -> None:
    rng = np.random.default_rng(0)
    frame = _noisy_lists(60, rng)
    scores = (frame["clicks"] / frame["impressions"]).to_numpy() + rng.normal(0, 0.01, 180)
    sums = _sums(frame, scores, max_k=3)
    point = metrics.uplift_from_sums(sums)
    low, high = metrics.bootstrap_interval(sums, 300, seed=1)
    again = metrics.bootstrap_interval(sums, 300, seed=1)
    assert np.array_equal(low, again[0]) and np.array_equal(high, again[1])
    assert np.all(low[:2] < point[:2]) and np.all(point[:2] < high[:2])
    assert low[2] == pytest.approx(0.0) and high[2] == pytest.approx(0.0)  # top-3 = everything


def test_paired_difference_cancels_shared_noise() -> None:
    frame = _noisy_lists(80, np.random.default_rng(2))
    ctr = (frame["clicks"] / frame["impressions"]).to_numpy()
    rng = np.random.default_rng(3)
    good = _sums(frame, ctr + rng.normal(0, 0.002, len(frame)))
    worse = _sums(frame, ctr + rng.normal(0, 0.02, len(frame)))
    point, low, high = metrics.paired_difference(good, worse, 400, seed=1)
    separate = metrics.uplift_from_sums(good) - metrics.uplift_from_sums(worse)
    assert np.allclose(point, separate)
    assert low[0] <= point[0] <= high[0]
    # the same lists resampled for both: a gap smaller than either interval's width is resolved
    own_low, own_high = metrics.bootstrap_interval(good, 400, seed=1)
    assert low[0] > 0 and high[0] - low[0] < own_high[0] - own_low[0]
    same, same_low, same_high = metrics.paired_difference(good, good, 100, seed=1)
    assert np.all(same == 0) and np.all(same_low == 0) and np.all(same_high == 0)
    with pytest.raises(UserError, match="same lists"):
        metrics.paired_difference(good, _sums(_noisy_lists(81, rng), np.zeros(243)), 10, 1)
    pooled = metrics.concat_sums([good, good])
    assert np.allclose(metrics.uplift_from_sums(pooled), metrics.uplift_from_sums(good))
    assert len(pooled.clicks_all) == 160


def test_no_clicks_is_a_user_error() -> None:
    frame = _case().assign(clicks=0)
    with pytest.raises(UserError, match="no clicks"):
        _uplift(frame)


def _loss_inputs() -> tuple[torch.Tensor, ...]:
    scores = torch.tensor([[0.0, math.log(2.0)], [0.5, 0.0]])
    target = torch.tensor([[0.1, 0.3], [0.2, 0.0]])
    impressions = torch.tensor([[10.0, 30.0], [60.0, 0.0]])
    mask = torch.tensor([[True, True], [True, False]])
    return scores, target, impressions, mask


def test_reward_loss_matches_eq_14_to_17_by_hand() -> None:
    scores, target, impressions, mask = _loss_inputs()
    total, list_loss, point_loss = reward_loss(scores, target, impressions, mask, lambda_r=0.1)
    list_1 = -(0.25 * math.log(1 / 3) + 0.75 * math.log(2 / 3))  # single-creative list: 0
    point_1 = 0.1**2 + (0.3 - math.log(2.0)) ** 2
    assert float(list_loss) == pytest.approx(0.4 * list_1)
    assert float(point_loss) == pytest.approx(0.4 * point_1 + 0.6 * 0.3**2)
    assert float(total) == pytest.approx(0.9 * float(list_loss) + 0.1 * float(point_loss))
    only_list, _, _ = reward_loss(scores, target, impressions, mask, lambda_r=0.0)
    only_point, _, _ = reward_loss(scores, target, impressions, mask, lambda_r=1.0)
    assert float(only_list) == pytest.approx(float(list_loss))
    assert float(only_point) == pytest.approx(float(point_loss))


def test_padding_never_reaches_the_loss_or_its_gradient() -> None:
    scores, target, impressions, mask = _loss_inputs()
    garbage = scores.clone()
    garbage[1, 1] = 100.0  # a padded position with a huge score, target and weight
    target_g, imps_g = target.clone(), impressions.clone()
    target_g[1, 1], imps_g[1, 1] = 5.0, 1000.0
    garbage.requires_grad_(True)
    total_g, _, _ = reward_loss(garbage, target_g, imps_g, mask, lambda_r=0.1)
    total, _, _ = reward_loss(scores, target, impressions, mask, lambda_r=0.1)
    assert float(total_g.detach()) == pytest.approx(float(total))
    total_g.backward()
    assert garbage.grad is not None and torch.isfinite(garbage.grad).all()
    assert float(garbage.grad[1, 1]) == 0.0


def test_temperature_divides_the_listwise_logits_only() -> None:
    scores, target, impressions, mask = _loss_inputs()
    _, list_t, point_t = reward_loss(scores, target, impressions, mask, 0.1, temperature=0.5)
    _, list_2, point_2 = reward_loss(scores * 2, target, impressions, mask, 0.1)
    _, _, point_1 = reward_loss(scores, target, impressions, mask, 0.1)
    assert float(list_t) == pytest.approx(float(list_2))
    assert float(point_t) == pytest.approx(float(point_1))


def test_a_ctr_link_changes_the_pointwise_term_only() -> None:
    scores, target, impressions, mask = _loss_inputs()
    linked = torch.sigmoid(scores)
    _, list_s, point_s = reward_loss(scores, target, impressions, mask, 0.1, ctr=linked)
    _, list_1, _ = reward_loss(scores, target, impressions, mask, 0.1)
    assert float(list_s) == pytest.approx(float(list_1))
    point_1 = (0.1 - 0.5) ** 2 + (0.3 - 2 / 3) ** 2  # sigmoid(0) = 1/2, sigmoid(log 2) = 2/3
    assert float(point_s) == pytest.approx(0.4 * point_1 + 0.6 * (0.2 - float(linked[1, 0])) ** 2)


def test_batches_hold_whole_lists_within_the_batch_size() -> None:
    rows = pd.DataFrame(
        {
            "list_id": ["a"] * 3 + ["b"] * 1 + ["c"] * 5 + ["d"] * 2,
            "target": 0.1,
            "impressions": 10,
        }
    )
    lists = Lists.from_rows(rows, None)
    assert lists.sizes.tolist() == [3, 1, 5, 2]
    batches = lists.batches(6, np.random.default_rng(0))
    assert sorted(np.concatenate(batches).tolist()) == [0, 1, 2, 3]
    assert all(lists.sizes[b].sum() <= 6 for b in batches)
    index, mask = lists.padded(np.array([1, 2]))
    assert index.shape == (2, 5) and mask.sum() == 6
    assert index[mask].tolist() == [3, 4, 5, 6, 7, 8]
    assert [len(b) for b in lists.batches(2, None)] == [1, 1, 1, 1]  # a long list stays whole


def test_beta_prior_by_method_of_moments() -> None:
    clicks = np.array([10, 20, 30])
    impressions = np.array([100, 100, 100])
    alpha, beta = fit_beta_prior(clicks, impressions)
    # mean 0.2, variance 0.02/3: alpha + beta = 0.16 / (0.02/3) - 1 = 23
    assert alpha == pytest.approx(0.2 * 23) and beta == pytest.approx(0.8 * 23)
    with pytest.raises(UserError, match="Beta prior"):
        fit_beta_prior(np.array([1, 1]), np.array([10, 10]))


def test_split_is_by_item_and_stable() -> None:
    items = [f"item-{i:04d}" for i in range(2000)]
    splits = [split_of(i, 0, 0.15, 0.15) for i in items]
    assert splits == [split_of(i, 0, 0.15, 0.15) for i in items]
    share = {s: splits.count(s) / len(items) for s in ("train", "val", "test")}
    assert share["test"] == pytest.approx(0.15, abs=0.03)
    assert share["val"] == pytest.approx(0.15, abs=0.03)
    assert splits != [split_of(i, 1, 0.15, 0.15) for i in items]
