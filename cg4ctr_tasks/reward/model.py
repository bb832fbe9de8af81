"""The reward model theta_r: projected title / caption / image features (and optionally a
user-group token) fused by a small transformer encoder into one CTR score per creative.

The encoders themselves live in :mod:`features`; this module only sees their (usually cached)
output vectors, so training and scoring never re-run BERT/Swin on unchanged inputs. A folder
written by :meth:`RewardModel.save_pretrained` holds ``config.json`` + ``model.safetensors``,
plus the encoders' weights when they are not simply referenced by path (fine-tuned, or the
simulated world's fixed random image encoder).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from cg4ctr_tasks import storage
from cg4ctr_tasks.checkpoints import CONFIG_NAME, WEIGHTS_NAME, load_checkpoint
from cg4ctr_tasks.errors import UserError
from cg4ctr_tasks.params import RewardParams, StorageParams
from cg4ctr_tasks.reward.features import Encoders, ImageEncoder, TextEncoder

IMAGE_WEIGHTS_NAME = "image_encoder.safetensors"
TEXT_FOLDER = "text_encoder"
MODALITIES = ("title", "caption", "image")


def fusion_encoder(width: int, heads: int, layers: int, dropout: float) -> nn.TransformerEncoder:
    """The pre-norm transformer that fuses modality tokens (reward model, inspector)."""
    layer = nn.TransformerEncoderLayer(
        width,
        heads,
        dim_feedforward=2 * width,
        dropout=dropout,
        batch_first=True,
        norm_first=True,
    )
    return nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)


@dataclass(frozen=True)
class RewardConfig:
    text_encoder: str  # params value, or TEXT_FOLDER when saved inside the model folder
    text_dim: int
    text_max_length: int
    image_encoder: str  # timm model name
    image_checkpoint: str | None  # a path, or IMAGE_WEIGHTS_NAME inside the model folder
    image_size: int
    image_dim: int
    hidden_size: int
    fusion_layers: int
    fusion_heads: int
    dropout: float
    modalities: list[str]
    user_groups: list[str]  # empty: no user-group token (the paper's per-creative model)
    ctr_link: str = "identity"  # predicted CTR = link(score); folders saved before it: identity
    extra: dict[str, Any] = field(default_factory=dict)  # training facts (not architecture)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> RewardConfig:
        return cls(**json.loads(text))


class RewardModel(nn.Module):
    def __init__(self, config: RewardConfig) -> None:
        super().__init__()
        self.config = config
        hidden = config.hidden_size

        def project(dim: int) -> nn.Module:
            # LayerNorm first: frozen features (a random CNN's above all) have arbitrary scale.
            return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden))

        dims = {"title": config.text_dim, "caption": config.text_dim, "image": config.image_dim}
        self.projections = nn.ModuleDict({m: project(dims[m]) for m in config.modalities})
        n_tokens = len(config.modalities) + (1 if config.user_groups else 0)
        self.group_embedding = (
            nn.Embedding(len(config.user_groups), hidden) if config.user_groups else None
        )
        self.slot_embedding = nn.Parameter(torch.randn(n_tokens, hidden) * 0.02)
        self.fusion = fusion_encoder(
            hidden, config.fusion_heads, config.fusion_layers, config.dropout
        )
        self.head = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, 1))

    def group_index(self, groups: list[str]) -> torch.Tensor:
        known = {g: i for i, g in enumerate(self.config.user_groups)}
        unknown = sorted(set(groups) - set(known))
        if unknown:
            raise UserError(f"user groups {unknown} were not in the reward model's training data")
        return torch.tensor([known[g] for g in groups], dtype=torch.long)

    def forward(
        self, features: dict[str, torch.Tensor], groups: torch.Tensor | None = None
    ) -> torch.Tensor:
        """One score per creative: the softmax logit (Eq 14); :meth:`ctr` gives Eq 16's CTR."""
        tokens = [self.projections[m](features[m]) for m in self.config.modalities]
        if self.group_embedding is not None:
            if groups is None:
                raise ValueError("this reward model needs the user group of every creative")
            tokens.append(self.group_embedding(groups))
        x = torch.stack(tokens, dim=1) + self.slot_embedding
        out: torch.Tensor = self.head(self.fusion(x).mean(dim=1)).squeeze(-1)
        return out

    def ctr(self, scores: torch.Tensor) -> torch.Tensor:
        """The predicted CTR of forward's scores (a monotone link: the ranking is the same)."""
        return torch.sigmoid(scores) if self.config.ctr_link == "sigmoid" else scores

    def load_encoders(
        self, folder: str | None, params: RewardParams, limits: StorageParams, cache: str | None
    ) -> Encoders:
        """The encoders this model was trained with (weights in ``folder`` where saved there)."""
        cfg = self.config
        text_source = (
            storage.join(folder, TEXT_FOLDER)
            if folder and cfg.text_encoder == TEXT_FOLDER
            else cfg.text_encoder
        )
        own = (
            storage.join(folder, IMAGE_WEIGHTS_NAME)
            if folder and cfg.image_checkpoint == IMAGE_WEIGHTS_NAME
            else None
        )
        text = TextEncoder(text_source, cfg.text_max_length)
        image = ImageEncoder(
            cfg.image_encoder,
            None if own else cfg.image_checkpoint,
            cfg.image_size,
            own_weights=own,
        )
        return Encoders(text, image, params, limits, cache)

    def save_pretrained(self, folder: str, encoders: Encoders, finetuned: bool) -> None:
        """Write the folder (staged locally: renamed into place, or uploaded with the
        weights last); the encoders are saved unless referenced by path."""
        cfg = self.config
        with storage.staged_dir(folder, last=WEIGHTS_NAME) as tmp:
            text_ref, image_ref = cfg.text_encoder, cfg.image_checkpoint
            if finetuned:
                encoders.text.save_pretrained(str(tmp / TEXT_FOLDER))
                text_ref = TEXT_FOLDER
            if finetuned or cfg.image_checkpoint is None:
                state = {k: v.contiguous() for k, v in encoders.image.model.state_dict().items()}
                save_file(state, str(tmp / IMAGE_WEIGHTS_NAME))
                image_ref = IMAGE_WEIGHTS_NAME
            saved = RewardConfig(
                **{**asdict(cfg), "text_encoder": text_ref, "image_checkpoint": image_ref}
            )
            self.config = saved
            (tmp / CONFIG_NAME).write_text(saved.to_json(), "utf-8")
            state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
            save_file(state, str(tmp / WEIGHTS_NAME))

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> RewardModel:
        """Load a local folder (see :func:`local_folder` for object stores)."""
        config, state = load_checkpoint(
            str(folder), RewardConfig, "reward model", ": run `cg4ctr train-reward` first"
        )
        model = cls(config)
        model.load_state_dict(state)
        model.eval()
        return model


def local_folder(folder: str) -> str:
    """A local copy of a model folder on an object store (the folder itself when local)."""
    if not storage.exists(storage.join(folder, CONFIG_NAME)):
        raise UserError(f"no reward model in {folder}: run `cg4ctr train-reward` first")
    return storage.local_copy(folder)
