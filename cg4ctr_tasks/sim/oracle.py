"""The hidden CTR oracle: the true click probability of a creative for a user group.

Only the click simulator and evaluation may call it (DESIGN.md rule 7). Its preferences are
drawn from the world seed, so results that hold across seeds cannot come from tuning to one.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from matplotlib.colors import rgb_to_hsv

ALTERATION_PENALTY = 25.0  # logit lost per unit of mean absolute product-pixel change (0..1)


@dataclass(frozen=True)
class GroupPreference:
    hue: float  # preferred background hue, in turns
    hue_weight: float  # logit gain of a fully saturated background at the preferred hue
    brightness: float  # preferred mean background brightness (HSV value, 0..1)
    brightness_weight: float
    texture_weight: float  # > 0: likes busy backgrounds; < 0: prefers plain ones
    contrast_weight: float  # gain for a product that stands out from its surroundings


@dataclass(frozen=True)
class CategoryFit:
    """How a product category moves every group's favourite background: a lamp may sell on a
    darker, warmer scene than a cup. The title names the category; the pixels only show it."""

    hue_shift: float  # added to each group's preferred hue, in turns
    brightness_shift: float  # added to each group's preferred brightness


@dataclass(frozen=True)
class Features:
    hue_x: float  # saturation-weighted mean hue vector of the background
    hue_y: float
    brightness: float
    texture: float
    contrast: float
    alteration: float  # mean |change| of product pixels, 0 for an exact paste


@dataclass(frozen=True)
class Oracle:
    base_logit: float
    groups: dict[str, GroupPreference]
    item_effects: dict[str, float]
    device_factors: dict[str, float]  # multiplicative, traffic-weighted mean 1
    hour_factors: list[float]  # 24 values, traffic-weighted mean 1
    hour_traffic: list[float]  # share of impressions per hour
    # worlds written before category fit existed load with none (the same CTRs as then)
    item_categories: dict[str, str] = field(default_factory=dict)
    categories: dict[str, CategoryFit] = field(default_factory=dict)

    @classmethod
    def draw(
        cls,
        rng: np.random.Generator,
        groups: list[str],
        items: list[str],
        devices: list[str],
        base_ctr: float,
        item_categories: dict[str, str] | None = None,
        category_hue_shift: float = 0.0,
        category_brightness_shift: float = 0.0,
    ) -> Oracle:
        """Draw a world's preferences; category fit is drawn last, so the other draws do not
        depend on it (a shift of 0 gives the same groups, items and contexts)."""
        start = rng.uniform(0, 1)
        prefs = {}
        for index, group in enumerate(groups):
            prefs[group] = GroupPreference(
                hue=float((start + index / len(groups) + rng.normal(0, 0.03)) % 1.0),
                hue_weight=float(rng.uniform(1.0, 1.6)),
                brightness=float(rng.uniform(0.35, 0.9)),
                brightness_weight=float(rng.uniform(2.0, 4.0)),
                texture_weight=float(rng.uniform(-1.0, 1.0)),
                contrast_weight=float(rng.uniform(0.5, 1.2)),
            )
        hours = np.arange(24)
        traffic = 1.0 + 0.8 * np.sin((hours - 6) / 24 * 2 * np.pi) ** 2
        traffic = traffic / traffic.sum()
        hour_factors = 1.0 + 0.15 * np.cos((hours - rng.uniform(0, 24)) / 24 * 2 * np.pi)
        hour_factors = hour_factors / float(np.dot(hour_factors, traffic))
        device_raw = rng.uniform(0.85, 1.15, size=len(devices))
        device_raw = device_raw / device_raw.mean()
        item_effects = {item: float(rng.normal(0, 0.3)) for item in items}
        item_categories = dict(item_categories or {})
        fits = {
            category: CategoryFit(
                hue_shift=float(rng.uniform(-1.0, 1.0) * category_hue_shift),
                brightness_shift=float(rng.uniform(-1.0, 1.0) * category_brightness_shift),
            )
            for category in sorted(set(item_categories.values()))
        }
        return cls(
            base_logit=float(np.log(base_ctr / (1 - base_ctr))),
            groups=prefs,
            item_effects=item_effects,
            device_factors={d: float(f) for d, f in zip(devices, device_raw, strict=True)},
            hour_factors=[float(f) for f in hour_factors],
            hour_traffic=[float(t) for t in traffic],
            item_categories=item_categories,
            categories=fits,
        )

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2, sort_keys=True), "utf-8")

    @classmethod
    def load(cls, path: Path) -> Oracle:
        raw = json.loads(path.read_text("utf-8"))
        raw["groups"] = {g: GroupPreference(**p) for g, p in raw["groups"].items()}
        raw["categories"] = {c: CategoryFit(**f) for c, f in raw.get("categories", {}).items()}
        return cls(**raw)

    def favourite(self, item_id: str, group: str) -> tuple[float, float]:
        """(hue, brightness) this group likes best behind this item."""
        pref = self.groups[group]
        category = self.item_categories.get(item_id)
        fit = self.categories.get(category) if category is not None else None
        if fit is None:
            return pref.hue, pref.brightness
        brightness = float(np.clip(pref.brightness + fit.brightness_shift, 0.05, 0.95))
        return (pref.hue + fit.hue_shift) % 1.0, brightness

    def logit(self, item_id: str, features: Features, group: str) -> float:
        pref = self.groups[group]
        hue, brightness = self.favourite(item_id, group)
        hue_term = features.hue_x * np.cos(2 * np.pi * hue) + features.hue_y * np.sin(
            2 * np.pi * hue
        )
        return float(
            self.base_logit
            + self.item_effects[item_id]
            + pref.hue_weight * hue_term
            - pref.brightness_weight * (features.brightness - brightness) ** 2
            + pref.texture_weight * features.texture
            + pref.contrast_weight * (features.contrast - 0.3)
            - ALTERATION_PENALTY * features.alteration
        )

    def ctr(self, item_id: str, features: Features, group: str) -> float:
        """True CTR under the average traffic context (device and hour factors average to 1)."""
        return float(1.0 / (1.0 + np.exp(-self.logit(item_id, features, group))))


def image_features(image: np.ndarray, product_image: np.ndarray, mask: np.ndarray) -> Features:
    """Pixel features of a creative's background and of how well its product is preserved."""
    if image.shape != product_image.shape:
        raise ValueError(
            f"creative is {image.shape[:2]}, its product image {product_image.shape[:2]}"
        )
    rgb = image.astype(np.float64) / 255.0
    background = ~mask
    hsv = rgb_to_hsv(rgb)
    hue, sat, val = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    angle = 2 * np.pi * hue[background]
    weight = sat[background]
    grad = np.abs(np.diff(val, axis=0))[background[1:, :] & background[:-1, :]]
    grad_x = np.abs(np.diff(val, axis=1))[background[:, 1:] & background[:, :-1]]
    texture = float(np.concatenate([grad, grad_x]).mean()) if grad.size + grad_x.size else 0.0
    ring = _dilate(mask, 4) & background
    product_mean = rgb[mask].mean(axis=0)
    ring_mean = rgb[ring].mean(axis=0) if ring.any() else rgb[background].mean(axis=0)
    contrast = float(np.linalg.norm(product_mean - ring_mean) / np.sqrt(3.0))
    alteration = float(
        np.abs(image[mask].astype(np.float64) - product_image[mask].astype(np.float64)).mean()
        / 255.0
    )
    return Features(
        hue_x=float((weight * np.cos(angle)).mean()),
        hue_y=float((weight * np.sin(angle)).mean()),
        brightness=float(val[background].mean()),
        texture=float(min(texture * 5.0, 1.0)),
        contrast=contrast,
        alteration=alteration,
    )


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    out = mask.copy()
    for _ in range(radius):
        grown = out.copy()
        grown[1:, :] |= out[:-1, :]
        grown[:-1, :] |= out[1:, :]
        grown[:, 1:] |= out[:, :-1]
        grown[:, :-1] |= out[:, 1:]
        out = grown
    return out
