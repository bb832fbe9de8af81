"""Debian packages the integration tests need (Chromium, PostgreSQL, Redis), installed on demand.

The project's own files install what it needs (CI starts from a bare machine): a test asks for a
binary; if it is missing and we are root, apt-get installs its packages non-interactively.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

_UPDATED = False


def ensure_binary(binary: str, packages: list[str], search: tuple[str, ...] = ()) -> str:
    """Path of ``binary`` (on PATH or under ``search`` globs), installing ``packages`` if needed."""
    found = _find(binary, search)
    if found:
        return found
    if os.geteuid() != 0:
        raise RuntimeError(f"{binary} is missing and only root can apt-get install {packages}")
    global _UPDATED
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    if not _UPDATED:
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, capture_output=True)
        _UPDATED = True
    subprocess.run(
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages],
        check=True,
        env=env,
        capture_output=True,
    )
    found = _find(binary, search)
    if not found:
        raise RuntimeError(f"installed {packages} but {binary} is still not found")
    return found


def _find(binary: str, search: tuple[str, ...]) -> str | None:
    on_path = shutil.which(binary)
    if on_path:
        return on_path
    for pattern in search:
        for candidate in sorted(Path("/").glob(pattern.lstrip("/")), reverse=True):
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return str(candidate)
    return None
