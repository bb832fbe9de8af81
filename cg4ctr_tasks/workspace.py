"""A workspace: one folder (or data root) holding params, data, models and the private world.

Several workspaces can live side by side; every command takes ``--workspace``. The layout is
DESIGN.md section 3. ``storage.url`` may move ``data/`` and ``models/`` to ``s3://``; the
simulated world's private ``sim/`` folder always stays local.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from cg4ctr_tasks import storage
from cg4ctr_tasks.params import Params, load_params
from cg4ctr_tasks.storage import join, safe_id

WORKSPACE_ENV = "CG4CTR_WORKSPACE"


def round_name(round_id: int) -> str:
    if round_id < 0 or round_id > 999:
        raise ValueError(f"round {round_id} is out of range 0..999")
    return f"round-{round_id:03d}"


def date_partition(date: str) -> str:
    return f"dt={date}"


@dataclass(frozen=True)
class Workspace:
    root: Path
    params: Params = field(repr=False)

    @classmethod
    def open(cls, root: str | Path | None = None, profile: str | None = None) -> Workspace:
        chosen = Path(root or os.environ.get(WORKSPACE_ENV) or ".").resolve()
        return cls(root=chosen, params=load_params(chosen / "params.yaml", profile=profile))

    @property
    def base(self) -> str:
        """Root of data/ and models/: the workspace folder or ``storage.url``."""
        return (self.params.storage.url or str(self.root)).rstrip("/")

    @property
    def data(self) -> str:
        return join(self.base, "data")

    @property
    def models(self) -> str:
        return join(self.base, "models")

    @property
    def sim(self) -> Path:
        """The simulated world's private folder: the oracle lives here; no model reads it."""
        return self.root / "sim"

    @property
    def items_table(self) -> str:
        return join(self.data, "items.parquet")

    @property
    def creatives_table(self) -> str:
        return join(self.data, "creatives.parquet")

    @property
    def raw_logs(self) -> str:
        return join(self.data, "raw", "logs")

    def raw_log_partition(self, date: str) -> str:
        return join(self.raw_logs, date_partition(date))

    def ctr_table(self, date: str) -> str:
        return join(self.data, "ctr", f"{date_partition(date)}.parquet")

    def ctr_creative_table(self, date: str) -> str:
        """Per-creative roll-up of :meth:`ctr_table` (all user groups), for the reward model."""
        return join(self.data, "ctr", "creatives", f"{date_partition(date)}.parquet")

    def quarantine(self, date: str) -> str:
        return join(self.data, "quarantine", date_partition(date))

    def round_dir(self, round_id: int) -> str:
        return join(self.data, "rounds", round_name(round_id))

    def model_dir(self, kind: str, round_id: int | None = None) -> str:
        base = join(self.models, safe_id(kind, "model kind"))
        return base if round_id is None else join(base, round_name(round_id))

    def latest_model_dir(self, kind: str, before_round: int) -> str | None:
        """The newest ``models/<kind>/round-MMM`` with MMM < ``before_round``, or None.

        Round N generates with the LoRA and selects prompts with the prompt model trained in
        the latest earlier round (round-000 holds the bootstrap models).
        """
        for candidate in range(before_round - 1, -1, -1):
            path = self.model_dir(kind, candidate)
            if storage.exists(path):
                return path
        return None

    def resolve(self, uri: str) -> str:
        """An image_uri is relative to the data root unless it is a URL or an absolute path."""
        if storage.is_remote(uri) or Path(uri).is_absolute():
            return uri
        return join(self.data, uri)

    def image_path(self, *parts: str) -> str:
        return join(self.data, "images", *(safe_id(p, "path part") for p in parts))
