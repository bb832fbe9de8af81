"""Scoring with a trained reward model: a round's candidates (``cg4ctr score --round N``).

Scores are the model's CTR predictions; ``select`` keeps the top-k per (item, user group). The
output records which model produced it, so a retrained model makes the old scores stale and a
re-run with the same model is skipped.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from cg4ctr_tasks import storage
from cg4ctr_tasks.errors import UserError
from cg4ctr_tasks.reward.data import attach_inputs, read_captions
from cg4ctr_tasks.reward.features import Encoders
from cg4ctr_tasks.reward.model import CONFIG_NAME, WEIGHTS_NAME, RewardModel, local_folder
from cg4ctr_tasks.reward.train import cached_features, feature_cache_root
from cg4ctr_tasks.workspace import Workspace

SCORE_COLUMNS = ["candidate_id", "item_id", "user_group", "score"]
MODEL_KEY = b"cg4ctr.reward_model"


def load_reward(ws: Workspace, folder: str | None = None) -> tuple[RewardModel, Encoders, str]:
    """The trained model, its encoders (with the shared feature cache) and its folder."""
    folder = folder or ws.model_dir("reward")
    local = local_folder(folder)
    model = RewardModel.from_pretrained(local)
    encoders = model.load_encoders(
        local, ws.params.reward, ws.params.storage, feature_cache_root(ws)
    )
    return model, encoders, folder


def model_digest(folder: str) -> str:
    digest = hashlib.sha256()
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        digest.update(storage.read_bytes(storage.join(folder, name)))
    return digest.hexdigest()


def predict(model: RewardModel, encoders: Encoders, rows: pd.DataFrame, batch: int) -> np.ndarray:
    """Predicted CTRs for rows with title, caption, image_url (and user_group for the group
    token); they rank as the model's scores do."""
    features = cached_features(encoders, rows, model.config.modalities)
    groups = (
        model.group_index([str(g) for g in rows["user_group"]])
        if model.config.user_groups
        else None
    )
    model.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(rows), batch):
            part = slice(start, start + batch)
            chunk = {m: v[part] for m, v in features.items()}
            scores = model(chunk, groups[part] if groups is not None else None)
            out.append(model.ctr(scores).numpy())
    return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)


def _existing_is_valid(path: str, digest: str, candidate_ids: set[str]) -> bool:
    if not storage.exists(path):
        return False
    fs, local = storage.url_to_fs(path)
    with fs.open(local, "rb") as handle:
        table = pq.read_table(handle)
    meta = table.schema.metadata or {}
    return (
        meta.get(MODEL_KEY) == digest.encode()
        and table.column_names == SCORE_COLUMNS
        and set(table.column("candidate_id").to_pylist()) == candidate_ids
    )


def score_round(ws: Workspace, round_id: int, force: bool = False) -> dict[str, Any]:
    """Write ``rounds/round-NNN/scores.parquet`` for the round's candidates."""
    round_dir = ws.round_dir(round_id)
    candidates_path = storage.join(round_dir, "candidates.parquet")
    if not storage.exists(candidates_path):
        raise UserError(f"no candidates for round {round_id}: run `cg4ctr generate` first")
    candidates = storage.read_parquet(candidates_path)
    for column in ("candidate_id", "item_id", "user_group", "image_uri"):
        if column not in candidates.columns:
            raise UserError(f"{candidates_path} lacks the column {column!r}")
    for value in candidates["candidate_id"]:
        storage.safe_id(value, "candidate_id")
    out_path = storage.join(round_dir, "scores.parquet")
    folder = ws.model_dir("reward")
    model, encoders, folder = load_reward(ws, folder)
    digest = model_digest(folder)
    ids = set(candidates["candidate_id"].astype(str))
    if not force and _existing_is_valid(out_path, digest, ids):
        return {"round": round_id, "scores": out_path, "candidates": len(ids), "skipped": True}
    captions = read_captions(storage.join(round_dir, "captions.parquet"), "candidate_id")
    rows = attach_inputs(ws, candidates, captions, "candidate_id")
    scores = predict(model, encoders, rows, ws.params.reward.batch_size)
    frame = pd.DataFrame(
        {
            "candidate_id": rows["candidate_id"].astype(str),
            "item_id": rows["item_id"].astype(str),
            "user_group": rows["user_group"].astype(str),
            "score": scores.astype(np.float64),
        }
    )
    table = pa.Table.from_pandas(frame, preserve_index=False)
    table = table.replace_schema_metadata({MODEL_KEY: digest.encode()})
    storage.write_parquet(out_path, table)
    return {
        "round": round_id,
        "scores": out_path,
        "candidates": len(frame),
        "score_mean": float(scores.mean()) if len(scores) else None,
        "skipped": False,
    }
