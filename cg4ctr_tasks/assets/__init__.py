"""Small model weights the project trains itself for the simulated world (committed, hashed).

Each asset folder holds a standard ``save_pretrained`` layout plus ``manifest.json`` with the
sha256 of every file and the command that made it. Params name them with the value ``sim``;
any other value is a path or hub id loaded through the same ``from_pretrained`` code.
"""

from __future__ import annotations

from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent


def asset_path(name: str) -> Path:
    return ASSETS_DIR / name


def resolve_pretrained(value: str, sim_asset: str) -> str:
    """Map a params model reference to what ``from_pretrained`` should load."""
    return str(asset_path(sim_asset)) if value == "sim" else value
