"""Images/s of the generation stage vs a plain per-image diffusers loop, in the same run.

The baseline is what a first implementation would write: one ``StableDiffusionInpaintPipeline``
call per candidate in float32 (same model, scheduler, step count, seeds, paste-back and PNG
writes). The stage batches candidates across items (``generate.batch_size``) and, on CUDA, runs
half precision (``--dtype``) with channels-last, PyTorch SDPA attention (diffusers' default) and
optionally a compiled UNet (``--compile``). A third arm runs the stage with a few-step scheduler
(``--few-steps`` of DPM-Solver++). Output equality of the first two is reported as the largest
pixel difference; on CUDA each arm reports its peak GPU memory.

    .venv/bin/python -m benchmarks.generate                  # CPU, the world's sim model
    .venv/bin/python -m benchmarks.generate --device cuda    # + random SD-1.5-sized model, 512px
    .venv/bin/python -m benchmarks.generate --device cuda --compile --dtype bfloat16
    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.generate --items 2 --candidates 2 \
        --steps 4 --model-size tiny --size 64                # the second arm's code path on CPU
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


def _sd15_sized_folder(root: Path, size: str, resolution: int) -> str:
    """A randomly initialised pipeline with SD-1.5's UNet/VAE/text-tower sizes (no download);
    ``size="tiny"``: the same architecture family, narrow, to run the code path on a CPU."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from cg4ctr_tasks.prompts.vocab import load_vocab
    from cg4ctr_tasks.sim.train_clip import build_tokenizer
    from cg4ctr_tasks.sim.train_generator import assemble_pipeline

    sd15 = size == "sd15"
    width = 768 if sd15 else 32
    tokenizer = build_tokenizer(load_vocab(), 77)
    text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=width,
            intermediate_size=4 * width,
            num_hidden_layers=12 if sd15 else 1,
            num_attention_heads=12 if sd15 else 2,
            max_position_embeddings=77,
        )
    )
    unet_widths = (320, 640, 1280, 1280) if sd15 else (32, 32, 64, 64)
    unet = UNet2DConditionModel(
        sample_size=resolution // 8,
        in_channels=9,
        cross_attention_dim=width,
        block_out_channels=unet_widths,
        layers_per_block=2 if sd15 else 1,
        attention_head_dim=8 if sd15 else 4,
        norm_num_groups=32 if sd15 else 16,
    )
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512) if sd15 else (16, 16, 32, 32),
        layers_per_block=2 if sd15 else 1,
        norm_num_groups=32 if sd15 else 16,
        sample_size=resolution,
    )
    pipe = assemble_pipeline(vae, text, tokenizer, unet)
    folder = root / f"{size}-sized"
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
    _reset_peak(device)
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


def _reset_peak(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_mib(device: str) -> float | None:
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**20, 1) if device == "cuda" else None


def _stage(ws: Workspace, device: str) -> tuple[float, float | None]:
    """Seconds and peak GPU MiB of the generate stage (a fresh round folder each time)."""
    from cg4ctr_tasks.generate import generate_round

    _reset_peak(device)
    started = time.perf_counter()
    generate_round(ws, 1, force=True)
    return time.perf_counter() - started, _peak_mib(device)


def _compare(ws: Workspace, device: str, few_steps: int) -> dict[str, object]:
    from cg4ctr_tasks import storage
    from cg4ctr_tasks.params import load_params

    plain_s, plain = _plain_loop(ws, device)
    plain_peak = _peak_mib(device)
    stage_s, stage_peak = _stage(ws, device)
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
    few = {"generate": {"scheduler": "dpm", "steps": few_steps}}
    fast = Workspace(ws.root, load_params(ws.root / "params.yaml", overrides=few))
    few_s, few_peak = _stage(fast, device)
    n = len(table)
    return {
        "images": n,
        "device": device,
        "steps": ws.params.generate.steps,
        "dtype": ws.params.generate.dtype if device == "cuda" else "float32",
        "compile": ws.params.generate.compile and device == "cuda",
        "plain_images_per_s": round(n / plain_s, 3),
        "stage_images_per_s": round(n / stage_s, 3),
        "ratio": round(plain_s / stage_s, 2),
        "max_pixel_diff": diff,
        f"stage_dpm_{few_steps}_steps_images_per_s": round(n / few_s, 3),
        f"ratio_dpm_{few_steps}_steps": round(plain_s / few_s, 2),
        "plain_peak_gpu_mib": plain_peak,
        "stage_peak_gpu_mib": stage_peak,
        f"stage_dpm_{few_steps}_steps_peak_gpu_mib": few_peak,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=6)
    parser.add_argument("--candidates", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--few-steps", type=int, default=8, help="DPM-Solver++ arm's steps")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=["float16", "bfloat16"], default="float16")
    parser.add_argument("--compile", action="store_true", help="torch.compile the stage's UNet")
    parser.add_argument("--model-size", choices=["sd15", "tiny"], default="sd15")
    parser.add_argument("--size", type=int, default=512, help="second arm's image side")
    parser.add_argument("--sd15-items", type=int, default=2)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-generate-"))
    common = (
        f"generate:\n  candidates: {args.candidates}\n  steps: {args.steps}\n"
        f"  batch_size: {args.batch_size}\n"
    )
    import torch

    sim_device = "cuda" if torch.cuda.is_available() else "cpu"  # the stage picks CUDA when present
    sim = _world(root / "sim", args.items, 64, common)
    results = {"sim_64px": _compare(sim, sim_device, args.few_steps)}
    if args.device == "cuda" or args.model_size == "tiny":
        folder = _sd15_sized_folder(root, args.model_size, args.size)
        params = (
            common + f"  base_model: {folder}\n  dtype: {args.dtype}\n"
            f"  compile: {str(args.compile).lower()}\n"
        )
        ws = _world(root / "sd15", args.sd15_items, args.size, params)
        key = f"{args.device}_{args.model_size}_sized_{args.size}px"
        results[key] = _compare(ws, args.device, args.few_steps)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
