"""The reward stages end to end on a small simulated world: train, cache, save/load, evaluate,
score a round, the CLI, and the sd15 code path on tiny same-architecture encoders."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from cg4ctr_tasks import storage
from cg4ctr_tasks.caption import caption_creatives, caption_round
from cg4ctr_tasks.cli import app
from cg4ctr_tasks.errors import UserError
from cg4ctr_tasks.ingest import ingest
from cg4ctr_tasks.reward.data import build_reward_data
from cg4ctr_tasks.reward.evaluate import eval_reward
from cg4ctr_tasks.reward.model import IMAGE_WEIGHTS_NAME, TEXT_FOLDER, RewardModel
from cg4ctr_tasks.reward.score import load_reward, predict, score_round
from cg4ctr_tasks.reward.train import feature_cache_root, train_reward
from cg4ctr_tasks.sim.world import init_world
from cg4ctr_tasks.workspace import Workspace

REWARD_PARAMS = """\
world:
  items: 16
  days: 2
reward:
  epochs: 2
  batch_size: 64
  hidden_size: 32
  val_fraction: 0.25
  test_fraction: 0.25
  min_impressions: 1
  bootstrap_samples: 50
"""


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    """A small world with CTR tables and captions, and a reward model trained on it."""
    root = tmp_path_factory.mktemp("reward-world")
    (root / "params.yaml").write_text(REWARD_PARAMS)
    ws = Workspace.open(root)
    summary = init_world(ws, seed=7)
    ingest(ws, summary.first_date, summary.last_date)
    caption_creatives(ws)
    train_reward(ws)
    return ws


def _cache_parts(ws: Workspace) -> list[Path]:
    return sorted(Path(feature_cache_root(ws)).rglob("part-*.parquet"))


def test_training_saves_a_loadable_model_and_skips_a_rerun(world: Workspace) -> None:
    folder = Path(world.model_dir("reward"))
    assert {"config.json", "model.safetensors", IMAGE_WEIGHTS_NAME} <= {
        p.name for p in folder.iterdir()
    }
    config = json.loads((folder / "config.json").read_text())
    summary = config["extra"]["summary"]
    assert 1 <= summary["best_epoch"] <= 2 and summary["lists_by"] == "item,user_group"
    assert config["user_groups"] == ["g0", "g1", "g2", "g3"]
    assert train_reward(world)["skipped"] is True

    model, encoders, _ = load_reward(world)
    rows = build_reward_data(world, world.params.reward).split("test")
    first = predict(model, encoders, rows, 7)
    again = predict(RewardModel.from_pretrained(folder), encoders, rows, 1000)
    np.testing.assert_allclose(first, again, rtol=1e-5, atol=1e-6)
    assert np.isfinite(first).all() and first.std() > 0


def test_retraining_reuses_cached_features(world: Workspace, tmp_path: Path) -> None:
    before = _cache_parts(world)
    assert len(before) >= 2  # text and image parts
    summary = train_reward(world, force=True, model_dir=str(tmp_path / "again"))
    assert summary["skipped"] is False
    assert _cache_parts(world) == before  # nothing new was encoded


def test_eval_reward_cli_prints_the_paper_metrics(world: Workspace) -> None:
    result = CliRunner().invoke(app, ["eval-reward", "-w", str(world.root), "--json"])
    assert result.exit_code == 0, result.output
    figures = json.loads(result.output[result.output.index("{") :])
    for k in range(1, 6):
        assert np.isfinite(figures[f"top{k}"])
        low, high = figures["ci95"][f"top{k}"]
        assert low <= figures[f"top{k}"] + 1e-9 and figures[f"top{k}"] <= high + 1e-9
        assert np.isfinite(figures["oracle"][f"top{k}"])
    assert figures["mse"] >= 0 and figures["min_impressions"] == 1
    assert figures["top3"] == pytest.approx(0.0)  # 3 creatives per item: top-3 is everything


def test_per_creative_model_without_the_group_token(world: Workspace, tmp_path: Path) -> None:
    params = world.params.reward.model_copy(update={"user_group_token": False})
    folder = str(tmp_path / "paper")
    summary = train_reward(world, model_dir=folder, params=params)
    assert summary["lists_by"] == "item"
    assert RewardModel.from_pretrained(folder).config.user_groups == []


def test_sigmoid_link_predicts_probabilities_in_the_scores_order(
    world: Workspace, tmp_path: Path
) -> None:
    params = world.params.reward.model_copy(update={"ctr_link": "sigmoid"})
    folder = tmp_path / "sigmoid"
    train_reward(world, model_dir=str(folder), params=params)
    model, encoders, _ = load_reward(world, str(folder))
    assert model.config.ctr_link == "sigmoid"
    rows = build_reward_data(world, params).split("test")
    ctr = predict(model, encoders, rows, 64)
    assert ((ctr > 0) & (ctr < 1)).all() and ctr.std() > 0
    model.config = replace(model.config, ctr_link="identity")  # the raw scores: same order
    raw = predict(model, encoders, rows, 64)
    assert (np.diff(ctr[np.argsort(raw)]) >= 0).all()
    # a folder saved before the link existed loads as the paper's identity
    config = json.loads((folder / "config.json").read_text())
    del config["ctr_link"]
    (folder / "config.json").write_text(json.dumps(config))
    assert RewardModel.from_pretrained(folder).config.ctr_link == "identity"


def _write_round(ws: Workspace, round_id: int) -> pd.DataFrame:
    creatives = storage.read_parquet(ws.creatives_table).head(6)
    candidates = pd.DataFrame(
        {
            "round": round_id,
            "item_id": creatives["item_id"],
            "user_group": ["g0", "g1", "g2", "g3", "g0", "g1"],
            "candidate_id": [f"cand-{i}" for i in range(6)],
            "image_uri": creatives["image_uri"],
            "prompt": "white soft",
            "seed": 0,
            "parent_creative_id": creatives["creative_id"],
        }
    )
    storage.write_parquet(storage.join(ws.round_dir(round_id), "candidates.parquet"), candidates)
    return candidates


def test_score_round_writes_scores_and_is_idempotent(world: Workspace) -> None:
    candidates = _write_round(world, 1)
    round_dir = world.round_dir(1)
    with pytest.raises(UserError, match="captions table not found"):
        score_round(world, 1)
    caption_round(world, 1)
    runner = CliRunner()
    result = runner.invoke(app, ["score", "--round", "1", "-w", str(world.root), "--json"])
    assert result.exit_code == 0, result.output
    scores = storage.read_parquet(storage.join(round_dir, "scores.parquet"))
    assert list(scores.columns) == ["candidate_id", "item_id", "user_group", "score"]
    assert sorted(scores["candidate_id"]) == sorted(candidates["candidate_id"])
    assert np.isfinite(scores["score"]).all()
    assert score_round(world, 1)["skipped"] is True
    assert score_round(world, 1, force=True)["skipped"] is False


def test_missing_inputs_fail_clearly(world: Workspace, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "params.yaml").write_text("world:\n  items: 4\n  days: 1\n")
    result = CliRunner().invoke(app, ["train-reward", "-w", str(empty)])
    assert result.exit_code != 0
    with pytest.raises(UserError, match="ingest"):
        train_reward(Workspace.open(empty))
    with pytest.raises(UserError, match="no candidates"):
        score_round(Workspace.open(empty), 1)
    with pytest.raises(UserError, match="no reward model"):
        eval_reward(Workspace.open(empty))


@pytest.mark.slow
def test_sd15_code_path_on_tiny_encoders_with_fine_tuning(world: Workspace, tmp_path: Path) -> None:
    """BERT-architecture text and a timm transformer loaded by path, then fine-tuned."""
    import timm
    from safetensors.torch import save_file
    from transformers import BertConfig, BertModel, BertTokenizerFast

    from cg4ctr_tasks.reward.features import text_encoder_path

    bert = tmp_path / "tiny-bert"
    tokenizer = BertTokenizerFast(vocab_file=str(Path(text_encoder_path("sim")) / "vocab.txt"))
    BertModel(
        BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    ).save_pretrained(bert)
    tokenizer.save_pretrained(bert)
    vit = tmp_path / "tiny-vit.safetensors"
    save_file(timm.create_model("test_vit", pretrained=False).state_dict(), str(vit))

    frozen = world.params.reward.model_copy(
        update={
            "text_encoder": str(bert),
            "image_encoder": "test_vit",
            "image_checkpoint": str(vit),
            "image_size": None,
            "epochs": 1,
        }
    )
    folder = tmp_path / "sd15"
    train_reward(world, model_dir=str(folder), params=frozen)
    names = {p.name for p in folder.iterdir()}
    assert IMAGE_WEIGHTS_NAME not in names and TEXT_FOLDER not in names  # referenced by path
    config = RewardModel.from_pretrained(folder).config
    assert config.image_checkpoint == str(vit) and config.image_size == 160

    tuned = tmp_path / "tuned"
    train_reward(
        world, model_dir=str(tuned), params=frozen.model_copy(update={"finetune_encoders": True})
    )
    assert {IMAGE_WEIGHTS_NAME, TEXT_FOLDER} <= {p.name for p in tuned.iterdir()}
    model, encoders, _ = load_reward(world, str(tuned))
    _, base_encoders, _ = load_reward(world, str(folder))
    assert encoders.image_fp != base_encoders.image_fp  # the encoders did change
    rows = build_reward_data(world, frozen).split("test")
    assert np.isfinite(predict(model, encoders, rows, 64)).all()


def test_model_folder_round_trips_through_s3(world: Workspace, s3_endpoint: str) -> None:
    from tests.fixtures_s3 import S3_BUCKET

    remote = f"s3://{S3_BUCKET}/models/reward-roundtrip"
    params = world.params.reward.model_copy(update={"epochs": 1})
    assert train_reward(world, model_dir=remote, params=params)["skipped"] is False
    assert storage.exists(storage.join(remote, "model.safetensors"))
    assert train_reward(world, model_dir=remote, params=params)["skipped"] is True
    model, encoders, folder = load_reward(world, remote)
    assert folder == remote and model.config.user_groups == ["g0", "g1", "g2", "g3"]
    rows = build_reward_data(world, params).split("test")
    assert np.isfinite(predict(model, encoders, rows, 64)).all()
