from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.colors import hsv_to_rgb

from cg4ctr_tasks import storage
from cg4ctr_tasks.errors import UserError
from cg4ctr_tasks.prompts.vocab import load_vocab
from cg4ctr_tasks.sim.oracle import Features, Oracle, image_features
from cg4ctr_tasks.sim.render import compose, draw_product, render_background
from cg4ctr_tasks.sim.world import GroundTruth, evaluate_creatives, init_world, true_ctr_table
from cg4ctr_tasks.workspace import Workspace


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != "params.yaml"
    }


def _small(tmp: Path) -> Workspace:
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "params.yaml").write_text("world:\n  items: 5\n  days: 2\n")
    return Workspace.open(tmp)


def test_same_seed_gives_byte_identical_worlds(tmp_path: Path) -> None:
    init_world(_small(tmp_path / "a"), seed=3)
    init_world(_small(tmp_path / "b"), seed=3)
    digest_a = _tree_digest(tmp_path / "a")
    assert len(digest_a) > 20
    assert digest_a == _tree_digest(tmp_path / "b")


def test_different_seeds_give_different_preferences(tmp_path: Path) -> None:
    prefs = []
    for seed in (1, 2):
        ws = _small(tmp_path / str(seed))
        init_world(ws, seed=seed)
        prefs.append(GroundTruth.load(ws).oracle.groups)
    assert prefs[0] != prefs[1]
    assert prefs[0]["g0"].hue != pytest.approx(prefs[1]["g0"].hue)


def test_reinit_reuses_and_refuses_a_different_world(tmp_path: Path) -> None:
    ws = _small(tmp_path)
    assert not init_world(ws, seed=5).reused
    assert init_world(ws, seed=5).reused
    with pytest.raises(UserError, match="different world"):
        init_world(ws, seed=6)
    assert not init_world(ws, seed=6, force=True).reused


def _background_at(hue: float, value: float, size: int = 64) -> np.ndarray:
    hsv = np.zeros((size, size, 3))
    hsv[..., 0], hsv[..., 1], hsv[..., 2] = hue, 0.8, value
    return np.asarray(np.round(hsv_to_rgb(hsv) * 255), dtype=np.uint8)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_oracle_prefers_what_it_says_it_prefers(seed: int) -> None:
    rng = np.random.default_rng(seed)
    groups = ["g0", "g1", "g2", "g3"]
    oracle = Oracle.draw(rng, groups, ["i"], ["ios"], 0.04)
    product = draw_product(2, 64, rng)
    for group, pref in oracle.groups.items():
        liked = compose(product, _background_at(pref.hue, pref.brightness))
        opposite = compose(product, _background_at((pref.hue + 0.5) % 1.0, pref.brightness))
        features_liked = image_features(liked, product.image, product.mask)
        features_opposite = image_features(opposite, product.image, product.mask)
        assert oracle.ctr("i", features_liked, group) > oracle.ctr("i", features_opposite, group)
        # the same hue at the wrong brightness is worse too
        far = 0.05 if pref.brightness > 0.5 else 1.0
        dull = compose(product, _background_at(pref.hue, far))
        assert oracle.ctr("i", features_liked, group) > oracle.ctr(
            "i", image_features(dull, product.image, product.mask), group
        )
    # groups disagree: each group's favourite is not every other group's favourite
    best = {
        g: max(
            groups,
            key=lambda h, g=g: oracle.ctr(
                "i",
                image_features(
                    compose(product, _background_at(oracle.groups[h].hue, 0.7)),
                    product.image,
                    product.mask,
                ),
                g,
            ),
        )
        for g in groups
    }
    assert len(set(best.values())) > 1


def _plain_features(hue: float, brightness: float) -> Features:
    """A fully saturated, flat background at (hue, brightness); contrast at its neutral 0.3."""
    angle = 2 * np.pi * hue
    return Features(float(np.cos(angle)), float(np.sin(angle)), brightness, 0.0, 0.3, 0.0)


@pytest.mark.parametrize("seed", [0, 1])
def test_category_moves_the_favourite_background(seed: int, tmp_path: Path) -> None:
    cats = {"i0": "lamp", "i1": "cup"}
    groups = ["g0", "g1"]
    plain = Oracle.draw(np.random.default_rng(seed), groups, list(cats), ["ios"], 0.04)
    fitted = Oracle.draw(
        np.random.default_rng(seed), groups, list(cats), ["ios"], 0.04, cats, 0.15, 0.2
    )
    # the category draws come last: groups, items and contexts are the world without them
    assert fitted.groups == plain.groups and fitted.item_effects == plain.item_effects
    for group in groups:
        hues = {item: fitted.favourite(item, group)[0] for item in cats}
        assert hues["i0"] != pytest.approx(hues["i1"])
        for item, other in (("i0", "i1"), ("i1", "i0")):
            own, theirs = (_plain_features(*fitted.favourite(i, group)) for i in (item, other))
            # each item does better on its own category's favourite than on the other's
            assert fitted.ctr(item, own, group) > fitted.ctr(item, theirs, group)
    # an oracle.json written before category fit existed loads, with one taste for all
    saved = tmp_path / "oracle.json"
    fitted.save(saved)
    raw = json.loads(saved.read_text())
    del raw["categories"], raw["item_categories"]
    saved.write_text(json.dumps(raw))
    old = Oracle.load(saved)
    assert old.favourite("i0", "g0") == (plain.groups["g0"].hue, plain.groups["g0"].brightness)
    assert Oracle.load(tmp_path / "oracle.json").categories == {}
    fitted.save(saved)
    assert Oracle.load(saved) == fitted


def test_altering_the_product_is_penalised() -> None:
    rng = np.random.default_rng(0)
    oracle = Oracle.draw(rng, ["g0"], ["i"], ["ios"], 0.04)
    product = draw_product(1, 64, rng)
    background = render_background(["blue", "soft", "plain"], load_vocab(), 64, rng)
    exact = compose(product, background)
    altered = exact.copy()
    altered[product.mask] = np.clip(altered[product.mask].astype(int) + 40, 0, 255).astype(np.uint8)
    f_exact = image_features(exact, product.image, product.mask)
    f_altered = image_features(altered, product.image, product.mask)
    assert f_exact.alteration == 0.0 and f_altered.alteration > 0.1
    assert oracle.ctr("i", f_altered, "g0") < 0.5 * oracle.ctr("i", f_exact, "g0")


def test_renderer_follows_tokens() -> None:
    vocab = load_vocab()
    rng = np.random.default_rng(0)
    red = render_background(["red", "soft", "plain"], vocab, 32, rng).astype(float)
    blue = render_background(["blue", "soft", "plain"], vocab, 32, rng).astype(float)
    assert red[..., 0].mean() > red[..., 2].mean() + 40
    assert blue[..., 2].mean() > blue[..., 0].mean() + 40
    bright = render_background(["green", "bright", "plain"], vocab, 32, rng).mean()
    dim = render_background(["green", "dim", "plain"], vocab, 32, rng).mean()
    assert bright > dim + 30
    plain = render_background(["teal", "plain"], vocab, 32, rng).astype(float)
    striped = render_background(["teal", "striped"], vocab, 32, rng).astype(float)

    def busy(image: np.ndarray) -> float:
        return float(np.abs(np.diff(image, axis=0)).mean() + np.abs(np.diff(image, axis=1)).mean())

    assert busy(striped) > 2 * busy(plain)


def test_world_tables_and_logs(tiny_world: Path) -> None:
    ws = Workspace.open(tiny_world)
    items = storage.read_parquet(ws.items_table)
    assert list(items.columns) == ["item_id", "category", "title", "image_uri"]
    assert len(items) == 8 and items["item_id"].is_unique
    creatives = storage.read_parquet(ws.creatives_table)
    assert list(creatives.columns) == ["creative_id", "item_id", "image_uri", "round"]
    assert (creatives["round"] == 0).all()
    logs = pd.concat(
        pd.read_csv(p) for p in sorted((tiny_world / "data/raw/logs").glob("dt=*/part-*.csv"))
    )
    assert list(logs.columns) == [
        "event_date",
        "item_id",
        "creative_id",
        "user_group",
        "device",
        "hour",
        "impressions",
        "clicks",
    ]
    assert (logs["clicks"] <= logs["impressions"]).all()
    assert (logs["clicks"] >= 0).all() and (logs["impressions"] > 0).all()
    assert set(logs["creative_id"]) <= set(creatives["creative_id"])
    assert logs["hour"].between(0, 23).all()
    assert 0.005 < logs["clicks"].sum() / logs["impressions"].sum() < 0.2
    # the model-visible folder holds no oracle or ground-truth masks
    assert not list((tiny_world / "data").rglob("oracle*"))
    assert (tiny_world / "sim" / "oracle.json").exists()


def test_epsilon_greedy_favours_the_better_creative(tiny_world: Path) -> None:
    ws = Workspace.open(tiny_world)
    logs = pd.concat(pd.read_csv(p) for p in (tiny_world / "data/raw/logs").glob("dt=*/*.csv"))
    truth = true_ctr_table(ws, storage.read_parquet(ws.creatives_table).assign(user_group=None))
    last_day = logs[logs["event_date"] == logs["event_date"].max()]
    shown = last_day.groupby(["item_id", "user_group", "creative_id"])["impressions"].sum()
    wins = total = 0
    for (item, group), block in shown.groupby(level=[0, 1]):
        most_shown = block.idxmax()[2]
        cands = truth[(truth.item_id == item) & (truth.user_group == group)].copy()
        cands["creative_id"] = cands["image_uri"].str.extract(r"/([^/]+)\.png$")[0]
        best = cands.sort_values("true_ctr").iloc[-1]["creative_id"]
        wins += int(most_shown == best)
        total += 1
    assert wins / total > 1 / 3 + 0.1  # better than picking one of 3 at random


def test_evaluate_per_group_and_given_group(tiny_world: Path) -> None:
    ws = Workspace.open(tiny_world)
    creatives = storage.read_parquet(ws.creatives_table)
    result = evaluate_creatives(ws, creatives)
    assert set(result["per_group"]) == {"g0", "g1", "g2", "g3"}
    assert 0.0 < result["overall"] < 1.0
    one = evaluate_creatives(ws, creatives.assign(user_group="g1"))
    assert set(one["per_group"]) == {"g1"}
    assert one["overall"] == pytest.approx(result["per_group"]["g1"])


def test_evaluate_rejects_bad_rows(tiny_world: Path) -> None:
    ws = Workspace.open(tiny_world)
    creatives = storage.read_parquet(ws.creatives_table).head(1)
    with pytest.raises(UserError, match="lacks the column 'image_uri'"):
        evaluate_creatives(ws, creatives.drop(columns=["image_uri"]))
    with pytest.raises(UserError, match="unknown user_group"):
        evaluate_creatives(ws, creatives.assign(user_group="g9"))
    with pytest.raises(UserError, match="unsafe item_id"):
        evaluate_creatives(ws, creatives.assign(item_id="../../etc/passwd"))
    with pytest.raises(UserError, match="unsafe path component"):
        evaluate_creatives(ws, creatives.assign(image_uri="../../sim/products/item-0000.png"))


def test_world_json_is_public_and_minimal(tiny_world: Path) -> None:
    public = json.loads((tiny_world / "data" / "world.json").read_text())
    assert public["user_groups"] == ["g0", "g1", "g2", "g3"]
    assert "hue" not in json.dumps(public)
