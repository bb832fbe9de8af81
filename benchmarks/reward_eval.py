"""Offline evaluation of the reward model on a larger simulated world (the paper's Table 2).

Builds a world in a temp dir (default 240 items x 6 initial creatives x 10 days), ingests its
logs, captions its creatives, trains the full model and the ablations on the train split
(epochs chosen on validation), and prints top-1..5 uplift on the held-out items (logged clicks,
bootstrap 95 % CI for top-1, and the oracle's true CTR) and MSE, for:
full, pointwise-only (lambda_r=1), listwise-only (lambda_r=0), image-only, random ranker, and
the full model with the listwise temperature set to the training mean CTR, and with a sigmoid
CTR link. Then the reference ranker (default: full) minus each other ranker, top-1, with a paired
bootstrap 95 % interval (both rankers scored on the same resampled lists), per world and pooled
over all worlds.

    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.reward_eval [--items 240] [--world-seeds 3 4]
        [--reference "full, sigmoid link"]

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
from cg4ctr_tasks.reward import metrics
from cg4ctr_tasks.reward.evaluate import MAX_K, evaluate_scores, held_out_rows, oracle_ctr
from cg4ctr_tasks.reward.score import load_reward, predict
from cg4ctr_tasks.reward.train import train_reward
from cg4ctr_tasks.sim.world import init_world
from cg4ctr_tasks.workspace import Workspace

VARIANTS: dict[str, dict[str, Any]] = {
    "full": {},
    "pointwise-only": {"lambda_r": 1.0},
    "listwise-only": {"lambda_r": 0.0},
    "image-only": {"modalities": ["image"]},
    "full, T=mean CTR": {"list_temperature": None},  # Eq 14 softmax(p / T): see params.yaml
    "full, sigmoid link": {"ctr_link": "sigmoid"},  # the score is the CTR's logit
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


Sums = dict[str, dict[str, metrics.TopKSums]]  # ranker -> {"logged" | "oracle": sums}


def run(ws: Workspace) -> tuple[dict[str, dict[str, Any]], Sums]:
    """Every ranker's figures on the test split, and its top-k sums for paired comparisons."""
    results: dict[str, dict[str, Any]] = {}
    base = ws.params.reward
    rows, by_group = held_out_rows(ws, base)
    truth = oracle_ctr(ws, rows, by_group)  # read once: every ranker scores the same split
    rankers: Sums = {}
    for name, update in VARIANTS.items():
        params = base.model_copy(update=update)
        folder = str(ws.root / "models" / f"reward-{name.replace(' ', '').replace(',', '-')}")
        started = time.perf_counter()
        summary = train_reward(ws, model_dir=folder, params=params)
        model, encoders, _ = load_reward(ws, folder)
        scores = predict(model, encoders, rows, params.batch_size)
        figures, rankers[name] = evaluate_scores(ws, rows, scores, truth, by_group, params)
        figures["train_seconds"] = time.perf_counter() - started
        figures["best_epoch"] = summary["best_epoch"]
        results[name] = figures
        print(
            f"  {name}: top1 {figures['top1']:.4f}, best epoch {summary['best_epoch']}, "
            f"{figures['train_seconds']:.0f} s",
            flush=True,
        )
    scores = np.random.default_rng(ws.params.seed).random(len(rows))
    results["random"], rankers["random"] = evaluate_scores(
        ws, rows, scores, truth, by_group, base, with_mse=False
    )
    return results, rankers


def paired_margins(
    rankers: Sums, reference: str, samples: int, seed: int
) -> dict[str, dict[str, list[float]]]:
    """Reference minus each other ranker, top-1, points: [difference, low, high] per yardstick."""
    out: dict[str, dict[str, list[float]]] = {}
    for name, other in rankers.items():
        if name == reference:
            continue
        out[name] = {}
        for yardstick in ("logged", "oracle"):
            point, low, high = metrics.paired_difference(
                rankers[reference][yardstick], other[yardstick], samples, seed
            )
            out[name][yardstick] = [round(100 * float(v[0]), 2) for v in (point, low, high)]
    return out


def _print_margins(title: str, reference: str, margins: dict[str, dict[str, list[float]]]) -> None:
    print(f"{title}: {reference} minus ranker, top-1 uplift points [paired 95 % CI]")
    for name, m in margins.items():
        logged, oracle = m["logged"], m["oracle"]
        print(
            f"  {name:17s} logged {logged[0]:+6.2f} [{logged[1]:+6.2f},{logged[2]:+6.2f}]"
            f"   oracle {oracle[0]:+6.2f} [{oracle[1]:+6.2f},{oracle[2]:+6.2f}]"
        )


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
    parser.add_argument("--reference", choices=list(VARIANTS), default="full")
    args = parser.parse_args()
    everything: dict[str, Any] = {}
    pooled: dict[str, dict[str, list[metrics.TopKSums]]] = {}
    samples = 0
    with tempfile.TemporaryDirectory(prefix="cg4ctr-reward-eval-") as tmp:
        for seed in args.world_seeds:
            root = (
                args.root or Path(tmp)
            ) / f"world-{args.items}-{args.creatives}-{args.days}-{seed}"
            ws = prepare(root, args.items, args.creatives, args.days, seed)
            results, rankers = run(ws)
            samples = ws.params.reward.bootstrap_samples
            margins = paired_margins(rankers, args.reference, samples, ws.params.seed)
            everything[str(seed)] = {"rankers": results, "minus": margins}
            for name, by in rankers.items():
                for yardstick, part in by.items():
                    pooled.setdefault(name, {}).setdefault(yardstick, []).append(part)
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
            _print_margins(f"world seed {seed}", args.reference, margins)
    if len(args.world_seeds) > 1:
        joined = {
            name: {y: metrics.concat_sums(parts) for y, parts in by.items()}
            for name, by in pooled.items()
        }
        margins = paired_margins(joined, args.reference, samples, 0)
        everything["pooled"] = {"world_seeds": args.world_seeds, "minus": margins}
        _print_margins(f"\nall {len(args.world_seeds)} worlds pooled", args.reference, margins)
    everything["reference"] = args.reference
    if args.out:
        args.out.write_text(json.dumps(everything, indent=2, default=float))


if __name__ == "__main__":
    main()
