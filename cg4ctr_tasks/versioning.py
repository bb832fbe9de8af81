"""DVC versioning of rounds: commit outputs to the DVC cache, push to the remote, tag round-NNN.

A workspace is its own git + DVC repository (never the DAG bundle's checkout). After a round,
``data/``, ``models/`` and the world's ``sim/`` are recorded with DVC (``dvc add`` of the three
folders, or ``dvc commit`` where a ``dvc.yaml`` pipeline owns the outputs), the pointer files
are committed to git and tagged ``round-NNN``, and the cache is pushed, so ``git checkout
round-NNN && dvc checkout`` restores exactly that round, whichever orchestrator made it.
Writers are serialised by the workspace lock because DVC's own repo lock does not wait.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from cg4ctr_tasks.errors import UserError
from cg4ctr_tasks.rounds import workspace_lock
from cg4ctr_tasks.workspace import Workspace, round_name

TRACKED = ("data", "models", "sim")
REMOTE_NAME = "storage"
IGNORED = (".cg4ctr.lock", ".dvc-remote/", "__pycache__/")


@dataclass(frozen=True)
class VersionResult:
    round: int
    tag: str
    commit: str
    remote: str
    tracked: list[str]

    def as_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


def _run(args: list[str], cwd: Path, what: str) -> str:
    env = {**os.environ, "GIT_TERMINAL_PROMPT": "0", "DVC_NO_ANALYTICS": "1"}
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        raise UserError(f"{what} failed in {cwd}: {detail[-1] if detail else proc.returncode}")
    return proc.stdout.strip()


def _git(ws: Workspace, *args: str) -> str:
    return _run(["git", *args], ws.root, f"git {args[0]}")


def _dvc(ws: Workspace, *args: str) -> str:
    return _run([sys.executable, "-m", "dvc", *args], ws.root, f"dvc {args[0]}")


def remote_url(ws: Workspace) -> str:
    return ws.params.versioning.remote or str(ws.root / ".dvc-remote")


def ensure_repo(ws: Workspace) -> None:
    """Make the workspace a git + DVC repository with the configured default remote."""
    if not (ws.root / ".git").exists():
        _git(ws, "init", "-q", "-b", "main")
        _git(ws, "config", "user.name", "cg4ctr")
        _git(ws, "config", "user.email", "cg4ctr@localhost")
    if not (ws.root / ".dvc").exists():
        _dvc(ws, "init", "-q")
        _dvc(ws, "config", "core.autostage", "true")
    ignore = ws.root / ".gitignore"
    present = ignore.read_text().splitlines() if ignore.exists() else []
    missing = [line for line in IGNORED if line not in present]
    if missing:
        ignore.write_text("\n".join([*present, *missing]) + "\n")
    url = remote_url(ws)
    _dvc(ws, "remote", "add", "--force", "--default", REMOTE_NAME, url)
    endpoint = os.environ.get("CG4CTR_S3_ENDPOINT_URL")
    if url.startswith("s3://") and endpoint:
        # --local: machine-specific, never committed (credentials stay in the environment)
        _dvc(ws, "remote", "modify", "--local", REMOTE_NAME, "endpointurl", endpoint)


def version_round(ws: Workspace, round_id: int) -> VersionResult:
    """Record the workspace state after ``round_id`` in DVC + git, tag it, push the cache."""
    tag = round_name(round_id)
    with workspace_lock(ws):
        ensure_repo(ws)
        tracked = [name for name in TRACKED if (ws.root / name).exists()]
        if (ws.root / "dvc.yaml").exists():
            _dvc(ws, "commit", "--force", "--quiet")
            _git(ws, "add", "dvc.yaml", "dvc.lock", ".gitignore")
        elif tracked:
            _dvc(ws, "add", "--quiet", *tracked)
            _git(ws, "add", ".gitignore", *(f"{name}.dvc" for name in tracked))
        _git(ws, "add", ".dvc/config", ".dvcignore", *_present(ws, "params.yaml"))
        if _git(ws, "status", "--porcelain", "--untracked-files=no"):
            _git(ws, "commit", "-q", "-m", f"{tag}: data and models after round {round_id}")
        _git(ws, "tag", "--force", tag)
        _dvc(ws, "push", "--quiet")
        commit = _git(ws, "rev-parse", "HEAD")
    return VersionResult(round_id, tag, commit, remote_url(ws), tracked)


def restore_round(ws: Workspace, round_id: int) -> str:
    """Check out round-NNN's pointers and data (``git checkout`` + ``dvc checkout``)."""
    tag = round_name(round_id)
    with workspace_lock(ws):
        _git(ws, "checkout", "-q", tag)
        _dvc(ws, "checkout", "--force", "--quiet")
        return _git(ws, "rev-parse", "HEAD")


def _present(ws: Workspace, *names: str) -> list[str]:
    return [name for name in names if (ws.root / name).exists()]
