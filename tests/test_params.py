from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cg4ctr_tasks.errors import UserError
from cg4ctr_tasks.params import Params, default_params_text, load_params
from cg4ctr_tasks.prompts.vocab import load_vocab, parse_vocab


def test_defaults_hold_the_paper_values() -> None:
    params = load_params()
    assert params.profile == "sim"
    assert params.select.k == 5  # paper: top 5 of 10 kept
    assert params.generate.candidates == 10  # q
    assert params.prompt.lambda_p == pytest.approx(0.1)  # Eq 8
    assert params.reward.lambda_r == pytest.approx(0.1)  # Eq 17
    assert params.reward.learning_rate == pytest.approx(5e-4)
    assert params.prompt.learning_rate == pytest.approx(1e-3)


def test_every_model_field_has_a_value_in_the_yaml() -> None:
    """The YAML is the single source of defaults: no field may rely on a Python default."""
    raw = yaml.safe_load(default_params_text())

    def walk(model: type, data: dict, where: str) -> None:
        for name, field in model.model_fields.items():
            assert name in data, f"{where}{name} missing from defaults/params.yaml"
            annotation = field.annotation
            if isinstance(annotation, type) and issubclass(annotation, Params.__mro__[1]):
                walk(annotation, data[name], f"{where}{name}.")

    walk(Params, raw, "")


def test_repository_params_yaml_is_the_packaged_defaults() -> None:
    repo_params = Path(__file__).resolve().parents[1] / "params.yaml"
    assert repo_params.read_text() == default_params_text()


def test_workspace_file_merges_over_defaults(tmp_path: Path) -> None:
    (tmp_path / "params.yaml").write_text("world:\n  items: 3\nselect:\n  k: 2\n")
    params = load_params(tmp_path / "params.yaml")
    assert params.world.items == 3
    assert params.select.k == 2
    assert params.world.days == load_params().world.days


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("world:\n  itemz: 3\n", "unknown key 'world.itemz'"),
        ("bogus: 1\n", "unknown key 'bogus'"),
        ("world:\n  items: many\n", "key 'world.items'"),
        ("select:\n  k: 0\n", "key 'select.k'"),
        ("saliency:\n  backend: magic\n", "key 'saliency.backend'"),
        ("reward:\n  lambda_r: 1.5\n", "key 'reward.lambda_r'"),
        ("world: [1, 2\n", "not valid YAML"),
        ("- a\n- b\n", "expected a mapping"),
        # DVC's parser refuses a repeated key, so ours does too (PyYAML would keep the last one)
        ("world:\n  items: 3\n  days: 2\n  items: 4\n", "duplicate key 'items'"),
        ("seed: 1\nseed: 1\n", "line 2"),
    ],
)
def test_bad_params_name_the_key(tmp_path: Path, text: str, needle: str) -> None:
    (tmp_path / "params.yaml").write_text(text)
    with pytest.raises(UserError, match=None) as info:
        load_params(tmp_path / "params.yaml")
    assert needle in str(info.value)
    assert str(tmp_path / "params.yaml") in str(info.value)


def test_profiles() -> None:
    sd15 = load_params(profile="sd15")
    assert sd15.profile == "sd15"
    assert sd15.saliency.backend == "isnet"
    assert sd15.generate.dtype == "float16"
    assert sd15.select.k == 5  # untouched keys keep the base values
    with pytest.raises(UserError, match="unknown profile 'nope'"):
        load_params(profile="nope")


def test_profile_override_with_unknown_key_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "params.yaml").write_text("profiles:\n  fast:\n    select:\n      kk: 1\n")
    with pytest.raises(UserError, match="select.kk"):
        load_params(tmp_path / "params.yaml", profile="fast")


def test_vocab_kinds_and_errors(tmp_path: Path) -> None:
    vocab = load_vocab()
    assert "red" in vocab.of_kind("colour")
    assert vocab.kind_of("striped") == "texture"
    assert {"colour", "light", "texture", "material", "scene", "style"} == set(vocab.kinds)
    with pytest.raises(UserError, match=":2:"):
        parse_vocab("colour: red\ncolour red\n", "v.txt")
    with pytest.raises(UserError, match="duplicate"):
        parse_vocab("colour: red\nstyle: red\n", "v.txt")
    with pytest.raises(UserError, match="not found"):
        load_vocab(str(tmp_path / "missing.txt"))


def test_workspace_rounds_replace_the_default_list(tmp_path: Path) -> None:
    (tmp_path / "params.yaml").write_text(
        "rounds:\n  round-001: {id: 1, prev: round-000, mode: lora}\n"
    )
    assert list(load_params(tmp_path / "params.yaml").rounds) == ["round-001"]
