"""Query features of the prompt model: one categorical field each, with an unseen-value bucket.

The query is (user group, item id, item category, device, hour), as in the paper's prompt model.
Each field has a fixed list of known values saved in the model's config; index 0 of every field is
the bucket for unseen *and* absent values, so a new item, a new group or logs without
device/hour (the aggregated CTR tables) still encode instead of crashing.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pandas as pd

from cg4ctr_tasks import storage
from cg4ctr_tasks.errors import UserError
from cg4ctr_tasks.workspace import Workspace

QUERY_FIELDS = ("user_group", "item_id", "category", "device", "hour")
UNSEEN = 0  # index of the unseen/absent bucket of every field
PAD = 0  # token index of padding; vocab token i has index i + 1


def field_key(value: Any) -> str | None:
    """Canonical string of a value (``3``, ``3.0``, ``"3"`` are one hour); None if absent."""
    if value is None:
        return None
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if value.is_integer():
            return str(int(value))
    if isinstance(value, np.integer):
        return str(int(value))
    text = str(value)
    return text if text else None


def world_info(ws: Workspace) -> dict[str, Any]:
    """The public world description (data/world.json), or {} when the workspace has none."""
    path = storage.join(ws.data, "world.json")
    if not storage.exists(path):
        return {}
    loaded: dict[str, Any] = json.loads(storage.read_bytes(path))
    return loaded


def read_ctr_tables(ws: Workspace) -> pd.DataFrame:
    """All ingested per-(item, creative, user group) CTR tables, summed over dates."""
    fs, root = storage.url_to_fs(storage.join(ws.data, "ctr"))
    files = sorted(fs.glob(f"{root}/dt=*.parquet"))
    if not files:
        raise UserError(f"no CTR tables under {ws.data}/ctr: run `cg4ctr ingest` first")
    columns = ["item_id", "creative_id", "user_group", "impressions", "clicks"]
    frames = []
    for path in files:
        frame = storage.read_parquet(fs.unstrip_protocol(path))
        missing = set(columns) - set(frame.columns)
        if missing:
            raise UserError(f"{path}: CTR table lacks columns {sorted(missing)}")
        frames.append(frame[columns])
    table = pd.concat(frames, ignore_index=True)
    return table.groupby(columns[:3], as_index=False, sort=True)[columns[3:]].sum()


def user_groups(ws: Workspace) -> list[str]:
    """The user groups to serve: data/world.json's list, else those seen in the CTR tables."""
    groups = world_info(ws).get("user_groups")
    if groups:
        return [storage.safe_id(g, "user_group") for g in groups]
    seen = read_ctr_tables(ws)["user_group"].unique()
    return sorted(storage.safe_id(g, "user_group") for g in seen)


def field_values(ws: Workspace, items: pd.DataFrame) -> dict[str, list[str]]:
    """Known values of every query field, fixed when the bootstrap model is built."""
    info = world_info(ws)

    def unique(values: Iterable[Any]) -> list[str]:
        return sorted({key for key in map(field_key, values) if key is not None})

    return {
        "user_group": unique(user_groups(ws)),
        "item_id": unique(items["item_id"]),
        "category": unique([*items["category"], *info.get("categories", [])]),
        "device": unique(info.get("devices", [])),
        "hour": unique(info.get("hours", range(24))),
    }


def encode_fields(frame: pd.DataFrame, values: dict[str, list[str]]) -> np.ndarray:
    """(rows, fields) int64 indices; absent columns and unseen values map to ``UNSEEN``."""
    out = np.full((len(frame), len(QUERY_FIELDS)), UNSEEN, dtype=np.int64)
    for column, name in enumerate(QUERY_FIELDS):
        if name not in frame.columns:
            continue
        lookup = {value: index + 1 for index, value in enumerate(values[name])}
        keys = (field_key(v) for v in frame[name].tolist())
        out[:, column] = [lookup.get(k, UNSEEN) if k is not None else UNSEEN for k in keys]
    return out


def encode_token_sets(token_sets: Sequence[Sequence[str]], tokens: Sequence[str]) -> np.ndarray:
    """(rows, longest set) int64 token indices, PAD-filled; out-of-vocab words are dropped."""
    lookup = {token: index + 1 for index, token in enumerate(tokens)}
    encoded = [sorted({lookup[t] for t in row if t in lookup}) for row in token_sets]
    width = max((len(row) for row in encoded), default=0) or 1
    out = np.full((len(encoded), width), PAD, dtype=np.int64)
    for row, indices in enumerate(encoded):
        out[row, : len(indices)] = indices
    return out
