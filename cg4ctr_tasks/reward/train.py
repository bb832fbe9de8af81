"""Training theta_r: Eq 14-17 over whole lists, epochs chosen on the validation split.

Batches hold whole lists (an item, or an (item, user group) pair), padded to the longest list
in the batch; padded positions are masked out of every softmax and every sum. The model state
with the lowest validation loss is kept; the test split is never touched here.
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from cg4ctr_tasks import storage
from cg4ctr_tasks.errors import UserError
from cg4ctr_tasks.params import RewardParams
from cg4ctr_tasks.reward.data import RewardData, build_reward_data
from cg4ctr_tasks.reward.features import Encoders, ImageEncoder, TextEncoder
from cg4ctr_tasks.reward.model import CONFIG_NAME, WEIGHTS_NAME, RewardConfig, RewardModel
from cg4ctr_tasks.workspace import Workspace

BatchFeatures = Callable[[torch.Tensor], dict[str, torch.Tensor]]


def reward_loss(
    scores: torch.Tensor,
    target: torch.Tensor,
    impressions: torch.Tensor,
    mask: torch.Tensor,
    lambda_r: float,
    temperature: float = 1.0,
    ctr: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Eq 17 total, Eq 14 listwise, Eq 16 pointwise) for padded (lists, positions) tensors.

    target: per-creative CTR (raw or smoothed); impressions give w^i (Eq 15), whose global
    normaliser cancels in Eq 14/16's ratio; mask is False on padding; ctr: the predicted CTR
    when it is not the score itself (a link function).
    """
    ctr = scores if ctr is None else ctr
    zero = torch.zeros_like(scores)
    target = torch.where(mask, target, zero)
    weights = torch.where(mask, impressions, zero).sum(dim=1)
    norm = target / target.sum(dim=1, keepdim=True).clamp(min=torch.finfo(target.dtype).tiny)
    log_p = torch.log_softmax((scores / temperature).masked_fill(~mask, float("-inf")), dim=1)
    list_i = -torch.where(mask, norm * log_p, zero).sum(dim=1)
    point_i = torch.where(mask, (target - ctr) ** 2, zero).sum(dim=1)
    total_w = weights.sum()
    list_loss = (weights * list_i).sum() / total_w
    point_loss = (weights * point_i).sum() / total_w
    return (1.0 - lambda_r) * list_loss + lambda_r * point_loss, list_loss, point_loss


@dataclass(frozen=True)
class Lists:
    """A split's rows as tensors; lists are contiguous runs of rows."""

    target: torch.Tensor
    impressions: torch.Tensor
    groups: torch.Tensor | None
    starts: np.ndarray
    sizes: np.ndarray

    @classmethod
    def from_rows(cls, rows: pd.DataFrame, groups: torch.Tensor | None) -> Lists:
        ids = rows["list_id"].to_numpy()
        change = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
        sizes = np.diff(np.r_[change, len(ids)])
        return cls(
            target=torch.tensor(rows["target"].to_numpy(), dtype=torch.float32),
            impressions=torch.tensor(rows["impressions"].to_numpy(), dtype=torch.float32),
            groups=groups,
            starts=change,
            sizes=sizes,
        )

    def batches(self, batch_size: int, rng: np.random.Generator | None) -> list[np.ndarray]:
        """Lists packed into batches of at most ``batch_size`` rows (one list at least)."""
        order = rng.permutation(len(self.sizes)) if rng is not None else np.arange(len(self.sizes))
        out: list[np.ndarray] = []
        current: list[int] = []
        rows = 0
        for index in order:
            if current and rows + self.sizes[index] > batch_size:
                out.append(np.asarray(current))
                current, rows = [], 0
            current.append(index)
            rows += int(self.sizes[index])
        if current:
            out.append(np.asarray(current))
        return out

    def padded(self, lists: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Row indices (lists, longest) with a validity mask."""
        width = int(self.sizes[lists].max())
        offsets = np.arange(width)
        index = self.starts[lists][:, None] + offsets[None, :]
        mask = offsets[None, :] < self.sizes[lists][:, None]
        return torch.from_numpy(np.where(mask, index, 0)), torch.from_numpy(mask)


def _batch_loss(
    model: RewardModel,
    data: Lists,
    lists: np.ndarray,
    features: BatchFeatures,
    params: RewardParams,
    temperature: float,
) -> tuple[torch.Tensor, float]:
    """Eq 17 on a batch of whole lists, and the batch's impressions (its weight)."""
    index, mask = data.padded(lists)
    rows = index[mask]
    groups = data.groups[rows] if data.groups is not None else None
    flat = model(features(rows), groups)
    scores = torch.zeros(index.shape, dtype=flat.dtype).masked_scatter(mask, flat)
    impressions = data.impressions[index]
    loss, _, _ = reward_loss(
        scores,
        data.target[index],
        impressions,
        mask,
        params.lambda_r,
        temperature,
        model.ctr(scores),
    )
    return loss, float(impressions[mask].sum())


def evaluate_loss(
    model: RewardModel,
    data: Lists,
    features: BatchFeatures,
    params: RewardParams,
    temperature: float,
) -> float:
    """Eq 17 over a whole split, batches combined with their impression weights."""
    model.eval()
    total = weight = 0.0
    with torch.no_grad():
        for lists in data.batches(params.batch_size, rng=None):
            loss, w = _batch_loss(model, data, lists, features, params, temperature)
            total += w * float(loss)
            weight += w
    return total / weight


@dataclass(frozen=True)
class FitResult:
    best_epoch: int
    val_losses: list[float]
    train_losses: list[float]
    samples_per_s: float


def fit(
    model: RewardModel,
    train: Lists,
    val: Lists,
    train_features: BatchFeatures,
    val_features: BatchFeatures,
    params: RewardParams,
    temperature: float,
    seed: int,
    also_train: list[torch.nn.Module] | None = None,
) -> FitResult:
    """Adam on Eq 17; keeps (and loads back) the state with the lowest validation loss.

    ``also_train``: encoders being fine-tuned, optimised and snapshotted with the model.
    """
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    modules = torch.nn.ModuleList([model, *(also_train or [])])
    optimizer = torch.optim.Adam(modules.parameters(), lr=params.learning_rate)
    best_state: dict[str, Any] | None = None
    best_epoch, best_val = 0, float("inf")
    val_losses, train_losses = [], []
    samples, seconds = 0, 0.0
    for epoch in range(1, params.epochs + 1):
        model.train()
        started, total, weight = time.perf_counter(), 0.0, 0
        for lists in train.batches(params.batch_size, rng):
            loss, _ = _batch_loss(model, train, lists, train_features, params, temperature)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(lists)
            weight += len(lists)
        seconds += time.perf_counter() - started
        samples += int(train.sizes.sum())
        train_losses.append(total / weight)
        val_losses.append(evaluate_loss(model, val, val_features, params, temperature))
        if val_losses[-1] < best_val:
            best_val, best_epoch = val_losses[-1], epoch
            best_state = copy.deepcopy(modules.state_dict())
    if best_state is not None:
        modules.load_state_dict(best_state)
    model.eval()
    return FitResult(best_epoch, val_losses, train_losses, samples / max(seconds, 1e-9))


def feature_cache_root(ws: Workspace) -> str:
    """Shared by training, evaluation and scoring; derived data, safe to delete."""
    return storage.join(ws.base, "cache", "reward-features")


def load_params_encoders(ws: Workspace, params: RewardParams) -> Encoders:
    """The encoders named in params (before any model exists)."""
    text = TextEncoder(params.text_encoder, params.text_max_length)
    image = ImageEncoder(
        params.image_encoder, params.image_checkpoint, params.image_size, init_seed=ws.params.seed
    )
    return Encoders(text, image, params, ws.params.storage, feature_cache_root(ws))


def cached_features(
    encoders: Encoders, rows: pd.DataFrame, modalities: list[str]
) -> dict[str, torch.Tensor]:
    """Frozen features of every row for the modalities the model uses (cache hits are free)."""
    out = {}
    for modality in modalities:
        if modality == "image":
            array = encoders.images(list(rows["image_url"]))
        else:
            array = encoders.texts([str(t) for t in rows[modality]])
        out[modality] = torch.from_numpy(array)
    return out


def lookup(table: dict[str, torch.Tensor]) -> BatchFeatures:
    """Batch features as rows of precomputed (cached) feature tables."""

    def features(index: torch.Tensor) -> dict[str, torch.Tensor]:
        return {m: v[index] for m, v in table.items()}

    return features


def raw_features(encoders: Encoders, rows: pd.DataFrame, modalities: list[str]) -> BatchFeatures:
    """Features computed through the encoders on every call (fine-tuning: gradients flow)."""
    limits = encoders.limits
    arrays = (
        [
            storage.read_image_array(u, limits.max_image_bytes, limits.max_image_pixels)
            for u in rows["image_url"]
        ]
        if "image" in modalities
        else []
    )

    def features(index: torch.Tensor) -> dict[str, torch.Tensor]:
        chosen = index.tolist()
        out = {}
        for modality in modalities:
            if modality == "image":
                pixels = encoders.image.preprocess([arrays[i] for i in chosen])
                out[modality] = encoders.image(pixels)
            else:
                out[modality] = encoders.text([str(rows[modality].iat[i]) for i in chosen])
        return out

    return features


def _data_fingerprint(ws: Workspace, params: RewardParams, data: RewardData) -> str:
    columns = ["list_id", "creative_id", "impressions", "clicks", "title", "caption", "image_uri"]
    digest = hashlib.sha256(params.model_dump_json().encode())
    digest.update(str(ws.params.seed).encode())
    digest.update(pd.util.hash_pandas_object(data.rows[columns], index=False).to_numpy().tobytes())
    return digest.hexdigest()


def _group_tensor(model: RewardModel, rows: pd.DataFrame) -> torch.Tensor | None:
    if not model.config.user_groups:
        return None
    return model.group_index([str(g) for g in rows["user_group"]])


def reward_config(params: RewardParams, encoders: Encoders, groups: list[str]) -> RewardConfig:
    """The architecture params and the loaded encoders determine (no training facts yet)."""
    return RewardConfig(
        text_encoder=params.text_encoder,
        text_dim=encoders.text.dim,
        text_max_length=params.text_max_length,
        image_encoder=params.image_encoder,
        image_checkpoint=params.image_checkpoint,
        image_size=encoders.image.image_size,
        image_dim=encoders.image.dim,
        hidden_size=params.hidden_size,
        fusion_layers=params.fusion_layers,
        fusion_heads=params.fusion_heads,
        dropout=params.dropout,
        modalities=list(params.modalities),
        user_groups=groups,
        ctr_link=params.ctr_link,
    )


def train_reward(
    ws: Workspace,
    force: bool = False,
    model_dir: str | None = None,
    params: RewardParams | None = None,
    before: str | None = None,
) -> dict[str, Any]:
    """Train theta_r on the logged creatives and save it to ``models/reward`` (or model_dir).

    ``before`` (a round's date) limits the logs to earlier days, so re-running a past round's
    refresh sees what that night saw. Skips when the folder already holds a model trained on
    the same data and params.
    """
    params = params or ws.params.reward
    folder = model_dir or ws.model_dir("reward")
    data = build_reward_data(ws, params, before)
    fingerprint = _data_fingerprint(ws, params, data)
    config_path = storage.join(folder, CONFIG_NAME)
    if (
        not force
        and storage.exists(config_path)
        and storage.exists(storage.join(folder, WEIGHTS_NAME))
    ):
        done = RewardConfig.from_json(storage.read_bytes(config_path).decode("utf-8"))
        if done.extra.get("data_fingerprint") == fingerprint:
            return {**done.extra["summary"], "model_dir": folder, "skipped": True}

    train_rows, val_rows = data.split("train"), data.split("val")
    if train_rows.empty or val_rows.empty:
        raise UserError(
            f"the split by item left train={len(train_rows)} / val={len(val_rows)} rows: "
            "add items or change reward.val_fraction"
        )
    encoders = load_params_encoders(ws, params)
    groups = sorted(data.rows["user_group"].astype(str).unique()) if data.by_group else []
    temperature = params.list_temperature or float(
        train_rows["clicks"].sum() / train_rows["impressions"].sum()
    )
    config = reward_config(params, encoders, groups)
    torch.manual_seed(ws.params.seed)
    model = RewardModel(config)
    train = Lists.from_rows(train_rows, _group_tensor(model, train_rows))
    val = Lists.from_rows(val_rows, _group_tensor(model, val_rows))
    encode_started = time.perf_counter()
    if params.finetune_encoders:
        train_features = raw_features(encoders, train_rows, config.modalities)
        val_features = raw_features(encoders, val_rows, config.modalities)
        also_train: list[torch.nn.Module] = [encoders.text, encoders.image]
    else:
        train_features = lookup(cached_features(encoders, train_rows, config.modalities))
        val_features = lookup(cached_features(encoders, val_rows, config.modalities))
        also_train = []
    encode_s = time.perf_counter() - encode_started
    result = fit(
        model,
        train,
        val,
        train_features,
        val_features,
        params,
        temperature,
        ws.params.seed,
        also_train,
    )
    # config.json holds only what the data and params determine (no paths, no timings), so the
    # same inputs give a byte-identical model folder and the scores' model digest (score.py)
    # does not change with the workspace's location or the machine's speed
    summary = {
        "lists": {s: int(data.split(s)["list_id"].nunique()) for s in ("train", "val", "test")},
        "rows": {s: int(len(data.split(s))) for s in ("train", "val", "test")},
        "lists_by": "item,user_group" if data.by_group else "item",
        "min_impressions": params.min_impressions,
        "beta_prior": list(data.prior) if data.prior else None,
        "temperature": temperature,
        "best_epoch": result.best_epoch,
        "epochs": params.epochs,
        "val_loss": min(result.val_losses),
        "val_losses": [round(v, 6) for v in result.val_losses],
    }
    model.config = RewardConfig(
        **{
            **json.loads(config.to_json()),
            "extra": {"data_fingerprint": fingerprint, "summary": summary},
        }
    )
    model.save_pretrained(folder, encoders, finetuned=params.finetune_encoders)
    return {
        **summary,
        "model_dir": folder,
        "train_samples_per_s": round(result.samples_per_s, 1),
        "feature_seconds": round(encode_s, 2),
        "skipped": False,
    }
