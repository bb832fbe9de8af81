"""The round ledger: which round a logical date is, derived from state and never from the clock.

A nightly run for a date that the ledger already knows reuses its round (clearing and re-running
a DAG run overwrites that round); a new date gets the next round id, so a backfill over a date
range yields consecutive rounds in date order. The ledger lives in the workspace
(``data/rounds/ledger.json``) and is written under the workspace lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import date, timedelta

from cg4ctr_tasks import storage
from cg4ctr_tasks.errors import UserError
from cg4ctr_tasks.workspace import Workspace


@dataclass(frozen=True)
class RoundInfo:
    id: int
    date: str  # the round's logical date: its online day's click logs carry this date
    mode: str  # "lora" (odd) or "prompt" (even): what the round trains

    @property
    def prev(self) -> int:
        return self.id - 1


def mode_of(round_id: int) -> str:
    return "lora" if round_id % 2 else "prompt"


@contextlib.contextmanager
def workspace_lock(ws: Workspace, timeout_s: float | None = None) -> Iterator[None]:
    """Serialise writers of one workspace (ledger, DVC, git): wait, then fail clearly."""
    limit = ws.params.versioning.lock_timeout_s if timeout_s is None else timeout_s
    ws.root.mkdir(parents=True, exist_ok=True)
    path = ws.root / ".cg4ctr.lock"
    with path.open("a+") as handle:
        deadline = time.monotonic() + limit
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise UserError(
                        f"workspace {ws.root} is locked by another cg4ctr run "
                        f"(waited {limit:.0f} s); try again when it has finished"
                    ) from None
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _ledger_path(ws: Workspace) -> str:
    return storage.join(ws.data, "rounds", "ledger.json")


def read_ledger(ws: Workspace) -> list[RoundInfo]:
    path = _ledger_path(ws)
    if not storage.exists(path):
        return []
    raw = json.loads(storage.read_bytes(path))
    return [RoundInfo(**entry) for entry in raw["rounds"]]


def _write_ledger(ws: Workspace, rounds: list[RoundInfo]) -> None:
    doc = {"rounds": [asdict(r) for r in sorted(rounds, key=lambda r: r.id)]}
    storage.write_text(_ledger_path(ws), json.dumps(doc, indent=2))


def history_end(ws: Workspace) -> str:
    """The last day of click history the world (or the deployment) started from."""
    path = storage.join(ws.data, "world.json")
    if not storage.exists(path):
        raise UserError(f"{path} not found: run `cg4ctr sim init` (or write it for real logs)")
    dates = json.loads(storage.read_bytes(path))["history_dates"]
    return str(max(dates))


def default_date(ws: Workspace, round_id: int) -> str:
    """Round N's date when no scheduler chose one: the day N days after the history ends."""
    return (date.fromisoformat(history_end(ws)) + timedelta(days=round_id)).isoformat()


def round_for_date(ws: Workspace, logical_date: str) -> RoundInfo:
    """The round of a logical date: the known one, or the next id for a new, later date."""
    try:
        date.fromisoformat(logical_date)
    except ValueError:
        raise UserError(f"not a date (YYYY-MM-DD): {logical_date!r}") from None
    with workspace_lock(ws):
        rounds = read_ledger(ws)
        for info in rounds:
            if info.date == logical_date:
                return info
        if logical_date <= history_end(ws):
            raise UserError(f"{logical_date} is inside the click history; rounds come after it")
        if rounds and logical_date < rounds[-1].date:
            raise UserError(
                f"{logical_date} is before round {rounds[-1].id} ({rounds[-1].date}): rounds run "
                "in date order; backfill older dates before newer ones"
            )
        next_id = rounds[-1].id + 1 if rounds else 1
        info = RoundInfo(id=next_id, date=logical_date, mode=mode_of(next_id))
        _write_ledger(ws, [*rounds, info])
        return info


def logs_before(ws: Workspace, round_id: int) -> str | None:
    """The registered round's date: its models learn from the logs of earlier days only (None:
    not in the ledger, all logs). Reading never registers a round."""
    return next((info.date for info in read_ledger(ws) if info.id == round_id), None)


def round_info(ws: Workspace, round_id: int) -> RoundInfo:
    """A round by id: from the ledger, or registered at its default date."""
    for info in read_ledger(ws):
        if info.id == round_id:
            return info
    known = read_ledger(ws)
    if known and round_id != known[-1].id + 1:
        raise UserError(f"round {round_id} is unknown; the next round is {known[-1].id + 1}")
    if not known and round_id != 1:
        raise UserError(f"round {round_id} is unknown; the first round is 1")
    info = round_for_date(ws, default_date(ws, round_id))
    if info.id != round_id:
        raise UserError(f"round {round_id}'s default date is taken by round {info.id}")
    return info
