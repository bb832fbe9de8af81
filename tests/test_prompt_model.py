"""Prompt model units: Eq 8, soft-label normalisation, query encoding, save/load, selection."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from cg4ctr_tasks.errors import UserError
from cg4ctr_tasks.prompts.features import UNSEEN, encode_fields, encode_token_sets
from cg4ctr_tasks.prompts.model import PromptModel, PromptModelConfig
from cg4ctr_tasks.prompts.select import choose_tokens, exploration_draws
from cg4ctr_tasks.prompts.train import eq8_loss, normalise_scores
from cg4ctr_tasks.prompts.vocab import load_vocab

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VALUES = {
    "user_group": ["g0", "g1"],
    "item_id": ["item-0000", "item-0001"],
    "category": ["ball", "cup"],
    "device": ["ios", "web"],
    "hour": [str(h) for h in range(24)],
}


def _model(seed: int = 0) -> PromptModel:
    torch.manual_seed(seed)
    config = PromptModelConfig(
        field_values=VALUES,
        tokens=list(load_vocab().tokens),
        embed_dim=8,
        layers=1,
        heads=2,
        hidden=16,
    )
    return PromptModel(config)


def test_eq8_loss_matches_a_hand_computed_value() -> None:
    # z = 0: sigmoid 0.5; z = 2: sigmoid 0.8807971.
    # hard CE = (-log 0.5 - log(1 - 0.8807971)) / 2 = (0.6931472 + 2.1269280) / 2 = 1.4100376
    # soft CE = (-log 0.5 - log 0.8807971) / 2       = (0.6931472 + 0.1269280) / 2 = 0.4100376
    # Eq 8 with lambda_p = 0.1: 0.9 * 1.4100376 + 0.1 * 0.4100376 = 1.3100376
    logits = torch.tensor([0.0, 2.0])
    hard = torch.tensor([1.0, 0.0])
    soft = torch.tensor([0.5, 1.0])
    assert float(eq8_loss(logits, hard, soft, 0.1)) == pytest.approx(1.3100376, abs=1e-6)
    assert float(eq8_loss(logits, hard, soft, 0.0)) == pytest.approx(1.4100376, abs=1e-6)
    assert float(eq8_loss(logits, hard, soft, 1.0)) == pytest.approx(0.4100376, abs=1e-6)
    assert math.isclose(-math.log(1 - 1 / (1 + math.exp(-2))), 2.1269280, rel_tol=1e-6)


def test_soft_labels_are_min_max_within_each_item_and_group() -> None:
    frame = pd.DataFrame(
        {
            "item_id": ["a", "a", "a", "a", "b", "b"],
            "user_group": ["g0", "g0", "g0", "g1", "g0", "g0"],
            "score": [0.02, 0.04, 0.03, 0.5, 0.07, 0.07],
        }
    )
    soft = normalise_scores(frame).tolist()
    assert soft == pytest.approx([0.0, 1.0, 0.5, 0.5, 0.5, 0.5])


def test_unseen_and_absent_query_values_use_the_unseen_bucket() -> None:
    frame = pd.DataFrame(
        {
            "user_group": ["g1", "new-group", None],
            "item_id": ["item-0001", "item-9999", "item-0000"],
            "category": ["cup", "cup", "sofa"],
            "hour": [3, 3.0, float("nan")],
        }
    )
    encoded = encode_fields(frame, VALUES)
    assert encoded[0].tolist() == [2, 2, 2, UNSEEN, 4]
    assert encoded[1].tolist() == [UNSEEN, UNSEEN, 2, UNSEEN, 4]
    assert encoded[2].tolist() == [UNSEEN, 1, UNSEEN, UNSEEN, UNSEEN]


def test_token_sets_encode_as_sets_and_drop_unknown_words() -> None:
    tokens = ["red", "blue", "soft"]
    encoded = encode_token_sets([["soft", "red", "red"], ["glitter"], ["blue"]], tokens)
    assert encoded.tolist() == [[1, 3], [0, 0], [2, 0]]


def test_predictions_are_finite_for_unseen_queries_and_order_free() -> None:
    model = _model()
    queries = pd.DataFrame(
        {
            "user_group": ["g0", "zz", "g1"],
            "item_id": ["item-0000", "never-seen", "item-0001"],
            "category": ["ball", "unknown", "cup"],
            "device": ["ios", "smart-fridge", None],
            "hour": [5, 99, None],
        }
    )
    sets = [["red", "soft", "plain"], ["glitter"], []]
    ctr = model.predict_ctr(queries, sets)
    assert np.isfinite(ctr).all() and ((ctr > 0) & (ctr < 1)).all()
    shuffled = model.predict_ctr(queries.iloc[:1], [["plain", "red", "soft"]])
    assert shuffled[0] == pytest.approx(ctr[0], abs=1e-6)


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    model = _model(seed=3)
    target = tmp_path / "models" / "prompt" / "round-000"
    model.save_pretrained(str(target))
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "model.safetensors"]
    loaded = PromptModel.from_pretrained(str(target))
    queries = pd.DataFrame({"user_group": ["g0"], "item_id": ["item-0001"]})
    assert loaded.predict_ctr(queries, [["blue", "dim"]]) == pytest.approx(
        model.predict_ctr(queries, [["blue", "dim"]])
    )
    with pytest.raises(UserError, match="no prompt model in"):
        PromptModel.from_pretrained(str(tmp_path / "missing"))


def _select(model: PromptModel, rate: float, round_id: int, size: int = 8) -> list[list[str]]:
    queries = pd.DataFrame(
        {"item_id": ["item-0000", "item-0001", "new-item"], "user_group": ["g0", "g1", "g9"]}
    )
    flags, draws = exploration_draws(7, round_id, queries, size, rate)
    caps = {"colour": 1, "light": 1, "texture": 1, "material": 2, "scene": 1, "style": 2}
    return choose_tokens(model, queries, load_vocab(), size, caps, flags, draws, 64).tokens


def test_selection_respects_kind_caps_and_is_deterministic() -> None:
    vocab = load_vocab()
    model = _model()
    for rate in (0.0, 1.0):
        first = _select(model, rate, round_id=1)
        assert first == _select(model, rate, round_id=1)
        for tokens in first:
            assert len(tokens) == len(set(tokens)) == 8
            kinds = [vocab.kind_of(t) for t in tokens]
            assert kinds.count("colour") == kinds.count("texture") == 1
            assert kinds.count("light") == kinds.count("scene") == 1
    explored = [_select(model, 1.0, round_id=r) for r in range(1, 6)]
    assert len({str(e) for e in explored}) > 1  # exploration draws change with the round


def test_selection_stops_when_caps_leave_no_token() -> None:
    model = _model()
    queries = pd.DataFrame({"item_id": ["item-0000"], "user_group": ["g0"]})
    flags, draws = exploration_draws(0, 1, queries, 4, 0.0)
    caps = {kind: 0 for kind in ("light", "texture", "material", "scene", "style")}
    caps["colour"] = 1
    chosen = choose_tokens(model, queries, load_vocab(), 4, caps, flags, draws, 64)
    assert len(chosen.tokens[0]) == 1
    with pytest.raises(UserError, match="unknown kinds"):
        choose_tokens(model, queries, load_vocab(), 4, {"smell": 1}, flags, draws, 64)
