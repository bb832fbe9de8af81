"""Availability inspector + recurrent generation on a held-out simulated round (issue 11).

One world: the bootstrap (round 0) labels ``inspector.labelled_per_item`` random-prompt
generations per item with the world's private labeller and trains the inspector on them; then
round 1 runs up to ``inspect`` (its candidates come from the round's own prompts and seeds,
never seen in training). Against the labeller's ground truth on every attempt of round 1 it
prints:
- the inspector's accuracy and per-class precision / recall (and failure-vs-available);
- availability of the candidates without recurrent generation (first attempts, the baseline
  measured in the same run) and with it (final attempts): the analogue of the paper's
  56.4 % -> 85.5 %; plus the extra generations it cost;
- the true CTR (oracle) of the kept creatives (reward-model top-k per list) and of all
  candidates, without and with recurrent generation, and the mean true CTR per true label.

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.inspector_eval [--items 12]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cg4ctr_tasks import storage
from cg4ctr_tasks.caption import caption_table
from cg4ctr_tasks.cycle import round_stages, run_round, run_stage
from cg4ctr_tasks.inspector import LABELS
from cg4ctr_tasks.reward.data import attach_inputs, read_captions
from cg4ctr_tasks.reward.score import load_reward, predict
from cg4ctr_tasks.rounds import round_info
from cg4ctr_tasks.select import partition
from cg4ctr_tasks.sim.availability import label_images
from cg4ctr_tasks.sim.world import init_world, true_ctr_table
from cg4ctr_tasks.workspace import Workspace


def classification(truth: pd.Series, predicted: pd.Series) -> dict[str, Any]:
    """Accuracy, per-class precision / recall / support, and the binary reject figures."""
    per_class = {}
    for label in LABELS:
        hits = int(((predicted == label) & (truth == label)).sum())
        said, real = int((predicted == label).sum()), int((truth == label).sum())
        per_class[label] = {
            "precision": round(hits / said, 3) if said else None,
            "recall": round(hits / real, 3) if real else None,
            "support": real,
        }
    bad_true, bad_said = truth != LABELS[0], predicted != LABELS[0]
    caught = int((bad_true & bad_said).sum())
    return {
        "accuracy": round(float((truth == predicted).mean()), 3),
        "per_class": per_class,
        "reject_precision": round(caught / int(bad_said.sum()), 3) if bad_said.any() else None,
        "reject_recall": round(caught / int(bad_true.sum()), 3) if bad_true.any() else None,
        "confusion": pd.crosstab(truth, predicted).to_dict(),
    }


def kept_true_ctr(ws: Workspace, table: pd.DataFrame, name: str, folder: str) -> dict[str, float]:
    """Caption and score a candidate set with the round's reward model, keep the top-k per
    (item, group) list as `select` does, and read the oracle's CTR of kept and all."""
    source = storage.join(folder, f"{name}.parquet")
    storage.write_parquet(source, table)
    captions_path = storage.join(folder, f"{name}-captions.parquet")
    caption_table(ws, source, "candidate_id", captions_path, storage.join(folder, f"parts-{name}"))
    model, encoders, _ = load_reward(ws)
    rows = attach_inputs(ws, table, read_captions(captions_path, "candidate_id"), "candidate_id")
    scores = rows[["candidate_id", "item_id", "user_group"]].assign(
        score=predict(model, encoders, rows, ws.params.reward.batch_size).astype(np.float64)
    )
    kept = partition(scores, ws.params.select.k)
    kept_ids = set(kept.loc[kept["kept"], "candidate_id"])
    truth = true_ctr_table(ws, table)["true_ctr"].to_numpy()
    is_kept = table["candidate_id"].isin(kept_ids).to_numpy()
    return {"kept": float(truth[is_kept].mean()), "all": float(truth.mean())}


def run(args: argparse.Namespace) -> dict[str, Any]:
    root = Path(args.workspace or tempfile.mkdtemp(prefix="cg4ctr-inspector-"))
    root.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text(
        f"world:\n  items: {args.items}\n  days: {args.days}\n"
        f"generate:\n  candidates: {args.candidates}\n"
        "versioning:\n  enabled: false\n"
    )
    ws = Workspace.open(root)
    timings: dict[str, float] = {}
    started = time.perf_counter()
    init_world(ws, seed=args.seed)
    log = lambda line: print(line, flush=True)  # noqa: E731
    run_round(ws, 0, log, version=False)
    timings["bootstrap_s"] = round(time.perf_counter() - started, 1)
    info = round_info(ws, 1)
    stages = round_stages(ws, info, version=False)
    names = [s.name for s in stages]
    for stage in stages[: names.index("inspect")]:
        run_stage(ws, 1, stage, log)
    generated = time.perf_counter()
    run_stage(ws, 1, stages[names.index("inspect")], log)
    timings["inspect_s"] = round(time.perf_counter() - generated, 1)

    labelled = storage.read_parquet(storage.join(ws.data, "inspector", "labels.parquet"))
    attempts = storage.read_parquet(storage.join(ws.round_dir(1), "inspection.parquet"))
    attempts = pd.concat([attempts, label_images(ws, attempts)], axis=1)
    first = attempts[attempts["attempt"] == 0].reset_index(drop=True)
    final = attempts[attempts["final"]].reset_index(drop=True)
    any_true = attempts.groupby("candidate_id")["true_label"].apply(
        lambda s: (s == "available").any()
    )
    columns = ["candidate_id", "item_id", "user_group", "image_uri"]
    bench = storage.join(ws.data, "bench-inspector")
    ctr_first = kept_true_ctr(ws, first[columns], "first", bench)
    ctr_final = kept_true_ctr(ws, final[columns], "final", bench)
    per_label = true_ctr_table(ws, attempts[columns]).assign(
        true_label=attempts["true_label"].to_numpy()
    )
    return {
        "world": {"seed": args.seed, "items": args.items, "candidates": len(first)},
        "training_set": {
            "samples": len(labelled),
            "labels": labelled["label"].value_counts().to_dict(),
        },
        "inspector_on_round_1_all_attempts": classification(
            attempts["true_label"], attempts["label"]
        ),
        "inspector_on_round_1_first_attempts": classification(first["true_label"], first["label"])[
            "accuracy"
        ],
        "availability": {
            "without_recurrent_generation": round(
                float((first["true_label"] == "available").mean()), 3
            ),
            "with_recurrent_generation": round(
                float((final["true_label"] == "available").mean()), 3
            ),
            "some_attempt_truly_available": round(float(any_true.mean()), 3),
            "judged_available_first": round(float((first["label"] == "available").mean()), 3),
            "judged_available_final": round(float((final["label"] == "available").mean()), 3),
            "true_labels_first": first["true_label"].value_counts().to_dict(),
            "true_labels_final": final["true_label"].value_counts().to_dict(),
        },
        "cost": {
            "generations_without": len(first),
            "generations_with": len(attempts),
            "extra_generations": int((attempts["attempt"] > 0).sum()),
            "extra_per_candidate": round(float((attempts["attempt"] > 0).sum() / len(first)), 3),
            "max_attempts": ws.params.inspector.max_attempts,
        },
        "true_ctr": {
            "kept_without": round(ctr_first["kept"], 5),
            "kept_with": round(ctr_final["kept"], 5),
            "kept_ratio_with_over_without": round(ctr_final["kept"] / ctr_first["kept"], 4),
            "all_candidates_without": round(ctr_first["all"], 5),
            "all_candidates_with": round(ctr_final["all"], 5),
            "mean_by_true_label_all_attempts": {
                str(k): round(float(v), 5)
                for k, v in per_label.groupby("true_label")["true_ctr"].mean().items()
            },
        },
        "timings": timings,
        "workspace": str(root),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workspace", default=None, help="a new folder (default: a temp dir)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--items", type=int, default=12)
    parser.add_argument("--days", type=int, default=3)
    parser.add_argument("--candidates", type=int, default=10)
    figures = run(parser.parse_args())
    print(json.dumps(figures, indent=2, default=str))


if __name__ == "__main__":
    main()
