from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cg4ctr_tasks.cli import app

runner = CliRunner()


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cg4ctr_tasks.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
    )


def test_help_lists_the_commands() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("sim", "demo", "params"):
        assert command in result.output


def _all_commands(group: object, prefix: list[str]) -> list[list[str]]:
    import typer.main

    click_group = typer.main.get_command(app) if group is None else group
    found = []
    for name, command in getattr(click_group, "commands", {}).items():
        found.append([*prefix, name])
        found.extend(_all_commands(command, [*prefix, name]))
    return found


@pytest.mark.parametrize("command", _all_commands(None, []), ids=" ".join)
def test_every_command_has_help(command: list[str]) -> None:
    result = runner.invoke(app, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_sim_init_and_evaluate_json(tmp_path: Path) -> None:
    (tmp_path / "params.yaml").write_text("world:\n  items: 4\n  days: 1\n")
    init = _cli("sim", "init", "--workspace", str(tmp_path), "--seed", "4", "--json")
    assert init.returncode == 0, init.stderr
    summary = json.loads(init.stdout)
    assert summary["items"] == 4 and summary["clicks"] <= summary["impressions"]
    evaluated = _cli(
        "sim",
        "evaluate",
        "-w",
        str(tmp_path),
        "--creatives",
        str(tmp_path / "data" / "creatives.parquet"),
        "--json",
    )
    assert evaluated.returncode == 0, evaluated.stderr
    figures = json.loads(evaluated.stdout)
    assert isinstance(figures["overall"], float) and set(figures["per_group"]) == {
        "g0",
        "g1",
        "g2",
        "g3",
    }


def test_items_and_days_flags_override_params(tmp_path: Path) -> None:
    result = _cli("sim", "init", "-w", str(tmp_path), "--items", "3", "--days", "1", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["items"] == 3


@pytest.mark.parametrize(
    ("params_text", "args", "needle"),
    [
        ("world:\n  itemz: 2\n", ["sim", "init"], "unknown key 'world.itemz'"),
        ("", ["sim", "evaluate", "--creatives", "missing.parquet"], "not found"),
        ("", ["sim", "init", "--items", "0"], "key 'world.items'"),
    ],
)
def test_user_errors_are_one_line_without_traceback(
    tmp_path: Path, params_text: str, args: list[str], needle: str
) -> None:
    (tmp_path / "params.yaml").write_text(params_text)
    result = _cli(*args[:1], *args[1:2], "-w", str(tmp_path), *args[2:])
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert needle in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_workspace_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "params.yaml").write_text("select:\n  k: 3\n")
    monkeypatch.setenv("CG4CTR_WORKSPACE", str(tmp_path))
    result = runner.invoke(app, ["params", "show"])
    assert result.exit_code == 0
    assert json.loads(result.output)["select"]["k"] == 3
