"""Train the simulated world's own latent-diffusion inpainting model (`cg4ctr sim train-generator`).

The world needs a generator whose backgrounds follow the prompt vocabulary, and it must load
through exactly the code that loads a real SD-inpainting checkpoint. So the model is a standard
diffusers layout: a small ``AutoencoderKL`` (64x64 RGB -> 8x8x4 latents, SD's
factor 8), a small
``UNet2DConditionModel`` with the inpainting input (9 channels: noisy latent, mask, masked-image
latent), the world's CLIP text tower (frozen) and its tokenizer, saved with ``save_pretrained``.

Training data comes only from the public renderer with its own seed: a random token prompt, the
background it renders, a product from ``draw_product`` pasted in, and that product's mask (the
renderer's own sample, not the world's ground truth).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from matplotlib.colors import rgb_to_hsv

from cg4ctr_tasks import storage
from cg4ctr_tasks.assets import asset_path, resolve_pretrained
from cg4ctr_tasks.errors import UserError
from cg4ctr_tasks.params import Params
from cg4ctr_tasks.prompts.vocab import Vocab, load_vocab
from cg4ctr_tasks.sim.render import (
    COLOURS,
    compose,
    draw_product,
    random_tokens,
    render_background,
)

if TYPE_CHECKING:
    import torch

ASSET_NAME = "sim-inpaint"
LATENT_CHANNELS = 4
# Three down-samplings (64x64 -> 8x8, SD's factor 8); a thin first level keeps the full-resolution
# convolutions, which dominate the cost on CPU, cheap. Norm groups of 4+ channels: with one
# channel per group, GroupNorm would erase each image's mean colour.
VAE_BLOCKS = (16, 32, 64, 64)
UNET_BLOCKS = (32, 64, 64)


@dataclass(frozen=True)
class RenderedSet:
    """Renderer samples: images (N,H,W,3 uint8), product masks (N,H,W bool), prompts."""

    images: np.ndarray
    masks: np.ndarray
    prompts: list[str]


@dataclass(frozen=True)
class GeneratorSummary:
    out: str
    samples: int
    vae_loss: float
    unet_loss: float
    colour_steering_rate: float
    wall_time_s: float
    reused: bool

    def as_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


def render_training_set(vocab: Vocab, size: int, count: int, seed: int) -> RenderedSet:
    """``count`` (prompt, composite, product mask) samples drawn by the public renderer."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x6E6]))
    images = np.empty((count, size, size, 3), dtype=np.uint8)
    masks = np.empty((count, size, size), dtype=bool)
    prompts = []
    for i in range(count):
        product = draw_product(int(rng.integers(6)), size, rng)
        tokens = random_tokens(vocab, rng)
        images[i] = compose(product, render_background(tokens, vocab, size, rng))
        masks[i] = product.mask
        prompts.append(" ".join(tokens))
    return RenderedSet(images=images, masks=masks, prompts=prompts)


def build_vae(size: int) -> Any:
    """SD's autoencoder at toy scale; its posterior starts narrow (log-variance -6).

    With the default start (variance 1) the sampled latents are mostly noise for the first
    hundreds of steps, which a short CPU run cannot afford.
    """
    import torch
    from diffusers import AutoencoderKL

    vae: Any = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(VAE_BLOCKS),
        up_block_types=("UpDecoderBlock2D",) * len(VAE_BLOCKS),
        block_out_channels=VAE_BLOCKS,
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=4,
        sample_size=size,
    )
    with torch.no_grad():
        vae.quant_conv.bias[LATENT_CHANNELS:] = -6.0
    return vae


def build_unet(latent_size: int, cross_attention_dim: int) -> Any:
    """SD-inpainting layout at toy scale: 9 input channels, cross-attention to the text tower."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=latent_size,
        in_channels=2 * LATENT_CHANNELS + 1,
        out_channels=LATENT_CHANNELS,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=UNET_BLOCKS,
        layers_per_block=1,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=16,
    )


def sd_scheduler_config() -> dict[str, Any]:
    """The noise schedule of Stable Diffusion 1.x (scaled-linear betas, 1000 steps, epsilon)."""
    return {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "prediction_type": "epsilon",
        "clip_sample": False,
        "set_alpha_to_one": False,
        "steps_offset": 1,
    }


def to_model_range(images: np.ndarray) -> torch.Tensor:
    """uint8 NHWC -> float NCHW in [-1, 1], the VAE's input range."""
    import torch

    tensor = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    return tensor / 127.5 - 1.0


def inpaint_inputs(
    images: np.ndarray, product_masks: np.ndarray
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(pixels, repaint mask, masked pixels) as SD inpainting sees them: mask 1 = repaint.

    The repainted region is the background, so the masked image keeps only the product (the
    background set to 0, mid-grey), exactly like ``StableDiffusionInpaintPipeline``.
    """
    import torch

    pixels = to_model_range(images)
    repaint = torch.from_numpy(~product_masks).float().unsqueeze(1)
    return pixels, repaint, pixels * (repaint < 0.5)


def train_vae(
    vae: Any,
    images: np.ndarray,
    steps: int,
    batch_size: int,
    crop: int,
    learning_rate: float,
    kl_weight: float,
    seed: int,
) -> float:
    """Reconstruction (MSE) + a tiny KL term on random crops; returns the last-50-steps mean.

    The autoencoder is convolutional, so crops teach it the same local code at a fraction of
    the cost of whole images.
    """
    import torch

    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=learning_rate)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, learning_rate, total_steps=steps)
    pixels = to_model_range(images)
    size = pixels.shape[-1]
    crop = min(crop, size)
    vae.train()
    losses = []
    for _ in _progress(range(steps), "vae"):
        top, left = (int(v) for v in torch.randint(size - crop + 1, (2,), generator=generator))
        batch = pixels[torch.randint(len(pixels), (batch_size,), generator=generator)]
        batch = batch[:, :, top : top + crop, left : left + crop]
        posterior = vae.encode(batch).latent_dist
        recon = vae.decode(posterior.sample(generator)).sample
        loss = torch.nn.functional.mse_loss(recon, batch) + kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
    vae.eval()
    return float(np.mean(losses[-50:]))


@dataclass(frozen=True)
class LatentSet:
    """Frozen-encoder features of an inpainting training set, computed once."""

    latents: torch.Tensor  # scaled VAE latents of the full images
    masks: torch.Tensor  # repaint mask at latent resolution
    masked_latents: torch.Tensor  # scaled VAE latents of the masked images
    text: torch.Tensor  # text-tower hidden states per sample


def encode_latents(vae: Any, pixels: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Scaled latent means (deterministic) of pixels in [-1, 1], in batches."""
    import torch

    parts = []
    with torch.no_grad():
        for start in range(0, len(pixels), batch_size):
            batch = pixels[start : start + batch_size].to(vae.device, vae.dtype)
            parts.append(vae.encode(batch).latent_dist.mode() * vae.config.scaling_factor)
    return torch.cat(parts)


def encode_prompts(text_encoder: Any, tokenizer: Any, prompts: list[str]) -> torch.Tensor:
    """Last hidden states of the frozen text tower, padded to the tokenizer's max length."""
    import torch

    ids = tokenizer(
        prompts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    with torch.no_grad():
        hidden: torch.Tensor = text_encoder(ids.to(text_encoder.device))[0]
    return hidden


def encode_inpaint_set(
    vae: Any,
    text_encoder: Any,
    tokenizer: Any,
    images: np.ndarray,
    product_masks: np.ndarray,
    prompts: list[str],
    batch_size: int,
) -> LatentSet:
    import torch

    pixels, repaint, masked = inpaint_inputs(images, product_masks)
    latents = encode_latents(vae, pixels, batch_size)
    mask_small = torch.nn.functional.interpolate(repaint, size=latents.shape[-2:])
    return LatentSet(
        latents=latents,
        masks=mask_small.to(latents.device, latents.dtype),
        masked_latents=encode_latents(vae, masked, batch_size),
        text=encode_prompts(text_encoder, tokenizer, prompts),
    )


def inpainting_loss(
    unet: Any,
    noise_scheduler: Any,
    latents: torch.Tensor,
    masks: torch.Tensor,
    masked_latents: torch.Tensor,
    text: torch.Tensor,
    generator: torch.Generator,
) -> torch.Tensor:
    """Eq 3/4: E ||eps - eps_theta(concat(z_t, m, E(masked x)), t, c)||^2 over t and eps."""
    import torch

    noise = torch.randn(latents.shape, generator=generator, dtype=latents.dtype)
    noise = noise.to(latents.device)
    steps = noise_scheduler.config.num_train_timesteps
    timesteps = torch.randint(steps, (len(latents),), generator=generator).to(latents.device)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    model_input = torch.cat([noisy, masks, masked_latents], dim=1)
    prediction = unet(model_input, timesteps, encoder_hidden_states=text).sample
    return torch.nn.functional.mse_loss(prediction.float(), noise.float())


def _progress(iterable: Any, desc: str) -> Any:
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, leave=False, disable=None, mininterval=5.0)


def load_text_tower(reference: str) -> tuple[Any, Any]:
    """The frozen text tower and tokenizer of a CLIP checkpoint (a CLIPModel or text-only)."""
    from transformers import AutoTokenizer, CLIPTextModel

    path = Path(reference)
    if path.exists() and not (path / "config.json").exists():
        raise UserError(f"{reference}: not a CLIP checkpoint folder (no config.json)")
    if reference == str(asset_path("sim-clip")) and not (path / "manifest.json").exists():
        raise UserError(
            "the world's CLIP (assets/sim-clip) is missing: run `cg4ctr sim train-clip` first"
        )
    try:
        text_encoder = CLIPTextModel.from_pretrained(reference)
        tokenizer = AutoTokenizer.from_pretrained(reference)
    except OSError as exc:
        raise UserError(f"cannot load a CLIP text tower from {reference!r}: {exc}") from None
    limit = text_encoder.config.max_position_embeddings
    if tokenizer.model_max_length > limit:
        tokenizer.model_max_length = limit
    text_encoder.requires_grad_(False).eval()
    return text_encoder, tokenizer


def train_unet(
    unet: Any,
    data: LatentSet,
    uncond_text: torch.Tensor,
    tp: Any,
    seed: int,
) -> float:
    """Inpainting loss with prompt dropout (for guidance); returns the last-100-steps mean."""
    import torch
    from diffusers import DDPMScheduler

    noise_scheduler = DDPMScheduler.from_config(sd_scheduler_config())
    generator = torch.Generator().manual_seed(seed + 1)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=tp.learning_rate, weight_decay=1e-2)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, tp.learning_rate, total_steps=tp.unet_steps, pct_start=0.05
    )
    unet.train()
    losses = []
    for _ in _progress(range(tp.unet_steps), "unet"):
        idx = torch.randint(len(data.latents), (tp.batch_size,), generator=generator)
        text = data.text[idx].clone()
        drop = torch.rand(tp.batch_size, generator=generator) < tp.uncond_fraction
        text[drop] = uncond_text
        loss = inpainting_loss(
            unet,
            noise_scheduler,
            data.latents[idx],
            data.masks[idx],
            data.masked_latents[idx],
            text,
            generator,
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    unet.eval()
    return float(np.mean(losses[-100:]))


def chromatic_colours() -> list[str]:
    """Colour tokens with a definite hue (white and black have none worth measuring)."""
    return [name for name, (_, sat, _) in COLOURS.items() if sat > 0.3]


def nearest_colour(rgb: np.ndarray) -> str:
    """The chromatic colour token whose hue is closest (circularly) to a mean RGB colour."""
    hue = float(rgb_to_hsv(np.clip(rgb / 255.0, 0, 1))[0])
    return min(
        chromatic_colours(),
        key=lambda name: min(abs(COLOURS[name][0] - hue), 1 - abs(COLOURS[name][0] - hue)),
    )


def colour_steering_rate(
    pipe: Any,
    size: int,
    per_colour: int,
    steps: int,
    guidance_scale: float,
    seed: int,
) -> tuple[float, dict[str, float]]:
    """Share of samples whose mean background hue is nearest the prompted colour token.

    Prompts "<colour> soft plain" for every chromatic colour, on fresh renderer products; the
    statistic is a pixel one (mean background RGB -> hue), so it checks what a viewer sees.
    """
    from cg4ctr_tasks.generate import inpaint_batch

    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xC01]))
    hits: dict[str, float] = {}
    for colour in chromatic_colours():
        products = [draw_product(int(rng.integers(6)), size, rng) for _ in range(per_colour)]
        images = inpaint_batch(
            pipe,
            [p.image for p in products],
            [p.mask for p in products],
            [f"{colour} soft plain"] * per_colour,
            [seed + k for k in range(per_colour)],
            steps,
            guidance_scale,
        )
        found = [
            nearest_colour(image[~p.mask].mean(axis=0)) == colour
            for image, p in zip(images, products, strict=True)
        ]
        hits[colour] = float(np.mean(found))
    return float(np.mean(list(hits.values()))), hits


def _manifest(folder: Path, command: str, wall_time_s: float, extra: dict[str, Any]) -> None:
    files = {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != "manifest.json"
    }
    doc = {"command": command, "wall_time_s": round(wall_time_s, 1), "files": files, **extra}
    (folder / "manifest.json").write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")


def assemble_pipeline(vae: Any, text_encoder: Any, tokenizer: Any, unet: Any) -> Any:
    """A standard SD-inpainting pipeline (DDIM, no safety checker) from its parts."""
    from diffusers import DDIMScheduler, StableDiffusionInpaintPipeline

    return StableDiffusionInpaintPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler.from_config(sd_scheduler_config()),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def train_generator(
    params: Params, out: str | Path, command: str, force: bool = False
) -> GeneratorSummary:
    """Train VAE then UNet on renderer samples; write a diffusers inpainting folder at ``out``.

    A folder with a manifest is reused unless ``force``. The manifest (written last) records the
    sha256 of every file, the command, the wall time, the losses and the steering rate.
    """
    import torch

    target = Path(out)
    manifest = target / "manifest.json"
    if manifest.exists() and not force:
        doc = json.loads(manifest.read_text("utf-8"))
        return GeneratorSummary(
            out=str(target),
            samples=int(doc["samples"]),
            vae_loss=float(doc["vae_loss"]),
            unet_loss=float(doc["unet_loss"]),
            colour_steering_rate=float(doc["colour_steering_rate"]),
            wall_time_s=float(doc["wall_time_s"]),
            reused=True,
        )
    started = time.perf_counter()
    tp = params.generate.train
    size = params.world.image_size
    torch.manual_seed(params.seed)
    text_encoder, tokenizer = load_text_tower(resolve_pretrained(tp.text_encoder, "sim-clip"))
    data = render_training_set(load_vocab(params.vocab), size, tp.samples, params.seed)

    vae = build_vae(size)
    vae_loss = train_vae(
        vae,
        data.images,
        tp.vae_steps,
        tp.batch_size,
        tp.vae_crop,
        tp.vae_learning_rate,
        tp.kl_weight,
        params.seed,
    )
    with torch.no_grad():
        sample = to_model_range(data.images[:512])
        std = float(vae.encode(sample).latent_dist.mode().std())
    vae.register_to_config(scaling_factor=1.0 / std)
    vae.requires_grad_(False)

    latents = encode_inpaint_set(
        vae, text_encoder, tokenizer, data.images, data.masks, data.prompts, 256
    )
    uncond = encode_prompts(text_encoder, tokenizer, [""])[0]
    unet = build_unet(size // 2 ** (len(VAE_BLOCKS) - 1), text_encoder.config.hidden_size)
    unet_loss = train_unet(unet, latents, uncond, tp, params.seed)

    pipe: Any = assemble_pipeline(vae, text_encoder, tokenizer, unet)
    pipe.set_progress_bar_config(disable=True)
    rate, per_colour = colour_steering_rate(
        pipe, size, tp.eval_samples, tp.eval_steps, params.generate.guidance_scale, params.seed + 7
    )
    wall = time.perf_counter() - started
    with storage.atomic_local_path(target) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        _manifest(
            tmp,
            command,
            wall,
            {
                "samples": tp.samples,
                "train_params": tp.model_dump(),
                "seed": params.seed,
                "threads": torch.get_num_threads(),
                "vae_loss": vae_loss,
                "unet_loss": unet_loss,
                "colour_steering_rate": rate,
                "colour_steering_per_colour": per_colour,
            },
        )
    return GeneratorSummary(
        out=str(target),
        samples=tp.samples,
        vae_loss=vae_loss,
        unet_loss=unet_loss,
        colour_steering_rate=rate,
        wall_time_s=wall,
        reused=False,
    )
