"""Procedural images of the simulated world: products on plain backgrounds, and backgrounds
rendered from vocab tokens.

The renderer is what makes prompts meaningful in the world: each token kind moves a visible
property of the background (colour -> hue, light -> brightness, texture -> pattern, ...), with
random variation, so a diffusion model trained on (tokens -> background) learns to be steered
by its prompt, and the captioner can read the tokens back.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from matplotlib.colors import hsv_to_rgb

from cg4ctr_tasks.prompts.vocab import Vocab

# Hue, saturation, value of each colour token (hue in turns).
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.0, 0.75, 0.8),
    "orange": (0.08, 0.8, 0.85),
    "yellow": (0.15, 0.75, 0.9),
    "green": (0.33, 0.65, 0.65),
    "teal": (0.49, 0.65, 0.65),
    "blue": (0.61, 0.7, 0.75),
    "purple": (0.76, 0.6, 0.65),
    "pink": (0.92, 0.45, 0.9),
    "white": (0.1, 0.04, 0.95),
    "black": (0.6, 0.1, 0.15),
}
BRIGHTNESS = {"bright": 1.3, "dim": 0.5, "soft": 1.05, "dramatic": 0.85}


@dataclass(frozen=True)
class Product:
    """A product: its RGB pixels on a plain background and its ground-truth mask."""

    image: np.ndarray  # HxWx3 uint8
    mask: np.ndarray  # HxW bool, True on product pixels


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    coords = (np.arange(size, dtype=np.float64) + 0.5) / size
    return np.meshgrid(coords, coords)  # x, y in (0, 1)


def _shape_mask(category_index: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """One of six silhouettes (by category), 35-55 % of the canvas, jittered position."""
    x, y = _grid(size)
    scale = rng.uniform(0.35, 0.5)
    cx = 0.5 + rng.uniform(-0.08, 0.08)
    cy = 0.55 + rng.uniform(-0.06, 0.06)
    u = (x - cx) / scale
    v = (y - cy) / scale
    kind = category_index % 6
    if kind == 0:  # bottle: tall body + neck
        mask = ((np.abs(u) < 0.28) & (v > -0.35) & (v < 0.6)) | ((np.abs(u) < 0.1) & (v > -0.7))
        mask &= v < 0.6
    elif kind == 1:  # box
        mask = (np.abs(u) < 0.5) & (np.abs(v) < 0.45)
    elif kind == 2:  # ball
        mask = u**2 + v**2 < 0.5**2
    elif kind == 3:  # lamp: trapezoid shade + stem + base
        shade = (v > -0.6) & (v < -0.1) & (np.abs(u) < 0.2 + 0.5 * (v + 0.6))
        stem = (np.abs(u) < 0.06) & (v >= -0.1) & (v < 0.45)
        base = (np.abs(u) < 0.3) & (v >= 0.45) & (v < 0.58)
        mask = shade | stem | base
    elif kind == 4:  # shoe: low ellipse + heel
        mask = ((u / 0.6) ** 2 + ((v - 0.2) / 0.25) ** 2 < 1) | (
            (u > 0.2) & (u < 0.55) & (v > -0.25) & (v < 0.2)
        )
    else:  # cup: body + handle ring
        body = (np.abs(u) < 0.32) & (np.abs(v) < 0.4)
        ring = np.abs(np.hypot(u - 0.38, v) - 0.17) < 0.06
        mask = body | (ring & (u > 0.3))
    return np.asarray(mask, dtype=bool)


def draw_product(category_index: int, size: int, rng: np.random.Generator) -> Product:
    """A shaded product of the category's silhouette on a plain light background."""
    mask = _shape_mask(category_index, size, rng)
    x, y = _grid(size)
    hue = rng.uniform(0.0, 1.0)
    sat = rng.uniform(0.6, 0.9)
    val = rng.uniform(0.55, 0.8)
    shade = np.clip(val * (1.15 - 0.45 * (x + y) / 2.0), 0, 1)
    hsv = np.stack([np.full_like(x, hue), np.full_like(x, sat), shade], axis=-1)
    product_rgb = hsv_to_rgb(hsv)
    plain = rng.uniform(0.88, 0.96)
    tint = rng.uniform(-0.02, 0.02, size=3)
    canvas = np.broadcast_to(np.clip(plain + tint, 0, 1), product_rgb.shape)
    image = np.where(mask[..., None], product_rgb, canvas)
    return Product(image=_to_uint8(image), mask=mask)


def random_tokens(vocab: Vocab, rng: np.random.Generator) -> list[str]:
    """A plausible prompt: one colour, light and texture, sometimes material, scene, style."""
    chosen = [str(rng.choice(vocab.of_kind(kind))) for kind in ("colour", "light", "texture")]
    for kind in ("material", "scene", "style"):
        if rng.random() < 0.5:
            chosen.append(str(rng.choice(vocab.of_kind(kind))))
    return chosen


def _pattern(texture: str, x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A field in [0, 1] that mixes the primary and secondary colours."""
    freq = rng.uniform(3.0, 5.0)
    angle = rng.uniform(0, np.pi)
    phase = rng.uniform(0, 2 * np.pi)
    t = x * np.cos(angle) + y * np.sin(angle)
    if texture == "striped":
        return (np.sin(2 * np.pi * freq * t + phase) > 0).astype(np.float64)
    if texture == "dotted":
        gx = np.mod(x * freq * 1.5 + phase, 1.0) - 0.5
        gy = np.mod(y * freq * 1.5 + phase, 1.0) - 0.5
        return (gx**2 + gy**2 < 0.09).astype(np.float64)
    if texture == "checkered":
        cells = np.floor(x * freq) + np.floor(y * freq)
        return np.mod(cells, 2.0)
    if texture == "gradient":
        return np.clip(t / max(np.cos(angle) + np.sin(angle), 1e-6), 0, 1)
    if texture == "grainy":
        return rng.random(x.shape)
    return np.zeros_like(x)


def render_background(
    tokens: list[str], vocab: Vocab, size: int, rng: np.random.Generator
) -> np.ndarray:
    """Render an HxWx3 uint8 background whose look follows ``tokens`` (unknown ones ignored)."""
    by_kind: dict[str, list[str]] = {}
    for token in tokens:
        if token in vocab.tokens:
            by_kind.setdefault(vocab.kind_of(token), []).append(token)
    x, y = _grid(size)

    colours = by_kind.get("colour", [])
    if colours:
        h, s, v = COLOURS.get(colours[0], (rng.uniform(0, 1), 0.5, 0.7))
    else:
        h, s, v = rng.uniform(0, 1), rng.uniform(0.3, 0.7), rng.uniform(0.5, 0.8)
    h = (h + rng.normal(0, 0.015)) % 1.0
    s = float(np.clip(s + rng.normal(0, 0.04), 0, 1))
    v = float(np.clip(v + rng.normal(0, 0.04), 0, 1))
    if len(colours) > 1:
        h2, s2, v2 = COLOURS.get(colours[1], (h, s, v))
    else:
        h2, s2, v2 = h, s * 0.7, (v * 0.55 if v > 0.5 else v + 0.35)
    primary = hsv_to_rgb(np.array([h, s, v]))
    secondary = hsv_to_rgb(np.array([h2 % 1.0, s2, float(np.clip(v2, 0, 1))]))

    lights = by_kind.get("light", [])
    textures = by_kind.get("texture", ["plain"])
    styles = by_kind.get("style", [])
    amplitude = 0.8
    if "soft" in lights:
        amplitude *= 0.5
    if "minimal" in styles:
        amplitude *= 0.4
    field = _pattern(textures[0], x, y, rng) * amplitude
    image = primary * (1 - field[..., None]) + secondary * field[..., None]

    for material in by_kind.get("material", []):
        if material == "wood":
            grain = 0.5 + 0.5 * np.sin(
                2 * np.pi * (12 * y + 0.6 * np.sin(6 * x + rng.uniform(0, 6)))
            )
            image = image * (0.8 + 0.2 * grain[..., None]) * np.array([1.05, 0.95, 0.8])
        elif material == "marble":
            veins = np.abs(np.sin(2 * np.pi * (3 * x + 2 * y + 0.4 * np.sin(9 * y))))
            image = image + (veins < 0.12)[..., None] * 0.35
        elif material == "fabric":
            hatch = (np.mod(np.floor(x * size / 2) + np.floor(y * size / 2), 2) - 0.5) * 0.12
            image = image + hatch[..., None]
        elif material == "metal":
            sheen = 0.75 + 0.5 * np.exp(-(((y - rng.uniform(0.2, 0.5)) / 0.12) ** 2))
            grey = image.mean(axis=-1, keepdims=True)
            image = (0.5 * image + 0.5 * grey) * sheen[..., None]

    for scene in by_kind.get("scene", []):
        if scene == "studio":
            image = image * np.where(y > 0.7, 0.8, 1.0)[..., None]
        elif scene == "outdoor":
            sky = np.clip((0.4 - y) / 0.4, 0, 1)[..., None]
            image = image * (1 - 0.5 * sky) + np.array([0.6, 0.8, 1.0]) * 0.5 * sky
        elif scene == "kitchen":
            tiles = (np.mod(x * 8, 1) < 0.08) | (np.mod(y * 8, 1) < 0.08)
            image = np.where(tiles[..., None], image * 0.7 + 0.25, image)
        elif scene == "beach":
            sand = (y > 0.65)[..., None]
            image = np.where(sand, image * 0.4 + np.array([0.9, 0.8, 0.55]) * 0.6, image)

    brightness = float(np.prod([BRIGHTNESS[light] for light in lights])) if lights else 1.0
    image = image * brightness
    vignette = 0.55 if "dramatic" in lights else 0.1
    radius = np.hypot(x - 0.5, y - 0.5) / np.sqrt(0.5)
    image = image * (1 - vignette * radius**2)[..., None]

    for style in styles:
        grey = image.mean(axis=-1, keepdims=True)
        if style == "vintage":
            image = (0.5 * image + 0.5 * grey) * np.array([1.1, 0.97, 0.8])
        elif style == "vivid":
            image = grey + 1.5 * (image - grey)
        elif style == "pastel":
            image = 0.6 * image + 0.4
    image = image + rng.normal(0, 0.01, size=image.shape)
    return _to_uint8(image)


def compose(product: Product, background: np.ndarray) -> np.ndarray:
    """Paste the product's pixels, exactly, over a background."""
    return np.where(product.mask[..., None], product.image, background)


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return np.asarray(np.clip(np.round(image * 255.0), 0, 255), dtype=np.uint8)
