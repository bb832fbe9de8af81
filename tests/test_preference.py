from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from cg4ctr_tasks import preference, storage
from cg4ctr_tasks.cli import app
from cg4ctr_tasks.errors import UserError
from cg4ctr_tasks.generate import load_pipeline
from cg4ctr_tasks.params import LoraParams, load_params
from cg4ctr_tasks.train_lora import (
    WEIGHTS_NAME,
    add_lora,
    encode_examples,
    fit_adapter,
    load_examples,
    read_round,
    train_lora,
)
from cg4ctr_tasks.workspace import Workspace
from tests.fixtures_generate import ROUND_PARAMS, write_positives, write_round_inputs

runner = CliRunner()


def _lora_params(**update: object) -> LoraParams:
    return load_params(None).lora.model_copy(update=update)


def test_dpo_loss_equals_the_hand_computed_value() -> None:
    # pair 0: the policy fits the winner worse (+0.1) and the loser better (-0.3) than the
    # reference: margin -(0.1 - (-0.3)) = -0.4; pair 1: margin -(-0.2 - 0.1) = +0.3
    error_w, ref_w = torch.tensor([0.5, 0.1]), torch.tensor([0.4, 0.3])
    error_l, ref_l = torch.tensor([0.3, 0.6]), torch.tensor([0.6, 0.5])
    loss, margin = preference.dpo_loss(error_w, ref_w, error_l, ref_l, beta=2.0)
    assert torch.allclose(margin, torch.tensor([-0.4, 0.3]))
    # -log sigmoid(beta/2 * m) = log(1 + exp(-beta/2 * m)), beta/2 = 1
    expected = (math.log1p(math.exp(0.4)) + math.log1p(math.exp(-0.3))) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_background_error_is_a_weighted_mean_that_ignores_the_product() -> None:
    product = np.zeros((1, 16, 16), dtype=bool)
    product[0, :8, :8] = True  # one whole latent cell (factor 8)
    product[0, 8:, :4] = True  # half of another
    weights = preference.background_weights(product, (2, 2))
    assert weights[0, 0].tolist() == [[0.0, 1.0], [0.5, 1.0]]

    target = torch.zeros(1, 2, 2, 2)
    prediction = torch.ones(1, 2, 2, 2)
    prediction[:, :, 1, 1] = 3.0
    # (1*1 + 0.5*1 + 1*9) per channel over the weight sum 2.5, both channels alike
    assert preference.background_error(prediction, target, weights).item() == pytest.approx(
        10.5 / 2.5
    )
    moved = prediction.clone()
    moved[:, :, 0, 0] = 100.0  # the all-product cell
    assert torch.equal(
        preference.background_error(moved, target, weights),
        preference.background_error(prediction, target, weights),
    )


def _partition() -> pd.DataFrame:
    rows = []
    for item in ("a", "b"):
        for group in ("g0", "g1"):
            for k in range(4):
                rows.append(
                    {
                        "candidate_id": f"{item}-{group}-{k}",
                        "item_id": item,
                        "user_group": group,
                        "score": 1.0 - 0.1 * k,
                        "rank": k + 1,
                        "kept": k < 2,
                    }
                )
    return pd.DataFrame(rows)


def test_pairs_are_winner_loser_of_one_list_with_caps_gaps_and_a_seed() -> None:
    table = _partition()
    kept = dict(zip(table["candidate_id"], table["kept"], strict=True))
    everything = preference.sample_pairs(table, _lora_params(max_pairs_per_list=10), 0)
    assert len(everything) == 4 * 2 * 2  # 4 lists x |G| 2 x |B| 2
    assert everything["winner_id"].map(kept).all() and not everything["loser_id"].map(kept).any()
    same_list = everything.apply(
        lambda r: r.winner_id.rsplit("-", 1)[0] == r.loser_id.rsplit("-", 1)[0], axis=1
    )
    assert same_list.all()

    capped = preference.sample_pairs(table, _lora_params(max_pairs_per_list=3), 7)
    assert capped.groupby(["item_id", "user_group"]).size().tolist() == [3] * 4
    assert capped.equals(preference.sample_pairs(table, _lora_params(max_pairs_per_list=3), 7))

    # gaps are 0.1 (rank 2 vs 3), 0.2 or 0.3: a minimum of 0.25 keeps rank 1 vs rank 4 only
    wide = preference.sample_pairs(table, _lora_params(min_score_gap=0.25), 0)
    assert len(wide) == 4 and (wide["score_gap"] >= 0.25).all()
    assert preference.sample_pairs(table, _lora_params(min_score_gap=5.0), 0).empty


@pytest.fixture()
def paired(tmp_path: Path) -> Workspace:
    """8 candidates of 3 items in one user group, every other one kept: each item has pairs."""
    params = ROUND_PARAMS + "lora:\n  steps: 3\n  batch_size: 4\n  method: preference\n"
    ws = write_round_inputs(tmp_path / "ws", 1, 3, params)
    write_positives(ws, 1, 8)
    for name in ("candidates.parquet", "partition.parquet"):
        path = storage.join(ws.round_dir(1), name)
        table = storage.read_parquet(path)
        table["user_group"] = "g0"
        if "kept" in table:
            table["score"] = table["kept"].astype(float)  # the kept ones ranked higher
        storage.write_parquet(path, table)
    return ws


def _pair_objective(ws: Workspace, previous: str | None = None) -> tuple[object, object, int]:
    from diffusers import DDPMScheduler

    lp = ws.params.lora
    table = read_round(ws, 1)
    pairs = preference.sample_pairs(table, lp, 0)
    ids, winners, losers = preference.pair_rows(pairs)
    rows = table.set_index("candidate_id").loc[ids].reset_index()
    images, masks, prompts = load_examples(ws, 1, rows)
    pipe = load_pipeline(ws.params.generate, "cpu")
    data = encode_examples(pipe, images, masks, prompts, 8)
    add_lora(pipe.unet, lp, previous)
    pair_set = preference.PairSet(
        data,
        preference.background_weights(masks, data.latents.shape[-2:]),
        torch.from_numpy(winners),
        torch.from_numpy(losers),
    )
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    objective = preference.preference_objective(pipe.unet, scheduler, pair_set, lp.dpo_beta)
    return pipe, objective, len(pairs)


def _fixed_loss(objective: object, count: int) -> float:
    with torch.no_grad():
        return objective(torch.arange(count), torch.Generator().manual_seed(0)).item()  # type: ignore[operator]


def test_reference_equal_to_policy_gives_log2_and_only_lora_weights_train(
    paired: Workspace, tmp_path: Path
) -> None:
    pipe, objective, count = _pair_objective(paired)
    assert count == 2 + 2 + 1  # item 0: 2 kept x 1 not, item 1: 1 x 2, item 2: 1 x 1
    assert _fixed_loss(objective, count) == pytest.approx(math.log(2), abs=1e-6)

    base = {k: v.clone() for k, v in pipe.unet.state_dict().items() if "lora_" not in k}
    lp = paired.params.lora.model_copy(update={"learning_rate": 1e-2, "steps": 6})
    batch = torch.arange(count)
    fit_adapter(
        pipe.unet, lambda idx, gen: objective(batch, torch.Generator().manual_seed(0)), count, lp, 0
    )
    assert _fixed_loss(objective, count) < math.log(2)  # winners now fitted better than losers
    after = pipe.unet.state_dict()
    assert all(torch.equal(after[k], v) for k, v in base.items())  # base weights untouched
    assert any(not torch.all(after[k] == 0) for k in after if "lora_B" in k)

    # A continued adapter is its own reference: the margin starts at zero again.
    from cg4ctr_tasks.train_lora import save_adapter

    save_adapter(pipe.unet, str(tmp_path / "previous"))
    _, continued, _ = _pair_objective(paired, str(tmp_path / "previous"))
    assert _fixed_loss(continued, count) == pytest.approx(math.log(2), abs=1e-6)


def test_train_lora_preference_from_the_cli_and_params(paired: Workspace) -> None:
    ws = paired
    result = runner.invoke(
        app, ["train-lora", "--round", "1", "-w", str(ws.root), "--method", "preference", "--json"]
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output[result.output.index("{") :])
    assert summary["method"] == "preference" and summary["examples"] == 5
    assert summary["first_loss"] == pytest.approx(math.log(2), abs=0.05)
    out = Path(ws.model_dir("lora", 1))
    assert (out / WEIGHTS_NAME).exists()
    assert json.loads((out / "train_summary.json").read_text())["method"] == "preference"
    assert train_lora(ws, 1).reused
    # params alone select it (the cycle runs `train-lora --round N`)
    assert train_lora(ws, 1, force=True).method == "preference"
    assert train_lora(ws, 1, force=True, method="sft").method == "sft"

    with pytest.raises(UserError, match="unknown LoRA method"):
        train_lora(ws, 1, method="x")


def test_preference_without_pairs_is_a_user_error(paired: Workspace) -> None:
    path = storage.join(paired.round_dir(1), "partition.parquet")
    table = storage.read_parquet(path)
    table["kept"] = True
    storage.write_parquet(path, table)
    with pytest.raises(UserError, match="no \\(kept, not kept\\) pairs"):
        train_lora(paired, 1)
    assert not storage.exists(paired.model_dir("lora", 1))
