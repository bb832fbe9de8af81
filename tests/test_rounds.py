from __future__ import annotations

import threading
from pathlib import Path

import pytest

from cg4ctr_tasks.errors import UserError
from cg4ctr_tasks.rounds import read_ledger, round_for_date, round_info, workspace_lock
from cg4ctr_tasks.sim.world import init_world
from cg4ctr_tasks.workspace import Workspace


@pytest.fixture()
def ws(workspace: Path) -> Workspace:
    opened = Workspace.open(workspace)
    init_world(opened, seed=1)  # history: 2026-01-01 .. 2026-01-02
    return opened


def test_dates_map_to_consecutive_rounds_and_reruns_reuse_them(ws: Workspace) -> None:
    first = round_for_date(ws, "2026-01-03")
    second = round_for_date(ws, "2026-01-05")
    assert (first.id, first.mode, second.id, second.mode) == (1, "lora", 2, "prompt")
    assert round_for_date(ws, "2026-01-03") == first  # a cleared/re-run DAG run keeps its round
    assert [r.id for r in read_ledger(ws)] == [1, 2]


def test_out_of_order_and_history_dates_are_refused(ws: Workspace) -> None:
    round_for_date(ws, "2026-01-05")
    with pytest.raises(UserError, match="date order"):
        round_for_date(ws, "2026-01-04")
    with pytest.raises(UserError, match="inside the click history"):
        round_for_date(ws, "2026-01-02")
    with pytest.raises(UserError, match="not a date"):
        round_for_date(ws, "yesterday")


def test_round_info_registers_default_dates(ws: Workspace) -> None:
    assert round_info(ws, 1).date == "2026-01-03"
    assert round_info(ws, 2).date == "2026-01-04"
    with pytest.raises(UserError, match="next round is 3"):
        round_info(ws, 5)


def test_workspace_lock_waits_then_fails_clearly(ws: Workspace) -> None:
    entered = threading.Event()
    release = threading.Event()

    def holder() -> None:
        with workspace_lock(ws):
            entered.set()
            release.wait(10)

    thread = threading.Thread(target=holder)
    thread.start()
    entered.wait(10)
    try:
        with (
            pytest.raises(UserError, match="locked by another cg4ctr run"),
            workspace_lock(ws, 0.5),
        ):
            pass
    finally:
        release.set()
        thread.join()
    with workspace_lock(ws, 0.5):  # free again
        pass
