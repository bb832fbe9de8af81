"""The world's availability labeller: the analogue of Reliable_AD's human annotators.

It reads ground truth (the product's true mask and pixels) and says whether a generated creative
is usable or which failure it shows. Like the oracle it is private: it labels the inspector's
training set (``cg4ctr sim label-availability``) and scores evaluations; no model, selection or
stage reads it. Each failure is a measurable property of the generated image:

- space mismatch: the scene's floor line lies below the product's base, so the product floats
  on the wall (the background's strongest row-to-row colour step under the product);
- indistinctive: the product barely differs from the ring of background around it (the
  oracle's own contrast feature);
- size mismatch: the background continues the product's colours right at its outline (bleeding,
  a halo of product colour) while the wider surroundings differ, so the product looks larger
  than it is;
- shape hallucination: a product-coloured blob away from the product, i.e. a second,
  product-like shape in the background.

A creative with several failures gets the first of that list (one label per creative, as an
annotator gives); none means available.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
from scipy import ndimage

from cg4ctr_tasks import storage
from cg4ctr_tasks.errors import UserError
from cg4ctr_tasks.inspector import LABELS, label_counts, labelled_set_dir
from cg4ctr_tasks.params import LabellerParams
from cg4ctr_tasks.sim.oracle import image_features
from cg4ctr_tasks.sim.render import Product
from cg4ctr_tasks.sim.world import GroundTruth
from cg4ctr_tasks.workspace import Workspace

PALETTE_SIZE = 64  # product pixels sampled as its colour palette (enough for its shading)


@dataclass(frozen=True)
class Measures:
    floor_step: float  # strongest floor-line step below the product's base (0: none there)
    bleed: float  # share of the ring around the product that continues its colours
    contrast: float  # product vs surrounding ring (the oracle's contrast feature)
    hallucination: float  # largest product-like blob away from the product / product area


def _colour_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """RGB distance in 0..1 units, scaled to 0..1 (as the oracle's contrast)."""
    return np.asarray(np.linalg.norm(a - b, axis=-1) / np.sqrt(3.0))


def _floor_step(rgb: np.ndarray, mask: np.ndarray, lp: LabellerParams) -> float:
    """The strongest step between the background rows just above and below a line under the
    product's lowest pixel."""
    rows = np.nonzero(mask.any(axis=1))[0]
    background = ~mask
    height = mask.shape[0]
    band = lp.floor_band
    counts = background.sum(axis=1)
    sums = (rgb * background[..., None]).sum(axis=1)
    best = 0.0
    # Both bands lie more than floor_margin rows under the base, so a halo is not a floor.
    for line in range(int(rows.max()) + 1 + lp.floor_margin + band, height - band + 1):
        above, below = slice(line - band, line), slice(line, line + band)
        if counts[above].sum() == 0 or counts[below].sum() == 0:
            continue
        top = sums[above].sum(axis=0) / counts[above].sum()
        bottom = sums[below].sum(axis=0) / counts[below].sum()
        best = max(best, float(_colour_distance(top, bottom)))
    return best


def measure(image: np.ndarray, product: Product, lp: LabellerParams) -> Measures:
    """The four failure measures of one generated creative against its true product."""
    mask = product.mask
    if image.shape != product.image.shape or not mask.any():
        raise ValueError(f"creative {image.shape} does not fit its product {product.image.shape}")
    rgb = image.astype(np.float64) / 255.0
    true_rgb = product.image.astype(np.float64) / 255.0
    distance, (near_y, near_x) = ndimage.distance_transform_edt(~mask, return_indices=True)
    continues = _colour_distance(rgb, true_rgb[near_y, near_x]) < lp.colour_tolerance
    ring = (distance > 0) & (distance <= lp.bleed_ring)
    palette = true_rgb[mask][:: max(1, int(mask.sum()) // PALETTE_SIZE)]
    nearest = _colour_distance(rgb[:, :, None, :], palette[None, None]).min(axis=-1)
    product_like = (distance > lp.hallucination_gap) & (nearest < lp.colour_tolerance)
    blobs, count = ndimage.label(product_like)
    largest = int(np.bincount(blobs.ravel())[1:].max()) if count else 0
    return Measures(
        floor_step=_floor_step(rgb, mask, lp),
        bleed=float(continues[ring].mean()) if ring.any() else 0.0,
        contrast=image_features(image, product.image, mask).contrast,
        hallucination=largest / float(mask.sum()),
    )


def label_of(m: Measures, lp: LabellerParams) -> str:
    """One label per creative: the first failure found, else available."""
    failures = {  # in priority order (module docstring)
        "space_mismatch": m.floor_step >= lp.floor_step,
        "indistinctive": m.contrast < lp.min_contrast,
        "size_mismatch": m.bleed >= lp.bleed_fraction,
        "shape_hallucination": m.hallucination >= lp.hallucination_area,
    }
    return next((label for label, failed in failures.items() if failed), LABELS[0])


def label_images(ws: Workspace, table: pd.DataFrame) -> pd.DataFrame:
    """Ground-truth label + measures for rows with item_id and image_uri (evaluation only)."""
    truth = GroundTruth.load(ws)
    lp = ws.params.inspector.labeller
    limits = ws.params.storage
    rows = []
    for item_id, uri in zip(
        table["item_id"].astype(str), table["image_uri"].astype(str), strict=True
    ):
        image = storage.read_image_array(
            ws.resolve(uri), limits.max_image_bytes, limits.max_image_pixels
        )
        try:
            measures = measure(image, truth.product(ws, item_id), lp)
        except ValueError as exc:
            raise UserError(f"{uri}: {exc}") from None
        rows.append({"true_label": label_of(measures, lp), **asdict(measures)})
    return pd.DataFrame(rows, index=table.index)


@dataclass(frozen=True)
class LabelSummary:
    path: str
    samples: int
    labels: dict[str, int]
    generated: int
    skipped: bool
    seconds: float

    def as_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


def label_availability(ws: Workspace, force: bool = False) -> LabelSummary:
    """The inspector's training set: ``inspector.labelled_per_item`` generations per item, from
    random vocab prompts and fresh seeds with the base model and the items' saliency masks (what
    a round would use), each labelled from ground truth, in ``data/inspector/``.

    In production this table comes from annotators in the same format: sample_id, item_id,
    image_uri, mask_uri, label.
    """
    from cg4ctr_tasks.generate import candidate_seed, inpaint_batch, load_pipeline
    from cg4ctr_tasks.prompts.vocab import load_vocab
    from cg4ctr_tasks.saliency import SaliencyModel
    from cg4ctr_tasks.sim.render import random_tokens

    started = time.perf_counter()
    folder = labelled_set_dir(ws)
    table_path = storage.join(folder, "labels.parquet")
    per_item = ws.params.inspector.labelled_per_item
    items = storage.read_parquet(ws.items_table, columns=["item_id", "image_uri"])
    expected = len(items) * per_item
    if not force and storage.exists(table_path):
        done = storage.read_parquet(table_path)
        if len(done) == expected:
            return LabelSummary(table_path, len(done), label_counts(done["label"]), 0, True, 0.0)
    gp, limits = ws.params.generate, ws.params.storage
    truth = GroundTruth.load(ws)
    saliency = SaliencyModel.load(ws.params.saliency)
    vocab = load_vocab(ws.params.vocab)
    rng = np.random.default_rng(candidate_seed(ws.params.seed, 0, "inspector", "prompts", 0))
    pipe = load_pipeline(gp)
    rows = []
    for item_id, uri in zip(
        items["item_id"].astype(str), items["image_uri"].astype(str), strict=True
    ):
        source = storage.read_image_array(
            ws.resolve(uri), limits.max_image_bytes, limits.max_image_pixels
        )
        mask = saliency.mask(source)
        mask_uri = storage.join("inspector", "masks", f"{storage.safe_id(item_id)}.png")
        storage.write_png(ws.resolve(mask_uri), mask.astype(np.uint8) * 255)
        prompts = [" ".join(random_tokens(vocab, rng)) for _ in range(per_item)]
        seeds = [
            candidate_seed(ws.params.seed, 0, item_id, "inspector", j) for j in range(per_item)
        ]
        for start in range(0, per_item, gp.batch_size):
            chunk = slice(start, start + gp.batch_size)
            count = len(prompts[chunk])
            images = inpaint_batch(
                pipe,
                [source] * count,
                [mask] * count,
                prompts[chunk],
                seeds[chunk],
                gp.steps,
                gp.guidance_scale,
            )
            for j, image in zip(range(start, start + count), images, strict=True):
                sample_id = f"{item_id}-s{j:03d}"
                image_uri = storage.join("inspector", "images", f"{sample_id}.png")
                storage.write_png(ws.resolve(image_uri), image)
                measures = measure(image, truth.product(ws, item_id), ws.params.inspector.labeller)
                rows.append(
                    {
                        "sample_id": sample_id,
                        "item_id": item_id,
                        "image_uri": image_uri,
                        "mask_uri": mask_uri,
                        "prompt": prompts[j],
                        "seed": seeds[j],
                        "label": label_of(measures, ws.params.inspector.labeller),
                        **asdict(measures),
                    }
                )
    table = pd.DataFrame(rows)
    storage.write_parquet(table_path, table)
    return LabelSummary(
        path=table_path,
        samples=len(table),
        labels=label_counts(table["label"]),
        generated=len(table),
        skipped=False,
        seconds=round(time.perf_counter() - started, 2),
    )
