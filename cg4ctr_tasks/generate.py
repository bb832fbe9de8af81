"""Candidate generation (`cg4ctr generate --round N`): SD inpainting + LoRA, product pasted back.

For every item and user group, q candidates are inpainted around the product (mask = 1 - the
saliency mask) from that group's prompt, with a seed fixed by (round, item, group, index), and
the product's pixels are then copied back exactly: the model never repaints the product.

The same code path serves the world's own small pipeline (``generate.base_model: sim``) and a
real SD-inpainting checkpoint (a path or hub id). Work is cut into parts of
``generate.shard_size`` items (``cg4ctr_tasks.shards``); inside a part, candidates of several
items share a denoising batch of ``generate.batch_size`` images, so memory is bounded by the
batch and throughput does not depend on q. Finished batches of candidates are reused on a
re-run.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from cg4ctr_tasks import storage
from cg4ctr_tasks.assets import resolve_pretrained
from cg4ctr_tasks.errors import RejectedInput, UserError
from cg4ctr_tasks.params import GenerateParams
from cg4ctr_tasks.shards import Shard, run_parts
from cg4ctr_tasks.workspace import Workspace, round_name

CANDIDATE_COLUMNS = [
    "round",
    "item_id",
    "user_group",
    "candidate_id",
    "image_uri",
    "prompt",
    "seed",
    "parent_creative_id",
]
SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "euler": "EulerDiscreteScheduler",
    "dpm": "DPMSolverMultistepScheduler",
    "lcm": "LCMScheduler",
}


@dataclass(frozen=True)
class GenerateSummary:
    round: int
    device: str
    lora: str | None
    candidates: int
    generated: int
    reused: int
    parts_total: int
    parts_written: int
    parts_skipped: int
    complete: bool
    skipped_items: list[dict[str, str]]
    seconds: float
    images_per_s: float

    def as_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


def candidate_seed(base_seed: int, round_id: int, item_id: str, group: str, index: int) -> int:
    """A seed fixed by (params seed, round, item, group, index): independent of batching."""
    key = f"{base_seed}/{round_id}/{item_id}/{group}/{index}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "big") >> 1


def make_candidate_id(item_id: str, round_id: int, group: str, index: int) -> str:
    """Readable ``<item>-rNNN-<group>-qII``; a long item id is replaced by its hash to fit."""
    suffix = f"-r{round_id:03d}-{group}-q{index:02d}"
    if len(item_id) + len(suffix) > 128:
        item_id = hashlib.sha256(item_id.encode()).hexdigest()[:32]
    return storage.safe_id(item_id + suffix, "candidate_id")


def load_pipeline(
    gp: GenerateParams,
    device: str | None = None,
    lora_dir: str | None = None,
    compile_unet: bool = False,
) -> Any:
    """The base inpainting pipeline (path, hub id or "sim"), the params' scheduler, the LoRA.

    On CUDA: half precision per ``generate.dtype``, channels-last UNet/VAE and, with
    ``compile_unet`` (inference only: the generate stage passes ``generate.compile``), a
    compiled UNet; attention runs on PyTorch SDPA (diffusers' default processor).
    On CPU everything stays float32 and eager.
    """
    import diffusers
    import torch
    from diffusers import StableDiffusionInpaintPipeline

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, gp.dtype) if device.startswith("cuda") else torch.float32
    reference = resolve_pretrained(gp.base_model, "sim-inpaint")
    try:
        pipe = StableDiffusionInpaintPipeline.from_pretrained(
            reference, dtype=dtype, safety_checker=None, requires_safety_checker=False
        )
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load the inpainting pipeline {reference!r}: {exc}") from None
    scheduler_class = getattr(diffusers, SCHEDULERS[gp.scheduler])
    pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config)
    if lora_dir is not None:
        pipe.load_lora_weights(storage.local_copy(lora_dir))
    pipe = pipe.to(device)
    if device.startswith("cuda"):
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
        if compile_unet:
            pipe.unet = torch.compile(pipe.unet)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def inpaint_batch(
    pipe: Any,
    sources: Sequence[np.ndarray],
    product_masks: Sequence[np.ndarray],
    prompts: Sequence[str],
    seeds: Sequence[int],
    steps: int,
    guidance_scale: float,
) -> np.ndarray:
    """Inpaint one batch (same image size) around the products; paste the products back.

    Returns uint8 (B, H, W, 3). Each image's noise comes from its own CPU generator, so an
    image does not depend on the batch it shares or on the device.
    """
    import torch
    from PIL import Image

    height, width = sources[0].shape[:2]
    result = pipe(
        prompt=list(prompts),
        image=[Image.fromarray(s) for s in sources],
        mask_image=[Image.fromarray(((~m) * 255).astype(np.uint8)) for m in product_masks],
        height=height,
        width=width,
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        generator=[torch.Generator().manual_seed(int(s)) for s in seeds],
        output_type="np",
    )
    images = np.clip(np.round(np.asarray(result.images) * 255.0), 0, 255).astype(np.uint8)
    masks = np.stack(product_masks)[..., None]
    return np.where(masks, np.stack(sources), images)


def _saliency_masks(ws: Workspace, round_id: int, item_ids: list[str]) -> dict[str, str]:
    """item_id -> mask url for items whose saliency succeeded in this round."""
    folder = storage.join(ws.round_dir(round_id), "saliency")
    table_path = storage.join(folder, "saliency.parquet")
    if not storage.exists(table_path) and not storage.exists(storage.join(folder, "masks")):
        raise UserError(
            f"round {round_id} has no saliency masks: run `cg4ctr saliency --round {round_id}`"
        )
    usable = set(item_ids)
    if storage.exists(table_path):
        table = storage.read_parquet(table_path, columns=["item_id", "status"])
        usable &= set(table.loc[table["status"] == "ok", "item_id"].astype(str))
    return {
        item_id: storage.join(folder, "masks", f"{item_id}.png")
        for item_id in item_ids
        if item_id in usable
    }


def _prompts(ws: Workspace, round_id: int) -> dict[tuple[str, str], str]:
    """(item, group) -> prompt from the round's prompt selection, when it has run."""
    path = storage.join(ws.round_dir(round_id), "prompts.parquet")
    if not storage.exists(path):
        return {}
    table = storage.read_parquet(path, columns=["item_id", "user_group", "prompt"])
    return {
        (str(r.item_id), str(r.user_group)): str(r.prompt) for r in table.itertuples(index=False)
    }


def plan_candidates(ws: Workspace, round_id: int) -> tuple[pd.DataFrame, list[dict[str, str]]]:
    """Every candidate row of the round, in (item, group, index) order, + items left out."""
    from cg4ctr_tasks.prompts.features import user_groups

    gp = ws.params.generate
    if not storage.exists(ws.items_table):
        raise UserError(f"{ws.items_table} not found: run `cg4ctr sim init` or ingest items first")
    items = storage.read_parquet(ws.items_table, columns=["item_id"])
    skipped: list[dict[str, str]] = []
    item_ids = []
    for raw in items["item_id"].astype(str):
        try:
            item_ids.append(storage.safe_id(raw, "item_id"))
        except RejectedInput as exc:
            skipped.append({"item_id": raw[:128], "error": str(exc)})
    masks = _saliency_masks(ws, round_id, item_ids)
    skipped += [
        {"item_id": i, "error": "no usable saliency mask"} for i in item_ids if i not in masks
    ]
    groups = user_groups(ws)
    selected = _prompts(ws, round_id)
    default = " ".join(gp.default_prompt)
    folder = storage.join("rounds", round_name(round_id), "candidates")
    rows = []
    for item_id in (i for i in item_ids if i in masks):
        for group in groups:
            prompt = selected.get((item_id, group), default)
            for index in range(gp.candidates):
                candidate_id = make_candidate_id(item_id, round_id, group, index)
                rows.append(
                    {
                        "round": round_id,
                        "item_id": item_id,
                        "user_group": group,
                        "candidate_id": candidate_id,
                        "image_uri": storage.join(folder, f"{candidate_id}.png"),
                        "prompt": prompt,
                        "seed": candidate_seed(ws.params.seed, round_id, item_id, group, index),
                        # Candidates are inpainted from the item's product image, not from a
                        # creative, so they have no parent creative.
                        "parent_creative_id": "",
                    }
                )
    return pd.DataFrame(rows, columns=CANDIDATE_COLUMNS), skipped


def _valid_image(url: str, size: tuple[int, int], ws: Workspace) -> bool:
    if not storage.exists(url):
        return False
    limits = ws.params.storage
    try:
        image = storage.read_image(url, limits.max_image_bytes, limits.max_image_pixels)
    except RejectedInput:
        return False
    return image.size == size


def _batches(rows: pd.DataFrame, sizes: dict[str, tuple[int, int]], limit: int) -> Iterator[Any]:
    """Consecutive runs of at most ``limit`` rows whose items share an image size."""
    start = 0
    for end in range(1, len(rows) + 1):
        if (
            end == len(rows)
            or end - start == limit
            or sizes[rows.iloc[end]["item_id"]] != sizes[rows.iloc[start]["item_id"]]
        ):
            yield rows.iloc[start:end]
            start = end


class Inpainter:
    """The round's pipeline (loaded on first use) and the batch loop that ``generate`` and
    ``inspect`` (recurrent generation) share: rows' images are inpainted and written."""

    def __init__(self, ws: Workspace, round_id: int, item_ids: list[str]) -> None:
        self.ws, self.gp, self.limits = ws, ws.params.generate, ws.params.storage
        items = storage.read_parquet(ws.items_table, columns=["item_id", "image_uri"])
        self.item_uri = dict(
            zip(items["item_id"].astype(str), items["image_uri"].astype(str), strict=True)
        )
        self.masks = _saliency_masks(ws, round_id, item_ids)
        self.lora_dir = ws.latest_model_dir("lora", round_id)
        self.pipe: Any = None
        self.generated = self.reused = 0

    @property
    def device(self) -> str:
        return "none" if self.pipe is None else str(self.pipe.device)

    def source(self, item_id: str) -> tuple[np.ndarray, np.ndarray]:
        """The product image and its binary saliency mask."""
        image = storage.read_image_array(
            self.ws.resolve(self.item_uri[item_id]),
            self.limits.max_image_bytes,
            self.limits.max_image_pixels,
        )
        mask = storage.read_image_array(
            self.masks[item_id], self.limits.max_image_bytes, self.limits.max_image_pixels
        )
        if mask.shape != image.shape:
            raise UserError(f"{self.masks[item_id]}: mask size {mask.shape} != image {image.shape}")
        return image, mask[..., 0] > 127

    def run(self, rows: pd.DataFrame, force: bool) -> None:
        """Inpaint ``rows`` (item_id, prompt, seed, image_uri) and write their images.

        Batches are cut from all of ``rows``, never from the images still missing: a batch's
        composition changes its pixels by float rounding, so a resumed run must rebuild the
        same batches to end with the same images. A batch whose images all exist is reused
        unless ``force``.
        """
        gp = self.gp
        sources = {item_id: self.source(item_id) for item_id in rows["item_id"].unique()}
        sizes = {k: (v[0].shape[1], v[0].shape[0]) for k, v in sources.items()}
        for batch in _batches(rows, sizes, gp.batch_size):
            if not force and all(
                _valid_image(self.ws.resolve(uri), sizes[item], self.ws)
                for uri, item in zip(batch["image_uri"], batch["item_id"], strict=True)
            ):
                self.reused += len(batch)
                continue
            if self.pipe is None:
                self.pipe = load_pipeline(gp, lora_dir=self.lora_dir, compile_unet=gp.compile)
            images = inpaint_batch(
                self.pipe,
                [sources[i][0] for i in batch["item_id"]],
                [sources[i][1] for i in batch["item_id"]],
                batch["prompt"].tolist(),
                batch["seed"].tolist(),
                gp.steps,
                gp.guidance_scale,
            )
            for uri, image in zip(batch["image_uri"], images, strict=True):
                storage.write_png(self.ws.resolve(uri), image)
            self.generated += len(batch)


def generate_round(
    ws: Workspace, round_id: int, shard: Shard | None = None, force: bool = False
) -> GenerateSummary:
    """Generate (this shard's share of) the round's candidates; merge when all parts exist."""
    started = time.perf_counter()
    gp = ws.params.generate
    plan, skipped = plan_candidates(ws, round_id)
    if plan.empty:
        raise UserError(f"round {round_id}: nothing to generate (no items with saliency masks)")
    inpainter = Inpainter(ws, round_id, sorted(set(plan["item_id"])))

    def process(rows: range) -> pd.DataFrame:
        part = plan.iloc[rows.start : rows.stop]
        inpainter.run(part, force)
        return part.reset_index(drop=True)

    run = run_parts(
        plan["candidate_id"].tolist(),
        "candidate_id",
        gp.shard_size * max(1, len(plan) // plan["item_id"].nunique()),
        storage.join(ws.round_dir(round_id), "parts", "candidates"),
        shard or Shard(0, 1),
        force,
        process,
        f"generate round {round_id}",
    )
    if run.merged is not None:
        storage.write_parquet(
            storage.join(ws.round_dir(round_id), "candidates.parquet"), run.merged
        )
    seconds = time.perf_counter() - started
    return GenerateSummary(
        round=round_id,
        device=inpainter.device,
        lora=inpainter.lora_dir,
        candidates=len(plan),
        generated=inpainter.generated,
        reused=inpainter.reused,
        parts_total=run.parts_total,
        parts_written=run.parts_written,
        parts_skipped=run.parts_skipped,
        complete=run.merged is not None,
        skipped_items=skipped,
        seconds=round(seconds, 2),
        images_per_s=round(inpainter.generated / seconds, 3) if seconds > 0 else 0.0,
    )
