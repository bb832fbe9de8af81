"""The CLIP interrogator (the paper's theta_c): caption images with tokens of the prompt vocab.

For every vocab token the interrogator embeds one phrase (``caption.phrase``, e.g. "{token}" for
the world's CLIP, "a {token} background" for a real one) and ranks the tokens of each kind by
CLIP image-text similarity, as CLIP-Interrogator does per category. A caption is the best token
of each of the kinds in ``caption.kinds``, in that order, cut to ``caption.top_tokens``. The
order is fixed rather than by confidence: a per-kind softmax always crowns a winner, also for a
kind the image does not show (no material, no scene), and those winners were measured to be
as confident as real ones, pushing out the always-present texture.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from cg4ctr_tasks import storage
from cg4ctr_tasks.errors import RejectedInput, UserError
from cg4ctr_tasks.params import CaptionParams
from cg4ctr_tasks.prompts.vocab import Vocab, load_vocab
from cg4ctr_tasks.shards import Shard, run_parts
from cg4ctr_tasks.workspace import Workspace

if TYPE_CHECKING:
    from transformers import CLIPModel, CLIPProcessor

    from cg4ctr_tasks.sim.train_clip import RenderedBatch


def load_clip(value: str) -> tuple[CLIPModel, CLIPProcessor]:
    """Load a CLIP by params value: "sim" = the packaged world CLIP, else a path or hub id."""
    from transformers import CLIPModel, CLIPProcessor

    from cg4ctr_tasks.assets import resolve_pretrained
    from cg4ctr_tasks.sim.train_clip import ASSET_NAME

    source = resolve_pretrained(value, ASSET_NAME)
    try:
        return CLIPModel.from_pretrained(source), CLIPProcessor.from_pretrained(source)
    except (OSError, ValueError) as exc:  # a missing folder reads as an invalid hub id
        hint = " (run `cg4ctr sim train-clip`)" if value == "sim" else ""
        raise UserError(f"cannot load CLIP {value!r} from {source}{hint}: {exc}") from None


class Interrogator:
    """Ranks vocab tokens per kind for a batch of images; the text side is embedded once."""

    def __init__(
        self,
        model: CLIPModel,
        processor: CLIPProcessor,
        vocab: Vocab,
        params: CaptionParams,
        device: str | None = None,
    ) -> None:
        import torch

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model.to(self.device)  # type: ignore[arg-type]  # transformers' stub wants a model
        self.model = model.eval()
        self.processor = processor
        self.vocab = vocab
        kinds = [kind for kind in params.kinds if kind in vocab.kinds][: params.top_tokens]
        self.columns = {kind: [i for i, k in enumerate(vocab.kinds) if k == kind] for kind in kinds}
        phrases = [params.phrase.format(token=token) for token in vocab.tokens]
        text = processor(text=phrases, return_tensors="pt", padding="max_length", truncation=True)
        with torch.inference_mode():
            features = self.model.get_text_features(**text.to(self.device)).pooler_output
        self.text = torch.nn.functional.normalize(features, dim=-1)
        self.scale = float(self.model.logit_scale.detach().exp())

    def probabilities(self, images: list[np.ndarray]) -> np.ndarray:
        """N x V: per image, the softmax of the CLIP logits over each captioned kind's tokens
        (zero for the tokens of kinds not captioned)."""
        import torch

        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"]
        with torch.inference_mode():
            pixels = pixels.to(self.device)
            features = self.model.get_image_features(pixel_values=pixels).pooler_output
            logits = self.scale * torch.nn.functional.normalize(features, dim=-1) @ self.text.T
        probs = torch.zeros_like(logits)
        for columns in self.columns.values():
            probs[:, columns] = logits[:, columns].softmax(dim=-1)
        return probs.float().cpu().numpy()

    def caption(self, images: list[np.ndarray]) -> list[list[str]]:
        """The best token of each captioned kind, in ``caption.kinds`` order."""
        probs = self.probabilities(images)
        return [
            [
                self.vocab.tokens[columns[int(np.argmax(row[columns]))]]
                for columns in self.columns.values()
            ]
            for row in probs
        ]


def token_accuracy(
    model: CLIPModel,
    processor: CLIPProcessor,
    vocab: Vocab,
    heldout: RenderedBatch,
    params: CaptionParams,
) -> dict[str, float]:
    """Per kind, the fraction of held-out renders whose true token is in the caption.

    Reported for the kinds every render has (colour, light, texture); the issue's target is
    colour >= 0.8 with ``top_tokens`` = 3. A kind left out of the caption scores 0.
    """
    interrogator = Interrogator(model, processor, vocab, params)
    captions: list[list[str]] = []
    for start in range(0, len(heldout.images), params.batch_size):
        batch = list(heldout.images[start : start + params.batch_size])
        captions.extend(interrogator.caption(batch))
    result = {}
    for kind in ("colour", "light", "texture"):
        hits = [
            any(t in caption and vocab.kind_of(t) == kind for t in truth)
            for truth, caption in zip(heldout.tokens, captions, strict=True)
        ]
        result[kind] = round(float(np.mean(hits)), 4)
    return result


# --------------------------------------------------------------------------- stage


@dataclass(frozen=True)
class CaptionSummary:
    source: str
    output: str
    images: int
    parts_total: int
    parts_written: int
    parts_skipped: int
    complete: bool
    captioned: int
    rejected: list[dict[str, str]]
    seconds: float

    def as_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


def caption_table(
    ws: Workspace,
    source: str,
    id_column: str,
    output: str,
    parts_dir: str,
    shard: Shard | None = None,
    force: bool = False,
) -> CaptionSummary:
    """Caption every image of ``source`` (id_column, image_uri) into ``output``.

    Parts of ``caption.shard_size`` images are resumable; an unreadable, oversized or unsafe
    image is listed in the summary's ``rejected`` and left out of ``output``.
    """
    started = time.perf_counter()
    params = ws.params
    if not storage.exists(source):
        raise UserError(f"{source} not found: nothing to caption")
    table = storage.read_parquet(source, columns=[id_column, "image_uri"])
    interrogator: Interrogator | None = None

    def process(rows: range) -> pd.DataFrame:
        nonlocal interrogator
        part = table.iloc[rows.start : rows.stop]
        images: dict[int, np.ndarray] = {}
        errors: dict[int, str] = {}
        for position, row in enumerate(part.itertuples(index=False)):
            try:
                storage.safe_id(getattr(row, id_column), id_column)
                images[position] = storage.read_image_array(
                    ws.resolve(str(row.image_uri)),
                    params.storage.max_image_bytes,
                    params.storage.max_image_pixels,
                )
            except (RejectedInput, OSError) as exc:
                errors[position] = str(exc).splitlines()[0][:500]
        if images and interrogator is None:
            interrogator = Interrogator(
                *load_clip(params.caption.clip_model), load_vocab(params.vocab), params.caption
            )
        tokens: dict[int, list[str]] = {}
        order = sorted(images)
        for start in range(0, len(order), params.caption.batch_size):
            chunk = order[start : start + params.caption.batch_size]
            assert interrogator is not None
            tokens.update(zip(chunk, interrogator.caption([images[i] for i in chunk]), strict=True))
        return pd.DataFrame(
            {
                id_column: part[id_column].astype(str).tolist(),
                "image_uri": part["image_uri"].astype(str).tolist(),
                "caption": [" ".join(tokens.get(i, [])) for i in range(len(part))],
                "tokens": [tokens.get(i, []) for i in range(len(part))],
                "error": [errors.get(i, "") for i in range(len(part))],
            }
        )

    run = run_parts(
        table[id_column].astype(str).tolist(),
        id_column,
        params.caption.shard_size,
        parts_dir,
        shard or Shard(0, 1),
        force,
        process,
        f"caption {Path(source).name}",
    )
    rejected: list[dict[str, str]] = []
    captioned = 0
    if run.merged is not None:
        good = run.merged["error"] == ""
        columns = [id_column, "image_uri", "caption", "tokens"]
        storage.write_parquet(output, run.merged.loc[good, columns].reset_index(drop=True))
        bad = run.merged.loc[~good]
        rejected = [
            {id_column: str(i), "error": str(e)}
            for i, e in zip(bad[id_column], bad["error"], strict=True)
        ]
        captioned = int(good.sum())
    return CaptionSummary(
        source=source,
        output=output,
        images=len(table),
        parts_total=run.parts_total,
        parts_written=run.parts_written,
        parts_skipped=run.parts_skipped,
        complete=run.merged is not None,
        captioned=captioned,
        rejected=rejected,
        seconds=round(time.perf_counter() - started, 2),
    )


def caption_round(
    ws: Workspace, round_id: int, shard: Shard | None = None, force: bool = False
) -> CaptionSummary:
    """rounds/round-NNN/candidates.parquet -> rounds/round-NNN/captions.parquet."""
    base = ws.round_dir(round_id)
    return caption_table(
        ws,
        storage.join(base, "candidates.parquet"),
        "candidate_id",
        storage.join(base, "captions.parquet"),
        storage.join(base, "parts", "captions"),
        shard,
        force,
    )


def caption_creatives(
    ws: Workspace, shard: Shard | None = None, force: bool = False
) -> CaptionSummary:
    """data/creatives.parquet -> data/captions.parquet (the bootstrap's logged creatives);
    its parts live in round-000, which the bootstrap versions."""
    return caption_table(
        ws,
        ws.creatives_table,
        "creative_id",
        storage.join(ws.data, "captions.parquet"),
        storage.join(ws.round_dir(0), "parts", "captions-creatives"),
        shard,
        force,
    )
