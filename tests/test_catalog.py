"""The creatives the logs can name (originals + shown candidates) and a round's log window."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from cg4ctr_tasks import storage
from cg4ctr_tasks.catalog import captioned_creatives
from cg4ctr_tasks.errors import UserError
from cg4ctr_tasks.ingest import ingest
from cg4ctr_tasks.reward.data import load_ctr
from cg4ctr_tasks.rounds import logs_before, read_ledger, round_for_date
from cg4ctr_tasks.sim.world import init_world
from cg4ctr_tasks.workspace import Workspace


def _captions(ids: list[str], id_column: str, caption: str) -> pd.DataFrame:
    return pd.DataFrame(
        {
            id_column: ids,
            "image_uri": [f"img/{i}.png" for i in ids],
            "caption": [caption] * len(ids),
            "tokens": [caption.split()] * len(ids),
        }
    )


def test_originals_and_every_rounds_candidates(workspace: Path) -> None:
    ws = Workspace.open(workspace)
    with pytest.raises(UserError, match="cg4ctr caption"):
        captioned_creatives(ws)
    storage.write_parquet(
        storage.join(ws.data, "captions.parquet"), _captions(["c0", "c1"], "creative_id", "red")
    )
    for n, ids in ((1, ["r1-a", "r1-b"]), (2, ["r2-a", "c1"])):
        storage.write_parquet(
            storage.join(ws.round_dir(n), "captions.parquet"),
            _captions(ids, "candidate_id", f"blue round{n}"),
        )
    catalog = captioned_creatives(ws)
    assert sorted(catalog["creative_id"]) == ["c0", "c1", "r1-a", "r1-b", "r2-a"]
    by_id = catalog.set_index("creative_id")
    assert by_id.loc["r1-a", "image_uri"] == "img/r1-a.png"
    assert by_id.loc["c1", "caption"] == "blue round2"  # the newest caption of an id wins
    assert list(captioned_creatives(ws, ["tokens"]).columns) == ["creative_id", "tokens"]


def test_a_rounds_refresh_sees_only_earlier_days(workspace: Path) -> None:
    ws = Workspace.open(workspace)
    init_world(ws, seed=1)  # history 2026-01-01 .. 2026-01-02, not yet ingested
    ingest(ws, "2026-01-01", "2026-01-02")
    assert logs_before(ws, 1) is None  # unregistered: all logs, and nothing is registered
    assert read_ledger(ws) == []
    round_for_date(ws, "2026-01-03")
    assert logs_before(ws, 1) == "2026-01-03"
    every_day = load_ctr(ws, by_group=True)
    first_day = load_ctr(ws, by_group=True, before="2026-01-02")
    assert 0 < first_day["impressions"].sum() < every_day["impressions"].sum()
    assert load_ctr(ws, True, before="2026-01-03").equals(every_day)
