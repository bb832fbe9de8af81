"""Prompt model training and selection through the workspace: bootstrap, even rounds, CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from cg4ctr_tasks import storage
from cg4ctr_tasks.cli import app
from cg4ctr_tasks.errors import UserError
from cg4ctr_tasks.prompts.select import select_prompts
from cg4ctr_tasks.prompts.train import train_prompt
from cg4ctr_tasks.prompts.vocab import load_vocab
from cg4ctr_tasks.sim.render import random_tokens
from cg4ctr_tasks.workspace import Workspace

pytestmark = pytest.mark.usefixtures("one_torch_thread")
runner = CliRunner()
SMALL_MODEL = """
prompt:
  batch_size: 256
  epochs: 1
  learning_rate: 3.0e-3
  min_steps: 300
  embed_dim: 16
  hidden: 32
  tokens_per_prompt: 3
"""
LIKED = {"ga": "red", "gb": "blue"}  # the planted preferences


def _planted_workspace(root: Path, seed: int) -> Workspace:
    """Synthetic logs where group ga clicks 4x more on red backgrounds and gb on blue ones."""
    root.mkdir(parents=True)
    (root / "params.yaml").write_text(f"seed: {seed}\n{SMALL_MODEL}  exploration: 0.0\n")
    ws = Workspace.open(root)
    rng = np.random.default_rng(seed)
    vocab = load_vocab()
    items = pd.DataFrame(
        {
            "item_id": [f"item-{i:04d}" for i in range(6)],
            "category": ["ball", "cup"] * 3,
            "title": ["t"] * 6,
            "image_uri": ["x.png"] * 6,
        }
    )
    storage.write_parquet(ws.items_table, items)
    world = {"user_groups": list(LIKED), "devices": ["ios"], "categories": ["ball", "cup"]}
    storage.write_text(storage.join(ws.data, "world.json"), json.dumps(world))
    ctr_rows, captions = [], []
    for item_id in items["item_id"]:
        for j in range(20):
            creative_id = f"{item_id}-c{j}"
            tokens = random_tokens(vocab, rng)
            captions.append({"creative_id": creative_id, "tokens": tokens})
            for group, liked in LIKED.items():
                ctr = 0.03 * (4.0 if liked in tokens else 1.0)
                row = (item_id, creative_id, group, 100, int(rng.binomial(100, ctr)))
                ctr_rows.append(row)
    columns = ["item_id", "creative_id", "user_group", "impressions", "clicks"]
    storage.write_parquet(ws.ctr_table("2026-01-01"), pd.DataFrame(ctr_rows, columns=columns))
    storage.write_parquet(storage.join(ws.data, "captions.parquet"), pd.DataFrame(captions))
    return ws


@pytest.mark.slow
def test_planted_preferences_are_learned_and_selected(tmp_path: Path) -> None:
    hits = total = 0
    for seed in range(4):
        ws = _planted_workspace(tmp_path / f"seed{seed}", seed)
        summary = train_prompt(ws, None)
        assert summary.steps == 300 and summary.loss_end < summary.loss_start
        select_prompts(ws, 1)
        prompts = storage.read_parquet(storage.join(ws.round_dir(1), "prompts.parquet"))
        for row in prompts.itertuples():
            total += 1
            hits += LIKED[row.user_group] in list(row.tokens)
    rate = hits / total
    print(f"planted preference selected in {hits}/{total} prompts ({rate:.0%})")
    assert total == 4 * 6 * 2
    assert rate >= 0.9


def test_bootstrap_select_and_even_round_on_the_tiny_world(
    tiny_world: Path, tmp_path: Path
) -> None:
    root = tmp_path / "world"
    shutil.copytree(tiny_world, root)
    (root / "params.yaml").write_text((root / "params.yaml").read_text() + SMALL_MODEL)
    ws = Workspace.open(root)
    with pytest.raises(UserError, match="train-prompt --bootstrap"):
        select_prompts(ws, 1)
    with pytest.raises(UserError, match="ingest"):
        train_prompt(ws, None)
    # The ingest stage's table, from the raw logs (a pandas group-by stands in for `ingest`).
    for part in sorted(Path(ws.raw_logs).glob("dt=*/part-*.csv")):
        logs = pd.read_csv(part)
        keys = ["item_id", "creative_id", "user_group"]
        table = logs.groupby(keys, as_index=False)[["impressions", "clicks"]].sum()
        storage.write_parquet(ws.ctr_table(str(logs["event_date"].iloc[0])), table)
    with pytest.raises(UserError, match="caption"):
        train_prompt(ws, None)
    rng = np.random.default_rng(5)  # the test's own captions: never the world's private tokens
    creatives = storage.read_parquet(ws.creatives_table)
    captions = [random_tokens(load_vocab(), rng) for _ in range(len(creatives))]
    captions[0] = []  # a caption with no vocab token is dropped, not an error
    frame = pd.DataFrame({"creative_id": creatives["creative_id"], "tokens": captions})
    storage.write_parquet(storage.join(ws.data, "captions.parquet"), frame)

    boot = train_prompt(ws, None)
    assert not boot.skipped and boot.dropped_rows == 4 and boot.rows == 8 * 3 * 4 - 4
    assert train_prompt(ws, None).skipped
    weights = Path(boot.model_dir) / "model.safetensors"
    first = weights.read_bytes()
    train_prompt(ws, None, force=True)
    assert weights.read_bytes() == first  # same inputs and seed, same model
    summary = select_prompts(ws, 1)
    prompts = storage.read_parquet(summary.prompts)
    assert list(prompts.columns) == ["round", "item_id", "user_group", "tokens", "prompt", "score"]
    assert len(prompts) == 8 * 4 and set(prompts["user_group"]) == {"g0", "g1", "g2", "g3"}
    assert all(len(t) == 3 for t in prompts["tokens"])
    assert (prompts["prompt"] == prompts["tokens"].map(" ".join)).all()
    assert select_prompts(ws, 1).skipped
    again = select_prompts(ws, 1, force=True)
    assert storage.read_parquet(again.prompts).equals(prompts)  # deterministic

    # Round 2: G/B partition of candidates with their captions (Eq 8 update).
    with pytest.raises(UserError, match="even rounds"):
        train_prompt(ws, 3)
    with pytest.raises(UserError, match="select --round 2"):
        train_prompt(ws, 2)
    round_dir = ws.round_dir(2)
    rows, caps = [], []
    for i, p in enumerate(prompts.itertuples()):
        for j in range(4):
            cid = f"r2-{i}-{j}"
            rows.append((cid, p.item_id, p.user_group, float(j), 4 - j, j >= 2))
            caps.append({"candidate_id": cid, "image_uri": "x.png", "caption": "", "tokens": []})
            caps[-1]["tokens"] = random_tokens(load_vocab(), rng)
    columns = ["candidate_id", "item_id", "user_group", "score", "rank", "kept"]
    storage.write_parquet(
        storage.join(round_dir, "partition.parquet"), pd.DataFrame(rows, columns=columns)
    )
    storage.write_parquet(storage.join(round_dir, "captions.parquet"), pd.DataFrame(caps))
    update = train_prompt(ws, 2)
    assert update.init_from == ws.model_dir("prompt", 0)
    assert update.rows == len(rows) and update.model_dir == ws.model_dir("prompt", 2)
    assert ws.latest_model_dir("prompt", 3) == ws.model_dir("prompt", 2)
    assert select_prompts(ws, 3).model_dir == ws.model_dir("prompt", 2)


def test_cli_commands(tmp_path: Path) -> None:
    ws = _planted_workspace(tmp_path / "w", seed=9)
    result = runner.invoke(app, ["prompts", "--round", "1", "-w", str(ws.root)])
    assert result.exit_code != 0 and isinstance(result.exception, UserError)
    result = runner.invoke(app, ["train-prompt", "-w", str(ws.root)])
    assert "exactly one of --bootstrap" in str(result.exception)
    result = runner.invoke(app, ["train-prompt", "--bootstrap", "-w", str(ws.root), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["mode"] == "bootstrap"
    result = runner.invoke(app, ["prompts", "--round", "1", "-w", str(ws.root), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["rows"] == 12
