"""Token selection: one prompt per (item, user group), the paper's "individuation" (Table 3).

Greedy over token sets: starting from the empty set, each of the ``tokens_per_prompt`` steps adds
the token whose addition gives the highest predicted CTR for the query, among the tokens still
allowed by the per-kind caps (one colour, one texture: the renderer and a diffusion prompt read
only the first). With probability ``exploration`` a step instead adds a uniformly drawn allowed
token, so tokens the model rates low keep being tried and their clicks keep coming back. The
draws come from a generator seeded by (params seed, round, item, group): the same inputs always
give the same prompts, and adding an item changes no other item's prompts.
"""

from __future__ import annotations

import zlib
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
import torch

from cg4ctr_tasks import storage
from cg4ctr_tasks.errors import UserError
from cg4ctr_tasks.prompts.features import PAD, encode_fields, user_groups
from cg4ctr_tasks.prompts.model import PromptModel
from cg4ctr_tasks.prompts.vocab import KINDS, Vocab, load_vocab
from cg4ctr_tasks.workspace import Workspace

PROMPT_COLUMNS = ["round", "item_id", "user_group", "tokens", "prompt", "score"]


@dataclass(frozen=True)
class Selection:
    tokens: list[list[str]]
    scores: np.ndarray  # predicted CTR of each chosen set
    explored: int  # tokens added by exploration


@dataclass(frozen=True)
class PromptsSummary:
    round: int
    prompts: str
    model_dir: str
    rows: int
    explored_tokens: int
    mean_predicted_ctr: float
    skipped: bool

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def exploration_draws(
    seed: int, round_id: int, queries: pd.DataFrame, steps: int, rate: float
) -> tuple[np.ndarray, np.ndarray]:
    """Per query and step: explore or not, and a uniform draw picking the explored token."""
    flags = np.zeros((len(queries), steps), dtype=bool)
    draws = np.zeros((len(queries), steps))
    pairs = zip(queries["item_id"], queries["user_group"], strict=True)
    for row, (item, group) in enumerate(pairs):
        key = [seed, round_id, zlib.crc32(str(item).encode()), zlib.crc32(str(group).encode())]
        rng = np.random.default_rng(key)
        flags[row] = rng.random(steps) < rate
        draws[row] = rng.random(steps)
    return flags, draws


@torch.no_grad()
def choose_tokens(
    model: PromptModel,
    queries: pd.DataFrame,
    vocab: Vocab,
    size: int,
    max_per_kind: dict[str, int],
    explore: np.ndarray,
    draws: np.ndarray,
    chunk_rows: int,
) -> Selection:
    """Greedy (with exploration) token sets of ``size`` for each query row.

    ``explore``/``draws`` are (queries, size) arrays from :func:`exploration_draws`.
    ``chunk_rows`` bounds the (query, candidate) rows scored in one forward pass.
    """
    unknown = set(max_per_kind) - set(KINDS)
    if unknown:
        raise UserError(f"prompt.max_per_kind: unknown kinds {sorted(unknown)} (known: {KINDS})")
    model.eval()
    names = [t for t in model.config.tokens if t in vocab.tokens]
    if not names:
        raise UserError("the prompt model shares no token with the vocabulary")
    model_index = {t: i + 1 for i, t in enumerate(model.config.tokens)}
    candidates = torch.tensor([model_index[t] for t in names])
    kinds = np.array([KINDS.index(vocab.kind_of(t)) for t in names])
    caps = np.array([max_per_kind.get(kind, size) for kind in KINDS])
    n_queries, n_cand = len(queries), len(names)
    fields = torch.from_numpy(encode_fields(queries, model.config.field_values))
    chosen = torch.full((n_queries, size), PAD, dtype=torch.long)
    taken = np.zeros((n_queries, n_cand), dtype=bool)
    counts = np.zeros((n_queries, len(KINDS)), dtype=np.int64)
    explored = 0
    per_chunk = max(1, chunk_rows // n_cand)
    for step in range(size):
        allowed = ~taken & (counts[:, kinds] < caps[kinds])
        logits = np.empty((n_queries, n_cand))
        for start in range(0, n_queries, per_chunk):
            rows = slice(start, min(start + per_chunk, n_queries))
            prefix = chosen[rows, :step].repeat_interleave(n_cand, dim=0)
            added = candidates.repeat(prefix.shape[0] // n_cand).unsqueeze(1)
            batch_fields = fields[rows].repeat_interleave(n_cand, dim=0)
            scored = model(batch_fields, torch.cat([prefix, added], dim=1))
            logits[rows] = scored.reshape(-1, n_cand).numpy()
        logits[~allowed] = -np.inf
        for row in np.flatnonzero(allowed.any(axis=1)):
            options = np.flatnonzero(allowed[row])
            if explore[row, step]:
                pick = int(options[min(int(draws[row, step] * len(options)), len(options) - 1)])
                explored += 1
            else:
                pick = int(np.argmax(logits[row]))
            chosen[row, step] = candidates[pick]
            taken[row, pick] = True
            counts[row, kinds[pick]] += 1
    scores = torch.sigmoid(model(fields, chosen)).numpy().astype(np.float64)
    order = {t: i for i, t in enumerate(vocab.tokens)}
    tokens = [
        sorted((model.config.tokens[i - 1] for i in row if i != PAD), key=order.__getitem__)
        for row in chosen.tolist()
    ]
    return Selection(tokens=tokens, scores=scores, explored=explored)


def _valid_prompts(url: str) -> bool:
    if not storage.exists(url):
        return False
    try:
        frame = storage.read_parquet(url)
    except (OSError, ValueError):
        return False
    return list(frame.columns) == PROMPT_COLUMNS and not frame.empty


def select_prompts(ws: Workspace, round_id: int, force: bool = False) -> PromptsSummary:
    """Write rounds/round-NNN/prompts.parquet with the latest earlier prompt model."""
    if round_id < 1:
        raise UserError(f"prompts are selected for rounds >= 1 (got {round_id})")
    out = storage.join(ws.round_dir(round_id), "prompts.parquet")
    model_dir = ws.latest_model_dir("prompt", round_id)
    if model_dir is None:
        raise UserError(
            f"no prompt model before round {round_id} under {ws.models}/prompt: "
            "run `cg4ctr train-prompt --bootstrap` first"
        )
    if not force and _valid_prompts(out):
        existing = storage.read_parquet(out)
        return PromptsSummary(
            round_id,
            out,
            model_dir,
            len(existing),
            0,
            float(existing["score"].mean()),
            skipped=True,
        )
    if not storage.exists(ws.items_table):
        raise UserError(f"{ws.items_table} not found: build or import the item table first")
    items = storage.read_parquet(ws.items_table, columns=["item_id", "category"])
    items = items.drop_duplicates("item_id")
    for item_id in items["item_id"]:
        storage.safe_id(item_id, "item_id")
    groups = pd.DataFrame({"user_group": user_groups(ws)})
    queries = items.merge(groups, how="cross").sort_values(["item_id", "user_group"])
    queries = queries.reset_index(drop=True)
    params = ws.params.prompt
    flags, draws = exploration_draws(
        ws.params.seed, round_id, queries, params.tokens_per_prompt, params.exploration
    )
    selection = choose_tokens(
        PromptModel.from_pretrained(model_dir),
        queries,
        load_vocab(ws.params.vocab),
        params.tokens_per_prompt,
        params.max_per_kind,
        flags,
        draws,
        chunk_rows=params.batch_size,
    )
    frame = pd.DataFrame(
        {
            "round": np.full(len(queries), round_id, dtype=np.int64),
            "item_id": queries["item_id"].astype(str),
            "user_group": queries["user_group"].astype(str),
            "tokens": selection.tokens,
            "prompt": [" ".join(tokens) for tokens in selection.tokens],
            "score": selection.scores,
        }
    )
    storage.write_parquet(out, frame)
    return PromptsSummary(
        round=round_id,
        prompts=out,
        model_dir=model_dir,
        rows=len(frame),
        explored_tokens=selection.explored,
        mean_predicted_ctr=float(frame["score"].mean()),
        skipped=False,
    )
