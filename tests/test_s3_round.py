"""A whole round with ``storage.url: s3://bucket/prefix`` against the moto S3 server.

Raw logs in, candidates, tables, models, report and metrics out, all in the bucket; the
workspace folder keeps only params, the world's private ``sim/`` and the git/DVC repository,
whose remote is on S3 too. Round versions are a storage manifest of S3 object versions
(cg4ctr_tasks/versioning.py), so ``cg4ctr restore`` puts the bucket back to a round.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from cg4ctr_tasks import storage
from cg4ctr_tasks.cycle import cg4ctr_command
from cg4ctr_tasks.errors import UserError
from cg4ctr_tasks.versioning import MANIFEST, restore_round, version_round
from cg4ctr_tasks.workspace import Workspace
from tests.test_cycle import TINY

pytestmark = pytest.mark.integration

S3_STORAGE = """\
storage:
  url: {url}
versioning:
  remote: {remote}
"""


def _bucket(name: str, versioned: bool) -> Any:
    fs, _ = storage.url_to_fs(f"s3://{name}")
    fs.mkdir(name)
    if versioned:
        fs.make_bucket_versioned(name)
    return fs


def _cg4ctr(root: Path, *args: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CG4CTR_LOCAL_CACHE": str(root.parent / "cache")}
    proc = subprocess.run(
        [*cg4ctr_command(), *args, "--workspace", str(root)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert proc.returncode == 0, f"cg4ctr {' '.join(args)} failed:\n{proc.stderr[-3000:]}"
    return proc.stdout


def _etags(fs: Any, root: str) -> dict[str, str]:
    """ETag of every object under ``root``/data and ``root``/models, by relative path."""
    fs.invalidate_cache()
    found = {}
    for folder in ("data", "models"):
        for name, info in fs.find(f"{root}/{folder}", detail=True).items():
            found[name[len(root) + 1 :]] = str(info["ETag"]).strip('"')
    return found


@pytest.mark.slow
def test_a_round_runs_on_s3_and_restores_from_object_versions(
    s3_endpoint: str, tmp_path: Path
) -> None:
    fs = _bucket("cg4ctr-round", versioned=True)
    root = tmp_path / "ws"
    root.mkdir()
    url = "s3://cg4ctr-round/prefix"
    (root / "params.yaml").write_text(
        S3_STORAGE.format(url=url, remote="s3://cg4ctr-round/dvc") + TINY
    )
    _cg4ctr(root, "sim", "init", "--seed", "5")
    _cg4ctr(root, "cycle", "--rounds", "1")

    # nothing of data/ or models/ lands in the workspace folder
    assert not (root / "data").exists() and not (root / "models").exists()
    data, r1 = "cg4ctr-round/prefix/data", "cg4ctr-round/prefix/data/rounds/round-001"
    present = set(fs.find("cg4ctr-round/prefix"))
    expected = {
        f"{data}/raw/logs/dt=2026-01-03/part-0000.csv",  # the online day's click logs
        f"{data}/ctr/dt=2026-01-01.parquet",
        f"{data}/items.parquet",
        f"{r1}/saliency/saliency.parquet",
        f"{r1}/prompts.parquet",
        f"{r1}/candidates.parquet",
        f"{r1}/captions.parquet",
        f"{r1}/scores.parquet",
        f"{r1}/partition.parquet",
        f"{r1}/metrics.json",
        f"{r1}/report.html",
        f"{data}/report.html",
        f"{data}/metrics/rounds.csv",
        "cg4ctr-round/prefix/models/reward/model.safetensors",
        "cg4ctr-round/prefix/models/prompt/round-000/model.safetensors",
        "cg4ctr-round/prefix/models/lora/round-001/pytorch_lora_weights.safetensors",
    }
    assert expected <= present, sorted(expected - present)
    ws = Workspace.open(root)
    candidates = storage.read_parquet(storage.join(ws.round_dir(1), "candidates.parquet"))
    assert len(candidates) == 3 * 2 * 3
    images = [ws.resolve(uri) for uri in candidates["image_uri"]]
    assert all(image.startswith(f"{url}/data/rounds/round-001/") for image in images)
    assert all(storage.exists(image) for image in images)
    scores = storage.read_parquet(storage.join(ws.round_dir(1), "scores.parquet"))
    assert set(scores["candidate_id"]) == set(candidates["candidate_id"])

    # DVC: remote on S3, one tag per round, the manifest pins the bucket's object versions
    assert "url = s3://cg4ctr-round/dvc" in (root / ".dvc" / "config").read_text()
    assert fs.find("cg4ctr-round/dvc"), "dvc push wrote nothing to the S3 remote"
    tags = subprocess.run(["git", "tag"], cwd=root, capture_output=True, text=True, check=True)
    assert tags.stdout.split() == ["round-000", "round-001"]
    manifest = storage.read_parquet(root / MANIFEST)
    assert "data/rounds/round-001/scores.parquet" in set(manifest["path"])
    assert manifest["version_id"].notna().all()
    pinned = dict(zip(manifest["path"], manifest["etag"], strict=True))
    assert set(pinned) < set(_etags(fs, "cg4ctr-round/prefix"))  # the report came after

    _cg4ctr(root, "restore", "--round", "0")
    fs.invalidate_cache()
    assert not fs.exists(f"{r1}/scores.parquet")
    assert not fs.exists("cg4ctr-round/prefix/models/lora/round-001")
    assert fs.exists(f"{data}/rounds/round-000/metrics.json")
    _cg4ctr(root, "restore", "--round", "1")
    assert _etags(fs, "cg4ctr-round/prefix") == pinned


def test_restore_refuses_when_the_bucket_keeps_no_versions(
    s3_endpoint: str, tmp_path: Path
) -> None:
    """Without S3 versioning an overwritten object cannot be brought back: say so."""
    _bucket("cg4ctr-unversioned", versioned=False)
    (tmp_path / "params.yaml").write_text(
        "storage:\n  url: s3://cg4ctr-unversioned/ws\n"
        "versioning:\n  remote: s3://cg4ctr-unversioned/dvc\n"
    )
    ws = Workspace.open(tmp_path)
    table = storage.join(ws.round_dir(1), "scores.parquet")
    storage.write_text(table, "round one")
    result = version_round(ws, 1)
    assert result.storage_objects == 1 and MANIFEST in result.tracked
    storage.write_text(table, "changed later")
    with pytest.raises(UserError, match="Object Versioning"):
        restore_round(ws, 1)
    assert storage.read_bytes(table) == b"changed later"


def test_restore_puts_back_changed_and_deleted_objects_and_removes_new_ones(
    s3_endpoint: str, tmp_path: Path
) -> None:
    fs = _bucket("cg4ctr-versioned", versioned=True)
    (tmp_path / "params.yaml").write_text("storage:\n  url: s3://cg4ctr-versioned/ws\n")
    ws = Workspace.open(tmp_path)
    changed, deleted = storage.join(ws.round_dir(1), "a.txt"), storage.join(ws.data, "rounds", "b")
    added = storage.join(ws.round_dir(2), "c.txt")
    storage.write_text(changed, "round one")
    storage.write_text(deleted, "model one")
    assert version_round(ws, 1).remote == "s3://cg4ctr-versioned/ws/dvc-remote"  # the default
    assert fs.find("cg4ctr-versioned/ws/dvc-remote"), "the manifest was not pushed"
    storage.write_text(changed, "round two")
    fs.rm(deleted.removeprefix("s3://"))
    storage.write_text(added, "new")
    restore_round(ws, 1)
    assert storage.read_bytes(changed) == b"round one"
    assert storage.read_bytes(deleted) == b"model one"
    assert not storage.exists(added)
