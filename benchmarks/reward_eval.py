"""Offline evaluation of the reward model on a larger simulated world (the paper's Table 2).

Builds a world in a temp dir (default 240 items x 6 initial creatives x 10 days), ingests its
logs, captions its creatives, trains the full model and the ablations on the train split
(epochs chosen on validation), and prints top-1..5 uplift on the held-out items (logged clicks,
bootstrap 95 % CI for top-1, and the oracle's true CTR) and MSE, for:
full, pointwise-only (lambda_r=1), listwise-only (lambda_r=0), image-only, random ranker, and
the full model with the listwise temperature set to the training mean CTR.

    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.reward_eval [--items 240] [--world-seeds 3 4]

Run from the repository root. Captions come from the real captioning stage (the world's own
small CLIP); nothing reads the world's private ground truth except the oracle uplift column.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from cg4ctr_tasks.caption import caption_creatives
from cg4ctr_tasks.ingest import ingest
from cg4ctr_tasks.reward.evaluate import MAX_K, eval_reward, evaluate_scores, held_out_rows
from cg4ctr_tasks.reward.train import train_reward
from cg4ctr_tasks.sim.world import init_world
from cg4ctr_tasks.workspace import Workspace

VARIANTS: dict[str, dict[str, Any]] = {
    "full": {},
    "pointwise-only": {"lambda_r": 1.0},
    "listwise-only": {"lambda_r": 0.0},
    "image-only": {"modalities": ["image"]},
    "full, T=mean CTR": {"list_temperature": None},  # Eq 14 softmax(p / T): see params.yaml
}


def prepare(root: Path, items: int, creatives: int, days: int, seed: int) -> Workspace:
    root.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text(
        f"world:\n  items: {items}\n  days: {days}\n  initial_creatives: {creatives}\n"
        "reward:\n  batch_size: 256\n  val_fraction: 0.2\n  test_fraction: 0.3\n"
    )
    ws = Workspace.open(root)
    started = time.perf_counter()
    summary = init_world(ws, seed)
    ingest(ws, summary.first_date, summary.last_date)
    caption_creatives(ws)
    print(f"world, ingest, captions: {time.perf_counter() - started:.0f} s; {summary.as_dict()}")
    return ws


def run(ws: Workspace) -> dict[str, dict[str, Any]]:
    results: dict[str, dict[str, Any]] = {}
    base = ws.params.reward
    for name, update in VARIANTS.items():
        params = base.model_copy(update=update)
        folder = str(ws.root / "models" / f"reward-{name.replace(' ', '').replace(',', '-')}")
        started = time.perf_counter()
        summary = train_reward(ws, model_dir=folder, params=params)
        figures = eval_reward(ws, model_dir=folder, params=params)
        figures["train_seconds"] = time.perf_counter() - started
        figures["best_epoch"] = summary["best_epoch"]
        results[name] = figures
        print(
            f"  {name}: top1 {figures['top1']:.4f}, best epoch {summary['best_epoch']}, "
            f"{figures['train_seconds']:.0f} s",
            flush=True,
        )
    rows, by_group = held_out_rows(ws, base)
    scores = np.random.default_rng(ws.params.seed).random(len(rows))
    results["random"] = evaluate_scores(ws, rows, scores, by_group, base, with_mse=False)
    return results


def _row(name: str, figures: dict[str, Any]) -> str:
    logged = " ".join(f"{100 * figures[f'top{k}']:6.2f}" for k in range(1, MAX_K + 1))
    oracle = " ".join(f"{100 * figures['oracle'][f'top{k}']:6.2f}" for k in range(1, MAX_K + 1))
    low, high = figures["ci95"]["top1"]
    mse = f"{figures['mse'] * 1e4:8.3f}" if figures["mse"] is not None else "     n/a"
    return f"{name:15s} {logged} | [{100 * low:6.2f},{100 * high:6.2f}] | {oracle} | {mse}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--items", type=int, default=240)
    parser.add_argument("--creatives", type=int, default=6)
    parser.add_argument("--days", type=int, default=10)
    parser.add_argument("--world-seeds", type=int, nargs="+", default=[3])
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON")
    parser.add_argument("--root", type=Path, default=None, help="keep/reuse worlds here")
    args = parser.parse_args()
    everything = {}
    with tempfile.TemporaryDirectory(prefix="cg4ctr-reward-eval-") as tmp:
        for seed in args.world_seeds:
            root = (
                args.root or Path(tmp)
            ) / f"world-{args.items}-{args.creatives}-{args.days}-{seed}"
            ws = prepare(root, args.items, args.creatives, args.days, seed)
            results = run(ws)
            everything[seed] = results
            first = next(iter(results.values()))
            print(
                f"\nworld seed {seed}; test split: {first['lists']} lists "
                f"({first['lists_by']}), {first['creatives']} creatives, impression threshold "
                f">= {first['min_impressions']}, base CTR {first['base_ctr']:.4f}"
            )
            print(
                f"{'model':15s} {'uplift % top-1..5 (logged clicks)':>34s} | "
                f"{'top-1 95% CI':>15s} | {'uplift % top-1..5 (oracle CTR)':>34s} | MSE x1e4"
            )
            for name, figures in results.items():
                print(_row(name, figures))
            full = results["full"]["top1"]
            margins = {n: 100 * (full - r["top1"]) for n, r in results.items() if n != "full"}
            print("full minus ablation, top-1 (points):", json.dumps(margins))
    if args.out:
        args.out.write_text(json.dumps(everything, indent=2, default=float))


if __name__ == "__main__":
    main()
