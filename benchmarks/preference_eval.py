"""sft vs preference LoRA on the simulated world (the figures issue 13 asks for).

Two workspaces whose params differ only in ``lora.method`` run the same world seed and the same
``cg4ctr cycle`` rounds. Per round it prints:
- the true CTR of the kept creatives (oracle, evaluation only, from the round's metrics.json),
  and the preference/sft ratio;
- reward-score drift: the mean reward-model score of the kept creatives (what the generator is
  optimised to please) next to their true CTR, each relative to round 1 (before any LoRA acted):
  a generator that learns to please the reward model more than the oracle shows the score gain
  rising while the true-CTR uplift stays flat or falls.

    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.preference_eval [--rounds 3] [--seed 0]

Tiny sizes by default (CPU, a few minutes); the figures are noisy at this size.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd

from cg4ctr_tasks import storage
from cg4ctr_tasks.cycle import run_cycle
from cg4ctr_tasks.sim.world import init_world
from cg4ctr_tasks.workspace import Workspace

METHODS = ("sft", "preference")


def params_yaml(args: argparse.Namespace, method: str) -> str:
    modes = {i: "lora" if i % 2 else "prompt" for i in range(1, args.rounds + 1)}
    rounds = "\n".join(
        f"  round-{i:03d}: {{id: {i}, prev: round-{i - 1:03d}, mode: {mode}}}"
        for i, mode in modes.items()
    )
    return f"""\
seed: {args.seed}
world:
  items: {args.items}
  days: 2
  user_groups: [g0, g1]
generate:
  candidates: {args.candidates}
  steps: {args.steps}
  batch_size: 16
select:
  k: {args.candidates // 2}
lora:
  method: {method}
  steps: {args.lora_steps}
  learning_rate: {args.lora_lr}
reward:
  epochs: 2
prompt:
  epochs: 1
versioning:
  enabled: false
rounds:
{rounds}
"""


def round_figures(ws: Workspace, rounds: int) -> pd.DataFrame:
    """Per round: true CTR of the kept (metrics.json) and their mean reward score."""
    rows = []
    for round_id in range(rounds + 1):
        metrics = json.loads(
            storage.read_bytes(storage.join(ws.round_dir(round_id), "metrics.json"))
        )
        score = float("nan")
        if round_id:
            partition = storage.read_parquet(
                storage.join(ws.round_dir(round_id), "partition.parquet")
            )
            score = float(partition.loc[partition["kept"].astype(bool), "score"].mean())
        rows.append({"round": round_id, "true_ctr": metrics["true_ctr"], "kept_score": score})
    return pd.DataFrame(rows).set_index("round")


def run(args: argparse.Namespace) -> dict[str, Any]:
    root = Path(args.workspace or tempfile.mkdtemp(prefix="cg4ctr-pref-"))
    tables, seconds = {}, {}
    for method in METHODS:
        folder = root / method
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "params.yaml").write_text(params_yaml(args, method))
        ws = Workspace.open(folder)
        started = time.perf_counter()
        init_world(ws, args.seed)
        run_cycle(ws, args.rounds, lambda line, m=method: print(f"[{m}] {line}", flush=True))
        seconds[method] = round(time.perf_counter() - started, 1)
        tables[method] = round_figures(ws, args.rounds)
    table = pd.concat(tables, axis=1)
    for method in METHODS:
        # scores are the reward model's logits (any sign): compare them by difference
        first = table.loc[1, (method, "true_ctr")], table.loc[1, (method, "kept_score")]
        table[(method, "true_uplift_r1")] = table[(method, "true_ctr")] / first[0] - 1
        table[(method, "score_gain_r1")] = table[(method, "kept_score")] - first[1]
    table[("ratio", "pref/sft true_ctr")] = (
        table[("preference", "true_ctr")] / table[("sft", "true_ctr")]
    )
    return {"workspace": str(root), "seconds": seconds, "table": table}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--items", type=int, default=4)
    parser.add_argument("--candidates", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8, help="denoising steps")
    parser.add_argument("--lora-steps", type=int, default=8)
    parser.add_argument("--lora-lr", type=float, default=1e-4)
    parser.add_argument("--workspace", default=None, help="folder for the two workspaces")
    args = parser.parse_args()
    result = run(args)
    pd.set_option("display.width", 200)
    print(f"\nworkspaces: {result['workspace']}  wall seconds: {result['seconds']}")
    print(result["table"].round(4).to_string())


if __name__ == "__main__":
    main()
