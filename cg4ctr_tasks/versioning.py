"""DVC versioning of rounds: commit outputs to the DVC cache, push to the remote, tag round-NNN.

A workspace is its own git + DVC repository (never the DAG bundle's checkout). After a round,
``data/``, ``models/`` and the world's ``sim/`` are recorded with DVC (``dvc add`` of the three
folders, or ``dvc commit`` where a ``dvc.yaml`` pipeline owns the outputs), the pointer files
are committed to git and tagged ``round-NNN``, and the cache is pushed, so ``git checkout
round-NNN && dvc checkout`` restores exactly that round, whichever orchestrator made it.
Writers are serialised by the workspace lock because DVC's own repo lock does not wait.

With ``storage.url`` on an object store, ``data/`` and ``models/`` are not in the workspace:
they already live in object storage, and copying them into DVC would double the bytes and
stream every one through this machine (DVC's external outputs / ``import-url`` for that are
deprecated). Instead the round records a *storage manifest*: one row per object under
``data/`` and ``models/`` with its size, ETag and S3 VersionId. The manifest file is tracked by
DVC like ``sim/`` (so the tag pins it), and :func:`restore_round` puts every object back to the
recorded version with server-side copies and removes objects the round did not have. This
is exact when the bucket has S3 Object Versioning enabled; without it the manifest can only
detect changes, and restore refuses (naming them) rather than pretend. Derived caches
(``<storage.url>/cache/``, content-addressed) are not recorded.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from cg4ctr_tasks import storage
from cg4ctr_tasks.errors import UserError
from cg4ctr_tasks.rounds import workspace_lock
from cg4ctr_tasks.workspace import Workspace, round_name

TRACKED = ("data", "models", "sim")
MANIFEST = "storage-manifest.parquet"  # object-store rounds: pinned objects (module docstring)
VERSIONED_FOLDERS = ("data", "models")
REMOTE_NAME = "storage"
IGNORED = (".cg4ctr.lock", ".dvc-remote/", "__pycache__/")


@dataclass(frozen=True)
class VersionResult:
    round: int
    tag: str
    commit: str
    remote: str
    tracked: list[str]
    storage_objects: int | None  # objects in the storage manifest (None: storage is local)

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
    """``versioning.remote``, else beside the data: ``<storage.url>/dvc-remote`` on an object
    store, ``<workspace>/.dvc-remote`` locally."""
    if ws.params.versioning.remote:
        return ws.params.versioning.remote
    if storage.is_remote(ws.base):
        return storage.join(ws.base, "dvc-remote")
    return str(ws.root / ".dvc-remote")


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
        objects = _write_manifest(ws) if storage.is_remote(ws.base) else None
        tracked = [name for name in (*TRACKED, MANIFEST) if (ws.root / name).exists()]
        if (ws.root / "dvc.yaml").exists():
            _dvc(ws, "commit", "--force", "--quiet")
            _git(ws, "add", "dvc.yaml", "dvc.lock", ".gitignore")
            if objects is not None:
                _dvc(ws, "add", "--quiet", MANIFEST)
                _git(ws, "add", f"{MANIFEST}.dvc")
        elif tracked:
            _dvc(ws, "add", "--quiet", *tracked)
            _git(ws, "add", ".gitignore", *(f"{name}.dvc" for name in tracked))
        _git(ws, "add", ".dvc/config", ".dvcignore", *_present(ws, "params.yaml"))
        if _git(ws, "status", "--porcelain", "--untracked-files=no"):
            _git(ws, "commit", "-q", "-m", f"{tag}: data and models after round {round_id}")
        _git(ws, "tag", "--force", tag)
        _dvc(ws, "push", "--quiet")
        commit = _git(ws, "rev-parse", "HEAD")
    return VersionResult(round_id, tag, commit, remote_url(ws), tracked, objects)


def restore_round(ws: Workspace, round_id: int) -> str:
    """Check out round-NNN's pointers and data (``git checkout`` + ``dvc checkout``)."""
    tag = round_name(round_id)
    with workspace_lock(ws):
        _git(ws, "checkout", "-q", tag)
        _dvc(ws, "checkout", "--force", "--quiet")
        if storage.is_remote(ws.base):
            _restore_objects(ws, tag)
        return _git(ws, "rev-parse", "HEAD")


def _listing(ws: Workspace) -> tuple[Any, str, dict[str, dict[str, Any]]]:
    """Every current object under data/ and models/: relative path -> size, ETag, VersionId."""
    fs, root = storage.url_to_fs(ws.base, version_aware=True)
    root = root.rstrip("/")
    fs.invalidate_cache()
    found: dict[str, dict[str, Any]] = {}
    for folder in VERSIONED_FOLDERS:
        for name, info in fs.find(f"{root}/{folder}", detail=True).items():
            version = info.get("VersionId")
            found[name[len(root) + 1 :]] = {
                "size": int(info["size"]),
                "etag": str(info.get("ETag", "")).strip('"'),
                "version_id": None if version in (None, "null") else str(version),
            }
    return fs, root, found


def _write_manifest(ws: Workspace) -> int:
    _, _, found = _listing(ws)
    paths = sorted(found)
    table = pa.table(
        {
            "path": pa.array(paths, pa.string()),
            "size": pa.array([found[p]["size"] for p in paths], pa.int64()),
            "etag": pa.array([found[p]["etag"] for p in paths], pa.string()),
            "version_id": pa.array([found[p]["version_id"] for p in paths], pa.string()),
        }
    )
    storage.write_parquet(ws.root / MANIFEST, table)
    return len(paths)


def _restore_objects(ws: Workspace, tag: str) -> None:
    """Put data/ and models/ back to the manifest's object versions (see module docstring)."""
    manifest = ws.root / MANIFEST
    if not manifest.exists():
        raise UserError(f"{tag} has no {MANIFEST}: it was not versioned with object storage")
    recorded = {row["path"]: row for row in pq.read_table(manifest).to_pylist()}
    fs, root, current = _listing(ws)
    changed = sorted(
        p for p, row in recorded.items() if current.get(p, {}).get("etag") != row["etag"]
    )
    extra = sorted(set(current) - set(recorded))
    unpinned = [p for p in changed if not recorded[p]["version_id"]]
    if unpinned or (extra and not all(row["version_id"] for row in recorded.values())):
        shown = ", ".join((unpinned or extra)[:5])
        raise UserError(
            f"{len(changed)} object(s) changed and {len(extra)} added under {ws.base} since "
            f"{tag} (e.g. {shown}), and the bucket kept no versions of them: enable S3 "
            "Object Versioning on the bucket so rounds can be restored"
        )
    fs.invalidate_cache()  # s3fs answers a versioned lookup of a deleted key from its listing
    for path in changed:
        source = f"{root}/{path}?versionId={recorded[path]['version_id']}"
        fs.cp_file(source, f"{root}/{path}")  # no glob expansion: "?" is part of the name
    if extra:
        fs.rm([f"{root}/{path}" for path in extra])  # versioned bucket: delete markers


def _present(ws: Workspace, *names: str) -> list[str]:
    return [name for name in names if (ws.root / name).exists()]
