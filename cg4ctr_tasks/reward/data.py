"""Training and evaluation lists for the reward model, from the ingested CTR tables.

One row per (item, creative[, user group]) with its summed impressions and clicks over all
ingested days, its title, caption and image. Rows are grouped into lists: per item (the paper),
or per (item, user group) with the user-group token. The split is by item, from a hash of the
item id and the seed, so it is stable as days and items are added.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import pandas as pd

from cg4ctr_tasks import storage
from cg4ctr_tasks.catalog import captioned_creatives
from cg4ctr_tasks.errors import UserError
from cg4ctr_tasks.params import RewardParams
from cg4ctr_tasks.workspace import Workspace

SPLITS = ("train", "val", "test")


def _read_partitions(folder: str, what: str, before: str | None) -> pd.DataFrame:
    fs, path = storage.url_to_fs(folder)
    parts = sorted(fs.glob(f"{path}/dt=*.parquet")) if fs.exists(path) else []
    if before is not None:  # dt=YYYY-MM-DD.parquet: ISO dates compare as strings
        parts = [p for p in parts if p.rsplit("dt=", 1)[-1][:10] < before]
    if not parts:
        raise UserError(f"no {what} under {folder}: run `cg4ctr ingest` first")
    frames = [storage.read_parquet(f"{folder}/{p.rsplit('/', 1)[-1]}") for p in parts]
    return pd.concat(frames, ignore_index=True)


def load_ctr(ws: Workspace, by_group: bool, before: str | None = None) -> pd.DataFrame:
    """Impressions and clicks summed over every ingested day (days before ``before`` only)."""
    if by_group:
        raw = _read_partitions(
            storage.join(ws.data, "ctr"), "CTR tables (data/ctr/dt=*.parquet)", before
        )
        keys = ["item_id", "creative_id", "user_group"]
    else:
        raw = _read_partitions(
            storage.join(ws.data, "ctr", "creatives"),
            "per-creative CTR tables (data/ctr/creatives/dt=*.parquet)",
            before,
        )
        keys = ["item_id", "creative_id"]
    summed = raw.groupby(keys, as_index=False)[["impressions", "clicks"]].sum()
    return summed.astype({"impressions": "int64", "clicks": "int64"})


def read_captions(path: str, id_column: str) -> pd.DataFrame:
    if not storage.exists(path):
        raise UserError(f"captions table not found: {path} (run `cg4ctr caption` first)")
    captions = storage.read_parquet(path, columns=[id_column, "caption"])
    return captions.drop_duplicates(id_column, keep="last")


def attach_inputs(
    ws: Workspace,
    rows: pd.DataFrame,
    captions: pd.DataFrame,
    id_col: str,
    images: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Add title, caption (and image_uri from ``images``) to each row, plus the resolved image
    url; a missing input is an error naming the creatives."""
    items = storage.read_parquet(ws.items_table, columns=["item_id", "title"])
    out = rows.merge(items, on="item_id", how="left")
    if images is not None:
        out = out.merge(images[[id_col, "image_uri"]], on=id_col, how="left")
    out = out.merge(captions[[id_col, "caption"]], on=id_col, how="left")
    for column, source in (("title", "items"), ("image_uri", "images"), ("caption", "captions")):
        lacking = out.loc[out[column].isna(), id_col].astype(str).unique()
        if len(lacking):
            shown = ", ".join(sorted(lacking)[:5])
            raise UserError(
                f"{len(lacking)} creatives have no {column} in the {source} table: {shown}"
            )
    out["image_url"] = [ws.resolve(str(u)) for u in out["image_uri"]]
    return out


def split_of(item_id: str, seed: int, val_fraction: float, test_fraction: float) -> str:
    """Deterministic split by item: never lets one item's creatives straddle train and test."""
    digest = hashlib.sha256(f"{seed}:{item_id}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2.0**64
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"


def fit_beta_prior(clicks: np.ndarray, impressions: np.ndarray) -> tuple[float, float]:
    """Method of moments on the observed CTRs: alpha + beta = m(1-m)/v - 1, alpha = m*(that)."""
    ctr = clicks / impressions
    mean, var = float(ctr.mean()), float(ctr.var())
    if not 0.0 < mean < 1.0 or var <= 0.0 or var >= mean * (1.0 - mean):
        raise UserError(
            f"cannot fit a Beta prior to these CTRs (mean {mean:.4g}, variance {var:.4g})"
        )
    strength = mean * (1.0 - mean) / var - 1.0
    return mean * strength, (1.0 - mean) * strength


@dataclass(frozen=True)
class RewardData:
    """Rows (one per list member) with list ids, splits and training targets."""

    rows: pd.DataFrame  # + columns list_id, split, target
    by_group: bool
    min_impressions: int
    prior: tuple[float, float] | None  # Beta(alpha, beta) fitted on the training split

    def split(self, name: str) -> pd.DataFrame:
        return self.rows[self.rows["split"] == name].reset_index(drop=True)


def build_reward_data(ws: Workspace, params: RewardParams, before: str | None = None) -> RewardData:
    """The logged creatives' lists (originals and generated candidates that went online, logged
    before the date ``before`` if given); targets are raw or Beta-smoothed CTRs."""
    by_group = params.user_group_token
    ctr = load_ctr(ws, by_group, before)
    ctr = ctr[ctr["impressions"] >= max(params.min_impressions, 1)].reset_index(drop=True)
    if ctr.empty:
        raise UserError(f"no creative has >= {params.min_impressions} impressions")
    catalog = captioned_creatives(ws, ["image_uri", "caption"])
    rows = attach_inputs(ws, ctr, catalog, "creative_id", images=catalog)
    seed = ws.params.seed
    rows["split"] = [
        split_of(i, seed, params.val_fraction, params.test_fraction) for i in rows["item_id"]
    ]
    rows["list_id"] = rows["item_id"] + ("|" + rows["user_group"] if by_group else "")
    rows["ctr"] = rows["clicks"] / rows["impressions"]
    prior = None
    if params.smoothing == "beta":
        train = rows[rows["split"] == "train"]
        prior = fit_beta_prior(train["clicks"].to_numpy(), train["impressions"].to_numpy())
        rows["target"] = (rows["clicks"] + prior[0]) / (rows["impressions"] + prior[0] + prior[1])
    else:
        rows["target"] = rows["ctr"]
    rows = rows.sort_values(["list_id", "creative_id"]).reset_index(drop=True)
    return RewardData(
        rows=rows, by_group=by_group, min_impressions=params.min_impressions, prior=prior
    )
