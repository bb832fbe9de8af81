from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from cg4ctr_tasks import storage
from cg4ctr_tasks.cli import app
from cg4ctr_tasks.errors import UserError
from cg4ctr_tasks.ingest import ingest, ingest_date, summary_path
from cg4ctr_tasks.workspace import Workspace

DAY = "2026-03-01"
DEVICES = ("ios", "android", "web")
HEADER = "event_date,item_id,creative_id,user_group,device,hour,impressions,clicks"


def good_rows(n: int = 200, start: int = 0) -> list[str]:
    """``n`` valid rows with distinct keys; 200 rows keep one bad row under the 1 % limit."""
    rows = []
    for i in range(start, start + n):
        item, device, group = f"item-{i % 7}", DEVICES[(i // 24) % 3], f"g{(i // 72) % 4}"
        rows.append(f"{DAY},{item},{item}-c{i % 3},{group},{device},{i % 24},{10 + i % 5},{i % 3}")
    return rows


def write_csv(folder: Path, name: str, rows: list[str], header: str = HEADER) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text("\n".join([header, *rows]) + "\n", "utf-8")
    return path


@pytest.fixture()
def logs(tmp_path: Path) -> Path:
    return tmp_path / "logs"


@pytest.fixture()
def ws(tmp_path: Path) -> Workspace:
    root = tmp_path / "ws"
    root.mkdir()
    return Workspace.open(root)


def partition(logs: Path) -> Path:
    return logs / f"dt={DAY}"


def quarantine_rows(ws: Workspace) -> pd.DataFrame:
    folder = Path(ws.quarantine(DAY)) / "rows"
    if not folder.is_dir():
        return pd.DataFrame(columns=["reason"])
    return pd.concat([pd.read_parquet(p) for p in sorted(folder.glob("*.parquet"))])


def assert_accounted(summary: dict, ws: Workspace) -> None:
    """Every row read is either accepted or quarantined, and quarantine holds them all."""
    assert summary["accepted"] + summary["quarantined"] == summary["rows_read"]
    assert sum(summary["quarantined_by_reason"].values()) == summary["quarantined"]
    assert len(quarantine_rows(ws)) == summary["quarantined"]
    ge = summary["great_expectations"]["unexpected_by_reason"]
    assert ge == summary["quarantined_by_reason"]


def test_tiny_world_totals_match_the_raw_csvs(tiny_world: Path, ws: Workspace) -> None:
    source = Workspace.open(tiny_world)
    days = sorted(p.name[3:] for p in Path(source.raw_logs).iterdir())
    totals = ingest(ws, days[0], days[-1], logs=source.raw_logs)
    raw = pd.concat(
        pd.read_csv(p, dtype={"hour": "int64"})
        for p in sorted(Path(source.raw_logs).rglob("*.csv"))
    )
    assert totals["dates"] == len(days)
    assert totals["rows_read"] == totals["accepted"] == len(raw)
    assert totals["impressions"] == raw["impressions"].sum()
    assert totals["clicks"] == raw["clicks"].sum()
    for day in days:
        ctr = storage.read_parquet(ws.ctr_table(day))
        expected = (
            raw[raw["event_date"] == day]
            .groupby(["item_id", "creative_id", "user_group"], as_index=False)[
                ["impressions", "clicks"]
            ]
            .sum()
        )
        pd.testing.assert_frame_equal(ctr, expected, check_dtype=False)
        assert str(ctr["impressions"].dtype) == "int64"
        per_creative = storage.read_parquet(ws.ctr_creative_table(day))
        assert per_creative["impressions"].sum() == expected["impressions"].sum()
        assert list(per_creative.columns) == ["item_id", "creative_id", "impressions", "clicks"]
        summary = json.loads(Path(summary_path(ws, day)).read_text())
        assert summary["status"] == "ok" and Path(summary["data_docs"]).is_file()
    again = ingest(ws, days[0], days[-1], logs=source.raw_logs)
    assert again["reused"] == len(days)


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("clicks_gt_impressions", "clicks_exceed_impressions"),
        ("negative", "negative_count"),
        ("float_count", "non_integer_count"),
        ("traversal_id", "unsafe_id"),
        ("long_id", "unsafe_id"),
        ("outside_date", "date_outside_partition"),
        ("bad_date", "bad_date"),
        ("bad_hour", "bad_hour"),
        ("missing_value", "missing_value"),
        ("malformed", "malformed_row"),
        ("duplicate_across_files", "duplicate_key"),
    ],
)
def test_bad_rows_are_quarantined_with_their_reason(
    case: str, reason: str, logs: Path, ws: Workspace
) -> None:
    bad = {
        "clicks_gt_impressions": f"{DAY},item-1,item-1-c0,g0,web,3,5,6",
        "negative": f"{DAY},item-1,item-1-c0,g0,web,3,-5,0",
        "float_count": f"{DAY},item-1,item-1-c0,g0,web,3,5,1.5",
        "traversal_id": f"{DAY},item-1,../../etc/passwd,g0,web,3,5,1",
        "long_id": f"{DAY},item-1,{'x' * 10_000},g0,web,3,5,1",
        "outside_date": "2026-02-28,item-1,item-1-c0,g0,web,3,5,1",
        "bad_date": "2026-02-30,item-1,item-1-c0,g0,web,3,5,1",
        "bad_hour": f"{DAY},item-1,item-1-c0,g0,web,24,5,1",
        "missing_value": f"{DAY},item-1,,g0,web,3,5,1",
        "malformed": f"{DAY},item-1,item-1-c0,g0,web,3,5",
        "duplicate_across_files": good_rows()[17],
    }[case]
    write_csv(partition(logs), "part-0000.csv", good_rows())
    write_csv(partition(logs), "part-0001.csv", [bad])
    summary = ingest_date(ws, DAY, logs=str(logs))
    assert summary["status"] == "ok"
    assert summary["rows_read"] == 201
    assert summary["quarantined_by_reason"] == {reason: 1}
    assert_accounted(summary, ws)
    rejected = quarantine_rows(ws)
    assert list(rejected["reason"]) == [reason]
    assert list(rejected["source_file"]) == ["part-0001.csv"]
    ctr = storage.read_parquet(ws.ctr_table(DAY))
    assert ctr["impressions"].sum() == sum(int(r.split(",")[6]) for r in good_rows())
    assert not (Path(ws.data).parent / "etc").exists()


def test_duplicate_keeps_the_first_copy_in_file_order(logs: Path, ws: Workspace) -> None:
    first = f"{DAY},item-1,item-1-c0,g0,web,3,50,5"
    write_csv(partition(logs), "a.csv", [first, *good_rows()])
    write_csv(partition(logs), "b.csv", [f"{DAY},item-1,item-1-c0,g0,web,3,70,7"])
    summary = ingest_date(ws, DAY, logs=str(logs))
    ctr = storage.read_parquet(ws.ctr_table(DAY))
    row = ctr[(ctr["creative_id"] == "item-1-c0") & (ctr["user_group"] == "g0")]
    assert int(row["impressions"].iloc[0]) == 50 + sum(
        int(r.split(",")[6]) for r in good_rows() if ",item-1,item-1-c0,g0," in r
    )
    assert summary["quarantined_by_reason"] == {"duplicate_key": 1}
    assert quarantine_rows(ws)["impressions"].tolist() == ["70"]


def test_extra_column_is_ignored_and_reported(logs: Path, ws: Workspace) -> None:
    rows = [f"{r},chrome" for r in good_rows()]
    write_csv(partition(logs), "part-0000.csv", rows, header=HEADER + ",browser")
    summary = ingest_date(ws, DAY, logs=str(logs))
    assert summary["accepted"] == 200
    assert summary["files"][0]["extra_columns"] == ["browser"]


def test_empty_file_counts_no_rows(logs: Path, ws: Workspace) -> None:
    write_csv(partition(logs), "part-0000.csv", good_rows())
    (partition(logs) / "part-0001.csv").write_bytes(b"")
    (partition(logs) / "_SUCCESS").write_bytes(b"")
    summary = ingest_date(ws, DAY, logs=str(logs))
    assert [f["status"] for f in summary["files"]] == ["ok", "empty"]
    assert summary["ignored_files"] == ["_SUCCESS"]
    assert summary["rows_read"] == summary["accepted"] == 200


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing_column", "missing column(s) clicks"),
        ("truncated_gzip", "truncated or corrupt gzip"),
        ("non_utf8", "not valid UTF-8"),
        ("unsupported", "unsupported file type"),
    ],
)
def test_structural_failures_fail_the_date_naming_the_file(
    case: str, message: str, logs: Path, ws: Workspace
) -> None:
    write_csv(partition(logs), "part-0000.csv", good_rows())
    ingest_date(ws, DAY, logs=str(logs))
    before = Path(ws.ctr_table(DAY)).read_bytes()
    folder = partition(logs)
    if case == "missing_column":
        header = HEADER.rsplit(",", 1)[0]
        write_csv(folder, "bad.csv", [r.rsplit(",", 1)[0] for r in good_rows(5)], header=header)
    elif case == "truncated_gzip":
        data = gzip.compress(("\n".join([HEADER, *good_rows(50, 1000)]) + "\n").encode())
        (folder / "bad.csv.gz").write_bytes(data[: len(data) // 2])
    elif case == "non_utf8":
        (folder / "bad.csv").write_bytes(
            (HEADER + "\n").encode() + f"{DAY},item-\xe9,c,g0,web,1,2,1\n".encode("latin-1")
        )
    else:
        (folder / "bad.tsv").write_text("x")
    with pytest.raises(UserError, match=re.escape(message)) as info:
        ingest_date(ws, DAY, logs=str(logs))
    assert "bad." in str(info.value)
    assert Path(ws.ctr_table(DAY)).read_bytes() == before  # the last good output stays
    if case in ("truncated_gzip", "non_utf8"):
        summary = json.loads((Path(ws.quarantine(DAY)) / "summary.json").read_text())
        assert summary["status"] == "failed"
        assert [p.name for p in (Path(ws.quarantine(DAY)) / "files").iterdir()] == [
            "0001-bad.csv" + (".gz" if case == "truncated_gzip" else "")
        ]


def test_reject_fraction_above_the_limit_fails_loudly(logs: Path, ws: Workspace) -> None:
    rows = good_rows(100)
    rows[:3] = [r.replace(",ios,", ",ios,", 1).rsplit(",", 1)[0] + ",99" for r in rows[:3]]
    write_csv(partition(logs), "part-0000.csv", rows)
    with pytest.raises(UserError, match=r"3 of 100 rows quarantined \(3.00% > "):
        ingest_date(ws, DAY, logs=str(logs))
    assert not storage.exists(ws.ctr_table(DAY))
    summary = json.loads((Path(ws.quarantine(DAY)) / "summary.json").read_text())
    assert summary["quarantined_by_reason"] == {"clicks_exceed_impressions": 3}
    assert len(quarantine_rows(ws)) == 3


def test_formats_and_streaming_give_the_same_aggregate(tmp_path: Path, logs: Path) -> None:
    rows = good_rows(300)
    frame = pd.read_csv(pd.io.common.StringIO("\n".join([HEADER, *rows])))
    folder = partition(logs)
    write_csv(folder, "a.csv", rows[:100])
    (folder / "b.csv.gz").write_bytes(gzip.compress(("\n".join([HEADER, *rows[100:150]])).encode()))
    frame.iloc[150:200].to_json(folder / "c.jsonl", orient="records", lines=True)
    pq.write_table(
        pa.Table.from_pandas(frame.iloc[200:], preserve_index=False),
        folder / "d.parquet",
        row_group_size=40,
    )
    outputs = []
    for name, extra in (
        ("memory", ""),
        ("stream", "  read_batch_bytes: 1\n  stream_block_bytes: 4096\n"),
    ):
        root = tmp_path / name
        root.mkdir()
        (root / "params.yaml").write_text(f"ingest:\n  max_reject_fraction: 0.01\n{extra}")
        ws = Workspace.open(root)
        summary = ingest_date(ws, DAY, logs=str(logs))
        assert summary["rows_read"] == summary["accepted"] == 300
        outputs.append(storage.read_parquet(ws.ctr_table(DAY)))
    expected = frame.groupby(["item_id", "creative_id", "user_group"], as_index=False)[
        ["impressions", "clicks"]
    ].sum()
    for ctr in outputs:
        pd.testing.assert_frame_equal(ctr, expected, check_dtype=False)


def test_crash_mid_write_keeps_the_previous_output(
    logs: Path, ws: Workspace, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_csv(partition(logs), "part-0000.csv", good_rows())
    ingest_date(ws, DAY, logs=str(logs))
    before = {p: Path(p).read_bytes() for p in (ws.ctr_table(DAY), summary_path(ws, DAY))}
    write_csv(partition(logs), "part-0001.csv", good_rows(10, 500))
    real = storage.write_parquet

    def crash_on_second(url: str, table: pa.Table) -> None:
        if "creatives" in str(url):
            raise KeyboardInterrupt("power cut")
        real(url, table)

    monkeypatch.setattr(storage, "write_parquet", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        ingest_date(ws, DAY, logs=str(logs))
    monkeypatch.undo()
    assert Path(summary_path(ws, DAY)).read_bytes() == before[summary_path(ws, DAY)]
    leftovers = [p for p in Path(ws.data).rglob("*") if ".tmp-" in p.name]
    assert leftovers == []
    summary = ingest_date(ws, DAY, logs=str(logs))  # the stale summary forces a redo
    assert not summary.get("reused") and summary["rows_read"] == 210


def test_cli_ingest_json_and_errors(tiny_world: Path, tmp_path: Path) -> None:
    source = Workspace.open(tiny_world)
    day = sorted(p.name[3:] for p in Path(source.raw_logs).iterdir())[0]
    runner = CliRunner()
    args = ["ingest", "-w", str(tmp_path), "--logs", source.raw_logs]
    result = runner.invoke(app, [*args, "--date", day, "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["status"] == "ok"
    result = runner.invoke(app, [*args, "--date", "2020-01-01"])
    assert isinstance(result.exception, UserError)
    assert "no click logs for 2020-01-01" in str(result.exception)
    result = runner.invoke(app, [*args, "--date", day, "--start", day])
    assert isinstance(result.exception, UserError)


@pytest.mark.integration
def test_ingest_from_and_to_s3(s3_endpoint: str, tmp_path: Path, logs: Path) -> None:
    """Logs read through s3:// URLs (many small objects in one fs.cat), outputs written back."""
    from tests.fixtures_s3 import S3_BUCKET

    for part in range(12):
        write_csv(partition(logs), f"part-{part:04d}.csv", good_rows(25, part * 25))
    prefix = f"s3://{S3_BUCKET}/{tmp_path.name}"
    fs, _ = storage.url_to_fs(prefix)
    fs.put(f"{logs}/", f"{S3_BUCKET}/{tmp_path.name}/logs", recursive=True)
    fs.invalidate_cache()
    local = Workspace.open(tmp_path / "ws-local")
    expected = ingest_date(local, DAY, logs=str(logs))
    (tmp_path / "ws-s3").mkdir()
    (tmp_path / "ws-s3" / "params.yaml").write_text(f"storage:\n  url: {prefix}/data-root\n")
    remote = Workspace.open(tmp_path / "ws-s3")
    summary = ingest_date(remote, DAY, logs=f"{prefix}/logs")
    assert summary["rows_read"] == expected["rows_read"] == 300
    assert summary["accepted"] == 300 and len(summary["files"]) == 12
    assert remote.ctr_table(DAY).startswith("s3://")
    pd.testing.assert_frame_equal(
        storage.read_parquet(remote.ctr_table(DAY)), storage.read_parquet(local.ctr_table(DAY))
    )
    assert storage.exists(summary["data_docs"])
    assert ingest_date(remote, DAY, logs=f"{prefix}/logs")["reused"] is True
    assert "testing" not in json.dumps(summary)


# pyarrow reports the undecodable malformed line (c.csv) as an unraisable exception of its own
# row-handler wrapper, then fails the parse, which is what the test checks
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_streamed_files_that_break_midway_fail_and_are_kept(tmp_path: Path, logs: Path) -> None:
    root = tmp_path / "stream"
    root.mkdir()
    (root / "params.yaml").write_text(
        "ingest:\n  read_batch_bytes: 1\n  stream_block_bytes: 4096\n"
    )
    ws = Workspace.open(root)
    data = gzip.compress(("\n".join([HEADER, *good_rows(2000)]) + "\n").encode())
    partition(logs).mkdir(parents=True)
    (partition(logs) / "a.csv.gz").write_bytes(data[: len(data) // 2])
    bad_line = f"{DAY},item-\xff,c,g0,ios,1,5,1\n".encode("latin-1")
    (partition(logs) / "b.csv").write_bytes(f"{HEADER}\n".encode() + bad_line)
    (partition(logs) / "c.csv").write_bytes(
        f"{HEADER}\n".encode() + bad_line.replace(b",1\n", b"\n")
    )
    match = "a.csv.gz: truncated or corrupt.*b.csv: not valid UTF-8.*c.csv: not valid UTF-8"
    with pytest.raises(UserError, match=match):
        ingest_date(ws, DAY, logs=str(logs))
    kept = sorted(p.name for p in (Path(ws.quarantine(DAY)) / "files").iterdir())
    assert kept == ["0001-a.csv.gz", "0002-b.csv", "0003-c.csv"]


def test_pending_ingests_new_partitions_and_reuses_current_ones(logs: Path, ws: Workspace) -> None:
    write_csv(partition(logs), "part-0.csv", good_rows())
    first = ingest(ws, None, logs=str(logs))
    assert first["status"] == "ok" and not first.get("reused")
    later = logs / "dt=2026-03-02"
    write_csv(later, "part-0.csv", [r.replace(DAY, "2026-03-02") for r in good_rows(50)])
    both = ingest(ws, None, logs=str(logs))
    assert both["dates"] == 2 and both["reused"] == 1
    assert both["rows_read"] == 250
    with pytest.raises(UserError, match="no click logs under"):
        ingest(ws, None, logs=str(logs / "nowhere"))
