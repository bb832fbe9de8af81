"""The self-cycle end to end on a tiny world: rounds close the loop, and a kill -9 resumes."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from cg4ctr_tasks.cycle import cg4ctr_command
from cg4ctr_tasks.reward.data import build_reward_data
from cg4ctr_tasks.workspace import Workspace

pytestmark = pytest.mark.slow

TINY = """\
world:
  items: 3
  days: 2
  user_groups: [g0, g1]
generate:
  candidates: 3
  steps: 3
  batch_size: 8
lora:
  steps: 3
reward:
  epochs: 2
prompt:
  epochs: 1
inspector:
  labelled_per_item: 4
  epochs: 2
rounds:
  round-001: {id: 1, prev: round-000, mode: lora}
  round-002: {id: 2, prev: round-001, mode: prompt}
"""

# outputs that must be byte-identical between an interrupted and an uninterrupted run
COMPARED = ("*.parquet", "*.png", "*.safetensors", "*.csv", "metrics.json", "ledger.json")


def _cycle(root: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [*cg4ctr_command(), "cycle", "--workspace", str(root)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )


def _digest(root: Path) -> dict[str, str]:
    found = {}
    for pattern in COMPARED:
        for path in (root / "data").rglob(pattern):
            if "quarantine" in path.parts or "data_docs" in path.parts or "cache" in path.parts:
                continue
            found[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    for path in (root / "models").rglob("*.safetensors"):
        found[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def _workspace(tmp_path: Path, name: str) -> Path:
    root = tmp_path / name
    root.mkdir()
    (root / "params.yaml").write_text(TINY)
    subprocess.run(
        [*cg4ctr_command(), "sim", "init", "--workspace", str(root), "--seed", "5"],
        check=True,
        capture_output=True,
    )
    return root


def test_cycle_closes_the_loop_and_resumes_after_kill_9(tmp_path: Path) -> None:
    clean = _workspace(tmp_path, "clean")
    proc = _cycle(clean)
    out, _ = proc.communicate(timeout=1500)
    assert proc.returncode == 0, out.decode()[-3000:]

    # the loop closed through real files: the round days' logs exist and were ingested
    ledger = json.loads((clean / "data/rounds/ledger.json").read_text())["rounds"]
    assert [(r["id"], r["mode"]) for r in ledger] == [(1, "lora"), (2, "prompt")]
    for entry in ledger:
        assert (clean / f"data/raw/logs/dt={entry['date']}/part-0000.csv").exists()
    assert (clean / f"data/ctr/dt={ledger[0]['date']}.parquet").exists()
    assert (clean / "models/lora/round-001").is_dir()
    assert (clean / "models/prompt/round-002").is_dir()
    metrics = json.loads((clean / "data/rounds/round-002/metrics.json").read_text())
    assert 0.0 < metrics["true_ctr"] < 1.0
    assert (clean / "data/report.html").exists()

    # round 2's reward refresh learned from the clicks on round 1's generated creatives
    ws = Workspace.open(clean)
    history = build_reward_data(ws, ws.params.reward, before=ledger[0]["date"])
    refreshed = json.loads((clean / "models/reward/config.json").read_text())["extra"]["summary"]
    assert sum(refreshed["rows"].values()) > len(history.rows)
    assert not history.rows["creative_id"].str.contains("-r001-").any()
    tags = subprocess.run(["git", "tag"], cwd=clean, capture_output=True, text=True).stdout
    assert tags.split() == ["round-000", "round-001", "round-002"]

    # kill -9 in the middle of round 1, then run the same command again
    killed = _workspace(tmp_path, "killed")
    proc = _cycle(killed)
    marker = killed / "data/rounds/round-001/.stages/saliency.done"
    deadline = time.monotonic() + 1200
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, "the cycle ended before it could be interrupted"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "data/rounds/round-001/.stages/select.done").exists()
    resumed = _cycle(killed)
    out, _ = resumed.communicate(timeout=1500)
    assert resumed.returncode == 0, out.decode()[-3000:]
    assert "round 0: ingest" not in out.decode()  # finished stages were not run again

    resumed_files, clean_files = _digest(killed), _digest(clean)
    assert len(clean_files) > 30
    assert resumed_files.keys() == clean_files.keys()  # nothing lost, nothing duplicated
    differing = sorted(k for k in clean_files if resumed_files[k] != clean_files[k])
    assert not differing, f"resumed run differs in {len(differing)} files, e.g. {differing[:3]}"
