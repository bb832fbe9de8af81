from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from cg4ctr_tasks import storage
from cg4ctr_tasks.assets import asset_path
from cg4ctr_tasks.cli import app
from cg4ctr_tasks.errors import UserError
from cg4ctr_tasks.generate import (
    CANDIDATE_COLUMNS,
    candidate_seed,
    generate_round,
    load_pipeline,
    make_candidate_id,
    plan_candidates,
)
from cg4ctr_tasks.params import load_params
from cg4ctr_tasks.shards import Shard
from cg4ctr_tasks.sim.train_generator import colour_steering_rate
from cg4ctr_tasks.workspace import Workspace
from tests.fixtures_generate import GROUPS, ROUND_PARAMS, write_round_inputs

runner = CliRunner()


@pytest.fixture()
def round_inputs(tmp_path: Path) -> Workspace:
    return write_round_inputs(tmp_path / "ws", 1, 3, ROUND_PARAMS)


def _read(ws: Workspace, uri: str) -> np.ndarray:
    limits = ws.params.storage
    return storage.read_image_array(
        ws.resolve(uri), limits.max_image_bytes, limits.max_image_pixels
    )


def _mask(ws: Workspace, item_id: str) -> np.ndarray:
    url = storage.join(ws.round_dir(1), "saliency", "masks", f"{item_id}.png")
    limits = ws.params.storage
    return (
        storage.read_image_array(url, limits.max_image_bytes, limits.max_image_pixels)[..., 0] > 0
    )


def test_sharded_generation_pastes_products_back_and_resumes(round_inputs: Workspace) -> None:
    ws = round_inputs
    first = generate_round(ws, 1, Shard(0, 2))
    assert not first.complete and first.generated > 0
    second = generate_round(ws, 1, Shard(1, 2))
    assert second.complete
    assert first.generated + second.generated == 3 * len(GROUPS) * 2

    table = storage.read_parquet(storage.join(ws.round_dir(1), "candidates.parquet"))
    assert list(table.columns) == CANDIDATE_COLUMNS
    assert len(table) == 12 and table["candidate_id"].is_unique
    assert set(table["user_group"]) == set(GROUPS)
    assert (table["prompt"] == "white soft plain studio").all()  # params default, no prompts
    items = storage.read_parquet(ws.items_table).set_index("item_id")
    for row in table.itertuples(index=False):
        assert row.seed == candidate_seed(
            0, 1, row.item_id, row.user_group, int(row.candidate_id[-2:])
        )
        product = _read(ws, items.loc[row.item_id, "image_uri"])
        mask = _mask(ws, row.item_id)
        image = _read(ws, row.image_uri)
        assert np.array_equal(image[mask], product[mask])  # product pixels exact
        assert np.abs(image[~mask].astype(int) - product[~mask]).mean() > 5  # background repainted

    again = generate_round(ws, 1)
    assert again.generated == 0 and again.parts_skipped == again.parts_total

    # A lost image is redone with its whole batch, rebuilt exactly as before: identical pixels.
    victim = table.iloc[5]
    before = _read(ws, victim["image_uri"])
    Path(ws.resolve(victim["image_uri"])).unlink()
    redo = generate_round(ws, 1, force=False)
    assert redo.generated == 0  # its part is complete: parts are the resume unit ...
    part_dir = Path(storage.join(ws.round_dir(1), "parts", "candidates"))
    for part in part_dir.glob("part-*.parquet"):
        part.unlink()
    redo = generate_round(ws, 1)
    assert 1 <= redo.generated < 12 and redo.generated + redo.reused == 12  # ... and batches
    assert np.array_equal(_read(ws, victim["image_uri"]), before)


def test_candidate_ids_are_safe_for_long_item_ids() -> None:
    assert make_candidate_id("item-1", 3, "g0", 7) == "item-1-r003-g0-q07"
    long_id = make_candidate_id("x" * 128, 3, "g0", 7)
    assert len(long_id) <= 128 and long_id.endswith("-r003-g0-q07")


def test_selected_prompts_replace_the_default(round_inputs: Workspace) -> None:
    ws = round_inputs
    prompts = pd.DataFrame(
        {
            "round": [1],
            "item_id": ["item-0001"],
            "user_group": ["g1"],
            "tokens": [["red", "striped"]],
            "prompt": ["red striped"],
            "score": [0.5],
        }
    )
    storage.write_parquet(storage.join(ws.round_dir(1), "prompts.parquet"), prompts)
    plan, skipped = plan_candidates(ws, 1)
    assert skipped == []
    chosen = plan[(plan["item_id"] == "item-0001") & (plan["user_group"] == "g1")]
    assert (chosen["prompt"] == "red striped").all() and len(chosen) == 2
    assert (plan.drop(chosen.index)["prompt"] == "white soft plain studio").all()


def test_missing_saliency_is_a_clear_error_and_failed_items_are_skipped(tmp_path: Path) -> None:
    ws = write_round_inputs(tmp_path / "ws", 1, 3, "")
    with pytest.raises(UserError, match=r"cg4ctr saliency --round 2"):
        plan_candidates(ws, 2)
    saliency = storage.join(ws.round_dir(1), "saliency", "saliency.parquet")
    table = storage.read_parquet(saliency)
    table.loc[1, "status"] = "rejected"
    storage.write_parquet(saliency, table)
    plan, skipped = plan_candidates(ws, 1)
    assert skipped == [{"item_id": "item-0001", "error": "no usable saliency mask"}]
    assert "item-0001" not in set(plan["item_id"])


def test_cli_generate_json(round_inputs: Workspace) -> None:
    result = runner.invoke(
        app, ["generate", "--round", "1", "--workspace", str(round_inputs.root), "--json"]
    )
    assert result.exit_code == 0, result.output
    figures = json.loads(result.output[result.output.index("{") :])
    assert figures["complete"] and figures["candidates"] == 12


def test_packaged_generator_loads_like_sd_inpainting_and_prompts_steer_colour() -> None:
    """The committed sim model is a standard folder; the colour token sets the background hue."""
    from diffusers import StableDiffusionInpaintPipeline

    folder = asset_path("sim-inpaint")
    manifest = json.loads((folder / "manifest.json").read_text())
    assert {"unet/config.json", "vae/config.json", "model_index.json"} <= set(manifest["files"])
    pipe = StableDiffusionInpaintPipeline.from_pretrained(folder)
    assert pipe.unet.config.in_channels == 9 and pipe.safety_checker is None
    gp = load_params().generate  # the packaged defaults: base_model "sim"
    rate, per_colour = colour_steering_rate(load_pipeline(gp, "cpu"), 64, 2, 10, 4.0, seed=3)
    print(f"colour steering rate: {rate:.2f} {per_colour}")
    assert rate >= 0.5  # chance is 1/8
