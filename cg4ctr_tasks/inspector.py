"""The availability inspector and recurrent generation (Reliable_AD's RFNet, DESIGN.md section 1).

Generated creatives are often unusable: the scene's space or scale does not fit the product, the
product is indistinct from its background, or product-like shapes appear in the background. The
inspector classifies a candidate from (product image, generated image, saliency mask, caption)
into LABELS; ``cg4ctr inspect --round N`` regenerates rejected candidates with new seeds up to
``inspector.max_attempts`` ("recurrent generation") before captioning and scoring.

Model: the three images, plus maps of each pixel's colour distance to the product and distance
from it, are stacked as channels and cut into patches by a small CNN stem; the
generated image's caption (CLIP-interrogator vocab tokens, as ``cg4ctr caption`` writes them)
is embedded per token; a transformer fuses [cls, patches, caption tokens] and the cls output is
classified. Saved as ``config.json`` + ``model.safetensors`` in ``models/inspector/``.

Training data is a labelled table (``data/inspector/labels.parquet``: sample_id, item_id,
image_uri, mask_uri, label), made by annotators in production and by the simulated world's
private labeller here (``cg4ctr sim label-availability``).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from cg4ctr_tasks import storage
from cg4ctr_tasks.checkpoints import CONFIG_NAME, load_checkpoint, save_checkpoint
from cg4ctr_tasks.errors import UserError
from cg4ctr_tasks.params import InspectorParams
from cg4ctr_tasks.prompts.features import PAD, encode_token_sets
from cg4ctr_tasks.reward.model import fusion_encoder
from cg4ctr_tasks.shards import Shard, run_parts
from cg4ctr_tasks.workspace import Workspace

if TYPE_CHECKING:
    from cg4ctr_tasks.caption import Interrogator

LABELS = (
    "available",
    "space_mismatch",
    "size_mismatch",
    "indistinctive",
    "shape_hallucination",
)
# Product RGB, generated RGB, saliency mask, and two maps that make the failures local: each
# pixel's colour distance to the product's mean colour, and its distance from the product.
CHANNELS = 9
INSPECTION_COLUMNS = [
    "round",
    "candidate_id",
    "item_id",
    "user_group",
    "attempt",
    "seed",
    "image_uri",
    "caption",
    "label",
    *(f"p_{label}" for label in LABELS),
    "final",
]


def label_counts(labels: pd.Series) -> dict[str, int]:
    return {str(k): int(v) for k, v in labels.value_counts().items()}


def labelled_set_dir(ws: Workspace) -> str:
    """``data/inspector``: the labelled training set (images, masks, labels.parquet)."""
    return storage.join(ws.data, "inspector")


@dataclass(frozen=True)
class InspectorConfig:
    labels: list[str]
    tokens: list[str]  # caption vocabulary; token i has index i + 1 (0 = padding)
    image_size: int
    patch_size: int
    hidden: int
    fusion_layers: int
    fusion_heads: int
    dropout: float
    extra: dict[str, Any] = field(default_factory=dict)  # training facts (not architecture)

    @classmethod
    def from_params(cls, ip: InspectorParams, tokens: Sequence[str]) -> InspectorConfig:
        return cls(
            labels=list(LABELS),
            tokens=list(tokens),
            image_size=ip.image_size,
            patch_size=ip.patch_size,
            hidden=ip.hidden,
            fusion_layers=ip.fusion_layers,
            fusion_heads=ip.fusion_heads,
            dropout=ip.dropout,
        )


class InspectorModel(nn.Module):
    """(B, CHANNELS, S, S) images + (B, T) caption token ids -> (B, len(labels)) logits."""

    def __init__(self, config: InspectorConfig) -> None:
        super().__init__()
        self.config = config
        hidden = config.hidden
        patches = (config.image_size // config.patch_size) ** 2
        self.stem = nn.Sequential(
            nn.Conv2d(CHANNELS, hidden, 3, stride=2, padding=1),  # half resolution: CPU-cheap
            nn.GELU(),
            nn.Conv2d(hidden, hidden, config.patch_size // 2, stride=config.patch_size // 2),
        )
        self.patch_position = nn.Parameter(torch.randn(patches, hidden) * 0.02)
        self.token_embedding = nn.Embedding(len(config.tokens) + 1, hidden, padding_idx=PAD)
        self.caption_type = nn.Parameter(torch.randn(hidden) * 0.02)
        self.cls = nn.Parameter(torch.randn(hidden) * 0.02)
        self.fusion = fusion_encoder(
            hidden, config.fusion_heads, config.fusion_layers, config.dropout
        )
        self.head = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, len(config.labels)))

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        patches = self.stem(images).flatten(2).transpose(1, 2) + self.patch_position
        words = self.token_embedding(tokens) + self.caption_type
        cls = self.cls.expand(len(images), 1, -1)
        x = torch.cat([cls, patches, words], dim=1)
        pad = torch.cat(
            [torch.zeros(len(images), 1 + patches.shape[1], dtype=torch.bool), tokens == PAD],
            dim=1,
        )
        out: torch.Tensor = self.head(self.fusion(x, src_key_padding_mask=pad)[:, 0])
        return out

    @torch.no_grad()
    def probabilities(self, images: torch.Tensor, tokens: torch.Tensor, batch: int) -> np.ndarray:
        self.eval()
        out = [
            F.softmax(self(images[s : s + batch], tokens[s : s + batch]), dim=-1)
            for s in range(0, len(images), batch)
        ]
        return torch.cat(out).numpy() if out else np.zeros((0, len(self.config.labels)))

    def save_pretrained(self, url: str) -> None:
        save_checkpoint(self, self.config, url)

    @classmethod
    def from_pretrained(cls, url: str) -> InspectorModel:
        config, state = load_checkpoint(
            url, InspectorConfig, "availability inspector", ": run `cg4ctr train-inspector` first"
        )
        model = cls(config)
        model.load_state_dict(state)
        model.eval()
        return model


# --------------------------------------------------------------------------- inputs


class InputReader:
    """Reads and stacks the inspector's inputs; the captioner is loaded on first use."""

    def __init__(self, ws: Workspace, config: InspectorConfig) -> None:
        self.ws = ws
        self.config = config
        self._interrogator: Interrogator | None = None
        self._cache: dict[str, np.ndarray] = {}

    def _image(self, uri: str, cache: bool) -> np.ndarray:
        """(3 or 1, S, S) float32 in [0, 1], resized to the model's side."""
        from PIL import Image

        if uri in self._cache:
            return self._cache[uri]
        limits = self.ws.params.storage
        image = storage.read_image(
            self.ws.resolve(uri), limits.max_image_bytes, limits.max_image_pixels
        )
        size = (self.config.image_size, self.config.image_size)
        array = np.asarray(image.convert("RGB").resize(size, Image.Resampling.BILINEAR))
        out = array.transpose(2, 0, 1).astype(np.float32) / 255.0
        if cache:
            self._cache[uri] = out
        return out

    @staticmethod
    def _stack(product: np.ndarray, generated: np.ndarray, mask: np.ndarray) -> np.ndarray:
        from scipy import ndimage

        inside = mask[0] > 0.5
        colour = product[:, inside].mean(axis=1) if inside.any() else product.mean(axis=(1, 2))
        to_colour = np.linalg.norm(generated - colour[:, None, None], axis=0) / np.sqrt(3.0)
        away = ndimage.distance_transform_edt(~inside) / inside.shape[0] if inside.any() else 1.0
        maps = np.stack([to_colour, np.broadcast_to(away, inside.shape)])
        return np.concatenate([product, generated, mask, maps]).astype(np.float32)

    def captions(self, images: list[np.ndarray]) -> list[list[str]]:
        from cg4ctr_tasks.caption import Interrogator, load_clip
        from cg4ctr_tasks.prompts.vocab import load_vocab

        params = self.ws.params
        if self._interrogator is None:
            self._interrogator = Interrogator(
                *load_clip(params.caption.clip_model), load_vocab(params.vocab), params.caption
            )
        out: list[list[str]] = []
        for start in range(0, len(images), params.caption.batch_size):
            out += self._interrogator.caption(images[start : start + params.caption.batch_size])
        return out

    def read(
        self, product_uris: Sequence[str], image_uris: Sequence[str], mask_uris: Sequence[str]
    ) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """Stacked images, caption token ids and the captions (space-joined) of the rows."""
        generated = [self._image(u, cache=False) for u in image_uris]
        stacked = [
            self._stack(self._image(p, True), g, self._image(m, True)[:1])
            for p, g, m in zip(product_uris, generated, mask_uris, strict=True)
        ]
        pixels = [np.round(g.transpose(1, 2, 0) * 255).astype(np.uint8) for g in generated]
        captions = self.captions(pixels) if pixels else []
        tokens = encode_token_sets(captions, self.config.tokens)
        images = torch.from_numpy(np.stack(stacked)) if stacked else torch.zeros(0)
        return images, torch.from_numpy(tokens), [" ".join(c) for c in captions]


def item_images(ws: Workspace) -> dict[str, str]:
    items = storage.read_parquet(ws.items_table, columns=["item_id", "image_uri"])
    return dict(zip(items["item_id"].astype(str), items["image_uri"].astype(str), strict=True))


# --------------------------------------------------------------------------- training


@dataclass(frozen=True)
class TrainSummary:
    model: str
    samples: int
    labels: dict[str, int]
    epochs: int
    best_epoch: int
    train_loss_first: float
    train_loss_last: float
    val_accuracy: float | None
    skipped: bool
    seconds: float

    def as_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


def _digest(table: pd.DataFrame, ip: InspectorParams) -> str:
    spec = table[["sample_id", "image_uri", "mask_uri", "label"]].to_json(orient="values")
    return hashlib.sha256((spec + ip.model_dump_json()).encode()).hexdigest()


def _balanced_accuracy(
    model: InspectorModel,
    images: torch.Tensor,
    tokens: torch.Tensor,
    y: torch.Tensor,
    idx: torch.Tensor,
) -> float:
    """Mean recall over the classes present: a model that calls everything available scores
    1 / classes however rare the failures are."""
    predicted = model.probabilities(images[idx], tokens[idx], len(idx)).argmax(axis=1)
    truth = y[idx].numpy()
    return float(np.mean([(predicted[truth == c] == c).mean() for c in np.unique(truth)]))


def train_inspector(ws: Workspace, force: bool = False) -> TrainSummary:
    """Fit the inspector on the labelled table (random horizontal flips); the epoch with the
    best balanced accuracy on held-out items is kept. Classes are weighted by inverse frequency
    to ``inspector.class_weight_power`` (failures are the rare classes)."""
    from cg4ctr_tasks.prompts.vocab import load_vocab

    started = time.perf_counter()
    ip = ws.params.inspector
    path = storage.join(labelled_set_dir(ws), "labels.parquet")
    if not storage.exists(path):
        raise UserError(
            f"{path} not found: label candidates first (`cg4ctr sim label-availability` in the "
            "simulated world; an annotated table with sample_id, item_id, image_uri, mask_uri, "
            "label otherwise)"
        )
    table = storage.read_parquet(path)
    missing = {"sample_id", "item_id", "image_uri", "mask_uri", "label"} - set(table.columns)
    if missing:
        raise UserError(f"{path} lacks columns {sorted(missing)}")
    unknown = sorted(set(table["label"]) - set(LABELS))
    if unknown:
        raise UserError(f"{path}: unknown labels {unknown} (expected {list(LABELS)})")
    target = ws.model_dir("inspector")
    digest = _digest(table, ip)
    counts = label_counts(table["label"])
    if not force and storage.exists(storage.join(target, CONFIG_NAME)):
        existing = InspectorModel.from_pretrained(target)
        if existing.config.extra.get("data_digest") == digest:
            facts = existing.config.extra
            return TrainSummary(
                target,
                len(table),
                counts,
                ip.epochs,
                facts["best_epoch"],
                facts["train_loss_first"],
                facts["train_loss_last"],
                facts["val_accuracy"],
                True,
                0.0,
            )
    torch.manual_seed(ws.params.seed)
    config = InspectorConfig.from_params(ip, load_vocab(ws.params.vocab).tokens)
    model = InspectorModel(config)
    products = item_images(ws)
    images, tokens, _ = InputReader(ws, config).read(
        [products[str(i)] for i in table["item_id"]],
        table["image_uri"].astype(str).tolist(),
        table["mask_uri"].astype(str).tolist(),
    )
    y = torch.tensor([LABELS.index(label) for label in table["label"]], dtype=torch.long)
    items = sorted(set(table["item_id"].astype(str)))
    rng = np.random.default_rng(ws.params.seed)
    held = set(rng.permutation(items)[: int(round(ip.val_fraction * len(items)))].tolist())
    is_val = torch.tensor(table["item_id"].astype(str).isin(held).to_numpy())
    train_idx = torch.nonzero(~is_val).squeeze(1)
    val_idx = torch.nonzero(is_val).squeeze(1)
    frequency = torch.bincount(y[train_idx], minlength=len(LABELS)).double()
    weight = (frequency.sum() / (len(LABELS) * frequency.clamp(min=1))) ** ip.class_weight_power
    weight = torch.where(frequency > 0, weight, 0.0).float()
    optimiser = torch.optim.Adam(model.parameters(), lr=ip.learning_rate)
    generator = torch.Generator().manual_seed(ws.params.seed)
    losses: list[float] = []
    best: tuple[float, int, dict[str, torch.Tensor]] | None = None
    for epoch in range(1, ip.epochs + 1):
        model.train()
        order = train_idx[torch.randperm(len(train_idx), generator=generator)]
        total = 0.0
        for start in range(0, len(order), ip.batch_size):
            batch = order[start : start + ip.batch_size]
            flip = torch.rand(len(batch), generator=generator) < 0.5  # labels are mirror-free
            pixels = torch.where(flip[:, None, None, None], images[batch].flip(-1), images[batch])
            loss = F.cross_entropy(model(pixels, tokens[batch]), y[batch], weight=weight)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            total += float(loss.detach()) * len(batch)
        losses.append(total / max(1, len(order)))
        score = _balanced_accuracy(model, images, tokens, y, val_idx if len(val_idx) else train_idx)
        if best is None or score >= best[0]:
            best = (score, epoch, {k: v.clone() for k, v in model.state_dict().items()})
    assert best is not None
    model.load_state_dict(best[2])
    val_accuracy = None
    if len(val_idx):
        probs = model.probabilities(images[val_idx], tokens[val_idx], ip.batch_size)
        val_accuracy = round(float((probs.argmax(1) == y[val_idx].numpy()).mean()), 4)
    facts = {
        "data_digest": digest,
        "samples": len(table),
        "labels": counts,
        "best_epoch": best[1],
        "train_loss_first": round(losses[0], 4),
        "train_loss_last": round(losses[-1], 4),
        "val_accuracy": val_accuracy,
        "val_items": sorted(held),
    }
    model.config = InspectorConfig(**{**asdict(config), "extra": facts})
    model.save_pretrained(target)
    return TrainSummary(
        model=target,
        samples=len(table),
        labels=counts,
        epochs=ip.epochs,
        best_epoch=best[1],
        train_loss_first=facts["train_loss_first"],
        train_loss_last=facts["train_loss_last"],
        val_accuracy=val_accuracy,
        skipped=False,
        seconds=round(time.perf_counter() - started, 2),
    )


# --------------------------------------------------------------------------- inspect


def retry_seed(seed: int, attempt: int) -> int:
    """Attempt 0 keeps the candidate's seed; later attempts derive a new one from it."""
    if attempt == 0:
        return int(seed)
    key = f"{int(seed)}/retry/{attempt}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "big") >> 1


def attempt_uri(uri: str, attempt: int) -> str:
    """``.../<candidate>.png`` for attempt 0, ``.../<candidate>-aNN.png`` after: earlier
    attempts' images are never overwritten."""
    if attempt == 0:
        return uri
    stem, dot, suffix = uri.rpartition(".")
    return f"{stem}-a{attempt:02d}{dot}{suffix}"


@dataclass(frozen=True)
class InspectSummary:
    round: int
    enabled: bool
    candidates: int
    attempts: int  # images inspected, first attempts included
    regenerated: int  # extra generations made by this call (reused ones not counted)
    available_first: int  # judged available at the first attempt
    available_final: int
    labels_first: dict[str, int]
    labels_final: dict[str, int]
    parts_total: int
    parts_written: int
    parts_skipped: int
    complete: bool
    seconds: float

    def as_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


def inspect_round(
    ws: Workspace, round_id: int, shard: Shard | None = None, force: bool = False
) -> InspectSummary:
    """Label every candidate; regenerate rejected ones with new seeds (recurrent generation).

    Parts of ``inspector.shard_size`` items are resumable. When every part exists, all attempts
    go to ``inspection.parquet`` and ``candidates.parquet`` is rewritten with each candidate's
    final attempt (the first judged available, else the most probably available one), so
    caption, score and select see the inspected creatives. Re-running ``generate`` restores
    the first attempts; re-running ``inspect`` after it restores the final ones.
    """
    from cg4ctr_tasks.generate import CANDIDATE_COLUMNS, Inpainter, plan_candidates

    started = time.perf_counter()
    ip = ws.params.inspector
    round_dir = ws.round_dir(round_id)
    candidates_path = storage.join(round_dir, "candidates.parquet")
    if not ip.enabled:
        return InspectSummary(round_id, False, 0, 0, 0, 0, 0, {}, {}, 0, 0, 0, True, 0.0)
    if not storage.exists(candidates_path):
        raise UserError(f"round {round_id} has no candidates: run `cg4ctr generate` first")
    plan, _ = plan_candidates(ws, round_id)
    model = InspectorModel.from_pretrained(ws.model_dir("inspector"))
    reader = InputReader(ws, model.config)
    products = item_images(ws)
    inpainter = Inpainter(ws, round_id, sorted(set(plan["item_id"])))
    masks = inpainter.masks

    def judge(rows: pd.DataFrame) -> pd.DataFrame:
        """Captions, probabilities and label of each row, read batch by batch (bounded memory)."""
        captions: list[str] = []
        chunks = []
        for start in range(0, len(rows), ip.batch_size):
            chunk = rows.iloc[start : start + ip.batch_size]
            images, tokens, texts = reader.read(
                [products[i] for i in chunk["item_id"]],
                chunk["image_uri"].tolist(),
                [masks[i] for i in chunk["item_id"]],
            )
            chunks.append(model.probabilities(images, tokens, ip.batch_size))
            captions += texts
        probs = np.concatenate(chunks) if chunks else np.zeros((0, len(LABELS)))
        out = rows.copy()
        out["caption"] = captions
        out["label"] = [LABELS[i] for i in probs.argmax(axis=1)]
        for j, label in enumerate(LABELS):
            out[f"p_{label}"] = probs[:, j].astype(np.float64)
        return out

    def process(rows: range) -> pd.DataFrame:
        part = plan.iloc[rows.start : rows.stop].reset_index(drop=True)
        attempts = [judge(part.assign(attempt=0))]
        pending = attempts[0].loc[attempts[0]["label"] != LABELS[0], CANDIDATE_COLUMNS]
        for attempt in range(1, ip.max_attempts):
            if pending.empty:
                break
            retry = pending.assign(
                attempt=attempt,
                seed=[retry_seed(s, attempt) for s in pending["seed"]],
                image_uri=[attempt_uri(u, attempt) for u in pending["image_uri"]],
            ).reset_index(drop=True)
            inpainter.run(retry, force=False)
            judged = judge(retry)
            attempts.append(judged)
            pending = judged.loc[judged["label"] != LABELS[0], CANDIDATE_COLUMNS]
        log = pd.concat(attempts, ignore_index=True)
        # The final attempt: the first accepted one, else the most probably available one.
        ranked = log.assign(accepted=log["label"] == LABELS[0]).sort_values(
            ["candidate_id", "accepted", "p_available", "attempt"],
            ascending=[True, False, False, True],
            kind="stable",
        )
        final = ranked.drop_duplicates("candidate_id").set_index("candidate_id")
        log["final"] = log["attempt"] == log["candidate_id"].map(final["attempt"])
        out = final.loc[part["candidate_id"]].reset_index()[CANDIDATE_COLUMNS]
        per_candidate = {
            c: rows.to_json(orient="records", double_precision=15)
            for c, rows in log[INSPECTION_COLUMNS].groupby("candidate_id", sort=False)
        }
        return out.assign(attempts=out["candidate_id"].map(per_candidate))

    run = run_parts(
        plan["candidate_id"].tolist(),
        "candidate_id",
        ip.shard_size * max(1, len(plan) // plan["item_id"].nunique()),
        storage.join(round_dir, "parts", "inspection"),
        shard or Shard(0, 1),
        force,
        process,
        f"inspect round {round_id}",
    )
    summary: dict[str, Any] = {
        "attempts": 0,
        "available_first": 0,
        "available_final": 0,
        "labels_first": {},
        "labels_final": {},
    }
    if run.merged is not None:
        log = pd.concat(
            [pd.DataFrame(json.loads(text)) for text in run.merged["attempts"]],
            ignore_index=True,
        )[INSPECTION_COLUMNS]
        storage.write_parquet(storage.join(round_dir, "inspection.parquet"), log)
        storage.write_parquet(candidates_path, run.merged[CANDIDATE_COLUMNS])
        first, final = log[log["attempt"] == 0], log[log["final"]]
        summary = {
            "attempts": len(log),
            "available_first": int((first["label"] == LABELS[0]).sum()),
            "available_final": int((final["label"] == LABELS[0]).sum()),
            "labels_first": label_counts(first["label"]),
            "labels_final": label_counts(final["label"]),
        }
    return InspectSummary(
        round=round_id,
        enabled=True,
        candidates=len(plan),
        regenerated=inpainter.generated,
        parts_total=run.parts_total,
        parts_written=run.parts_written,
        parts_skipped=run.parts_skipped,
        complete=run.merged is not None,
        seconds=round(time.perf_counter() - started, 2),
        **summary,
    )
