"""Resumable, sharded row-wise stages: fixed-size part files, then one merged table.

A stage's input rows are cut into parts of ``part_size`` rows (in input order). Worker ``i/n``
(an Airflow mapped task, or a plain CLI call with ``--shard i/n``) processes the parts ``p`` with
``p % n == i`` and writes each as its own parquet file, atomically; a valid part (same keys as
the input rows it covers) is skipped on the next run, so a crash loses one part at most. The
call that finds every part present merges them into the stage's output table.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pandas as pd
from tqdm import tqdm

from cg4ctr_tasks import storage
from cg4ctr_tasks.errors import UserError

_SHARD = re.compile(r"^(\d+)/(\d+)$")


@dataclass(frozen=True)
class Shard:
    index: int
    count: int

    @classmethod
    def parse(cls, text: str | None) -> Shard:
        """``"i/n"`` (0 <= i < n); None means the whole input."""
        if text is None:
            return cls(0, 1)
        match = _SHARD.match(text.strip())
        if not match or not 0 <= int(match[1]) < int(match[2]):
            raise UserError(f"--shard must look like i/n with 0 <= i < n, got {text!r}")
        return cls(int(match[1]), int(match[2]))

    def owns(self, part: int) -> bool:
        return part % self.count == self.index


@dataclass(frozen=True)
class PartsRun:
    parts_total: int
    parts_written: int
    parts_skipped: int
    merged: pd.DataFrame | None  # every part's rows, in input order, once all parts exist


def _valid_part(path: str, key_column: str, keys: Sequence[str]) -> pd.DataFrame | None:
    if not storage.exists(path):
        return None
    try:
        frame = storage.read_parquet(path)
    except (OSError, ValueError):
        return None
    if key_column not in frame or frame[key_column].astype(str).tolist() != list(keys):
        return None
    return frame


def run_parts(
    keys: Sequence[str],
    key_column: str,
    part_size: int,
    parts_dir: str,
    shard: Shard,
    force: bool,
    process: Callable[[range], pd.DataFrame],
    desc: str,
) -> PartsRun:
    """Run ``process(rows)`` for this shard's missing parts; merge when all parts exist.

    ``process`` gets the input row range of one part and returns one output row per input row,
    with ``key_column`` holding that row's key (so a stale part is detected and redone).
    """
    total = max(1, math.ceil(len(keys) / part_size))
    ranges = [range(p * part_size, min(len(keys), (p + 1) * part_size)) for p in range(total)]
    paths = [storage.join(parts_dir, f"part-{p:05d}.parquet") for p in range(total)]
    written = skipped = 0
    owned = [p for p in range(total) if shard.owns(p)]
    with tqdm(total=sum(len(ranges[p]) for p in owned), desc=desc, disable=None) as bar:
        for p in owned:
            expected = [keys[i] for i in ranges[p]]
            if not force and _valid_part(paths[p], key_column, expected) is not None:
                skipped += 1
            else:
                frame = process(ranges[p])
                if frame[key_column].astype(str).tolist() != expected:
                    raise RuntimeError(f"{desc}: part {p} returned rows out of order")
                storage.write_parquet(paths[p], frame)
                written += 1
            bar.update(len(ranges[p]))
    frames = []
    for p in range(total):
        found = _valid_part(paths[p], key_column, [keys[i] for i in ranges[p]])
        if found is None:
            return PartsRun(total, written, skipped, None)
        frames.append(found)
    return PartsRun(total, written, skipped, pd.concat(frames, ignore_index=True))
