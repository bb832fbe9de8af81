"""Building the simulated world into a workspace, and evaluating creatives against its oracle.

Public outputs (what a production system would have): the item table, product images, the
initial creatives and click logs in the real format. Private outputs under ``sim/`` (ground-truth
product masks and pixels, the oracle, the tokens behind each initial creative) are read only by
the click simulator and by evaluation.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import date, timedelta

import numpy as np
import pandas as pd
from tqdm import tqdm

from cg4ctr_tasks import storage
from cg4ctr_tasks.errors import UserError
from cg4ctr_tasks.prompts.vocab import load_vocab
from cg4ctr_tasks.sim.clicks import ClickHistory, simulate_day
from cg4ctr_tasks.sim.oracle import Oracle, image_features
from cg4ctr_tasks.sim.render import Product, compose, draw_product, random_tokens, render_background
from cg4ctr_tasks.workspace import Workspace

ADJECTIVES = ["classic", "sleek", "compact", "deluxe", "eco", "smart", "premium", "handmade"]
_STREAMS = ("products", "oracle", "creatives", "clicks")


@dataclass(frozen=True)
class WorldSummary:
    seed: int
    items: int
    user_groups: int
    initial_creatives: int
    days: int
    first_date: str
    last_date: str
    log_rows: int
    impressions: int
    clicks: int
    reused: bool

    def as_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


def _streams(seed: int) -> dict[str, np.random.Generator]:
    children = np.random.SeedSequence(seed).spawn(len(_STREAMS))
    return {name: np.random.default_rng(s) for name, s in zip(_STREAMS, children, strict=True)}


def _dates(start: str, days: int) -> list[str]:
    first = date.fromisoformat(start)
    return [(first + timedelta(days=d)).isoformat() for d in range(days)]


def _world_stamp(ws: Workspace, seed: int) -> str:
    spec = {"seed": seed, "world": ws.params.world.model_dump(), "vocab": ws.params.vocab}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def _colour_word(product: Product) -> str:
    from matplotlib.colors import rgb_to_hsv

    from cg4ctr_tasks.sim.render import COLOURS

    hue = float(rgb_to_hsv(product.image[product.mask].mean(axis=0) / 255.0)[0])
    chromatic = {k: v for k, v in COLOURS.items() if v[1] > 0.3}
    return min(
        chromatic, key=lambda k: min(abs(chromatic[k][0] - hue), 1 - abs(chromatic[k][0] - hue))
    )


def init_world(ws: Workspace, seed: int, force: bool = False) -> WorldSummary:
    """Write a reproducible world into ``ws``; same seed and params give byte-identical files."""
    params = ws.params.world
    stamp_path = ws.sim / "world.json"
    stamp = _world_stamp(ws, seed)
    if stamp_path.exists() and not force:
        recorded = json.loads(stamp_path.read_text("utf-8"))
        if recorded.get("stamp") != stamp:
            raise UserError(
                f"{ws.root} already holds a different world (seed {recorded.get('seed')}); "
                "use another --workspace or pass --force to rebuild it"
            )
        return WorldSummary(**{**recorded["summary"], "reused": True})

    vocab = load_vocab(ws.params.vocab)
    rng = _streams(seed)
    ws.sim.mkdir(parents=True, exist_ok=True)
    size = params.image_size
    item_ids = [f"item-{i:04d}" for i in range(params.items)]

    products: dict[str, Product] = {}
    item_rows = []
    for item_id in item_ids:
        category_index = int(rng["products"].integers(len(params.categories)))
        product = draw_product(category_index, size, rng["products"])
        products[item_id] = product
        adjective = ADJECTIVES[int(rng["products"].integers(len(ADJECTIVES)))]
        category = params.categories[category_index]
        uri = f"images/items/{item_id}.png"
        storage.write_png(storage.join(ws.data, uri), product.image)
        storage.write_png(str(ws.sim / "products" / f"{item_id}.png"), product.image)
        storage.write_png(
            str(ws.sim / "masks" / f"{item_id}.png"), product.mask.astype(np.uint8) * 255
        )
        item_rows.append(
            {
                "item_id": item_id,
                "category": category,
                "title": f"{adjective} {_colour_word(product)} {category}",
                "image_uri": uri,
            }
        )
    storage.write_parquet(ws.items_table, pd.DataFrame(item_rows))

    oracle = Oracle.draw(
        rng["oracle"],
        params.user_groups,
        item_ids,
        params.devices,
        params.base_ctr,
        item_categories={row["item_id"]: row["category"] for row in item_rows},
        category_hue_shift=params.category_hue_shift,
        category_brightness_shift=params.category_brightness_shift,
    )
    oracle.save(ws.sim / "oracle.json")

    creative_rows, token_rows = [], []
    true_ctr: dict[tuple[str, str], float] = {}
    for item_id in tqdm(item_ids, desc="initial creatives", leave=False, disable=None):
        for j in range(params.initial_creatives):
            creative_id = f"{item_id}-c{j}"
            tokens = random_tokens(vocab, rng["creatives"])
            background = render_background(tokens, vocab, size, rng["creatives"])
            image = compose(products[item_id], background)
            uri = f"images/creatives/round-000/{creative_id}.png"
            storage.write_png(storage.join(ws.data, uri), image)
            creative_rows.append(
                {"creative_id": creative_id, "item_id": item_id, "image_uri": uri, "round": 0}
            )
            token_rows.append({"creative_id": creative_id, "tokens": " ".join(tokens)})
            features = image_features(image, products[item_id].image, products[item_id].mask)
            for group in params.user_groups:
                true_ctr[(creative_id, group)] = oracle.ctr(item_id, features, group)
    creatives = pd.DataFrame(creative_rows)
    storage.write_parquet(ws.creatives_table, creatives)
    storage.write_parquet(str(ws.sim / "creative_tokens.parquet"), pd.DataFrame(token_rows))

    history = ClickHistory()
    dates = _dates(params.start_date, params.days)
    log_rows = impressions = clicks = 0
    for day in tqdm(dates, desc="click logs", leave=False, disable=None):
        logs = simulate_day(
            oracle,
            creatives,
            true_ctr,
            day,
            params.impressions_per_day,
            params.epsilon,
            history,
            rng["clicks"],
        )
        target = storage.join(ws.raw_log_partition(day), "part-0000.csv")
        storage.write_text(target, logs.to_csv(index=False))
        log_rows += len(logs)
        impressions += int(logs["impressions"].sum())
        clicks += int(logs["clicks"].sum())

    public = {
        "user_groups": params.user_groups,
        "devices": params.devices,
        "categories": params.categories,
        "hours": list(range(24)),
        "history_dates": dates,
    }
    storage.write_text(storage.join(ws.data, "world.json"), json.dumps(public, indent=2))
    summary = WorldSummary(
        seed=seed,
        items=len(item_ids),
        user_groups=len(params.user_groups),
        initial_creatives=len(creatives),
        days=len(dates),
        first_date=dates[0],
        last_date=dates[-1],
        log_rows=log_rows,
        impressions=impressions,
        clicks=clicks,
        reused=False,
    )
    stamp_doc = {"seed": seed, "stamp": stamp, "summary": summary.as_dict()}
    storage.write_text(str(stamp_path), json.dumps(stamp_doc, indent=2, sort_keys=True))
    return summary


@dataclass(frozen=True)
class GroundTruth:
    """The world's private truth: oracle, product pixels and masks. Evaluation only."""

    oracle: Oracle
    products: dict[str, Product]

    @classmethod
    def load(cls, ws: Workspace) -> GroundTruth:
        path = ws.sim / "oracle.json"
        if not path.exists():
            raise UserError(f"no simulated world in {ws.root}: run `cg4ctr sim init` first")
        return cls(oracle=Oracle.load(path), products={})

    def product(self, ws: Workspace, item_id: str) -> Product:
        if item_id not in self.products:
            safe = storage.safe_id(item_id, "item_id")
            if safe not in self.oracle.item_effects:
                raise UserError(f"item_id {safe!r} is not an item of this world")
            limits = ws.params.storage
            image = storage.read_image_array(
                str(ws.sim / "products" / f"{safe}.png"),
                limits.max_image_bytes,
                limits.max_image_pixels,
            )
            mask = (
                storage.read_image_array(
                    str(ws.sim / "masks" / f"{safe}.png"),
                    limits.max_image_bytes,
                    limits.max_image_pixels,
                )[..., 0]
                > 127
            )
            self.products[item_id] = Product(image=image, mask=mask)
        return self.products[item_id]


def true_ctr_table(ws: Workspace, creatives: pd.DataFrame) -> pd.DataFrame:
    """True CTR of each creative for its ``user_group`` (or for every group when absent)."""
    for column in ("item_id", "image_uri"):
        if column not in creatives.columns:
            raise UserError(f"creatives table lacks the column {column!r}")
    truth = GroundTruth.load(ws)
    groups = sorted(truth.oracle.groups)
    limits = ws.params.storage
    rows = []
    for record in creatives.to_dict("records"):
        item_id = str(record["item_id"])
        product = truth.product(ws, item_id)
        image = storage.read_image_array(
            ws.resolve(str(record["image_uri"])),
            limits.max_image_bytes,
            limits.max_image_pixels,
        )
        try:
            features = image_features(image, product.image, product.mask)
        except ValueError as exc:
            raise UserError(f"{record['image_uri']}: {exc}") from None
        wanted = [str(record["user_group"])] if record.get("user_group") is not None else groups
        for group in wanted:
            if group not in truth.oracle.groups:
                raise UserError(f"unknown user_group {group!r} (world has {groups})")
            rows.append(
                {
                    "item_id": item_id,
                    "image_uri": record["image_uri"],
                    "user_group": group,
                    "true_ctr": truth.oracle.ctr(item_id, features, group),
                }
            )
    return pd.DataFrame(rows, columns=["item_id", "image_uri", "user_group", "true_ctr"])


def evaluate_creatives(ws: Workspace, creatives: pd.DataFrame) -> dict[str, object]:
    """Mean true CTR overall and per user group: the yardstick of every uplift we report."""
    table = true_ctr_table(ws, creatives)
    if table.empty:
        raise UserError("no creatives to evaluate")
    per_group = table.groupby("user_group")["true_ctr"].mean()
    return {
        "overall": float(table["true_ctr"].mean()),
        "per_group": {str(g): float(v) for g, v in per_group.items()},
        "creatives": int(len(creatives)),
        "evaluations": int(len(table)),
    }
