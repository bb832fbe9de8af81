"""Every creative the click logs can name, with its image and caption.

The logs name the advertiser's original creatives (captioned into ``data/captions.parquet`` at
the bootstrap) and, once the loop runs, the generated candidates that went online (captioned
into each round's ``captions.parquet``). Models that learn from the logs look both up here, so
the clicks on generated creatives feed the next nights' reward and prompt models.
"""

from __future__ import annotations

import pandas as pd

from cg4ctr_tasks import storage
from cg4ctr_tasks.errors import UserError
from cg4ctr_tasks.workspace import Workspace

CATALOG_COLUMNS = ["creative_id", "image_uri", "caption", "tokens"]


def _round_caption_tables(ws: Workspace) -> list[str]:
    fs, root = storage.url_to_fs(storage.join(ws.data, "rounds"))
    if not fs.exists(root):
        return []
    found = sorted(fs.glob(f"{root}/round-*/captions.parquet"))
    return [storage.join(ws.data, "rounds", *p.rsplit("/", 2)[-2:]) for p in found]


def captioned_creatives(ws: Workspace, columns: list[str] | None = None) -> pd.DataFrame:
    """creative_id and ``columns`` (default: image_uri, caption, tokens) of the originals and
    every round's candidates."""
    columns = columns or CATALOG_COLUMNS[1:]
    originals = storage.join(ws.data, "captions.parquet")
    if not storage.exists(originals):
        raise UserError(f"captions table not found: {originals} (run `cg4ctr caption` first)")
    frames = [storage.read_parquet(originals, columns=["creative_id", *columns])]
    for url in _round_caption_tables(ws):
        table = storage.read_parquet(url, columns=["candidate_id", *columns])
        frames.append(table.rename(columns={"candidate_id": "creative_id"}))
    catalog = pd.concat(frames, ignore_index=True)
    return catalog.drop_duplicates("creative_id", keep="last").reset_index(drop=True)
