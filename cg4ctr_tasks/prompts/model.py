"""The prompt model theta_p: P(click | query, prompt token set).

The prompt's tokens go through a transformer encoder without positional encodings and are
mean-pooled, so the prompt is treated as a *set* (order-free, any length). DeepFM then combines
the query-field embeddings and the pooled prompt vector: first-order terms, FM second-order
interactions (where "group g likes token t" lives) and a deep MLP. Saved as ``config.json`` +
``model.safetensors`` and loaded by path (local or ``s3://``) with :meth:`from_pretrained`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import nn

from cg4ctr_tasks.checkpoints import load_checkpoint, save_checkpoint
from cg4ctr_tasks.errors import UserError
from cg4ctr_tasks.prompts.features import PAD, QUERY_FIELDS, encode_fields, encode_token_sets

INIT_STD = 0.1


@dataclass(frozen=True)
class PromptModelConfig:
    field_values: dict[str, list[str]]  # known values per query field (index 0 = unseen)
    tokens: list[str]  # the vocabulary the model scores (token i has index i + 1)
    embed_dim: int
    layers: int
    heads: int
    hidden: int


class PromptModel(nn.Module):
    def __init__(self, config: PromptModelConfig) -> None:
        super().__init__()
        missing = set(QUERY_FIELDS) - set(config.field_values)
        if missing:
            raise UserError(f"prompt model config lacks query fields {sorted(missing)}")
        if config.embed_dim % config.heads:
            raise UserError(f"prompt embed_dim {config.embed_dim} not divisible by heads")
        self.config = config
        dim = config.embed_dim
        sizes = [len(config.field_values[name]) + 1 for name in QUERY_FIELDS]
        self.field_embeddings = nn.ModuleList(nn.Embedding(n, dim) for n in sizes)
        self.field_weights = nn.ModuleList(nn.Embedding(n, 1) for n in sizes)
        self.token_embedding = nn.Embedding(len(config.tokens) + 1, dim, padding_idx=PAD)
        layer = nn.TransformerEncoderLayer(
            dim, config.heads, dim_feedforward=2 * dim, dropout=0.0, batch_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, config.layers, enable_nested_tensor=False)
        self.token_weight = nn.Linear(dim, 1)
        vectors = len(QUERY_FIELDS) + 1
        self.deep = nn.Sequential(
            nn.Linear(vectors * dim, config.hidden),
            nn.ReLU(),
            nn.Linear(config.hidden, config.hidden),
            nn.ReLU(),
            nn.Linear(config.hidden, 1),
        )
        # Small embeddings (as in DeepFM): FM products of unit-scale vectors would start the
        # logits far from 0 and saturate the sigmoid.
        for embedding in [*self.field_embeddings, *self.field_weights, self.token_embedding]:
            nn.init.normal_(embedding.weight, std=INIT_STD)
        with torch.no_grad():
            self.token_embedding.weight[PAD].zero_()

    def pool_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Mean of the encoded non-padding tokens; an empty set pools to zeros."""
        pad = tokens == PAD
        empty = pad.all(dim=1, keepdim=True)
        # A fully masked row would give NaN attention: let it attend to its (zero) padding.
        encoded = self.encoder(self.token_embedding(tokens), src_key_padding_mask=pad & ~empty)
        keep = (~pad).unsqueeze(-1).to(encoded.dtype)
        return (encoded * keep).sum(dim=1) / keep.sum(dim=1).clamp(min=1.0)

    def forward(self, fields: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Click logits, shape (rows,), from field indices (rows, 5) and token indices."""
        pooled = self.pool_tokens(tokens)
        vectors = [emb(fields[:, i]) for i, emb in enumerate(self.field_embeddings)]
        vectors.append(pooled)
        stacked = torch.stack(vectors, dim=1)  # (rows, fields + 1, dim)
        first = sum(w(fields[:, i]) for i, w in enumerate(self.field_weights))
        first = first + self.token_weight(pooled)
        second = 0.5 * (stacked.sum(dim=1).pow(2) - stacked.pow(2).sum(dim=1)).sum(-1)
        deep = self.deep(stacked.flatten(1))
        return (first + deep).squeeze(-1) + second

    def encode(self, frame: pd.DataFrame, token_sets: list[list[str]]) -> tuple[torch.Tensor, ...]:
        """Tensors for :meth:`forward` from query columns and token lists."""
        fields = encode_fields(frame, self.config.field_values)
        tokens = encode_token_sets(token_sets, self.config.tokens)
        return torch.from_numpy(fields), torch.from_numpy(tokens)

    @torch.no_grad()
    def predict_ctr(self, frame: pd.DataFrame, token_sets: list[list[str]]) -> np.ndarray:
        self.eval()
        fields, tokens = self.encode(frame, token_sets)
        return torch.sigmoid(self(fields, tokens)).numpy().astype(np.float64)

    def save_pretrained(self, url: str) -> None:
        save_checkpoint(self, self.config, url)

    @classmethod
    def from_pretrained(cls, url: str) -> PromptModel:
        config, state = load_checkpoint(url, PromptModelConfig, "prompt model")
        model = cls(config)
        model.load_state_dict(state)
        model.eval()
        return model
