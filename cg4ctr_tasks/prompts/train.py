"""Training the prompt model: the bootstrap from click logs, and the even rounds (Eq 8).

Both go through one loop, :func:`fit`, over rows with a hard label, a soft label and a weight:

* bootstrap: one row per (item, creative, user group) of the ingested CTR tables, tokens from the
  captioner; hard = soft = clicks / impressions and weight = impressions, so a batch drawn with
  probability proportional to impressions gives the same expected gradient as per-impression
  binary cross-entropy, and an epoch is one pass over the impressions.
* even round N: one row per candidate of the round's partition; hard = kept (G = 1, B = 0),
  soft = the reward score min-max normalised within its (item, user group) list (a list of equal
  scores gets 0.5), weight = 1; Eq 8 mixes the two cross-entropies with lambda_p, for the
  paper's epochs (no ``min_steps`` floor: hundreds of steps on one round's few hundred
  partition rows overwrite what the clicks taught and chase the reward model's errors).
  With ``prompt.replay_logs`` the round first refits the previous model on every logged
  creative's clicks, the generated ones that went online included, so real clicks anchor it.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from cg4ctr_tasks import storage
from cg4ctr_tasks.catalog import captioned_creatives
from cg4ctr_tasks.errors import UserError
from cg4ctr_tasks.params import PromptParams
from cg4ctr_tasks.prompts.features import UNSEEN, field_values
from cg4ctr_tasks.prompts.model import PromptModel, PromptModelConfig
from cg4ctr_tasks.prompts.vocab import load_vocab
from cg4ctr_tasks.reward.data import load_ctr
from cg4ctr_tasks.rounds import logs_before
from cg4ctr_tasks.workspace import Workspace

LOSS_WINDOW = 10  # steps averaged for the reported start / end loss


@dataclass(frozen=True)
class FitResult:
    steps: int
    loss_start: float
    loss_end: float


@dataclass(frozen=True)
class TrainSummary:
    mode: str  # bootstrap | round
    round: int
    model_dir: str
    init_from: str | None
    rows: int
    replay_rows: int  # even rounds with prompt.replay_logs: logged rows refitted first
    dropped_rows: int  # rows without any vocab token (no caption / empty prompt)
    steps: int
    loss_start: float
    loss_end: float
    seconds: float
    skipped: bool

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def eq8_loss(
    logits: torch.Tensor, hard: torch.Tensor, soft: torch.Tensor, lambda_p: float
) -> torch.Tensor:
    """Eq 8: (1 - lambda_p) * CE(hard labels) + lambda_p * CE(soft labels), batch means."""
    hard_ce = F.binary_cross_entropy_with_logits(logits, hard)
    soft_ce = F.binary_cross_entropy_with_logits(logits, soft)
    return (1.0 - lambda_p) * hard_ce + lambda_p * soft_ce


def normalise_scores(frame: pd.DataFrame) -> pd.Series:
    """Reward scores min-max scaled to [0, 1] within each (item, user group) list."""
    grouped = frame.groupby(["item_id", "user_group"])["score"]
    low, high = grouped.transform("min"), grouped.transform("max")
    span = (high - low).to_numpy(dtype=np.float64)
    scaled = np.divide(
        (frame["score"] - low).to_numpy(dtype=np.float64),
        span,
        out=np.full(len(frame), 0.5),
        where=span > 0,
    )
    return pd.Series(scaled, index=frame.index, name="soft")


def fit(
    model: PromptModel,
    rows: pd.DataFrame,
    params: PromptParams,
    lambda_p: float,
    seed: int,
    min_steps: int,
) -> FitResult:
    """Adam on batches drawn with probability proportional to ``weight`` (with replacement).

    ``rows`` holds the query columns, ``tokens`` (lists), ``hard``, ``soft`` and ``weight``.
    Steps: ``epochs`` passes over the total weight in batches of ``batch_size``, at least
    ``min_steps``. A share ``oov_dropout`` of query fields is replaced by the unseen bucket so
    that bucket learns an average instead of staying at its random initialisation.
    """
    if rows.empty:
        raise UserError("no training rows for the prompt model")
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    fields, tokens = model.encode(rows, list(rows["tokens"]))
    hard = torch.tensor(rows["hard"].to_numpy(dtype=np.float32))
    soft = torch.tensor(rows["soft"].to_numpy(dtype=np.float32))
    weight = torch.tensor(rows["weight"].to_numpy(dtype=np.float64))
    total = float(weight.sum())
    steps = max(params.epochs * math.ceil(total / params.batch_size), min_steps)
    optimiser = torch.optim.Adam(model.parameters(), lr=params.learning_rate)
    losses: list[float] = []
    model.train()
    for _ in range(steps):
        batch = torch.multinomial(weight, params.batch_size, replacement=True, generator=generator)
        batch_fields = fields[batch]
        drop = torch.rand(batch_fields.shape, generator=generator) < params.oov_dropout
        batch_fields = batch_fields.masked_fill(drop, UNSEEN)
        logits = model(batch_fields, tokens[batch])
        loss = eq8_loss(logits, hard[batch], soft[batch], lambda_p)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    model.eval()
    window = min(LOSS_WINDOW, steps)
    return FitResult(
        steps=steps,
        loss_start=float(np.mean(losses[:window])),
        loss_end=float(np.mean(losses[-window:])),
    )


def _items(ws: Workspace) -> pd.DataFrame:
    if not storage.exists(ws.items_table):
        raise UserError(f"{ws.items_table} not found: build or import the item table first")
    items = storage.read_parquet(ws.items_table, columns=["item_id", "category"])
    return items.drop_duplicates("item_id")


def _as_tokens(value: object) -> list[str]:
    """A token list from a list cell, space-separated prompt text, or a missing join (empty)."""
    if isinstance(value, str):
        return value.split()
    if isinstance(value, list | tuple | np.ndarray):
        return [str(t) for t in value]
    return []


def _finish(rows: pd.DataFrame, items: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """Attach the item category; drop rows without any vocab token (nothing to learn from)."""
    rows = rows.merge(items, on="item_id", how="left")
    rows["tokens"] = rows["tokens"].map(_as_tokens)
    has_tokens = rows["tokens"].map(len) > 0
    return rows[has_tokens].reset_index(drop=True), int((~has_tokens).sum())


def log_rows(ws: Workspace, before: str | None = None) -> tuple[pd.DataFrame, int]:
    """CTR-table rows (days before ``before``) joined with the logged creatives' caption tokens,
    generated ones included; returns (rows, rows dropped without tokens)."""
    ctr = load_ctr(ws, by_group=True, before=before)
    ctr = ctr[ctr["impressions"] > 0]
    captions = captioned_creatives(ws, ["tokens"])
    rows = ctr.merge(captions, on="creative_id", how="left")
    rows["hard"] = rows["clicks"] / rows["impressions"]
    rows["soft"] = rows["hard"]
    rows["weight"] = rows["impressions"].astype(np.float64)
    return _finish(rows, _items(ws))


def round_rows(ws: Workspace, round_id: int, source: str) -> tuple[pd.DataFrame, int]:
    """The round's G/B partition with each candidate's tokens (caption or prompt)."""
    round_dir = ws.round_dir(round_id)
    partition_url = storage.join(round_dir, "partition.parquet")
    if not storage.exists(partition_url):
        raise UserError(f"{partition_url} not found: run `cg4ctr select --round {round_id}` first")
    partition = storage.read_parquet(partition_url)
    table, column = (
        ("captions.parquet", "tokens") if source == "caption" else ("candidates.parquet", "prompt")
    )
    tokens_url = storage.join(round_dir, table)
    if not storage.exists(tokens_url):
        raise UserError(f"{tokens_url} not found: prompt.round_tokens is {source!r}")
    tokens = storage.read_parquet(tokens_url, columns=["candidate_id", column])
    tokens = tokens.rename(columns={column: "tokens"}).drop_duplicates("candidate_id")
    rows = partition.merge(tokens, on="candidate_id", how="left")
    rows["hard"] = rows["kept"].astype(np.float64)
    rows["soft"] = normalise_scores(rows)
    rows["weight"] = 1.0
    return _finish(rows, _items(ws))


def new_model(ws: Workspace) -> PromptModel:
    """An untrained model over the workspace's vocabulary and known query values."""
    params = ws.params.prompt
    config = PromptModelConfig(
        field_values=field_values(ws, _items(ws)),
        tokens=list(load_vocab(ws.params.vocab).tokens),
        embed_dim=params.embed_dim,
        layers=params.layers,
        heads=params.heads,
        hidden=params.hidden,
    )
    return PromptModel(config)


def _is_saved_model(url: str) -> bool:
    try:
        PromptModel.from_pretrained(url)
    except (UserError, RuntimeError, OSError, ValueError):
        return False
    return True


def train_prompt(ws: Workspace, round_id: int | None, force: bool = False) -> TrainSummary:
    """Bootstrap (``round_id`` None -> models/prompt/round-000) or an even round's update.

    An existing valid output is kept unless ``force``; the new model replaces it atomically.
    """
    if round_id is not None and (round_id < 2 or round_id % 2):
        raise UserError(
            f"the prompt model trains in even rounds >= 2 (got {round_id}); "
            "use --bootstrap for the initial model"
        )
    target_round = 0 if round_id is None else round_id
    target = ws.model_dir("prompt", target_round)
    mode = "bootstrap" if round_id is None else "round"
    init_from = None if round_id is None else ws.latest_model_dir("prompt", round_id)
    if not force and _is_saved_model(target):
        return TrainSummary(mode, target_round, target, init_from, 0, 0, 0, 0, 0.0, 0.0, 0.0, True)
    started = time.perf_counter()
    params = ws.params.prompt
    seed = ws.params.seed * 1000 + target_round
    torch.manual_seed(seed)  # the fresh model's initial weights too: same inputs, same model
    replayed = 0
    if round_id is None:
        rows, dropped = log_rows(ws)
        model, lambda_p, min_steps = new_model(ws), 0.0, params.min_steps  # soft = hard = CTR
    else:
        if init_from is None:
            raise UserError(
                f"no prompt model before round {round_id}: run `cg4ctr train-prompt --bootstrap`"
            )
        rows, dropped = round_rows(ws, round_id, params.round_tokens)
        model, lambda_p, min_steps = PromptModel.from_pretrained(init_from), params.lambda_p, 0
        if params.replay_logs:
            replay, _ = log_rows(ws, before=logs_before(ws, round_id))
            replayed = len(replay)
            fit(model, replay, params, 0.0, seed, params.min_steps)
    result = fit(model, rows, params, lambda_p, seed, min_steps)
    model.save_pretrained(target)
    return TrainSummary(
        mode=mode,
        round=target_round,
        model_dir=target,
        init_from=init_from,
        rows=len(rows),
        replay_rows=replayed,
        dropped_rows=dropped,
        steps=result.steps,
        loss_start=result.loss_start,
        loss_end=result.loss_end,
        seconds=round(time.perf_counter() - started, 2),
        skipped=False,
    )
