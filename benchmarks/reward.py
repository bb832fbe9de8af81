"""Reward-model training throughput: cached frozen features vs re-encoding every epoch.

Both arms train the same model with the same Eq 17 loop (``reward.train.fit``) on the same
lists of a small simulated world; the baseline recomputes the frozen MiniLM / timm features
of every batch (no gradient) instead of reading them from the content-hash cache.

    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.reward [--items 40] [--epochs 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.reward_eval import prepare
from cg4ctr_tasks.reward.data import build_reward_data
from cg4ctr_tasks.reward.model import RewardModel
from cg4ctr_tasks.reward.train import (
    BatchFeatures,
    Lists,
    cached_features,
    fit,
    load_params_encoders,
    lookup,
    raw_features,
    reward_config,
)


def without_grad(features: BatchFeatures) -> BatchFeatures:
    def run(index: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return features(index)

    return run


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--items", type=int, default=40)
    parser.add_argument("--creatives", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (1 avoids oversubscription)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="cg4ctr-reward-bench-") as tmp:
        ws = prepare(Path(tmp), args.items, args.creatives, 2, seed=5)
        params = ws.params.reward.model_copy(update={"epochs": args.epochs, "batch_size": 256})
        data = build_reward_data(ws, params)
        train_rows, val_rows = data.split("train"), data.split("val")
        encoders = load_params_encoders(ws, params)
        modalities = list(params.modalities)
        started = time.perf_counter()
        cached_features(encoders, data.rows, modalities)  # fill the cache once
        fill_s = time.perf_counter() - started
        started = time.perf_counter()
        train_table = cached_features(encoders, train_rows, modalities)
        val_table = cached_features(encoders, val_rows, modalities)
        hit_s = time.perf_counter() - started

        def train_once(train_f: BatchFeatures, val_f: BatchFeatures) -> float:
            config = reward_config(params, encoders, sorted(data.rows["user_group"].unique()))
            model = RewardModel(config)
            train = Lists.from_rows(train_rows, model.group_index(list(train_rows["user_group"])))
            val = Lists.from_rows(val_rows, model.group_index(list(val_rows["user_group"])))
            return fit(model, train, val, train_f, val_f, params, 1.0, 0).samples_per_s

        cached = train_once(lookup(train_table), lookup(val_table))
        recomputed = train_once(
            without_grad(raw_features(encoders, train_rows, modalities)),
            without_grad(raw_features(encoders, val_rows, modalities)),
        )
        print(
            f"{len(train_rows)} training creatives x {args.epochs} epochs "
            f"(torch threads: {torch.get_num_threads()})"
        )
        print(f"cache fill (first encode): {fill_s:.2f} s; cache hit for all rows: {hit_s:.2f} s")
        print(f"training, cached features:     {cached:10.1f} samples/s")
        print(f"training, features recomputed: {recomputed:10.1f} samples/s")
        print(f"ratio cached / recomputed: {cached / recomputed:.1f}x")


if __name__ == "__main__":
    main()
