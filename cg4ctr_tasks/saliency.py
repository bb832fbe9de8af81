"""Saliency masks (the paper's theta_s): which pixels are the product, so inpainting keeps them.

Two backends behind :func:`product_mask`:
- ``isnet``: the IS-Net architecture of "Highly Accurate Dichotomous Image Segmentation" (DIS),
  written here with the module and parameter names of the public ``isnet-general-use``
  checkpoint so that its state dict loads as is (``.pth`` via ``weights_only=True``, or
  safetensors). The sd15 profile's choice.
- ``classical``: no weights. Product photos sit on a plain backdrop, so the backdrop colour is
  estimated from the image border and every pixel far enough from it is product; morphology
  removes specks and fills holes. The sim default.
Both return a binary mask of the input's size, so the product keeps its size and position.

`cg4ctr saliency --round N` writes, per item, ``saliency/masks/<item_id>.png`` (L, 0/255) and
``saliency/products/<item_id>.png`` (RGBA, alpha = mask), plus ``saliency/saliency.parquet``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from cg4ctr_tasks import storage
from cg4ctr_tasks.errors import RejectedInput, UserError
from cg4ctr_tasks.params import SaliencyParams
from cg4ctr_tasks.shards import Shard, run_parts
from cg4ctr_tasks.workspace import Workspace, round_name

# --------------------------------------------------------------------------- IS-Net (DIS)


class ConvBnRelu(nn.Module):
    """3x3 (dilated) conv + batch norm + ReLU; names match the checkpoint's REBNCONV."""

    def __init__(self, in_ch: int, out_ch: int, dilation: int = 1) -> None:
        super().__init__()
        self.conv_s1 = nn.Conv2d(in_ch, out_ch, 3, padding=dilation, dilation=dilation)
        self.bn_s1 = nn.BatchNorm2d(out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn_s1(self.conv_s1(x)))


def _upsample_to(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, size=ref.shape[2:], mode="bilinear", align_corners=False)


class ResidualUBlock(nn.Module):
    """RSU-L: a small U-Net inside a residual block.

    ``depth`` levels: ``rebnconv1..{depth-1}`` encode (halving between them, or for the RSU-4F
    variant, ``dilated``, growing the dilation instead), ``rebnconv{depth}`` is the dilated
    bottom, ``rebnconv{depth-1}d..1d`` decode with skip connections.
    """

    def __init__(
        self, depth: int, in_ch: int, mid_ch: int, out_ch: int, dilated: bool = False
    ) -> None:
        super().__init__()
        self.depth, self.dilated = depth, dilated
        self.rebnconvin = ConvBnRelu(in_ch, out_ch)
        rates = [2 ** (level - 1) if dilated else 1 for level in range(1, depth + 1)]
        if not dilated:
            rates[-1] = 2
        for level in range(1, depth + 1):
            source = out_ch if level == 1 else mid_ch
            setattr(self, f"rebnconv{level}", ConvBnRelu(source, mid_ch, rates[level - 1]))
        for level in range(depth - 1, 0, -1):
            target = out_ch if level == 1 else mid_ch
            setattr(self, f"rebnconv{level}d", ConvBnRelu(2 * mid_ch, target, rates[level - 1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top = self.rebnconvin(x)
        skips = []
        hx = top
        for level in range(1, self.depth):
            hx = getattr(self, f"rebnconv{level}")(hx)
            skips.append(hx)
            if not self.dilated and level < self.depth - 1:
                hx = F.max_pool2d(hx, 2, stride=2, ceil_mode=True)
        hx = getattr(self, f"rebnconv{self.depth}")(hx)
        for level in range(self.depth - 1, 0, -1):
            skip = skips[level - 1]
            hx = getattr(self, f"rebnconv{level}d")(torch.cat((_upsample_to(hx, skip), skip), 1))
        return hx + top


class ISNet(nn.Module):
    """IS-Net's segmentation network: stride-2 stem, six RSU encoder stages, five decoder
    stages and one side output per stage; ``side1`` (the finest) is the mask."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(3, 64, 3, stride=2, padding=1)
        encoder = [(7, 64, 32, 64), (6, 64, 32, 128), (5, 128, 64, 256), (4, 256, 128, 512)]
        for i, (depth, cin, mid, cout) in enumerate(encoder, start=1):
            setattr(self, f"stage{i}", ResidualUBlock(depth, cin, mid, cout))
        self.stage5 = ResidualUBlock(4, 512, 256, 512, dilated=True)
        self.stage6 = ResidualUBlock(4, 512, 256, 512, dilated=True)
        self.stage5d = ResidualUBlock(4, 1024, 256, 512, dilated=True)
        decoder = [(4, 1024, 128, 256), (5, 512, 64, 128), (6, 256, 32, 64), (7, 128, 16, 64)]
        for i, (depth, cin, mid, cout) in zip(range(4, 0, -1), decoder, strict=True):
            setattr(self, f"stage{i}d", ResidualUBlock(depth, cin, mid, cout))
        for i, channels in enumerate([64, 64, 128, 256, 512, 512], start=1):
            setattr(self, f"side{i}", nn.Conv2d(channels, 1, 3, padding=1))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Six sigmoid side outputs at the input's resolution, finest first."""
        hx = self.conv_in(x)
        encoded = []
        for i in range(1, 7):
            hx = getattr(self, f"stage{i}")(hx)
            encoded.append(hx)
            if i < 6:
                hx = F.max_pool2d(hx, 2, stride=2, ceil_mode=True)
        decoded = {6: hx}
        for i in range(5, 0, -1):
            skip = encoded[i - 1]
            hx = getattr(self, f"stage{i}d")(torch.cat((_upsample_to(hx, skip), skip), 1))
            decoded[i] = hx
        return [
            torch.sigmoid(_upsample_to(getattr(self, f"side{i}")(decoded[i]), x))
            for i in range(1, 7)
        ]


def load_isnet(checkpoint: str | Path) -> ISNet:
    """IS-Net with weights from a ``.safetensors`` file or a ``.pth`` state dict (weights only)."""
    path = Path(checkpoint)
    if not path.is_file():
        raise UserError(
            f"IS-Net checkpoint not found: {checkpoint} (params saliency.isnet_checkpoint)"
        )
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    model = ISNet()
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise UserError(f"{checkpoint}: not an isnet-general-use state dict ({exc})") from None
    return model.eval()


def isnet_mask(model: nn.Module, image: np.ndarray, input_size: int) -> np.ndarray:
    """Run IS-Net as its reference inference does: resize, (x - 0.5), min-max, threshold 0.5."""
    device = next(model.parameters()).device
    x = torch.tensor(image, dtype=torch.float32, device=device).permute(2, 0, 1)[None]
    x = F.interpolate(x, size=(input_size, input_size), mode="bilinear", align_corners=False)
    x = x / 255.0 - 0.5
    with torch.inference_mode():
        side = model(x)[0]
    side = F.interpolate(side, size=image.shape[:2], mode="bilinear", align_corners=False)[0, 0]
    low, high = side.min(), side.max()
    scaled = (side - low) / (high - low).clamp_min(1e-8)
    return np.asarray((scaled > 0.5).cpu().numpy(), dtype=bool)


# --------------------------------------------------------------------------- classical


def classical_mask(image: np.ndarray, params: SaliencyParams) -> np.ndarray:
    """Product = pixels far from the backdrop colour estimated on the image border.

    The threshold is the larger of ``classical_threshold`` and three times the border's own
    spread (so a noisy backdrop does not leak in); ``classical_opening`` rounds of opening with
    the smallest cross remove specks (0 for flat studio backdrops: opening also erodes thin
    parts such as a lamp's stem), and parts smaller than ``classical_min_area`` of the image are
    dropped. Holes are kept: a cup's handle encloses backdrop, which must be repainted.
    """
    from scipy import ndimage

    pixels = image.astype(np.float32) / 255.0
    b = params.classical_border
    border = np.concatenate(
        [pixels[:b].reshape(-1, 3), pixels[-b:].reshape(-1, 3)]
        + [pixels[:, :b].reshape(-1, 3), pixels[:, -b:].reshape(-1, 3)]
    )
    backdrop = np.median(border, axis=0)
    spread = float(np.percentile(np.linalg.norm(border - backdrop, axis=1), 95))
    distance = np.linalg.norm(pixels - backdrop, axis=-1)
    mask = distance > max(params.classical_threshold, 3.0 * spread)
    if params.classical_opening:
        cross = ndimage.generate_binary_structure(2, 1)
        mask = ndimage.binary_opening(mask, cross, iterations=params.classical_opening)
    labels, count = ndimage.label(mask)
    if count:
        sizes = ndimage.sum_labels(mask, labels, index=np.arange(1, count + 1))
        keep = np.flatnonzero(sizes >= params.classical_min_area * mask.size) + 1
        mask = np.isin(labels, keep)
    return np.asarray(mask, dtype=bool)


@dataclass
class SaliencyModel:
    """One entry point over both backends (the IS-Net weights are loaded once)."""

    params: SaliencyParams
    isnet: nn.Module | None = field(default=None, repr=False)

    @classmethod
    def load(cls, params: SaliencyParams) -> SaliencyModel:
        if params.backend == "classical":
            return cls(params)
        if params.isnet_checkpoint is None:
            raise UserError("saliency.backend is isnet but saliency.isnet_checkpoint is not set")
        model = load_isnet(params.isnet_checkpoint)
        return cls(params, model.to("cuda" if torch.cuda.is_available() else "cpu"))

    def mask(self, image: np.ndarray) -> np.ndarray:
        """Binary HxW product mask of an HxWx3 uint8 image."""
        if self.isnet is not None:
            return isnet_mask(self.isnet, image, self.params.isnet_input_size)
        return classical_mask(image, self.params)


def product_mask(image: np.ndarray, params: SaliencyParams) -> np.ndarray:
    """The saliency mask of one image with the configured backend."""
    return SaliencyModel.load(params).mask(image)


def masked_product(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """RGBA: the product's pixels, exactly; transparent black elsewhere."""
    alpha = mask.astype(np.uint8) * 255
    return np.dstack([np.where(mask[..., None], image, 0), alpha]).astype(np.uint8)


# --------------------------------------------------------------------------- stage


@dataclass(frozen=True)
class SaliencySummary:
    round: int
    backend: str
    items: int
    parts_total: int
    parts_written: int
    parts_skipped: int
    complete: bool
    ok: int
    reused: int
    rejected: list[dict[str, str]]
    seconds: float

    def as_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


def saliency_dir(ws: Workspace, round_id: int) -> str:
    """``data/rounds/round-NNN/saliency``; its files' uris are relative to the data root."""
    return storage.join(ws.round_dir(round_id), "saliency")


def run_saliency(
    ws: Workspace, round_id: int, shard: Shard | None = None, force: bool = False
) -> SaliencySummary:
    """Masks and masked products for every item of ``data/items.parquet`` (this shard's parts).

    An item whose mask and product files exist is reused unless ``force``; an unreadable,
    oversized or unsafe item gets a row with status ``rejected`` and its error, never a crash.
    """
    started = time.perf_counter()
    params = ws.params
    if not storage.exists(ws.items_table):
        raise UserError(f"{ws.items_table} not found: run `cg4ctr sim init` or ingest items first")
    items = storage.read_parquet(ws.items_table, columns=["item_id", "image_uri"])
    out = saliency_dir(ws, round_id)
    rel_dir = storage.join("rounds", round_name(round_id), "saliency")
    model = SaliencyModel.load(params.saliency)
    reused = 0

    def process(rows: range) -> pd.DataFrame:
        nonlocal reused
        records = []
        for row in items.iloc[rows.start : rows.stop].itertuples(index=False):
            record = {
                "item_id": str(row.item_id),
                "mask_uri": "",
                "product_uri": "",
                "status": "ok",
                "error": "",
            }
            try:
                item_id = storage.safe_id(row.item_id, "item_id")
                mask_rel = storage.join(rel_dir, "masks", f"{item_id}.png")
                product_rel = storage.join(rel_dir, "products", f"{item_id}.png")
                mask_url, product_url = ws.resolve(mask_rel), ws.resolve(product_rel)
                if not force and storage.exists(mask_url) and storage.exists(product_url):
                    reused += 1
                else:
                    image = storage.read_image_array(
                        ws.resolve(str(row.image_uri)),
                        params.storage.max_image_bytes,
                        params.storage.max_image_pixels,
                    )
                    mask = model.mask(image)
                    storage.write_png(product_url, masked_product(image, mask))
                    storage.write_png(mask_url, mask.astype(np.uint8) * 255)
                record.update(mask_uri=mask_rel, product_uri=product_rel)
            except (RejectedInput, OSError) as exc:
                record.update(status="rejected", error=str(exc).splitlines()[0][:500])
            records.append(record)
        return pd.DataFrame.from_records(
            records, columns=["item_id", "mask_uri", "product_uri", "status", "error"]
        )

    run = run_parts(
        items["item_id"].astype(str).tolist(),
        "item_id",
        params.saliency.shard_size,
        storage.join(out, "parts"),
        shard or Shard(0, 1),
        force,
        process,
        f"saliency round {round_id}",
    )
    rejected: list[dict[str, str]] = []
    ok = 0
    if run.merged is not None:
        storage.write_parquet(storage.join(out, "saliency.parquet"), run.merged)
        bad = run.merged[run.merged["status"] != "ok"]
        rejected = [
            {"item_id": str(i), "error": str(e)}
            for i, e in zip(bad["item_id"], bad["error"], strict=True)
        ]
        ok = int((run.merged["status"] == "ok").sum())
    return SaliencySummary(
        round=round_id,
        backend=params.saliency.backend,
        items=len(items),
        parts_total=run.parts_total,
        parts_written=run.parts_written,
        parts_skipped=run.parts_skipped,
        complete=run.merged is not None,
        ok=ok,
        reused=reused,
        rejected=rejected,
        seconds=round(time.perf_counter() - started, 2),
    )
