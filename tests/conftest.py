"""Shared fixtures. Feature-specific fixtures live in tests/fixtures_*.py (see pytest_plugins)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

pytest_plugins: list[str] = ["tests.fixtures_airflow", "tests.fixtures_s3", "tests.fixtures_prompt"]


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small simulated world, built once per session. Tests must not modify it."""
    from cg4ctr_tasks.sim.world import init_world
    from cg4ctr_tasks.workspace import Workspace

    root = tmp_path_factory.mktemp("tiny-world")
    (root / "params.yaml").write_text("world:\n  items: 8\n  days: 3\n")
    init_world(Workspace.open(root), seed=11)
    return root


@pytest.fixture()
def workspace(tmp_path: Path) -> Path:
    """An empty workspace folder with a small-world params.yaml."""
    (tmp_path / "params.yaml").write_text("world:\n  items: 6\n  days: 2\n")
    return tmp_path
