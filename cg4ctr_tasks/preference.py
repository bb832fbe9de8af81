"""Reward-guided preference optimisation of the generator (``lora.method: preference``).

CAIG's idea (a CTR reward model as the reward of a preference update of the generator) in the
form of Diffusion-DPO (Wallace et al., CVPR 2024): instead of fitting only the top-k G, the LoRA
learns from (winner in G, loser in B) pairs of the same item and user group, ranked by the reward
model, relative to a frozen reference (the previous round's generator).

Diffusion-DPO, Eq 14 of the paper, with the per-sample errors of one shared noise and timestep:

    L = -E log sigmoid(-beta/2 * [(e_w - e_ref_w) - (e_l - e_ref_l)]),
    e_x = ||eps - eps_theta(x_t, t)||^2,  e_ref_x = ||eps - eps_ref(x_t, t)||^2

The paper writes the scale as ``beta * T * omega(lambda_t)`` and separate noises for the two
images; its released trainer folds T and the weighting into ``beta``, applies the factor 1/2 and
shares one noise and timestep per pair (lower variance), as here (``lora.dpo_beta``). The
implicit reward margin is ``-(e_w - e_ref_w) + (e_l - e_ref_l)``: it is zero when the policy
equals the reference, so the loss starts at log 2.

Product-centric: the errors are means over the BACKGROUND latents only (each latent cell weighted
by its fraction of background pixels), because the product is pasted back pixel-exact after
generation; the update can only move the background.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from cg4ctr_tasks.errors import UserError
from cg4ctr_tasks.params import LoraParams
from cg4ctr_tasks.sim.train_generator import LatentSet

if TYPE_CHECKING:
    import torch

    from cg4ctr_tasks.train_lora import Objective

PAIR_COLUMNS = ["item_id", "user_group", "winner_id", "loser_id", "score_gap"]


def sample_pairs(partition: pd.DataFrame, lp: LoraParams, seed: int) -> pd.DataFrame:
    """(winner in G, loser in B) pairs within each (item, user group) list of a partition.

    Pairs whose reward scores differ by less than ``lora.min_score_gap`` are dropped (near-ties
    at the top-k boundary carry no preference); of the rest at most ``lora.max_pairs_per_list``
    per list are drawn without replacement, deterministically from ``seed``.
    """
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xD70]))
    kept = partition["kept"].astype(bool)
    winners = partition[kept][["item_id", "user_group", "candidate_id", "score"]]
    losers = partition[~kept][["item_id", "user_group", "candidate_id", "score"]]
    pairs = winners.merge(losers, on=["item_id", "user_group"], suffixes=("_w", "_l"))
    pairs["score_gap"] = pairs["score_w"] - pairs["score_l"]
    pairs = pairs[pairs["score_gap"] >= lp.min_score_gap]
    pairs = pairs.rename(columns={"candidate_id_w": "winner_id", "candidate_id_l": "loser_id"})
    pairs = pairs.sort_values(["item_id", "user_group", "winner_id", "loser_id"])
    chosen = []
    for _, group in pairs.groupby(["item_id", "user_group"], sort=True):
        take = min(len(group), lp.max_pairs_per_list)
        chosen.append(group.iloc[np.sort(rng.choice(len(group), take, replace=False))])
    if not chosen:
        return pd.DataFrame(columns=PAIR_COLUMNS)
    return pd.concat(chosen)[PAIR_COLUMNS].reset_index(drop=True)


def background_weights(product_masks: np.ndarray, latent_size: tuple[int, ...]) -> torch.Tensor:
    """Per latent cell, the fraction of its pixels that are background (0 = all product)."""
    import torch

    background = torch.from_numpy(~product_masks).float().unsqueeze(1)
    height, width = latent_size
    return torch.nn.functional.adaptive_avg_pool2d(background, (height, width))


def background_error(
    prediction: torch.Tensor, target: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """Per-sample ||target - prediction||^2 averaged over the background-weighted latent cells."""
    squared = (prediction.float() - target.float()).pow(2) * weights
    denominator = weights.sum(dim=(1, 2, 3)) * prediction.shape[1]
    return squared.sum(dim=(1, 2, 3)) / denominator.clamp_min(1e-8)


def dpo_loss(
    error_w: torch.Tensor,
    ref_error_w: torch.Tensor,
    error_l: torch.Tensor,
    ref_error_l: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Diffusion-DPO (see the module docstring): (mean loss, per-pair implicit reward margin)."""
    import torch

    margin = -((error_w - ref_error_w) - (error_l - ref_error_l))
    loss = -torch.nn.functional.logsigmoid(beta / 2 * margin).mean()
    return loss, margin


@dataclass(frozen=True)
class PairSet:
    """Frozen features of the paired candidates and, per pair, winner and loser rows."""

    data: LatentSet
    weights: torch.Tensor  # background weight per latent cell, per candidate
    winners: torch.Tensor
    losers: torch.Tensor


def reference_snapshot(unet: Any) -> dict[str, torch.Tensor]:
    """The LoRA weights as they are now: the frozen reference (the previous round's adapter,
    or a fresh zero-effect one, i.e. the base model) at no cost of a second UNet."""
    return {
        name: param.detach().clone()
        for name, param in unet.named_parameters()
        if param.requires_grad
    }


def preference_objective(unet: Any, noise_scheduler: Any, pairs: PairSet, beta: float) -> Objective:
    """The Diffusion-DPO loss over a batch of pair indices, against the reference snapshot."""
    import torch
    from torch.func import functional_call

    reference = reference_snapshot(unet)
    data = pairs.data

    def loss(idx: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        rows = torch.cat([pairs.winners[idx], pairs.losers[idx]])
        latents = data.latents[rows]
        # the same noise and timestep for the winner and the loser of a pair
        noise = torch.randn(latents[: len(idx)].shape, generator=generator, dtype=latents.dtype)
        steps = noise_scheduler.config.num_train_timesteps
        timesteps = torch.randint(steps, (len(idx),), generator=generator)
        noise = noise.repeat(2, 1, 1, 1).to(latents.device)
        timesteps = timesteps.repeat(2).to(latents.device)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        model_input = torch.cat([noisy, data.masks[rows], data.masked_latents[rows]], dim=1)
        text = data.text[rows]
        weights = pairs.weights[rows]
        error = background_error(
            unet(model_input, timesteps, encoder_hidden_states=text).sample, noise, weights
        )
        with torch.no_grad():
            ref_prediction = functional_call(
                unet, reference, (model_input, timesteps), {"encoder_hidden_states": text}
            ).sample
            ref_error = background_error(ref_prediction, noise, weights)
        error_w, error_l = error.chunk(2)
        ref_w, ref_l = ref_error.chunk(2)
        return dpo_loss(error_w, ref_w, error_l, ref_l, beta)[0]

    return loss


def pair_rows(pairs: pd.DataFrame) -> tuple[list[str], np.ndarray, np.ndarray]:
    """The distinct candidates of the pairs and each pair's (winner, loser) row in that list."""
    ids = sorted(set(pairs["winner_id"]) | set(pairs["loser_id"]))
    row = {candidate_id: i for i, candidate_id in enumerate(ids)}
    winners = np.array(pairs["winner_id"].map(row), dtype=np.int64)
    losers = np.array(pairs["loser_id"].map(row), dtype=np.int64)
    return ids, winners, losers


def require_pairs(pairs: pd.DataFrame, round_id: int) -> None:
    if pairs.empty:
        raise UserError(
            f"round {round_id}: no (kept, not kept) pairs of one item and user group with a "
            "score gap of at least lora.min_score_gap; nothing to prefer"
        )
