"""Availability inspector: the world's labeller, the model, training and recurrent generation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from cg4ctr_tasks import storage
from cg4ctr_tasks.cli import app
from cg4ctr_tasks.cycle import bootstrap_stages, round_stages
from cg4ctr_tasks.generate import generate_round
from cg4ctr_tasks.inspector import (
    CHANNELS,
    LABELS,
    InspectorConfig,
    InspectorModel,
    inspect_round,
    labelled_set_dir,
    train_inspector,
)
from cg4ctr_tasks.params import load_params
from cg4ctr_tasks.prompts.vocab import load_vocab
from cg4ctr_tasks.rounds import RoundInfo
from cg4ctr_tasks.sim.availability import label_of, measure
from cg4ctr_tasks.sim.render import Product
from cg4ctr_tasks.workspace import Workspace
from tests.fixtures_generate import GROUPS, ROUND_PARAMS, write_round_inputs

SIZE = 64
RED, BLUE, GREEN = (200, 30, 30), (30, 40, 200), (40, 160, 60)
INSPECT_PARAMS = ROUND_PARAMS + "inspector:\n  max_attempts: 2\n  epochs: 3\n  batch_size: 8\n"


def _product() -> Product:
    mask = np.zeros((SIZE, SIZE), dtype=bool)
    mask[20:40, 24:40] = True  # base at row 39
    image = np.full((SIZE, SIZE, 3), 235, dtype=np.uint8)
    image[mask] = RED
    return Product(image=image, mask=mask)


def _scene(background: tuple[int, int, int]) -> tuple[Product, np.ndarray]:
    product = _product()
    image = np.empty((SIZE, SIZE, 3), dtype=np.uint8)
    image[:] = background
    image[product.mask] = RED
    return product, image


@pytest.mark.parametrize(
    "case", ["available", "space_mismatch", "size_mismatch", "indistinctive", "shape_hallucination"]
)
def test_labeller_names_each_failure(case: str) -> None:
    lp = load_params(None).inspector.labeller
    product, image = _scene(BLUE)
    if case == "space_mismatch":
        image[52:] = GREEN  # the floor starts 12 rows under the product's base: it floats
        image[product.mask] = RED
    elif case == "size_mismatch":
        halo = np.zeros_like(product.mask)
        halo[18:42, 22:42] = True  # a 2-pixel rim of product colour: the product looks larger
        image[halo] = RED
    elif case == "indistinctive":
        product, image = _scene((185, 60, 55))
    elif case == "shape_hallucination":
        image[4:12, 4:12] = RED  # a product-coloured blob far from the product
    assert label_of(measure(image, product, lp), lp) == case


def _config() -> InspectorConfig:
    params = load_params(None).inspector
    return InspectorConfig.from_params(params, load_vocab().tokens)


def test_inspector_forward_and_save_load_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = InspectorModel(_config())
    images = torch.rand(3, CHANNELS, SIZE, SIZE)
    tokens = torch.tensor([[1, 5, 9], [2, 0, 0], [0, 0, 0]])
    probs = model.probabilities(images, tokens, batch=2)
    assert probs.shape == (3, len(LABELS))
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    model.save_pretrained(str(tmp_path / "inspector"))
    assert {p.name for p in (tmp_path / "inspector").iterdir()} == {
        "config.json",
        "model.safetensors",
    }
    loaded = InspectorModel.from_pretrained(str(tmp_path / "inspector"))
    assert loaded.config == model.config
    assert np.allclose(loaded.probabilities(images, tokens, batch=3), probs, atol=1e-6)


def _labelled_set(ws: Workspace) -> None:
    """Hand-made labelled generations: the product on a distinct or a same-colour backdrop."""
    limits = ws.params.storage
    items = storage.read_parquet(ws.items_table)
    rows = []
    for item in items.itertuples():
        image = storage.read_image_array(
            ws.resolve(item.image_uri), limits.max_image_bytes, limits.max_image_pixels
        )
        mask_uri = f"rounds/round-001/saliency/masks/{item.item_id}.png"
        mask = storage.read_image_array(
            ws.resolve(mask_uri), limits.max_image_bytes, limits.max_image_pixels
        )[..., 0]
        colour = image[mask > 127].mean(axis=0)
        for j, (backdrop, label) in enumerate([(BLUE, "available"), (colour, "indistinctive")]):
            scene = np.where(mask[..., None] > 127, image, np.asarray(backdrop, dtype=np.uint8))
            uri = f"inspector/images/{item.item_id}-s{j}.png"
            storage.write_png(ws.resolve(uri), scene)
            rows.append(
                {
                    "sample_id": f"{item.item_id}-s{j}",
                    "item_id": item.item_id,
                    "image_uri": uri,
                    "mask_uri": mask_uri,
                    "label": label,
                }
            )
    storage.write_parquet(storage.join(labelled_set_dir(ws), "labels.parquet"), pd.DataFrame(rows))


def test_training_reduces_loss_and_is_skipped_when_unchanged(tmp_path: Path) -> None:
    ws = write_round_inputs(tmp_path / "ws", 1, 3, INSPECT_PARAMS)
    _labelled_set(ws)
    summary = train_inspector(ws)
    assert summary.samples == 6 and not summary.skipped
    assert summary.train_loss_last < summary.train_loss_first
    model = InspectorModel.from_pretrained(ws.model_dir("inspector"))
    assert model.config.extra["samples"] == 6
    assert train_inspector(ws).skipped


def _rejecting_inspector(ws: Workspace) -> None:
    """An inspector whose verdict is always "size mismatch": every candidate is regenerated."""
    model = InspectorModel(_config())
    with torch.no_grad():
        head = model.head[-1]
        head.weight.zero_()
        head.bias.copy_(torch.tensor([0.0, 0.0, 4.0, 0.0, 0.0]))
    model.save_pretrained(ws.model_dir("inspector"))


def test_inspect_regenerates_rejected_candidates_and_reruns_are_no_ops(tmp_path: Path) -> None:
    ws = write_round_inputs(tmp_path / "ws", 1, 3, INSPECT_PARAMS)
    generate_round(ws, 1)
    round_dir = ws.round_dir(1)
    first_candidates = storage.read_parquet(storage.join(round_dir, "candidates.parquet"))
    _rejecting_inspector(ws)
    result = CliRunner().invoke(app, ["inspect", "--round", "1", "--workspace", str(ws.root)])
    assert result.exit_code == 0, result.output
    table = storage.read_parquet(storage.join(round_dir, "inspection.parquet"))
    count = 3 * len(GROUPS) * 2
    assert len(table) == 2 * count  # every candidate rejected twice: max_attempts attempts
    assert set(table["label"]) == {"size_mismatch"}
    retries = table[table["attempt"] == 1].set_index("candidate_id")
    firsts = table[table["attempt"] == 0].set_index("candidate_id")
    assert (retries["seed"] != firsts.loc[retries.index, "seed"]).all()
    assert retries["image_uri"].str.endswith("-a01.png").all()
    for uri in [*retries["image_uri"], *firsts["image_uri"]]:
        assert storage.exists(ws.resolve(uri))  # earlier attempts are kept, not overwritten
    assert table.groupby("candidate_id")["final"].sum().eq(1).all()
    final = table[table["final"]].set_index("candidate_id")
    candidates = storage.read_parquet(storage.join(round_dir, "candidates.parquet"))
    assert list(candidates.columns) == list(first_candidates.columns)
    assert candidates["candidate_id"].tolist() == first_candidates["candidate_id"].tolist()
    chosen = candidates.set_index("candidate_id")
    assert (chosen["image_uri"] == final.loc[chosen.index, "image_uri"]).all()
    assert (chosen["seed"] == final.loc[chosen.index, "seed"]).all()

    again = inspect_round(ws, 1)
    assert again.regenerated == 0 and again.parts_written == 0 and again.complete
    assert again.attempts == 2 * count and again.available_final == 0
    pd.testing.assert_frame_equal(
        storage.read_parquet(storage.join(round_dir, "inspection.parquet")), table
    )


def test_stage_lists_follow_the_switch(tiny_world: Path, tmp_path: Path) -> None:
    ws = Workspace.open(tiny_world)
    info = RoundInfo(id=1, date="2026-01-04", mode="lora")
    names = [s.name for s in round_stages(ws, info)]
    assert names.index("generate") + 1 == names.index("inspect") == names.index("caption") - 1
    boot = [s.name for s in bootstrap_stages(ws)]
    assert boot.index("label-availability") + 1 == boot.index("train-inspector")
    (tmp_path / "params.yaml").write_text("inspector:\n  enabled: false\n")
    off = Workspace.open(tmp_path)
    assert "inspect" not in [s.name for s in round_stages(off, info)]
    assert "train-inspector" not in [s.name for s in bootstrap_stages(off)]
    assert not inspect_round(off, 1).enabled
