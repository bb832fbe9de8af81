"""The CLIP interrogator: accuracy of the world's CLIP, the stage, and the sd15 (by path) route."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from cg4ctr_tasks import storage
from cg4ctr_tasks.caption import Interrogator, caption_creatives, caption_round, load_clip
from cg4ctr_tasks.cli import app
from cg4ctr_tasks.errors import UserError
from cg4ctr_tasks.params import load_params
from cg4ctr_tasks.prompts.vocab import load_vocab
from cg4ctr_tasks.shards import Shard
from cg4ctr_tasks.workspace import Workspace


@pytest.fixture()
def world(tiny_world: Path, tmp_path: Path) -> Workspace:
    root = tmp_path / "world"
    shutil.copytree(tiny_world, root)
    return Workspace.open(root)


def test_top3_tokens_recover_colour_and_texture_on_heldout_renders() -> None:
    from cg4ctr_tasks.caption import token_accuracy
    from cg4ctr_tasks.sim.train_clip import render_batch

    params = load_params()
    vocab = load_vocab()
    # A seed stream the trainer never used (it draws from SeedSequence([seed, 0xC11F])).
    heldout = render_batch(vocab, 64, 200, 0.25, np.random.default_rng(20260501))
    accuracy = token_accuracy(*load_clip("sim"), vocab, heldout, params.caption)
    print(f"sim CLIP interrogator, top-{params.caption.top_tokens} accuracy: {accuracy}")
    assert accuracy["colour"] >= 0.8
    assert accuracy["texture"] >= 0.3  # chance: 1/6; the small CLIP reads texture poorly


def test_captions_are_one_token_per_kind() -> None:
    params = load_params()
    vocab = load_vocab()
    interrogator = Interrogator(*load_clip("sim"), vocab, params.caption)
    rng = np.random.default_rng(1)
    from cg4ctr_tasks.sim.render import render_background

    images = [render_background(["red", "bright", "striped"], vocab, 64, rng) for _ in range(4)]
    captions = interrogator.caption(images)
    for tokens in captions:
        assert len(tokens) == params.caption.top_tokens
        kinds = [vocab.kind_of(t) for t in tokens]
        assert len(set(kinds)) == len(kinds)
    assert sum("red" in tokens for tokens in captions) >= 3


def test_caption_creatives_stage_resumes_and_reports_bad_images(world: Workspace) -> None:
    creatives = storage.read_parquet(world.creatives_table)
    storage.write_bytes(world.resolve(creatives.loc[1, "image_uri"]), b"\x89PNG broken")
    sized = world.params.model_copy(
        update={"caption": world.params.caption.model_copy(update={"shard_size": 10})}
    )
    ws = Workspace(root=world.root, params=sized)
    first = caption_creatives(ws, Shard(1, 3))
    assert not first.complete and first.parts_written == 1
    summary = caption_creatives(ws)
    assert summary.complete and summary.parts_skipped == 1 and summary.parts_written == 2
    assert [r["creative_id"] for r in summary.rejected] == [creatives.loc[1, "creative_id"]]
    table = storage.read_parquet(storage.join(ws.data, "captions.parquet"))
    assert list(table.columns) == ["creative_id", "image_uri", "caption", "tokens"]
    assert len(table) == len(creatives) - 1 == summary.captioned
    vocab = load_vocab()
    for caption, tokens in zip(table["caption"], table["tokens"], strict=True):
        assert caption == " ".join(tokens) and len(tokens) == 3
        assert all(t in vocab.tokens for t in tokens)
    again = caption_creatives(ws)
    assert again.parts_written == 0 and again.parts_skipped == 3


def test_caption_round_and_cli(world: Workspace) -> None:
    creatives = storage.read_parquet(world.creatives_table).head(5)
    candidates = pd.DataFrame(
        {
            "candidate_id": [f"cand-{i}" for i in range(5)],
            "image_uri": creatives["image_uri"],
        }
    )
    storage.write_parquet(storage.join(world.round_dir(1), "candidates.parquet"), candidates)
    summary = caption_round(world, 1)
    assert summary.complete and summary.captioned == 5
    result = CliRunner().invoke(
        app, ["caption", "--round", "1", "-w", str(world.root), "--force", "--json"]
    )
    assert result.exit_code == 0, result.output
    assert '"captioned": 5' in result.output
    table = storage.read_parquet(storage.join(world.round_dir(1), "captions.parquet"))
    assert table["candidate_id"].tolist() == candidates["candidate_id"].tolist()
    both = CliRunner().invoke(
        app, ["caption", "--round", "1", "--creatives", "-w", str(world.root)]
    )
    assert both.exit_code != 0
    with pytest.raises(UserError, match="not found"):
        caption_round(world, 2)


def _tiny_openai_style_clip(folder: Path, words: list[str]) -> None:
    """A same-architecture CLIP (BPE tokenizer like openai's) built from a config and saved."""
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        CLIPTokenizer,
    )

    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    merges: list[tuple[str, str]] = []
    for word in words:
        parts = [*word[:-1], word[-1] + "</w>"]
        for part in parts:
            vocab.setdefault(part, len(vocab))
        while len(parts) > 1:
            if (parts[0], parts[1]) not in merges:
                merges.append((parts[0], parts[1]))
            parts = [parts[0] + parts[1], *parts[2:]]
            vocab.setdefault(parts[0], len(vocab))
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=24)
    config = CLIPConfig(
        text_config={
            "vocab_size": len(vocab),
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "max_position_embeddings": 24,
            "bos_token_id": 0,
            "eos_token_id": 1,
            "pad_token_id": 1,
        },
        vision_config={
            "image_size": 32,
            "patch_size": 8,
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
        },
        projection_dim=8,
    )
    CLIPModel(config).save_pretrained(folder)
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(folder)


def test_sd15_route_loads_a_clip_by_path(world: Workspace, tmp_path: Path) -> None:
    vocab = load_vocab()
    folder = tmp_path / "tiny-openai-clip"
    _tiny_openai_style_clip(folder, ["a", "background", *vocab.tokens])
    sd15 = load_params(profile="sd15").caption
    assert sd15.phrase == "a {token} background"
    sd15 = sd15.model_copy(update={"clip_model": str(folder)})  # a hub id in real use
    ws = Workspace(root=world.root, params=world.params.model_copy(update={"caption": sd15}))
    summary = caption_creatives(ws)
    assert summary.complete and summary.captioned == len(storage.read_parquet(ws.creatives_table))
    table = storage.read_parquet(storage.join(ws.data, "captions.parquet"))
    assert all(len(t) == sd15.top_tokens for t in table["tokens"])
    with pytest.raises(UserError, match="cannot load CLIP"):
        load_clip(str(tmp_path / "missing"))
