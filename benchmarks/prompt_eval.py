"""Evaluation of the prompt model on the simulated world (the figures issue 8 asks for).

1. Builds a world, then logs a history the prompt model can learn from: ``--creatives`` extra
   backgrounds per item drawn by the public renderer (``random_tokens`` + ``render_background``,
   own seed stream), pasted around the item's product, shown by the world's click simulator with
   uniform exploration for ``--days`` days. Their tokens are the renderer's own (the brief allows
   them in place of captions); the private ``sim/creative_tokens.parquet`` is never read.
2. Writes the ingest-format CTR tables (train creatives only: 80 % of each item's) and
   captions.parquet, and runs the real bootstrap (``train_prompt``) with the params defaults.
3. AUC on held-out creatives' clicks (impression-weighted: each click a positive, each
   non-click a negative) of the prompt model vs a logistic regression on the same features
   (one-hot user group, item, category + multi-hot tokens; scikit-learn).
4. Selection (``select_prompts`` with the params' exploration, and pure greedy) vs random token
   sets (the renderer's ``random_tokens``, and uniform draws under the same kind caps), and
   greedy blind to the user group (the unseen-group bucket: the paper's Table 3 ablation); renders
   ``--renders`` backgrounds per (item, group, condition), composes them with the product, and
   asks the oracle for the true CTR per user group (evaluation only).

    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.prompt_eval [--seeds 0 1] [--workspace DIR]

Ratios are printed against the baselines measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from cg4ctr_tasks import storage
from cg4ctr_tasks.prompts.features import user_groups
from cg4ctr_tasks.prompts.model import PromptModel
from cg4ctr_tasks.prompts.select import choose_tokens, exploration_draws, select_prompts
from cg4ctr_tasks.prompts.train import train_prompt
from cg4ctr_tasks.prompts.vocab import load_vocab
from cg4ctr_tasks.sim.clicks import ClickHistory, simulate_day
from cg4ctr_tasks.sim.oracle import image_features
from cg4ctr_tasks.sim.render import compose, random_tokens, render_background
from cg4ctr_tasks.sim.world import GroundTruth, init_world, true_ctr_table
from cg4ctr_tasks.workspace import Workspace

KEYS = ["item_id", "creative_id", "user_group"]


def log_history(ws: Workspace, creatives: int, days: int, seed: int) -> pd.DataFrame:
    """Rendered creatives + simulated clicks; returns per-(item, creative, group) totals."""
    rng = np.random.default_rng([seed, 8])
    vocab = load_vocab(ws.params.vocab)
    truth = GroundTruth.load(ws)
    items = storage.read_parquet(ws.items_table)
    rows, true_ctr, tokens = [], {}, {}
    for item_id in items["item_id"]:
        product = truth.product(ws, item_id)
        for j in range(creatives):
            creative_id = f"{item_id}-h{j}"
            chosen = random_tokens(vocab, rng)
            size = ws.params.world.image_size
            image = compose(product, render_background(chosen, vocab, size, rng))
            uri = f"images/creatives/history/{creative_id}.png"
            storage.write_png(storage.join(ws.data, uri), image)
            features = image_features(image, product.image, product.mask)
            for group in truth.oracle.groups:
                true_ctr[(creative_id, group)] = truth.oracle.ctr(item_id, features, group)
            rows.append({"item_id": item_id, "creative_id": creative_id, "image_uri": uri})
            tokens[creative_id] = chosen
    displayed = pd.DataFrame(rows)
    history, logs = ClickHistory(), []
    first = date.fromisoformat(ws.params.world.start_date) + timedelta(ws.params.world.days)
    for day in (str(first + timedelta(d)) for d in range(days)):
        day_logs = simulate_day(
            truth.oracle,
            displayed,
            true_ctr,
            day,
            ws.params.world.impressions_per_day,
            1.0,  # uniform logging policy: every creative gets traffic
            history,
            rng,
        )
        logs.append(day_logs.groupby(KEYS, as_index=False)[["impressions", "clicks"]].sum())
    totals = pd.concat(logs).groupby(KEYS, as_index=False)[["impressions", "clicks"]].sum()
    totals["tokens"] = totals["creative_id"].map(tokens)
    return totals.merge(displayed[["creative_id", "image_uri"]], on="creative_id")


def split(totals: pd.DataFrame, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    creatives = totals["creative_id"].unique()
    rng = np.random.default_rng([seed, 9])
    held = set(rng.choice(creatives, size=len(creatives) // 5, replace=False))
    mask = totals["creative_id"].isin(held)
    return totals[~mask].reset_index(drop=True), totals[mask].reset_index(drop=True)


def write_training_inputs(ws: Workspace, train: pd.DataFrame) -> None:
    """The ingest stage's CTR table and the captioner's table, for the train creatives."""
    table = train[KEYS + ["impressions", "clicks"]].astype(
        {"impressions": "int64", "clicks": "int64"}
    )
    storage.write_parquet(ws.ctr_table(ws.params.world.start_date), table)
    captions = train.drop_duplicates("creative_id")[["creative_id", "image_uri", "tokens"]]
    captions = captions.assign(caption=captions["tokens"].map(" ".join))
    storage.write_parquet(storage.join(ws.data, "captions.parquet"), captions)


def weighted_auc(frame: pd.DataFrame, scores: np.ndarray) -> float:
    """AUC over impressions: each row is `clicks` positives and the rest negatives."""
    labels = np.r_[np.ones(len(frame)), np.zeros(len(frame))]
    weights = np.r_[frame["clicks"], frame["impressions"] - frame["clicks"]].astype(float)
    return float(roc_auc_score(labels, np.r_[scores, scores], sample_weight=weights))


def design(frame: pd.DataFrame, columns: list[str] | None = None) -> pd.DataFrame:
    """One-hot query fields + multi-hot tokens: the logistic regression's features."""
    onehot = pd.get_dummies(frame[["user_group", "item_id", "category"]], dtype=float)
    tokens = frame["tokens"].map(lambda t: "|".join(t)).str.get_dummies().add_prefix("tok_")
    features = pd.concat([onehot, tokens.astype(float)], axis=1)
    return features if columns is None else features.reindex(columns=columns, fill_value=0.0)


def logistic_auc(train: pd.DataFrame, test: pd.DataFrame) -> float:
    x = design(train)
    labels = np.r_[np.ones(len(train)), np.zeros(len(train))]
    weights = np.r_[train["clicks"], train["impressions"] - train["clicks"]].astype(float)
    model = LogisticRegression(max_iter=2000, C=1.0)
    model.fit(pd.concat([x, x]).to_numpy(), labels, sample_weight=weights)
    return weighted_auc(test, model.predict_proba(design(test, list(x.columns)).to_numpy())[:, 1])


def render_conditions(
    ws: Workspace, prompts: dict[str, pd.DataFrame], renders: int
) -> pd.DataFrame:
    """Backgrounds from each condition's tokens, composed with the product, scored by the oracle."""
    vocab = load_vocab(ws.params.vocab)
    truth = GroundTruth.load(ws)
    rows = []
    for condition, frame in prompts.items():
        for n, rec in enumerate(frame.itertuples()):
            product = truth.product(ws, rec.item_id)
            for r in range(renders):
                rng = np.random.default_rng([ws.params.seed, n, r])  # same draws per condition
                background = render_background(list(rec.tokens), vocab, product.image.shape[0], rng)
                uri = f"eval/prompt/{condition}/{rec.item_id}-{rec.user_group}-{r}.png"
                storage.write_png(storage.join(ws.data, uri), compose(product, background))
                rows.append(
                    {
                        "condition": condition,
                        "item_id": rec.item_id,
                        "user_group": rec.user_group,
                        "image_uri": uri,
                    }
                )
    table = pd.DataFrame(rows)
    storage.write_parquet(storage.join(ws.data, "eval", "prompt", "renders.parquet"), table)
    truth_table = true_ctr_table(ws, table)
    table["true_ctr"] = truth_table["true_ctr"].to_numpy()
    return table


def evaluate(root: Path, seed: int, creatives: int, days: int, renders: int) -> dict[str, Any]:
    root.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text(f"seed: {seed}\n")
    ws = Workspace.open(root)
    init_world(ws, seed)
    started = time.perf_counter()
    totals = log_history(ws, creatives, days, seed)
    items = storage.read_parquet(ws.items_table, columns=["item_id", "category"])
    totals = totals.merge(items, on="item_id")
    train, test = split(totals, seed)
    write_training_inputs(ws, train)
    summary = train_prompt(ws, None, force=True)
    model = PromptModel.from_pretrained(summary.model_dir)
    auc_model = weighted_auc(test, model.predict_ctr(test, list(test["tokens"])))
    auc_lr = logistic_auc(train, test)

    select_prompts(ws, 1, force=True)
    selected = storage.read_parquet(storage.join(ws.round_dir(1), "prompts.parquet"))
    queries = selected[["item_id", "user_group"]].merge(items, on="item_id")
    vocab, params = load_vocab(ws.params.vocab), ws.params.prompt
    size = params.tokens_per_prompt

    def draw(rate: float, frame: pd.DataFrame = queries) -> list[list[str]]:
        flags, draws = exploration_draws(seed, 1, frame, size, rate)
        caps = params.max_per_kind
        return choose_tokens(model, frame, vocab, size, caps, flags, draws, 2048).tokens

    rng = np.random.default_rng([seed, 10])
    prompts = {
        "selected": selected,
        "greedy": queries.assign(tokens=draw(0.0)),
        # Table 3 analogue: the same greedy selection blind to the user (unseen-group bucket).
        "greedy_no_user": queries.assign(tokens=draw(0.0, queries.assign(user_group="-"))),
        "random_capped": queries.assign(tokens=draw(1.0)),
        "random_renderer": queries.assign(
            tokens=[random_tokens(vocab, rng) for _ in range(len(queries))]
        ),
    }
    table = render_conditions(ws, prompts, renders)
    per_group = table.pivot_table("true_ctr", "user_group", "condition", aggfunc="mean")
    overall = table.groupby("condition")["true_ctr"].mean()
    return {
        "seed": seed,
        "groups": user_groups(ws),
        "train_rows": len(train),
        "heldout_rows": len(test),
        "heldout_impressions": int(test["impressions"].sum()),
        "train_steps": summary.steps,
        "train_seconds": summary.seconds,
        "auc_prompt_model": round(auc_model, 4),
        "auc_logistic_regression": round(auc_lr, 4),
        "auc_ratio": round(auc_model / auc_lr, 4),
        "true_ctr_overall": {k: round(float(v), 5) for k, v in overall.items()},
        "true_ctr_per_group": {
            g: {c: round(float(v), 5) for c, v in row.items()} for g, row in per_group.iterrows()
        },
        "uplift_selected_vs_random_renderer": round(
            float(overall["selected"] / overall["random_renderer"] - 1), 4
        ),
        "uplift_greedy_vs_random_capped": round(
            float(overall["greedy"] / overall["random_capped"] - 1), 4
        ),
        "uplift_greedy_no_user_vs_random_capped": round(
            float(overall["greedy_no_user"] / overall["random_capped"] - 1), 4
        ),
        "seconds": round(time.perf_counter() - started, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--creatives", type=int, default=20, help="history creatives per item")
    parser.add_argument("--days", type=int, default=14, help="days of logged history")
    parser.add_argument("--renders", type=int, default=3, help="backgrounds per prompt")
    parser.add_argument("--workspace", type=Path, default=None, help="default: a temp dir")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base = args.workspace or Path(tempfile.mkdtemp(prefix="prompt-eval-"))
    results = []
    for seed in args.seeds:
        result = evaluate(base / f"seed-{seed}", seed, args.creatives, args.days, args.renders)
        print(json.dumps(result, indent=2), flush=True)
        results.append(result)
    if len(results) > 1:
        keys = [
            "auc_prompt_model",
            "auc_logistic_regression",
            "uplift_selected_vs_random_renderer",
            "uplift_greedy_vs_random_capped",
            "uplift_greedy_no_user_vs_random_capped",
        ]
        means = {k: round(float(np.mean([r[k] for r in results])), 4) for k in keys}
        print(json.dumps({"mean_over_seeds": means}, indent=2))


if __name__ == "__main__":
    main()
