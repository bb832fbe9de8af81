from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cg4ctr_tasks.rounds import round_info
from cg4ctr_tasks.sim.world import init_world
from cg4ctr_tasks.versioning import restore_round, version_round
from cg4ctr_tasks.workspace import Workspace


def _git(root: Path, *args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=root, capture_output=True, text=True, check=True
    ).stdout.strip()


@pytest.fixture()
def ws(workspace: Path) -> Workspace:
    opened = Workspace.open(workspace)
    init_world(opened, seed=2)
    return opened


def _fake_round(ws: Workspace, round_id: int, text: str) -> Path:
    """Stand-in outputs of a round: a file in the round folder and a model checkpoint."""
    round_dir = Path(ws.round_dir(round_id))
    round_dir.mkdir(parents=True, exist_ok=True)
    (round_dir / "partition.txt").write_text(text)
    model = Path(ws.model_dir("lora", round_id))
    model.mkdir(parents=True, exist_ok=True)
    (model / "adapter.bin").write_bytes(text.encode() * 10)
    return round_dir


def test_rounds_are_tagged_pushed_and_restorable(ws: Workspace) -> None:
    first = _fake_round(ws, round_info(ws, 1).id, "round one")
    result = version_round(ws, 1)
    assert result.tag == "round-001" and set(result.tracked) == {"data", "models", "sim"}
    assert any((ws.root / ".dvc-remote").rglob("*")), "dvc push wrote nothing to the remote"

    (first / "partition.txt").write_text("overwritten later")
    second = _fake_round(ws, round_info(ws, 2).id, "round two")
    version_round(ws, 2)
    assert _git(ws.root, "tag", "--list") == "round-001\nround-002"

    restore_round(ws, 1)
    assert (first / "partition.txt").read_text() == "round one"
    assert not second.exists()
    assert not Path(ws.model_dir("lora", 2)).exists()

    # the cache can be rebuilt from the remote alone
    import shutil

    shutil.rmtree(ws.root / ".dvc" / "cache")
    shutil.rmtree(ws.root / "data")
    subprocess.run(
        [sys.executable, "-m", "dvc", "pull", "-q"], cwd=ws.root, check=True, capture_output=True
    )
    assert (first / "partition.txt").read_text() == "round one"


def test_re_versioning_a_round_moves_its_tag(ws: Workspace) -> None:
    round_dir = _fake_round(ws, round_info(ws, 1).id, "first try")
    version_round(ws, 1)
    before = _git(ws.root, "rev-parse", "round-001")
    (round_dir / "partition.txt").write_text("cleared and re-run")
    version_round(ws, 1)
    assert _git(ws.root, "rev-parse", "round-001") != before
    assert _git(ws.root, "tag", "--list") == "round-001"


def test_two_concurrent_version_runs_do_not_corrupt_the_repo(ws: Workspace) -> None:
    _fake_round(ws, round_info(ws, 1).id, "concurrent")
    command = [
        sys.executable,
        "-m",
        "cg4ctr_tasks.cli",
        "version",
        "--round",
        "1",
        "--workspace",
        str(ws.root),
    ]
    procs = [
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)
    ]
    outcomes = [p.wait(timeout=300) for p in procs]
    assert outcomes == [0, 0], [p.stderr.read() for p in procs if p.stderr]  # the second waited
    status = subprocess.run(
        [sys.executable, "-m", "dvc", "status", "-q"], cwd=ws.root, capture_output=True
    )
    assert status.returncode == 0
    assert _git(ws.root, "status", "--porcelain", "--untracked-files=no") == ""


@pytest.mark.integration
def test_rounds_push_to_an_s3_remote_and_restore_from_it(
    workspace: Path, s3_endpoint: str, tmp_path: Path
) -> None:
    from tests.fixtures_s3 import S3_BUCKET

    (workspace / "params.yaml").write_text(
        f"world:\n  items: 3\n  days: 1\nversioning:\n  remote: s3://{S3_BUCKET}/dvc-remote\n"
    )
    ws = Workspace.open(workspace)
    init_world(ws, seed=2)
    round_dir = _fake_round(ws, round_info(ws, 1).id, "on s3")
    version_round(ws, 1)

    from cg4ctr_tasks.storage import url_to_fs

    fs, _ = url_to_fs(f"s3://{S3_BUCKET}")
    assert fs.find(f"{S3_BUCKET}/dvc-remote"), "nothing was pushed to the S3 remote"
    # the endpoint is machine-local config, credentials never reach a committed file
    committed = _git(ws.root, "show", "HEAD:.dvc/config")
    assert "dvc-remote" in committed and "127.0.0.1" not in committed and "testing" not in committed

    # a second clone of the workspace repo restores the round from S3 alone
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ws.root), str(clone)], check=True)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "dvc",
            "remote",
            "modify",
            "--local",
            "storage",
            "endpointurl",
            s3_endpoint,
        ],
        cwd=clone,
        check=True,
        capture_output=True,
    )
    subprocess.run(
        [sys.executable, "-m", "dvc", "pull", "-q"], cwd=clone, check=True, capture_output=True
    )
    relative = round_dir.relative_to(ws.root)
    assert (clone / relative / "partition.txt").read_text() == "on s3"
