from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cg4ctr_tasks import storage
from cg4ctr_tasks.cli import app
from cg4ctr_tasks.errors import UserError
from cg4ctr_tasks.generate import inpaint_batch, load_pipeline
from cg4ctr_tasks.train_lora import (
    WEIGHTS_NAME,
    add_lora,
    encode_examples,
    fit_adapter,
    load_positives,
    save_adapter,
    sft_objective,
    train_lora,
)
from cg4ctr_tasks.workspace import Workspace
from tests.fixtures_generate import ROUND_PARAMS, write_positives, write_round_inputs

runner = CliRunner()


@pytest.fixture()
def positives(tmp_path: Path) -> Workspace:
    ws = write_round_inputs(
        tmp_path / "ws", 1, 3, ROUND_PARAMS + "lora:\n  steps: 4\n  batch_size: 4\n"
    )
    write_positives(ws, 1, 8)
    return ws


def _sample(pipe: object, ws: Workspace) -> np.ndarray:
    images, masks, prompts = load_positives(ws, 1)
    return inpaint_batch(pipe, images[:2], masks[:2], prompts[:2], [7, 8], 4, 4.0)  # type: ignore[arg-type]


def test_lora_steps_lower_the_loss_touch_only_lora_and_reload_identically(
    positives: Workspace, tmp_path: Path
) -> None:
    from diffusers import DDPMScheduler

    ws = positives
    lp = ws.params.lora.model_copy(update={"learning_rate": 1e-2, "steps": 8})
    pipe = load_pipeline(ws.params.generate, "cpu")
    images, masks, prompts = load_positives(ws, 1)
    assert len(images) == 4  # the kept half of 8 candidates
    data = encode_examples(pipe, images, masks, prompts, 4)
    base = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    add_lora(pipe.unet, lp)
    objective = sft_objective(pipe.unet, DDPMScheduler.from_config(pipe.scheduler.config), data)
    batch = torch.arange(len(images))

    def fixed_batch_loss() -> float:
        with torch.no_grad():
            return objective(batch, torch.Generator().manual_seed(0)).item()

    before = fixed_batch_loss()
    fit_adapter(
        pipe.unet, lambda idx, gen: objective(batch, torch.Generator().manual_seed(0)), 4, lp, 0
    )
    assert fixed_batch_loss() < before

    after = pipe.unet.state_dict()
    lora_keys = [k for k in after if "lora_" in k]
    assert lora_keys and all(
        any(p in k for p in ("to_q", "to_k", "to_v", "to_out.0")) for k in lora_keys
    )
    assert any(not torch.all(after[k] == 0) for k in lora_keys if "lora_B" in k)
    stripped = {k.replace(".base_layer", ""): v for k, v in after.items() if "lora_" not in k}
    assert stripped.keys() == base.keys()
    assert all(torch.equal(stripped[k], base[k]) for k in base)  # base weights untouched

    trained = _sample(pipe, ws)
    folder = tmp_path / "adapter"
    save_adapter(pipe.unet, str(folder))
    reloaded = load_pipeline(ws.params.generate, "cpu", lora_dir=str(folder))
    assert np.array_equal(_sample(reloaded, ws), trained)
    plain = load_pipeline(ws.params.generate, "cpu")
    assert not np.array_equal(_sample(plain, ws), trained)


def test_train_lora_writes_reuses_and_continues_the_adapter(positives: Workspace) -> None:
    ws = positives
    result = runner.invoke(app, ["train-lora", "--round", "1", "-w", str(ws.root), "--json"])
    assert result.exit_code == 0, result.output
    first = json.loads(result.output[result.output.index("{") :])
    assert first["examples"] == 4 and first["continued_from"] is None and not first["reused"]
    out = Path(ws.model_dir("lora", 1))
    assert (out / WEIGHTS_NAME).exists()
    assert train_lora(ws, 1).reused

    # Round 3 continues from round 1's adapter (the latest earlier one) and loads in generate.
    write_round_inputs(ws.root, 3, 3, (ws.root / "params.yaml").read_text())
    write_positives(ws, 3, 8)
    third = train_lora(ws, 3)
    assert third.continued_from == str(out)
    pipe = load_pipeline(ws.params.generate, "cpu", lora_dir=ws.model_dir("lora", 3))
    assert pipe.unet.peft_config


def test_train_lora_needs_the_partition(tmp_path: Path) -> None:
    ws = write_round_inputs(tmp_path / "ws", 1, 2, ROUND_PARAMS)
    with pytest.raises(UserError, match="cg4ctr generate --round 1"):
        train_lora(ws, 1)
    assert not storage.exists(ws.model_dir("lora", 1))
