"""Helpers for the generation and LoRA tests: a small round whose saliency masks are written
by the test itself from the renderer's own product masks (not the world's ground truth)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from cg4ctr_tasks import storage
from cg4ctr_tasks.sim.render import draw_product
from cg4ctr_tasks.workspace import Workspace

GROUPS = ["g0", "g1"]
# Round 1 for 3 items x 2 groups, 2 candidates each, 4 denoising steps, parts of 2 items.
ROUND_PARAMS = "generate:\n  candidates: 2\n  steps: 4\n  batch_size: 5\n  shard_size: 2\n"


def write_round_inputs(root: Path, round_id: int, items: int, params_yaml: str) -> Workspace:
    """items.parquet + product images, data/world.json and the round's saliency output."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text(params_yaml)
    ws = Workspace.open(root)
    rng = np.random.default_rng(5)
    saliency = storage.join(ws.round_dir(round_id), "saliency")
    rows, sal_rows = [], []
    for i in range(items):
        item_id = f"item-{i:04d}"
        product = draw_product(i % 6, 64, rng)
        uri = f"images/items/{item_id}.png"
        storage.write_png(ws.resolve(uri), product.image)
        storage.write_png(
            storage.join(saliency, "masks", f"{item_id}.png"), product.mask.astype(np.uint8) * 255
        )
        rows.append({"item_id": item_id, "category": "box", "title": "a box", "image_uri": uri})
        sal_rows.append(
            {
                "item_id": item_id,
                "mask_uri": f"rounds/round-{round_id:03d}/saliency/masks/{item_id}.png",
                "product_uri": "",
                "status": "ok",
                "error": "",
            }
        )
    storage.write_parquet(ws.items_table, pd.DataFrame(rows))
    storage.write_parquet(storage.join(saliency, "saliency.parquet"), pd.DataFrame(sal_rows))
    storage.write_text(storage.join(ws.data, "world.json"), json.dumps({"user_groups": GROUPS}))
    return ws


def write_positives(ws: Workspace, round_id: int, count: int) -> None:
    """Renderer composites of the round's items as candidates; every other one kept (G)."""
    from cg4ctr_tasks.prompts.vocab import load_vocab
    from cg4ctr_tasks.sim.render import Product, compose, random_tokens, render_background

    vocab = load_vocab()
    rng = np.random.default_rng(9)
    items = storage.read_parquet(ws.items_table)
    limits = ws.params.storage
    rows = []
    for k in range(count):
        item = items.iloc[k % len(items)]
        image = storage.read_image_array(
            ws.resolve(item["image_uri"]), limits.max_image_bytes, limits.max_image_pixels
        )
        mask = (
            storage.read_image_array(
                storage.join(ws.round_dir(round_id), "saliency", "masks", f"{item['item_id']}.png"),
                limits.max_image_bytes,
                limits.max_image_pixels,
            )[..., 0]
            > 127
        )
        tokens = random_tokens(vocab, rng)
        composite = compose(Product(image, mask), render_background(tokens, vocab, 64, rng))
        candidate_id = f"cand-{k:03d}"
        uri = f"rounds/round-{round_id:03d}/candidates/{candidate_id}.png"
        storage.write_png(ws.resolve(uri), composite)
        rows.append(
            {
                "round": round_id,
                "item_id": item["item_id"],
                "user_group": GROUPS[k % 2],
                "candidate_id": candidate_id,
                "image_uri": uri,
                "prompt": " ".join(tokens),
                "seed": k,
                "parent_creative_id": "",
                "score": float(k),
                "rank": k,
                "kept": k % 2 == 0,
            }
        )
    table = pd.DataFrame(rows)
    round_dir = ws.round_dir(round_id)
    storage.write_parquet(storage.join(round_dir, "candidates.parquet"), table.iloc[:, :8])
    storage.write_parquet(
        storage.join(round_dir, "partition.parquet"),
        table[["candidate_id", "item_id", "user_group", "score", "rank", "kept"]],
    )
