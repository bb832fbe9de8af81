from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cg4ctr_tasks.cli import app
from cg4ctr_tasks.prompts.vocab import load_vocab
from cg4ctr_tasks.sim.render import COLOURS
from cg4ctr_tasks.sim.train_generator import (
    chromatic_colours,
    nearest_colour,
    render_training_set,
)

runner = CliRunner()

SHORT = """generate:
  train:
    text_encoder: {clip}
    samples: 32
    vae_steps: 2
    unet_steps: 2
    batch_size: 4
    eval_steps: 2
    eval_samples: 1
"""


def _tiny_clip(folder: Path) -> Path:
    """An untrained CLIP of the sim-clip layout (text tower + word-level tokenizer) on disk."""
    from cg4ctr_tasks.params import load_params
    from cg4ctr_tasks.sim.train_clip import build_clip

    model, processor = build_clip(load_params(), load_vocab())
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.mark.slow  # ~30 s: a two-step retrain, save, reload and reuse
def test_short_retrain_writes_a_standard_inpainting_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from diffusers import StableDiffusionInpaintPipeline

    (tmp_path / "params.yaml").write_text(SHORT.format(clip=_tiny_clip(tmp_path / "clip")))
    out = tmp_path / "sim-inpaint"
    args = ["sim", "train-generator", "-w", str(tmp_path), "--out", str(out), "--json"]
    monkeypatch.setattr(sys, "argv", ["cg4ctr", *args])  # as a shell would invoke it
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    figures = json.loads(result.output[result.output.index("{") :])
    assert not figures["reused"] and 0.0 <= figures["colour_steering_rate"] <= 1.0

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["command"].startswith("cg4ctr ") and manifest["wall_time_s"] > 0
    for name, digest in manifest["files"].items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == digest
    pipe = StableDiffusionInpaintPipeline.from_pretrained(out)
    assert pipe.unet.config.in_channels == 9
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    assert pipe.vae_scale_factor == 8 and pipe.safety_checker is None
    assert pipe.tokenizer("red striped").input_ids[1:3] != [pipe.tokenizer.unk_token_id] * 2

    again = runner.invoke(app, args)
    assert again.exit_code == 0 and json.loads(again.output[again.output.index("{") :])["reused"]


def test_renderer_training_set_is_reproducible_and_hue_reader_is_right() -> None:
    a = render_training_set(load_vocab(), 32, 6, seed=4)
    b = render_training_set(load_vocab(), 32, 6, seed=4)
    assert np.array_equal(a.images, b.images) and a.prompts == b.prompts
    assert a.masks.any() and (~a.masks).any()
    from matplotlib.colors import hsv_to_rgb

    for name in chromatic_colours():
        rgb = hsv_to_rgb(np.array(COLOURS[name])) * 255.0
        assert nearest_colour(rgb) == name
