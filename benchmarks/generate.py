"""Images/s of the generation stage vs a plain per-image diffusers loop, in the same run.

The baseline is what a first implementation would write: one ``StableDiffusionInpaintPipeline``
call per candidate (same model, scheduler, step count, seeds, paste-back and PNG writes). The
stage batches candidates across items (``generate.batch_size``) and, on CUDA, runs half
precision with channels-last. Output equality is reported as the largest pixel difference.

    .venv/bin/python -m benchmarks.generate                 # CPU, the world's sim model
    .venv/bin/python -m benchmarks.generate --device cuda   # + a random SD-1.5-sized model, 512px
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from cg4ctr_tasks.workspace import Workspace  # noqa: E402


def _world(root: Path, items: int, size: int, params: str) -> Workspace:
    from cg4ctr_tasks.saliency import run_saliency
    from cg4ctr_tasks.sim.world import init_world

    root.mkdir(parents=True)
    (root / "params.yaml").write_text(
        f"world:\n  items: {items}\n  days: 1\n  image_size: {size}\n{params}"
    )
    ws = Workspace.open(root)
    init_world(ws, seed=0)
    run_saliency(ws, 1)
    return ws


def _sd15_sized_folder(root: Path) -> str:
    """A randomly initialised pipeline with SD-1.5's UNet/VAE/text-tower sizes (no download)."""
    from diffusers import (
        AutoencoderKL,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    from cg4ctr_tasks.prompts.vocab import load_vocab
    from cg4ctr_tasks.sim.train_clip import build_tokenizer
    from cg4ctr_tasks.sim.train_generator import assemble_pipeline

    tokenizer = build_tokenizer(load_vocab(), 77)
    text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=77,
        )
    )
    unet = UNet2DConditionModel(sample_size=64, in_channels=9, cross_attention_dim=768)
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        sample_size=512,
    )
    pipe = assemble_pipeline(vae, text, tokenizer, unet)
    folder = root / "sd15-sized"
    pipe.save_pretrained(folder, safe_serialization=True)
    return str(folder)


def _plain_loop(ws: Workspace, device: str) -> tuple[float, dict[str, np.ndarray]]:
    """One pipeline call per candidate, float32, default attention: the baseline."""
    import torch
    from diffusers import StableDiffusionInpaintPipeline
    from PIL import Image

    from cg4ctr_tasks import storage
    from cg4ctr_tasks.assets import resolve_pretrained
    from cg4ctr_tasks.generate import plan_candidates

    gp = ws.params.generate
    limits = ws.params.storage
    plan, _ = plan_candidates(ws, 1)
    items = storage.read_parquet(ws.items_table).set_index("item_id")
    out = Path(tempfile.mkdtemp(prefix="plain-"))
    started = time.perf_counter()
    pipe = StableDiffusionInpaintPipeline.from_pretrained(
        resolve_pretrained(gp.base_model, "sim-inpaint"), safety_checker=None
    ).to(device)
    pipe.set_progress_bar_config(disable=True)
    images = {}
    for row in plan.itertuples(index=False):
        source = storage.read_image_array(
            ws.resolve(items.loc[row.item_id, "image_uri"]),
            limits.max_image_bytes,
            limits.max_image_pixels,
        )
        mask_url = storage.join(
            ws.round_dir(1),
            "saliency",
            "masks",
            f"{row.item_id}.png",
        )
        mask = storage.read_image_array(mask_url, limits.max_image_bytes, limits.max_image_pixels)
        product = mask[..., 0] > 127
        result = pipe(
            prompt=row.prompt,
            image=Image.fromarray(source),
            mask_image=Image.fromarray(255 - mask[..., 0]),
            height=source.shape[0],
            width=source.shape[1],
            num_inference_steps=gp.steps,
            guidance_scale=gp.guidance_scale,
            generator=torch.Generator().manual_seed(int(row.seed)),
            output_type="np",
        )
        image = np.clip(np.round(result.images[0] * 255.0), 0, 255).astype(np.uint8)
        image = np.where(product[..., None], source, image)
        storage.write_png(str(out / f"{row.candidate_id}.png"), image)
        images[row.candidate_id] = image
    return time.perf_counter() - started, images


def _compare(ws: Workspace, device: str) -> dict[str, object]:
    from cg4ctr_tasks import storage
    from cg4ctr_tasks.generate import generate_round

    plain_s, plain = _plain_loop(ws, device)
    started = time.perf_counter()
    summary = generate_round(ws, 1)
    stage_s = time.perf_counter() - started
    table = storage.read_parquet(storage.join(ws.round_dir(1), "candidates.parquet"))
    limits = ws.params.storage
    diff = max(
        int(
            np.abs(
                storage.read_image_array(
                    ws.resolve(uri),
                    limits.max_image_bytes,
                    limits.max_image_pixels,
                ).astype(int)
                - plain[cid]
            ).max()
        )
        for cid, uri in zip(table["candidate_id"], table["image_uri"], strict=True)
    )
    n = len(table)
    return {
        "images": n,
        "device": summary.device,
        "plain_images_per_s": round(n / plain_s, 3),
        "stage_images_per_s": round(n / stage_s, 3),
        "ratio": round(plain_s / stage_s, 2),
        "max_pixel_diff": diff,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=6)
    parser.add_argument("--candidates", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--sd15-items", type=int, default=2)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-generate-"))
    common = (
        f"generate:\n  candidates: {args.candidates}\n  steps: {args.steps}\n"
        f"  batch_size: {args.batch_size}\n"
    )
    import torch

    sim_device = "cuda" if torch.cuda.is_available() else "cpu"  # the stage picks CUDA when present
    results = {"sim_64px": _compare(_world(root / "sim", args.items, 64, common), sim_device)}
    if args.device == "cuda":
        folder = _sd15_sized_folder(root)
        params = common + f"  base_model: {folder}\n  dtype: float16\n"
        ws = _world(root / "sd15", args.sd15_items, 512, params)
        results["cuda_sd15_sized_512px"] = _compare(ws, "cuda")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
