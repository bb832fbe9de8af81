"""Odd rounds (`cg4ctr train-lora --round N`): a LoRA on the UNet trained on the round's positives.

The paper's generator update (Eq 3/4): the noise-prediction MSE of SD inpainting, where the UNet
sees ``concat(z_t, mask, VAE(masked image))``, on the top-k candidates G of the round. Only the
LoRA matrices on the attention projections (to_q, to_k, to_v, to_out.0) train; the base model
stays byte-identical. The adapter continues from the latest earlier round's adapter, so the
generator keeps what previous rounds taught it, and is saved in the diffusers/peft LoRA format
(safetensors) that ``pipe.load_lora_weights(dir)`` reads.

The optimisation loop (:func:`fit_adapter`) takes the objective as a function of a batch of
example indices, so the preference objective (Diffusion-DPO over (G, B) pairs,
``lora.method: preference``, :mod:`cg4ctr_tasks.preference`) plugs in without a second loop;
its examples are pairs, and ``examples`` in the summary counts them.
"""

from __future__ import annotations

import json
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from cg4ctr_tasks import storage
from cg4ctr_tasks.errors import UserError
from cg4ctr_tasks.generate import load_pipeline
from cg4ctr_tasks.params import LoraParams
from cg4ctr_tasks.sim.train_generator import (
    LatentSet,
    encode_inpaint_set,
    inpainting_loss,
)
from cg4ctr_tasks.workspace import Workspace

if TYPE_CHECKING:
    import torch

TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0"]
WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
SUMMARY_NAME = "train_summary.json"  # written last: marks a complete adapter folder

# An objective maps (example indices, random generator) to a scalar loss.
Objective = Callable[["torch.Tensor", "torch.Generator"], "torch.Tensor"]


@dataclass(frozen=True)
class LoraSummary:
    round: int
    method: str
    out: str
    examples: int
    steps: int
    first_loss: float
    last_loss: float
    continued_from: str | None
    reused: bool
    seconds: float

    def as_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


def add_lora(unet: Any, lp: LoraParams, previous: str | None = None) -> None:
    """Freeze the UNet and attach a trainable LoRA (fresh, or the previous round's adapter)."""
    from peft import LoraConfig

    unet.requires_grad_(False)
    if previous is None:
        config = LoraConfig(
            r=lp.rank,
            lora_alpha=lp.alpha,  # type: ignore[arg-type]  # peft accepts a float scale
            init_lora_weights="gaussian",
            target_modules=TARGET_MODULES,
        )
        unet.add_adapter(config)
    else:
        unet.load_lora_adapter(
            storage.local_copy(previous),
            prefix="unet",
            adapter_name="default",
            weight_name=WEIGHTS_NAME,
        )
    for name, param in unet.named_parameters():
        if "lora_" in name:
            param.requires_grad_(True)


def sft_objective(unet: Any, noise_scheduler: object, data: LatentSet) -> Objective:
    """Eq 3/4 on the examples (top-k positives G): the inpainting noise-prediction MSE."""

    def loss(idx: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return inpainting_loss(
            unet,
            noise_scheduler,
            data.latents[idx],
            data.masks[idx],
            data.masked_latents[idx],
            data.text[idx],
            generator,
        )

    return loss


def fit_adapter(
    unet: Any,
    objective: Objective,
    examples: int,
    lp: LoraParams,
    seed: int,
) -> list[float]:
    """AdamW on the trainable (LoRA) parameters for ``lora.steps`` batches; returns the losses."""
    import torch

    trainable = [p for p in unet.parameters() if p.requires_grad]
    if not trainable:
        raise RuntimeError("the UNet has no trainable LoRA parameters")
    optimizer = torch.optim.AdamW(trainable, lr=lp.learning_rate)
    generator = torch.Generator().manual_seed(seed)
    unet.train()
    losses = []
    for _ in range(lp.steps):
        idx = torch.randint(examples, (min(lp.batch_size, examples),), generator=generator)
        loss = objective(idx, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        losses.append(loss.item())
    unet.eval()
    return losses


def _adapter_metadata(unet: Any) -> dict[str, Any]:
    """peft's adapter config with ``target_modules`` sorted: peft keeps it as a set, whose
    order (hash-seeded per process) would make the same weights' file differ byte for byte."""
    meta: dict[str, Any] = unet.peft_config["default"].to_dict()
    if isinstance(meta.get("target_modules"), set | list | tuple):
        meta["target_modules"] = sorted(meta["target_modules"])
    return meta


def save_adapter(unet: Any, folder: str) -> None:
    """The diffusers LoRA file (peft keys, ``unet.`` prefix) + its adapter config metadata."""
    from diffusers import StableDiffusionInpaintPipeline
    from peft.utils import get_peft_model_state_dict

    StableDiffusionInpaintPipeline.save_lora_weights(
        folder,
        unet_lora_layers=get_peft_model_state_dict(unet),
        unet_lora_adapter_metadata=_adapter_metadata(unet),
        weight_name=WEIGHTS_NAME,
    )
    _canonical_header(Path(folder) / WEIGHTS_NAME)


def _canonical_header(path: Path) -> None:
    """Rewrite the safetensors header with sorted keys, same length: safetensors writes the
    ``__metadata__`` map in hash order, so identical weights would differ byte for byte."""
    with open(path, "r+b") as handle:
        (size,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(size))
        text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")
        if len(text) <= size:  # the format allows trailing spaces in the header
            handle.seek(8)
            handle.write(text.ljust(size, b" "))


def read_round(ws: Workspace, round_id: int) -> pd.DataFrame:
    """The round's partition (item, group, score, kept) joined with its candidates' images."""
    round_dir = ws.round_dir(round_id)
    partition_path = storage.join(round_dir, "partition.parquet")
    candidates_path = storage.join(round_dir, "candidates.parquet")
    for path, stage in ((candidates_path, "generate"), (partition_path, "select")):
        if not storage.exists(path):
            raise UserError(f"{path} not found: run `cg4ctr {stage} --round {round_id}` first")
    partition = storage.read_parquet(
        partition_path, columns=["candidate_id", "item_id", "user_group", "score", "kept"]
    )
    candidates = storage.read_parquet(
        candidates_path, columns=["candidate_id", "image_uri", "prompt"]
    )
    return candidates.merge(partition, on="candidate_id")


def load_examples(
    ws: Workspace, round_id: int, rows: pd.DataFrame
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Images, product masks (the round's saliency masks) and prompts of candidate rows."""
    round_dir = ws.round_dir(round_id)
    limits = ws.params.storage
    masks: dict[str, np.ndarray] = {}
    images, product_masks = [], []
    for row in rows.itertuples(index=False):
        item_id = storage.safe_id(row.item_id, "item_id")
        if item_id not in masks:
            mask_url = storage.join(round_dir, "saliency", "masks", f"{item_id}.png")
            if not storage.exists(mask_url):
                raise UserError(f"{mask_url} not found: run `cg4ctr saliency --round {round_id}`")
            masks[item_id] = (
                storage.read_image_array(mask_url, limits.max_image_bytes, limits.max_image_pixels)[
                    ..., 0
                ]
                > 127
            )
        images.append(
            storage.read_image_array(
                ws.resolve(str(row.image_uri)), limits.max_image_bytes, limits.max_image_pixels
            )
        )
        product_masks.append(masks[item_id])
    return np.stack(images), np.stack(product_masks), rows["prompt"].astype(str).tolist()


def load_positives(ws: Workspace, round_id: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Images, product masks and prompts of the round's kept candidates G."""
    table = read_round(ws, round_id)
    kept = table[table["kept"].astype(bool)]
    if kept.empty:
        raise UserError(f"round {round_id}: no kept candidates to train the LoRA on")
    return load_examples(ws, round_id, kept)


def encode_examples(
    pipe: Any,
    images: np.ndarray,
    product_masks: np.ndarray,
    prompts: list[str],
    batch_size: int,
) -> LatentSet:
    """Frozen VAE and text features of the examples, on the pipeline's device."""
    return encode_inpaint_set(
        pipe.vae, pipe.text_encoder, pipe.tokenizer, images, product_masks, prompts, batch_size
    )


def train_lora(
    ws: Workspace, round_id: int, force: bool = False, method: str | None = None
) -> LoraSummary:
    """Train and save ``models/lora/round-NNN`` (skip if present).

    ``method`` (default ``lora.method``): ``sft`` fits the round's positives G (Eq 3/4);
    ``preference`` runs Diffusion-DPO on (G, B) pairs (:mod:`cg4ctr_tasks.preference`).
    """
    import torch
    from diffusers import DDPMScheduler

    from cg4ctr_tasks import preference

    started = time.perf_counter()
    lp = ws.params.lora
    method = method or lp.method
    if method not in ("sft", "preference"):
        raise UserError(f"unknown LoRA method {method!r}; use 'sft' or 'preference'")
    out = ws.model_dir("lora", round_id)
    summary_path = storage.join(out, SUMMARY_NAME)
    if not force and storage.exists(storage.join(out, WEIGHTS_NAME)):
        if storage.exists(summary_path):
            return LoraSummary(**{**json.loads(storage.read_bytes(summary_path)), "reused": True})
    previous = ws.latest_model_dir("lora", round_id)
    seed = ws.params.seed + round_id
    torch.manual_seed(seed)  # VAE latent sampling and peft's LoRA init draw from the global RNG
    pairs = None
    if method == "sft":
        images, product_masks, prompts = load_positives(ws, round_id)
    else:
        table = read_round(ws, round_id)
        pairs = preference.sample_pairs(table, lp, seed)
        preference.require_pairs(pairs, round_id)
        ids, winners, losers = preference.pair_rows(pairs)
        rows = table.set_index("candidate_id").loc[ids].reset_index()
        images, product_masks, prompts = load_examples(ws, round_id, rows)
    pipe = load_pipeline(ws.params.generate)
    if pipe.unet.dtype != torch.float32:  # LoRA trains in float32 even on a half-precision GPU
        pipe.unet.to(torch.float32)
    data = encode_examples(pipe, images, product_masks, prompts, lp.batch_size)
    data = LatentSet(
        *(t.float() for t in (data.latents, data.masks, data.masked_latents, data.text))
    )
    add_lora(pipe.unet, lp, previous)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    if pairs is None:
        objective = sft_objective(pipe.unet, noise_scheduler, data)
        examples = len(images)
    else:
        pair_set = preference.PairSet(
            data=data,
            weights=preference.background_weights(product_masks, data.latents.shape[-2:]).to(
                data.latents.device
            ),
            winners=torch.from_numpy(winners),
            losers=torch.from_numpy(losers),
        )
        objective = preference.preference_objective(
            pipe.unet, noise_scheduler, pair_set, lp.dpo_beta
        )
        examples = len(pairs)
    losses = fit_adapter(pipe.unet, objective, examples, lp, seed)
    summary = LoraSummary(
        round=round_id,
        method=method,
        out=out,
        examples=examples,
        steps=lp.steps,
        first_loss=float(np.mean(losses[: max(1, len(losses) // 10)])),
        last_loss=float(np.mean(losses[-max(1, len(losses) // 10) :])),
        continued_from=previous,
        reused=False,
        seconds=round(time.perf_counter() - started, 2),
    )
    with storage.staged_dir(out, last=SUMMARY_NAME) as tmp:
        _write_adapter(pipe.unet, str(tmp), summary)
    return summary


def _write_adapter(unet: Any, folder: str, summary: LoraSummary) -> None:
    save_adapter(unet, folder)
    doc = summary.as_dict()
    doc.pop("reused")
    storage.write_text(storage.join(folder, SUMMARY_NAME), json.dumps(doc, indent=2))
