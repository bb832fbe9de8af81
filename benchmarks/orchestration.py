"""Orchestration overhead: one self-cycling round run three ways in the same run.

A tiny simulated world is built and bootstrapped once (round 0), then copied three times and
round 1 runs in each copy:

1. plain: the `cg4ctr` stage commands of ``cycle.round_stages``, one process each (baseline);
2. DVC: ``dvc repro round@round-001`` in a workspace holding the project's dvc.yaml, with the
   world and bootstrap stages already recorded in dvc.lock (as after earlier rounds);
3. Airflow: ``airflow dags test cg4ctr_nightly <date>`` (``dag.test()``: the real nightly DAG
   in one process, SQLite metadata DB).

It prints each wall time, the ratio over the plain run (DVC's round stage has no ``version``
step, so its baseline is the plain run without it) and where the extra time goes: process and
DAG-parse start-up, per-task overhead, time between tasks, DVC's dependency checks and output
caching. The issue's target is <= 10 % overhead for a round whose stages take minutes; that
overhead is mostly fixed seconds, so the overhead is also shown against a round of
``--round-minutes`` of stage time.

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.orchestration
    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.orchestration --items 12 --steps 12
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import yaml

from cg4ctr_tasks.cycle import cg4ctr_command, round_stages
from cg4ctr_tasks.params import load_params
from cg4ctr_tasks.rounds import default_date, round_info
from cg4ctr_tasks.workspace import Workspace

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ROUND = 1


@dataclass
class Timed:
    seconds: float
    started: float  # time.time() at launch
    lines: list[tuple[float, str]]  # (seconds since launch, output line)

    def first(self, text: str) -> float:
        """Seconds from launch to the first output line containing ``text``."""
        return next(t for t, line in self.lines if text in line)


def timed(argv: list[str], cwd: Path, env: dict[str, str]) -> Timed:
    """Run a command, time-stamping its output lines; fail with its tail if it fails."""
    started, t0 = time.time(), time.perf_counter()
    proc = subprocess.Popen(
        argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    assert proc.stdout is not None
    lines = [(time.perf_counter() - t0, line.rstrip()) for line in proc.stdout]
    proc.wait()
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = "\n".join(line for _, line in lines[-40:])
        raise SystemExit(f"{' '.join(argv)} exited {proc.returncode}:\n{tail}")
    return Timed(seconds, started, lines)


def base_env() -> dict[str, str]:
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW__")},
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONUNBUFFERED": "1",  # line-timed output of dvc and airflow
        "HF_HUB_OFFLINE": "1",
        "DVC_NO_ANALYTICS": "1",
        "GIT_TERMINAL_PROMPT": "0",
    }


def full_params(args: argparse.Namespace, scratch: Path) -> str:
    """The whole params.yaml (defaults + the tiny sizes): dvc.yaml's `params:` need every key."""
    overrides = {
        "world": {"items": args.items, "days": 2, "user_groups": ["g0", "g1"]},
        "generate": {"candidates": args.candidates, "steps": args.steps, "batch_size": 8},
        "lora": {"steps": 3},
        "reward": {"epochs": 2},
        "prompt": {"epochs": 1},
        "rounds": {"round-001": {"id": 1, "prev": "round-000", "mode": "lora"}},
    }
    (scratch / "params.yaml").write_text(yaml.safe_dump(overrides))
    return yaml.safe_dump(load_params(scratch / "params.yaml").model_dump(mode="json"))


def plain(ws: Path, env: dict[str, str]) -> dict[str, float]:
    """Round 1's stage commands one after the other; seconds per stage."""
    workspace = Workspace.open(ws)
    stages = round_stages(workspace, round_info(workspace, ROUND))
    argv = cg4ctr_command()
    return {
        stage.name: timed([*argv, *stage.args, "--workspace", str(ws)], ws, env).seconds
        for stage in stages
    }


def dvc(ws: Path, env: dict[str, str]) -> tuple[Timed, float, float]:
    """``dvc repro`` of round 1 after recording world and bootstrap; (run, setup s, no-op s)."""
    t0 = time.perf_counter()
    shutil.copy(REPO / "dvc.yaml", ws / "dvc.yaml")
    for argv in (
        ["git", "init", "-q", "-b", "main"],
        [sys.executable, "-m", "dvc", "init", "-q"],
        [sys.executable, "-m", "dvc", "commit", "--force", "--quiet", "world", "bootstrap"],
    ):
        timed(argv, ws, env)
    setup = time.perf_counter() - t0
    run = timed([sys.executable, "-m", "dvc", "repro", f"round@round-{ROUND:03d}"], ws, env)
    noop = timed([sys.executable, "-m", "dvc", "repro", f"round@round-{ROUND:03d}"], ws, env)
    return run, setup, noop.seconds


# `airflow dags test` log lines carry their own UTC time stamps; tasks run one at a time.
TASK_START = re.compile(r"^(\S+Z) .*\[DAG TEST\] starting task_id=(\S+) map_index=(-?\d+)")
TASK_END = re.compile(r"^(\S+Z) .*\[DAG TEST\] end task task_id=")
COMMAND_START = re.compile(r"^(\S+Z) .*Running command: ")
COMMAND_END = re.compile(r"^(\S+Z) .*Command exited with return code")


@dataclass
class TaskRun:
    task: str
    start: float  # seconds since launch
    seconds: float
    command: float  # seconds in its bash command; 0 for a Python task


def task_runs(run: Timed) -> list[TaskRun]:
    """Each task's span and its bash command's span, from the run's log time stamps."""

    def at(stamp: str) -> float:
        return datetime.fromisoformat(stamp).timestamp() - run.started

    tasks: list[TaskRun] = []
    began = command = 0.0
    for _, line in run.lines:
        if m := TASK_START.match(line):
            index = int(m[3])
            name = m[2] if index < 0 else f"{m[2]}[{index}]"
            began, command = at(m[1]), 0.0
        elif m := COMMAND_START.match(line):
            command = -at(m[1])
        elif m := COMMAND_END.match(line):
            command += at(m[1])
        elif m := TASK_END.match(line):
            tasks.append(TaskRun(name, began, at(m[1]) - began, command))
    return tasks


def airflow(ws: Path, env: dict[str, str], day: str) -> tuple[Timed, float, float]:
    """``airflow dags test`` of the nightly for round 1's date; (run, migrate s, parse s)."""
    env = {
        **env,
        "AIRFLOW_HOME": str(ws.parent / "airflow-home"),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "CG4CTR_WORKSPACE": str(ws),
        "CG4CTR_BIN": str(BIN / "cg4ctr"),
    }
    airflow_bin = str(BIN / "airflow")
    migrate = timed([airflow_bin, "db", "migrate"], ws, env).seconds
    probe = (
        "import sys, time; t = time.perf_counter(); sys.path.insert(0, sys.argv[1]); "
        "import cg4ctr_nightly; print(time.perf_counter() - t)"
    )
    parse = timed([sys.executable, "-c", probe, str(REPO / "dags")], ws, env)
    run = timed([airflow_bin, "dags", "test", "cg4ctr_nightly", day], ws, env)
    return run, migrate, float(parse.lines[-1][1])


def stage_of(task: str, stages: dict[str, float]) -> str | None:
    """The plain stage a DAG task runs (``generate[0]`` -> ``generate``), if any."""
    name = task.split("[")[0].replace("_", "-")
    return name if name in stages else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=3)
    parser.add_argument("--candidates", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3, help="denoising steps")
    parser.add_argument("--round-minutes", type=float, default=5.0)
    parser.add_argument("--keep", action="store_true", help="keep the workspaces")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="cg4ctr-orchestration-"))
    env = base_env()
    base = root / "base"
    base.mkdir()
    (base / "params.yaml").write_text(full_params(args, root))
    argv = cg4ctr_command()
    timed([*argv, "sim", "init", "--workspace", str(base)], base, env)
    boot = timed(
        [*argv, "round", "--round", "0", "--no-version", "--workspace", str(base)], base, env
    )
    day = default_date(Workspace.open(base), ROUND)
    folders = {way: root / way / "ws" for way in ("plain", "dvc", "airflow")}
    for folder in folders.values():
        shutil.copytree(base, folder, symlinks=True)

    stages = plain(folders["plain"], env)
    dvc_run, dvc_setup, dvc_noop = dvc(folders["dvc"], env)
    af_run, migrate, parse = airflow(folders["airflow"], env, day)

    # DVC: `cg4ctr round` prints a line as each stage starts and one when all are done
    echoed, finished = dvc_run.first("> cg4ctr round"), dvc_run.first(f"round {ROUND} finished")
    first_stage = dvc_run.first(f"round {ROUND}: ")
    dvc_stages = finished - first_stage
    # Airflow: a task's span minus its bash command's is that task's overhead
    tasks = task_runs(af_run)
    staged = [t for t in tasks if stage_of(t.task, stages) is not None]
    helpers = [t for t in tasks if stage_of(t.task, stages) is None]
    af_stages = sum(t.command for t in staged)
    first, last = tasks[0].start, tasks[-1].start + tasks[-1].seconds

    full = sum(stages.values())
    no_version = full - stages.get("version", 0.0)
    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    print(
        f"one round (round {ROUND}, lora, {day}) on a tiny world: {args.items} items x 2 groups "
        f"x {args.candidates} candidates, {args.steps} steps; OMP_NUM_THREADS={threads}, "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; "
        f"bootstrap (set-up) {boot.seconds:.1f} s"
    )
    print(
        f"\n{'way':<28}{'wall s':>8}{'/ plain run':>12}{'stages s':>10}{'overhead s':>12}"
        f"{'wall / stages':>15}"
    )
    rows = (
        ("plain cg4ctr stages", full, full, full),
        ("  (without version)", no_version, no_version, no_version),
        ("dvc repro", dvc_run.seconds, no_version, dvc_stages),
        ("airflow dags test", af_run.seconds, full, af_stages),
    )
    for name, wall, baseline, inside in rows:
        print(
            f"{name:<28}{wall:8.1f}{wall / baseline:12.2f}{inside:10.1f}{wall - inside:12.1f}"
            f"{wall / inside:15.3f}"
        )
    print(
        "(stages s: the stage commands' own time measured inside that run; overhead = wall - "
        "stages.\n / plain run compares separate runs of the same stages: on a shared machine "
        "their stage times differ by more than the overhead; DVC's round has no version step)"
    )
    print("\nplain stages, s: " + ", ".join(f"{k} {v:.1f}" for k, v in stages.items()))

    print(
        f"\nDVC overhead {dvc_run.seconds - dvc_stages:.1f} s = {echoed:.1f} s before the "
        f"command (start-up, dvc.yaml and params parse, world/bootstrap deps and outs checked "
        f"against dvc.lock)\n   + {first_stage - echoed:.1f} s start of the `cg4ctr round` "
        f"wrapper process (the stages then run as in the plain run)\n"
        f"   + {dvc_run.seconds - finished:.1f} s after it (hashing the new outputs into the "
        f"cache, dvc.lock)\n   a no-op `dvc repro` (all up to date) takes {dvc_noop:.1f} s; "
        f"set-up (git/dvc init, dvc commit of world + bootstrap; untimed) {dvc_setup:.1f} s"
    )
    per_task = sum(t.seconds - t.command for t in staged)
    print(
        f"\nAirflow overhead {af_run.seconds - af_stages:.1f} s = {first:.1f} s before the first "
        f"task (CLI start, DAG folder parse, run set-up; the nightly DAG file alone imports "
        f"in {parse:.2f} s)\n   + {per_task:.1f} s around the commands of the {len(staged)} "
        f"stage tasks (task start/finish, bash, XCom; {per_task / len(staged):.2f} s each)\n"
        f"   + {sum(t.seconds for t in helpers):.1f} s in {len(helpers)} tasks the DAG adds: "
        + ", ".join(f"{t.task} {t.seconds:.2f}" for t in helpers)
        + f"\n   + {last - first - sum(t.seconds for t in tasks):.1f} s between tasks "
        f"(dag.test's scheduling loop)\n   + {af_run.seconds - last:.1f} s after the last task; "
        f"`airflow db migrate` (set-up, untimed) {migrate:.1f} s"
    )
    budget = args.round_minutes * 60
    dvc_extra, af_extra = dvc_run.seconds - dvc_stages, af_run.seconds - af_stages
    print(
        f"\ntarget <= 10 % overhead for a round whose stages take minutes: these overheads are "
        f"fixed or per task, so for {args.round_minutes:g} min of stage time they are DVC "
        f"{dvc_extra / budget:.1%}, Airflow {af_extra / budget:.1%} (at this size: DVC "
        f"{dvc_extra / dvc_stages:.1%}, Airflow {af_extra / af_stages:.1%})"
    )
    if args.keep:
        print(f"workspaces kept in {root}")
    else:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
