"""Adapters: public click-log formats -> our raw log partitions, then `cg4ctr ingest` as usual.

Adapters only change the layout; validation stays in ingestion, so a bad id or count in a public
file is quarantined with a reason like any other row, never fixed up silently here.

- Tianchi / Alibaba CreativeRanking (WWW 2021): tab-separated ``item_id, image_name, ds, pv,
  clk`` (header line optional) plus an image folder, no titles. ``ds`` may be YYYYMMDD,
  YYYY-MM-DD, or a day number (the smallest becomes ``start_date``, then one date per day).
  creative_id is the image name without its extension (nothing else is stripped). Also
  writes items.parquet and creatives.parquet (round 0), image_uri pointing into the folder.
- CG4CTR's released JSON: ``{item_id: [{creative_id, exp_impression_cnt, exp_click_cnt, ...}]}``
  for one date.
Neither format has users or context, so rows get user_group ``all``, device ``unknown``, hour 0.
"""

from __future__ import annotations

import json
import re
from datetime import date, timedelta
from typing import Any

import pandas as pd

from cg4ctr_tasks import storage
from cg4ctr_tasks.contracts import LOG_COLUMNS
from cg4ctr_tasks.errors import UserError
from cg4ctr_tasks.workspace import Workspace, date_partition

TIANCHI_COLUMNS = ["item_id", "image_name", "ds", "pv", "clk"]
NO_USER_GROUP, NO_DEVICE = "all", "unknown"


def _event_dates(ds: pd.Series, start_date: str) -> pd.Series:
    text = ds.astype(str).str.strip()
    if text.str.fullmatch(r"\d{4}-\d{2}-\d{2}").all():
        return text
    if text.str.fullmatch(r"(19|20)\d{6}").all():
        parsed = pd.to_datetime(text, format="%Y%m%d", errors="coerce")
        if parsed.notna().all():
            return parsed.dt.strftime("%Y-%m-%d")
    if not text.str.fullmatch(r"\d{1,6}").all():
        bad = text[~text.str.fullmatch(r"\d{1,6}")].iloc[0]
        raise UserError(f"ds must be YYYYMMDD, YYYY-MM-DD or a day number; got {bad!r}")
    days = text.astype("int64")
    first = date.fromisoformat(start_date)
    low = int(days.min())
    lookup = {d: (first + timedelta(days=int(d) - low)).isoformat() for d in days.unique()}
    return days.map(lookup)


def _write_partitions(logs: pd.DataFrame, out: str, name: str) -> list[str]:
    written = []
    for day, frame in logs.groupby("event_date", sort=True):
        target = storage.join(out, date_partition(str(day)), name)
        storage.write_text(target, frame[list(LOG_COLUMNS)].to_csv(index=False))
        written.append(str(day))
    return written


def _as_counts(values: pd.Series) -> pd.Series:
    """Integral floats (JSON 12.0) become ints; anything else is left for ingest to judge."""
    numbers = pd.to_numeric(values, errors="coerce")
    integral = numbers.notna() & (numbers == numbers.round())
    out = values.astype(object).copy()
    out[integral] = numbers[integral].astype("int64")
    return out


def import_tianchi(
    ws: Workspace,
    tsv: str,
    images: str,
    start_date: str,
    out: str | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Tianchi CreativeRanking TSV + image folder -> raw log partitions, items, creatives."""
    out = out or ws.raw_logs
    if not force and storage.exists(ws.items_table):
        raise UserError(f"{ws.items_table} exists; pass --force to replace it with {tsv}")
    fs, path = storage.url_to_fs(tsv)
    with fs.open(path, "rb") as handle:
        raw = pd.read_csv(
            handle, sep="\t", header=None, names=TIANCHI_COLUMNS, dtype=str, keep_default_na=False
        )
    if len(raw) and raw.iloc[0].tolist() == TIANCHI_COLUMNS:
        raw = raw.iloc[1:]
    if raw.empty:
        raise UserError(f"{tsv}: no rows")
    # only the extension goes: a name like "../x.jpg" must stay unsafe and be quarantined
    raw["creative_id"] = raw["image_name"].str.replace(r"\.[A-Za-z0-9]{1,5}$", "", regex=True)
    logs = pd.DataFrame(
        {
            "event_date": _event_dates(raw["ds"], start_date),
            "item_id": raw["item_id"],
            "creative_id": raw["creative_id"],
            "user_group": NO_USER_GROUP,
            "device": NO_DEVICE,
            "hour": 0,
            "impressions": raw["pv"],
            "clicks": raw["clk"],
        }
    )
    dates = _write_partitions(logs, out, "part-tianchi.csv")

    image_fs, image_root = storage.url_to_fs(images)
    present = {p[len(image_root.rstrip("/")) + 1 :] for p in image_fs.find(image_root)}
    creatives = raw.drop_duplicates("creative_id")
    usable = creatives["item_id"].map(storage.is_safe_id) & creatives["creative_id"].map(
        storage.is_safe_id
    )
    has_image = creatives["image_name"].isin(present)
    kept = creatives[usable & has_image]
    base = images.rstrip("/") if storage.is_remote(images) else image_root.rstrip("/")
    table = pd.DataFrame(
        {
            "creative_id": kept["creative_id"],
            "item_id": kept["item_id"],
            "image_uri": [f"{base}/{name}" for name in kept["image_name"]],
            "round": 0,
        }
    )
    items = table.drop_duplicates("item_id")
    storage.write_parquet(
        ws.items_table,
        pd.DataFrame(
            {
                "item_id": items["item_id"],
                "category": "unknown",
                "title": "",  # the data set has no titles
                "image_uri": items["image_uri"],
            }
        ),
    )
    storage.write_parquet(ws.creatives_table, table)
    return {
        "rows": len(raw),
        "dates": dates,
        "logs": out,
        "items": len(items),
        "creatives": len(table),
        "creatives_without_image": int((usable & ~has_image).sum()),
        "creatives_with_unsafe_ids": int((~usable).sum()),
    }


def import_cg4ctr_json(ws: Workspace, source: str, day: str, out: str | None = None) -> dict:
    """CG4CTR's ``{item_id: [{creative_id, exp_impression_cnt, exp_click_cnt}]}`` for ``day``."""
    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", day):
        raise UserError(f"--date must be YYYY-MM-DD, got {day!r}")
    out = out or ws.raw_logs
    try:
        document = json.loads(storage.read_bytes(source))
    except (ValueError, UnicodeDecodeError) as exc:
        raise UserError(f"{source}: not valid JSON ({exc})") from None
    if not isinstance(document, dict):
        raise UserError(f"{source}: expected an object keyed by item_id")
    rows = []
    for item_id, creatives in document.items():
        if not isinstance(creatives, list):
            raise UserError(f"{source}: item {str(item_id)[:60]!r} does not hold a list")
        for entry in creatives:
            if not isinstance(entry, dict):
                raise UserError(f"{source}: item {str(item_id)[:60]!r} holds a non-object")
            rows.append(
                (
                    day,
                    str(item_id),
                    str(entry.get("creative_id", "")),
                    NO_USER_GROUP,
                    NO_DEVICE,
                    0,
                    entry.get("exp_impression_cnt"),
                    entry.get("exp_click_cnt"),
                )
            )
    if not rows:
        raise UserError(f"{source}: no creatives")
    logs = pd.DataFrame(rows, columns=list(LOG_COLUMNS))
    logs["impressions"] = _as_counts(logs["impressions"])
    logs["clicks"] = _as_counts(logs["clicks"])
    _write_partitions(logs, out, "part-cg4ctr-json.csv")
    return {"rows": len(logs), "dates": [day], "logs": out, "items": len(document)}
