"""Benchmark: the full ingest stage (validation, duplicate check, quarantine, GE, Data Docs)
against a bare pyarrow CSV read + group-by of the same files, measured in the same run.

    .venv/bin/python benchmarks/ingest.py                 # 5M rows in 10 CSV files
    .venv/bin/python benchmarks/ingest.py --rows 200000   # a quick smoke run

Each side runs in a fresh child process so that its peak RSS is its own. The stage side also
reports Great Expectations' one-off import/context start-up separately from the stage itself.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

DAY = "2026-01-01"
GROUPS, DEVICES, HOURS = ("g0", "g1", "g2", "g3"), ("ios", "android", "web"), 24


def generate(folder: Path, rows: int, files: int, fmt: str, bad_fraction: float, seed: int) -> None:
    """Distinct (item, creative, group, device, hour) keys, like a real day's log."""
    rng = np.random.default_rng(seed)
    creatives_per_item = 5
    items = max(1, rows // 250)
    cells = items * creatives_per_item * len(GROUPS) * len(DEVICES) * HOURS
    if cells < rows:
        raise SystemExit(f"too few cells ({cells}) for {rows} distinct keys")
    picked = rng.choice(cells, size=rows, replace=False)
    hour, rest = picked % HOURS, picked // HOURS
    device, rest = rest % len(DEVICES), rest // len(DEVICES)
    group, creative = rest % len(GROUPS), rest // len(GROUPS)
    item = creative // creatives_per_item
    impressions = rng.integers(1, 60, rows)
    clicks = rng.binomial(impressions, 0.04)
    bad = rng.random(rows) < bad_fraction
    clicks[bad] = impressions[bad] + 1  # quarantined as clicks_exceed_impressions
    item_names = np.array([f"item-{i:06d}" for i in range(items)], dtype=object)
    creative_names = np.array(
        [f"item-{i // creatives_per_item:06d}-c{i % creatives_per_item}" for i in range(items * 5)],
        dtype=object,
    )
    out = folder / f"dt={DAY}"
    out.mkdir(parents=True, exist_ok=True)
    for part, index in enumerate(np.array_split(np.arange(rows), files)):
        table = pa.table(
            {
                "event_date": pa.array(np.full(len(index), DAY, dtype=object), pa.string()),
                "item_id": pa.array(item_names[item[index]], pa.string()),
                "creative_id": pa.array(creative_names[creative[index]], pa.string()),
                "user_group": pa.array(np.array(GROUPS, dtype=object)[group[index]], pa.string()),
                "device": pa.array(np.array(DEVICES, dtype=object)[device[index]], pa.string()),
                "hour": pa.array(hour[index], pa.int64()),
                "impressions": pa.array(impressions[index], pa.int64()),
                "clicks": pa.array(clicks[index], pa.int64()),
            }
        )
        if fmt == "csv":
            pa_csv.write_csv(table, out / f"part-{part:04d}.csv")
        else:
            pq.write_table(table, out / f"part-{part:04d}.parquet", row_group_size=250_000)


def run_baseline(folder: Path) -> dict[str, float]:
    """Bare pyarrow: read each file, group-by sum, then combine the partial sums."""
    keys = ["item_id", "creative_id", "user_group"]
    started = time.perf_counter()
    partials = []
    rows = 0
    for path in sorted((folder / f"dt={DAY}").iterdir()):
        table = pa_csv.read_csv(path) if path.suffix == ".csv" else pq.read_table(path)
        rows += table.num_rows
        partials.append(table.group_by(keys).aggregate([("impressions", "sum"), ("clicks", "sum")]))
    combined = pa.concat_tables(partials).group_by(keys)
    result = combined.aggregate([("impressions_sum", "sum"), ("clicks_sum", "sum")])
    return {"seconds": time.perf_counter() - started, "rows": rows, "groups": result.num_rows}


def run_stage(folder: Path) -> dict[str, float]:
    from cg4ctr_tasks.ingest import ingest_date
    from cg4ctr_tasks.workspace import Workspace

    root = Path(tempfile.mkdtemp(prefix="cg4ctr-bench-ws-"))
    ws = Workspace.open(root)
    started = time.perf_counter()
    generate(root / "warm-up", 100, 1, "csv", 0.0, 1)  # GE import, context and suites: once
    ingest_date(ws, DAY, logs=str(root / "warm-up"))  # per process, timed separately
    startup = time.perf_counter() - started
    started = time.perf_counter()
    summary = ingest_date(ws, DAY, logs=str(folder), force=True)
    return {
        "seconds": time.perf_counter() - started,
        "ge_startup_seconds": startup,
        "rows": summary["rows_read"],
        "accepted": summary["accepted"],
        "quarantined": summary["quarantined"],
        "groups": summary["ctr_rows"],
        "ge_validations": summary["great_expectations"]["validations"],
    }


def child(side: str, folder: Path) -> dict[str, float]:
    """Run one side in a fresh interpreter; returns its figures and peak RSS."""
    out = subprocess.run(
        [sys.executable, __file__, "--child", side, "--dir", str(folder)],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def _median_run(runs: list[dict[str, float]]) -> dict[str, float]:
    return sorted(runs, key=lambda r: r["seconds"])[len(runs) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=5_000_000)
    parser.add_argument("--files", type=int, default=10)
    parser.add_argument("--format", choices=("csv", "parquet"), default="csv")
    parser.add_argument("--bad-fraction", type=float, default=0.001)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs per side")
    parser.add_argument("--dir", type=Path, default=None, help="reuse/generate data here")
    parser.add_argument("--child", choices=("baseline", "stage"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        figures = run_baseline(args.dir) if args.child == "baseline" else run_stage(args.dir)
        figures["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(figures))
        return

    folder = args.dir or Path(tempfile.mkdtemp(prefix="cg4ctr-bench-logs-"))
    if not (folder / f"dt={DAY}").is_dir():
        started = time.perf_counter()
        generate(folder, args.rows, args.files, args.format, args.bad_fraction, args.seed)
        print(
            f"generated {args.rows:,} rows in {args.files} {args.format} files "
            f"({sum(p.stat().st_size for p in folder.rglob('*.*')) / 1e6:.0f} MB) "
            f"in {time.perf_counter() - started:.1f} s under {folder}"
        )
    pairs = []
    for _ in range(args.repeats):  # alternate the sides: a busy machine slows both alike
        pairs.append((child("baseline", folder), child("stage", folder)))
    ratios = [b["seconds"] / s["seconds"] for b, s in pairs]
    baseline = _median_run([b for b, _ in pairs])
    stage = _median_run([s for _, s in pairs])
    rows = stage["rows"]
    print(
        f"bare pyarrow group-by : {baseline['seconds']:7.2f} s  "
        f"{baseline['rows'] / baseline['seconds']:12,.0f} rows/s  "
        f"peak RSS {baseline['peak_rss_mb']:.0f} MB  (median of {args.repeats})"
    )
    print(
        f"ingest stage          : {stage['seconds']:7.2f} s  "
        f"{rows / stage['seconds']:12,.0f} rows/s  "
        f"peak RSS {stage['peak_rss_mb']:.0f} MB  (accepted {stage['accepted']:,}, "
        f"quarantined {stage['quarantined']:,}, {stage['ge_validations']} GE validations)"
    )
    print(f"GE start-up (warm-up) : {stage['ge_startup_seconds']:7.2f} s once per process")
    print(
        f"speed ratio stage/bare: {statistics.median(ratios):.2f} median of "
        f"{', '.join(f'{r:.2f}' for r in ratios)} (target >= 0.5); including GE start-up: "
        f"{baseline['seconds'] / (stage['seconds'] + stage['ge_startup_seconds']):.2f}"
    )
    if stage["groups"] != baseline["groups"]:
        print(f"note: {baseline['groups']} groups bare vs {stage['groups']} after quarantine")


if __name__ == "__main__":
    main()
