"""The world's small CLIP: tokenizer, loss, a short retraining, and the committed asset."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from cg4ctr_tasks.assets import asset_path
from cg4ctr_tasks.params import load_params
from cg4ctr_tasks.prompts.vocab import load_vocab
from cg4ctr_tasks.sim.train_clip import (
    ASSET_NAME,
    EOS,
    UNK,
    build_tokenizer,
    multi_positive_loss,
    train_clip,
)

TINY = {
    "steps": 3,
    "batch_size": 8,
    "text_hidden": 16,
    "vision_hidden": 16,
    "vision_layers": 1,
    "text_layers": 1,
    "heads": 2,
    "projection_dim": 8,
    "heldout_images": 12,
}


def test_tokenizer_round_trip_pads_to_fixed_length(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    vocab = load_vocab()
    build_tokenizer(vocab, 16).save_pretrained(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    assert tokenizer.model_max_length == 16
    batch = tokenizer(
        ["Red  striped", "red nonsense"], padding="max_length", truncation=True, return_tensors="pt"
    )
    assert batch["input_ids"].shape == (2, 16)
    first = tokenizer.convert_ids_to_tokens(batch["input_ids"][0][:5].tolist())
    assert first == [tokenizer.bos_token, "red", "striped", EOS, tokenizer.pad_token]
    assert tokenizer.convert_ids_to_tokens(int(batch["input_ids"][1][2])) == UNK
    too_long = tokenizer(" ".join(vocab.tokens), padding="max_length", truncation=True)
    assert len(too_long["input_ids"]) == 16


def test_multi_positive_loss_prefers_matching_pairs() -> None:
    images = [["red", "plain"], ["blue", "striped"]]
    texts = [["red"], ["striped"]]
    right = torch.tensor([[5.0, -5.0], [-5.0, 5.0]])
    assert multi_positive_loss(right, images, texts) < multi_positive_loss(-right, images, texts)
    # "red" is shown by both images: matching both is right, preferring one is not rewarded.
    images = [["red", "plain"], ["red", "striped"]]
    both = torch.tensor([[5.0, -5.0], [5.0, 5.0]])
    one = torch.tensor([[5.0, -5.0], [-5.0, 5.0]])
    assert multi_positive_loss(both, images, texts) < multi_positive_loss(one, images, texts)


def test_short_training_saves_a_loadable_checkpoint(tmp_path: Path) -> None:
    from transformers import AutoTokenizer, CLIPModel, CLIPProcessor, CLIPTextModel

    params = load_params(overrides={"caption": {"train": TINY}})
    out = tmp_path / "clip"
    summary = train_clip(params, out, seed=3, command="test", show_progress=False)
    assert summary.steps == 3 and summary.images_seen == 24
    assert 0.0 <= summary.colour_accuracy <= 1.0
    manifest = json.loads((out / "manifest.json").read_text())
    for name, digest in manifest["files"].items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == digest
    assert "model.safetensors" in manifest["files"] and manifest["command"] == "test"

    model = CLIPModel.from_pretrained(out)
    processor = CLIPProcessor.from_pretrained(out)
    text_model = CLIPTextModel.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer(["red soft plain"], padding="max_length", truncation=True, return_tensors="pt")
    with torch.inference_mode():
        hidden = text_model(**ids).last_hidden_state
    assert hidden.shape == (1, 16, 16)
    assert model.config.text_config.eos_token_id == tokenizer.eos_token_id
    assert processor.image_processor.crop_size["height"] == params.world.image_size

    again = train_clip(params, out, seed=3, command="test", show_progress=False)
    assert again.final_loss == summary.final_loss  # same seed, same run


def test_committed_asset_matches_its_manifest() -> None:
    folder = asset_path(ASSET_NAME)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["command"].startswith("cg4ctr sim train-clip")
    for name, digest in manifest["files"].items():
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest
    assert sum((folder / n).stat().st_size for n in manifest["files"]) < 8_000_000
    assert manifest["summary"]["colour_accuracy"] >= 0.8


def test_cli_train_clip(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from cg4ctr_tasks.cli import app

    (tmp_path / "params.yaml").write_text(
        "caption:\n  train:\n" + "".join(f"    {k}: {v}\n" for k, v in TINY.items())
    )
    out = tmp_path / "clip"
    result = CliRunner().invoke(
        app, ["sim", "train-clip", "-w", str(tmp_path), "--out", str(out), "--json"]
    )
    assert result.exit_code == 0, result.output
    assert (out / "manifest.json").is_file()
