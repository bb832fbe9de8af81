"""Click-log ingestion: raw logs of one date -> validated CTR tables, rejects -> quarantine.

Input: ``<logs>/dt=YYYY-MM-DD/`` (local folder or ``s3://``) holding CSV, JSONL or parquet files,
optionally gzip-compressed. Output per date:

- ``data/ctr/dt=D.parquet``: item_id, creative_id, user_group, impressions, clicks (int64);
- ``data/ctr/creatives/dt=D.parquet``: the same rolled up per (item_id, creative_id);
- ``data/ctr/dt=D.json``: the summary of the run that produced them (the commit marker);
- ``data/quarantine/dt=D/``: the latest attempt's evidence: ``rows/part-*.parquet`` (every
  rejected row as text, with ``source_file``, ``row`` and ``reason``), ``files/`` (copies of files
  that could not be read), ``data_docs/index.html`` (Great Expectations) and ``summary.json``.

Every input row ends in the aggregate or in quarantine. Row-level failures are quarantined and
the date fails when their fraction exceeds ``ingest.max_reject_fraction``; structural failures
(missing column, unreadable or truncated file, invalid UTF-8, unsupported file type) fail the date
naming the file. Extra columns are ignored and listed in the summary. Files are processed in
path order, so "the first copy" of a duplicated key is well defined.

Memory stays bounded for logs larger than RAM: small files are fetched in groups of at most
``read_batch_bytes`` (one ``fs.cat`` each, concurrent on S3), larger ones are streamed by CSV
block or parquet row group, and only the aggregate, the id vocabularies and 8 bytes per distinct
row key (for the duplicate check) are kept for the whole date.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import re
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from cg4ctr_tasks import storage
from cg4ctr_tasks.contracts import (
    CTR,
    CTR_CREATIVES,
    INTEGER_COLUMNS,
    LOG_COLUMNS,
    REASON_CODES,
    REASONS,
    STRING_COLUMNS,
    Validation,
    check_rows,
    reason_code,
    validate_table,
)
from cg4ctr_tasks.errors import UserError
from cg4ctr_tasks.params import IngestParams
from cg4ctr_tasks.workspace import Workspace, date_partition

FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}
_OUTPUT_VERSION = 1  # bump when the meaning of the outputs changes: forces a re-ingest
_DICT = pa.dictionary(pa.int32(), pa.string())
_QUARANTINE_SCHEMA = pa.schema(
    [
        ("source_file", pa.string()),
        ("row", pa.int64()),
        ("reason", pa.string()),
        ("raw", pa.string()),
        *[(name, pa.string()) for name in LOG_COLUMNS],
    ]
)


class FileProblem(Exception):
    """A structural failure of one input file (it cannot be read as a click log)."""


@dataclass(frozen=True)
class LogFile:
    path: str  # filesystem path (without protocol)
    name: str  # relative to the partition folder, used in reports
    size: int
    stamp: str  # mtime or ETag: part of the input fingerprint
    format: str
    gzip: bool


@dataclass
class FileReport:
    file: str
    format: str
    bytes: int
    rows: int = 0
    malformed: int = 0
    status: str = "ok"  # ok | empty | unreadable
    error: str | None = None
    extra_columns: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if v not in (None, [])}
        return out


# --- discovery ------------------------------------------------------------------------------


def dates_between(start: str, end: str) -> list[str]:
    """Inclusive ISO date range; raises UserError on bad or reversed dates."""
    try:
        first, last = date.fromisoformat(start), date.fromisoformat(end)
    except ValueError as exc:
        raise UserError(f"dates must be YYYY-MM-DD: {exc}") from None
    if last < first:
        raise UserError(f"--end {end} is before --start {start}")
    return [(first + timedelta(days=d)).isoformat() for d in range((last - first).days + 1)]


def _format_of(name: str) -> tuple[str | None, bool]:
    lower = name.lower()
    compressed = lower.endswith(".gz")
    stem = lower[:-3] if compressed else lower
    suffix = stem[stem.rfind(".") :] if "." in stem else ""
    return FORMATS.get(suffix), compressed


def discover(logs: str, day: str) -> tuple[Any, list[LogFile], list[str]]:
    """List a date's partition: (fs, log files in path order, ignored names).

    Names starting with ``_`` or ``.`` (``_SUCCESS``, checksums) are ignored and reported; any
    other unknown file type fails the date rather than being skipped silently.
    """
    fs, root = storage.url_to_fs(logs)
    partition = f"{root.rstrip('/')}/{date_partition(day)}"
    if not fs.isdir(partition):
        raise UserError(
            f"no click logs for {day}: {logs.rstrip('/')}/{date_partition(day)} missing"
        )
    files, ignored, unsupported = [], [], []
    for path, info in sorted(fs.find(partition, detail=True).items()):
        name = path[len(partition) :].lstrip("/")
        if any(part.startswith(("_", ".")) for part in name.split("/")):
            ignored.append(name)
            continue
        fmt, compressed = _format_of(name)
        if fmt is None or (fmt == "parquet" and compressed):
            unsupported.append(name)
            continue
        stamp = info.get("ETag") or info.get("mtime") or info.get("LastModified") or ""
        files.append(LogFile(path, name, int(info.get("size") or 0), str(stamp), fmt, compressed))
    if unsupported:
        raise UserError(
            f"{day}: unsupported file type(s) in {logs}: {', '.join(unsupported[:5])} "
            f"(expected {', '.join(FORMATS)}, optionally .gz)"
        )
    return fs, files, ignored


# --- reading ----------------------------------------------------------------------------------


@dataclass
class Batch:
    """Up to one file's rows, normalised to LOG_COLUMNS, plus its malformed lines."""

    file: LogFile
    table: pa.Table
    malformed: list[str]
    first_row: int  # 1-based data-row number of the table's first row in its file


def _header(first_line: bytes, file: LogFile) -> list[str]:
    try:
        text = first_line.decode("utf-8").lstrip("\ufeff")
    except UnicodeDecodeError:
        raise FileProblem(f"{file.name}: not valid UTF-8 (header line)") from None
    return next(csv.reader([text]), [])


def _check_columns(columns: list[str], file: LogFile, report: FileReport) -> None:
    missing = [c for c in LOG_COLUMNS if c not in columns]
    if missing:
        raise FileProblem(f"{file.name}: missing column(s) {', '.join(missing)}")
    report.extra_columns = [c for c in columns if c not in LOG_COLUMNS]


def _as_text(column: pa.ChunkedArray) -> pa.ChunkedArray:
    """String form of an id or date column: dates print as YYYY-MM-DD, numbers as digits."""
    kind = column.type
    if pa.types.is_dictionary(kind) and pa.types.is_string(kind.value_type):
        return column
    if pa.types.is_timestamp(kind):
        day = column.cast(pa.date32())
        midnight = pc.equal(day.cast(kind), column)
        full = pc.strftime(column, "%Y-%m-%dT%H:%M:%S")
        column = pc.if_else(midnight, day.cast(pa.string()), full)
    return column.cast(pa.string()).dictionary_encode()


def _normalise(table: pa.Table) -> pa.Table:
    """LOG_COLUMNS only, ids and dates dictionary-encoded (checked once per distinct value)."""
    arrays = [
        _as_text(table.column(n)) if n in STRING_COLUMNS else table.column(n) for n in LOG_COLUMNS
    ]
    return pa.table(arrays, names=list(LOG_COLUMNS))


def _csv_options(text_counts: bool, malformed: list[str], block: int) -> tuple[Any, Any, Any]:
    def on_invalid(row: Any) -> str:
        malformed.append(str(row.text))
        return "skip"

    types = {name: _DICT for name in STRING_COLUMNS}
    types.update({name: pa.string() if text_counts else pa.int64() for name in INTEGER_COLUMNS})
    read = pa_csv.ReadOptions(block_size=block)
    parse = pa_csv.ParseOptions(invalid_row_handler=on_invalid)
    convert = pa_csv.ConvertOptions(
        column_types=types,
        include_columns=list(LOG_COLUMNS),
        null_values=[""],
        strings_can_be_null=True,
    )
    return read, parse, convert


def _arrow_problem(exc: Exception, file: LogFile) -> FileProblem:
    text = str(exc)
    # pyarrow cannot hand a non-UTF-8 malformed line to the row handler: it fails the parse,
    # quoting the line with U+FFFD replacement characters
    if "UTF8" in text or "UTF-8" in text or "\ufffd" in text:
        return FileProblem(f"{file.name}: not valid UTF-8 ({text.splitlines()[0][:120]})")
    return FileProblem(
        f"{file.name}: cannot be parsed as {file.format} ({text.splitlines()[0][:160]})"
    )


def _parse_csv(data: bytes, file: LogFile, report: FileReport, block: int) -> Iterator[Batch]:
    end = data.find(b"\n")
    _check_columns(_header(data if end < 0 else data[:end], file), file, report)
    for text_counts in (False, True):
        malformed: list[str] = []
        read, parse, convert = _csv_options(text_counts, malformed, block)
        try:
            table = pa_csv.read_csv(io.BytesIO(data), read, parse, convert)
        except pa.ArrowInvalid as exc:
            conversion = "conversion error to int64" in str(exc)
            if conversion and not text_counts:
                continue  # a non-integer count somewhere: re-read counts as text, check per row
            raise _arrow_problem(exc, file) from None
        yield Batch(file, _normalise(table), malformed, 1)
        return


def _stream_csv(
    fs: Any, file: LogFile, params: IngestParams, report: FileReport
) -> Iterator[Batch]:
    """Large CSV: read block by block; counts are read as text (a late float cannot restart)."""
    with _open(fs, file) as handle:
        _check_columns(_header(handle.readline(), file), file, report)
    malformed: list[str] = []
    read, parse, convert = _csv_options(True, malformed, params.stream_block_bytes)
    first_row = 1
    with _open(fs, file) as handle:
        try:
            reader = pa_csv.open_csv(handle, read, parse, convert)
            for record_batch in reader:
                table = _normalise(pa.Table.from_batches([record_batch]))
                seen = len(malformed)  # the reader may parse ahead: take only what is there
                yield Batch(file, table, malformed[:seen], first_row)
                del malformed[:seen]
                first_row += table.num_rows
        except pa.ArrowInvalid as exc:
            raise _arrow_problem(exc, file) from None
        except (EOFError, OSError, zlib.error) as exc:
            raise FileProblem(f"{file.name}: truncated or corrupt ({exc})") from None
    if malformed:
        yield Batch(file, _normalise(_empty_log_table()), list(malformed), first_row)


def _empty_log_table() -> pa.Table:
    return pa.table({name: pa.array([], pa.string()) for name in LOG_COLUMNS})


def _parse_jsonl(data: bytes | Any, file: LogFile, report: FileReport) -> Iterator[Batch]:
    try:
        table = pa_json.read_json(data if not isinstance(data, bytes) else io.BytesIO(data))
    except pa.ArrowInvalid as exc:
        raise _arrow_problem(exc, file) from None
    _check_columns(table.column_names, file, report)
    yield Batch(file, _normalise(table), [], 1)


def _parse_parquet(source: Any, file: LogFile, report: FileReport) -> Iterator[Batch]:
    try:
        parquet = pq.ParquetFile(source)
    except (pa.ArrowInvalid, OSError) as exc:
        raise FileProblem(f"{file.name}: not a readable parquet file ({exc})") from None
    _check_columns(parquet.schema_arrow.names, file, report)
    first_row = 1
    for group in range(parquet.num_row_groups):
        try:
            table = parquet.read_row_group(group, columns=list(LOG_COLUMNS))
        except (pa.ArrowInvalid, OSError) as exc:
            raise FileProblem(f"{file.name}: row group {group} unreadable ({exc})") from None
        yield Batch(file, _normalise(table), [], first_row)
        first_row += table.num_rows


def _open(fs: Any, file: LogFile) -> Any:
    handle = fs.open(file.path, "rb")
    return gzip.GzipFile(fileobj=handle) if file.gzip else handle


def _parse_bytes(data: bytes, file: LogFile, report: FileReport, block: int) -> Iterator[Batch]:
    if file.gzip:
        try:
            data = gzip.decompress(data)
        except (EOFError, OSError, zlib.error) as exc:
            raise FileProblem(f"{file.name}: truncated or corrupt gzip ({exc})") from None
    if not data.strip():
        report.status = "empty"
        return
    if file.format != "parquet" and not data.isascii():  # names the byte; pyarrow may not
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise FileProblem(f"{file.name}: not valid UTF-8 (byte {exc.start})") from None
    if file.format == "csv":
        # a few large blocks: few chunks (dictionaries) yet parsed on several threads
        yield from _parse_csv(data, file, report, max(1 << 20, min(block, len(data) // 2 + 1)))
    elif file.format == "jsonl":
        yield from _parse_jsonl(data, file, report)
    else:
        yield from _parse_parquet(io.BytesIO(data), file, report)


def _stream(fs: Any, file: LogFile, params: IngestParams, report: FileReport) -> Iterator[Batch]:
    if file.format == "csv":
        yield from _stream_csv(fs, file, params, report)
    elif file.format == "parquet":
        with fs.open(file.path, "rb") as handle:
            yield from _parse_parquet(handle, file, report)
    else:
        with _open(fs, file) as handle:
            try:
                reader = pa_json.open_json(handle)
                _check_columns(reader.schema.names, file, report)
                first_row = 1
                for record_batch in reader:
                    table = _normalise(pa.Table.from_batches([record_batch]))
                    yield Batch(file, table, [], first_row)
                    first_row += table.num_rows
            except pa.ArrowInvalid as exc:
                raise _arrow_problem(exc, file) from None
            except (EOFError, OSError, zlib.error) as exc:
                raise FileProblem(f"{file.name}: truncated or corrupt ({exc})") from None


def read_batches(
    fs: Any,
    files: list[LogFile],
    params: IngestParams,
    reports: dict[str, FileReport],
    on_problem: Callable[[LogFile, str, bytes | None], None],
) -> Iterator[Batch]:
    """Batches of every file in order. Small files come from one ``fs.cat`` per group (S3
    fetches them concurrently); files over ``read_batch_bytes`` are streamed. A file that
    cannot be read is reported through ``on_problem`` and reading goes on with the next one.
    """
    position = 0
    while position < len(files):
        group: list[LogFile] = []
        total = 0
        while position < len(files) and files[position].size <= params.read_batch_bytes:
            if group and total + files[position].size > params.read_batch_bytes:
                break
            group.append(files[position])
            total += files[position].size
            position += 1
        if not group:
            file = files[position]
            position += 1
            try:
                yield from _stream(fs, file, params, reports[file.name])
            except FileProblem as exc:
                on_problem(file, str(exc), None)
            continue
        contents = fs.cat([f.path for f in group], on_error="return")
        for file in group:
            data = contents.get(file.path)
            if not isinstance(data, bytes):
                on_problem(file, f"{file.name}: could not be fetched ({data!r})", None)
                continue
            try:
                yield from _parse_bytes(data, file, reports[file.name], params.stream_block_bytes)
            except FileProblem as exc:
                on_problem(file, str(exc), data)


# --- aggregation ----------------------------------------------------------------------------


class _Interner:
    """Dense ids (0, 1, ...) for the values seen so far, looked up in bulk with pandas."""

    def __init__(self, values: pd.Index) -> None:
        self.index = values

    def ids(self, values: np.ndarray, distinct: bool = False) -> np.ndarray:
        """Ids of ``values``; repeated values are looked up once (``distinct``: none repeat)."""
        if not distinct:
            unique, inverse = np.unique(values, return_inverse=True)
            return self.ids(unique, distinct=True)[inverse]
        found = np.asarray(self.index.get_indexer(pd.Index(values)), dtype=np.int64)
        new = found < 0
        if new.any():
            start = len(self.index)
            self.index = self.index.append(pd.Index(values[new]))
            found[new] = np.arange(start, len(self.index))
        return found


class _SeenKeys:
    """A set of int64 keys as sorted runs of geometric sizes: O(log n) runs to search."""

    def __init__(self) -> None:
        self.runs: list[np.ndarray] = []

    def contains(self, keys: np.ndarray) -> np.ndarray:
        hit = np.zeros(len(keys), dtype=bool)
        order = np.argsort(keys)  # sorted queries walk each run in order: cache-friendly
        queries = keys[order]
        for run in self.runs:
            position = np.minimum(np.searchsorted(run, queries), len(run) - 1)
            hit[order] |= run[position] == queries
        return hit

    def add(self, keys: np.ndarray) -> None:
        if len(keys):
            self.runs.append(np.sort(keys))
        while len(self.runs) > 1 and len(self.runs[-2]) <= 2 * len(self.runs[-1]):
            last = self.runs.pop()
            self.runs[-1] = np.sort(np.concatenate([self.runs[-1], last]), kind="stable")


_BITS = {"item": 31, "creative": 32, "pair": 42, "group": 16, "device": 16}


class Aggregator:
    """Sums impressions and clicks per (item, creative, user_group) and flags duplicate keys.

    Each id gets a dense integer; (item, creative) and (pair, group) are packed into int64
    codes and interned again, and the full row key packs (triple, device, hour) into one int64,
    so duplicates and sums are found with vectorised numpy, never per row in Python.
    """

    def __init__(self) -> None:
        self.vocab = {name: _Interner(pd.Index([], dtype="str")) for name in STRING_COLUMNS[1:]}
        self.pairs = _Interner(pd.Index([], dtype="int64"))
        self.triples = _Interner(pd.Index([], dtype="int64"))
        self.impressions = np.zeros(0, dtype=np.int64)
        self.clicks = np.zeros(0, dtype=np.int64)
        self.seen = _SeenKeys()

    def _ids(self, column: pa.ChunkedArray, name: str, rows: np.ndarray) -> np.ndarray:
        parts = []
        for chunk in column.chunks:
            values = chunk.dictionary.to_numpy(zero_copy_only=False)
            vocab = self.vocab[name]
            ids = vocab.ids(values, distinct=True) if len(values) else np.zeros(1, np.int64)
            parts.append(ids[chunk.indices.fill_null(0).to_numpy(zero_copy_only=False)])
        out = np.concatenate(parts)[rows] if parts else np.zeros(0, np.int64)
        self._bound(len(self.vocab[name].index), name)
        return out

    @staticmethod
    def _bound(size: int, what: str) -> None:
        limit = {"item_id": "item", "creative_id": "creative", "user_group": "group"}.get(
            what, what
        )
        if size >= 2 ** _BITS.get(limit, 16):
            raise UserError(f"too many distinct {what} values in one date ({size})")

    def add(
        self,
        table: pa.Table,
        reasons: np.ndarray,
        hour: np.ndarray,
        impressions: np.ndarray,
        clicks: np.ndarray,
    ) -> None:
        """Add the rows whose reason is still 0; mark later copies of a seen key in place."""
        rows = np.flatnonzero(reasons == 0)
        if not len(rows):
            return
        item = self._ids(table.column("item_id"), "item_id", rows)
        creative = self._ids(table.column("creative_id"), "creative_id", rows)
        group = self._ids(table.column("user_group"), "user_group", rows)
        device = self._ids(table.column("device"), "device", rows)
        pair = self.pairs.ids((item << 32) | creative)
        self._bound(len(self.pairs.index), "pair")
        triple = self.triples.ids((pair << 16) | group)
        self._bound(len(self.triples.index), "pair")
        key = (triple << 21) | (device << 5) | hour[rows]
        duplicate = pd.Series(key).duplicated(keep="first").to_numpy() | self.seen.contains(key)
        reasons[rows[duplicate]] = reason_code("duplicate_key")
        keep = ~duplicate
        self.seen.add(key[keep])
        size = len(self.triples.index)
        if len(self.impressions) < size:
            grow = max(size, 2 * len(self.impressions)) - len(self.impressions)
            self.impressions = np.concatenate([self.impressions, np.zeros(grow, np.int64)])
            self.clicks = np.concatenate([self.clicks, np.zeros(grow, np.int64)])
        np.add.at(self.impressions, triple[keep], impressions[rows][keep])
        np.add.at(self.clicks, triple[keep], clicks[rows][keep])

    def tables(self) -> tuple[pa.Table, pa.Table]:
        """(per item, creative, user group) and (per item, creative), sorted by their keys."""
        size = len(self.triples.index)
        codes = np.asarray(self.triples.index.to_numpy(), dtype=np.int64)
        pair = codes >> 16
        pair_codes = np.asarray(self.pairs.index.to_numpy(), dtype=np.int64)
        names = {k: np.asarray(v.index.to_numpy(), dtype=object) for k, v in self.vocab.items()}
        item_of_pair = names["item_id"].take(pair_codes >> 32)
        creative_of_pair = names["creative_id"].take(pair_codes & 0xFFFFFFFF)
        impressions, clicks = self.impressions[:size], self.clicks[:size]
        ctr = pa.table(
            {
                "item_id": pa.array(item_of_pair.take(pair), pa.string()),
                "creative_id": pa.array(creative_of_pair.take(pair), pa.string()),
                "user_group": pa.array(names["user_group"].take(codes & 0xFFFF), pa.string()),
                "impressions": pa.array(impressions, pa.int64()),
                "clicks": pa.array(clicks, pa.int64()),
            }
        )
        pair_impressions = np.zeros(len(pair_codes), np.int64)
        pair_clicks = np.zeros(len(pair_codes), np.int64)
        np.add.at(pair_impressions, pair, impressions)
        np.add.at(pair_clicks, pair, clicks)
        creatives = pa.table(
            {
                "item_id": pa.array(item_of_pair, pa.string()),
                "creative_id": pa.array(creative_of_pair, pa.string()),
                "impressions": pa.array(pair_impressions, pa.int64()),
                "clicks": pa.array(pair_clicks, pa.int64()),
            }
        )
        order = [("item_id", "ascending"), ("creative_id", "ascending")]
        return (
            ctr.sort_by([*order, ("user_group", "ascending")]),
            creatives.sort_by(order),
        )


# --- the stage ------------------------------------------------------------------------------


def summary_path(ws: Workspace, day: str) -> str:
    """The summary of the run that produced ``ws.ctr_table(day)``, next to it."""
    return storage.join(ws.data, "ctr", f"{date_partition(day)}.json")


def _fingerprint(files: list[LogFile], params: IngestParams) -> str:
    spec = {
        "version": _OUTPUT_VERSION,
        "params": params.model_dump(),
        "files": [(f.name, f.size, f.stamp) for f in files],
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def _reusable(ws: Workspace, day: str, fingerprint: str) -> dict[str, Any] | None:
    path = summary_path(ws, day)
    if not storage.exists(path):
        return None
    try:
        summary = json.loads(storage.read_bytes(path))
    except (ValueError, OSError):
        return None
    outputs = (ws.ctr_table(day), ws.ctr_creative_table(day))
    if summary.get("fingerprint") != fingerprint or not all(storage.exists(p) for p in outputs):
        return None
    return dict(summary)


def _quarantine_rows(batch: Batch, reasons: np.ndarray) -> pa.Table | None:
    rows = np.flatnonzero(reasons != 0)
    parts = []
    if len(rows):
        taken = batch.table.take(pa.array(rows))
        columns = {name: taken.column(name).cast(pa.string()) for name in LOG_COLUMNS}
        parts.append(
            pa.table(
                {
                    "source_file": pa.array([batch.file.name] * len(rows), pa.string()),
                    "row": pa.array(rows + batch.first_row, pa.int64()),
                    "reason": pa.array(np.asarray(REASON_CODES, dtype=object)[reasons[rows]]),
                    "raw": pa.nulls(len(rows), pa.string()),
                    **columns,
                },
                schema=_QUARANTINE_SCHEMA,
            )
        )
    if batch.malformed:
        count = len(batch.malformed)
        parts.append(
            pa.table(
                {
                    "source_file": pa.array([batch.file.name] * count, pa.string()),
                    "row": pa.nulls(count, pa.int64()),
                    "reason": pa.array(["malformed_row"] * count, pa.string()),
                    "raw": pa.array(batch.malformed, pa.string()),
                    **{name: pa.nulls(count, pa.string()) for name in LOG_COLUMNS},
                },
                schema=_QUARANTINE_SCHEMA,
            )
        )
    return pa.concat_tables(parts) if parts else None


def _safe_file_name(index: int, name: str) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9_.-]", "_", name.replace("/", "__")).lstrip(".")[:100]
    return f"{index:04d}-{cleaned or 'file'}"


class _Run:
    """State of one date's ingestion, staged in a local folder that becomes the quarantine."""

    def __init__(self, ws: Workspace, day: str, stage: Path) -> None:
        self.ws, self.day, self.stage = ws, day, stage
        self.params = ws.params.ingest
        self.validation = Validation()
        self.aggregator = Aggregator()
        self.by_reason = dict.fromkeys(REASONS, 0)
        self.ge_by_reason = dict.fromkeys(REASONS, 0)
        self.pending: list[np.ndarray] = []
        self.pending_rows = 0
        self.parts = 0
        self.problems: list[str] = []
        self.rows_read = 0

    def problem(self, fs: Any, file: LogFile, message: str, data: bytes | None) -> None:
        """Keep a copy of an unreadable file (streamed ones are copied from the source)."""
        self.problems.append(message)
        folder = self.stage / "files"
        folder.mkdir(exist_ok=True)
        target = folder / _safe_file_name(len(self.problems), file.name)
        if data is not None:
            target.write_bytes(data)
            return
        try:
            fs.get(file.path, str(target))
        except OSError as exc:
            note = f"{message}\ncopy failed: {exc}\n"
            target.with_name(target.name + ".error.txt").write_text(note, "utf-8")

    def consume(self, batch: Batch, report: FileReport) -> None:
        checked = check_rows(batch.table, self.day)
        self.aggregator.add(
            batch.table, checked.reasons, checked.hour, checked.impressions, checked.clicks
        )
        reasons = np.concatenate(
            [checked.reasons, np.full(len(batch.malformed), reason_code("malformed_row"), np.int8)]
        )
        counts = np.bincount(reasons, minlength=len(REASON_CODES))
        for code, name in enumerate(REASON_CODES[1:], start=1):
            self.by_reason[name] += int(counts[code])
        rows = len(reasons)
        self.rows_read += rows
        report.rows += batch.table.num_rows
        report.malformed += len(batch.malformed)
        rejected = _quarantine_rows(batch, checked.reasons)
        if rejected is not None:
            folder = self.stage / "rows"
            folder.mkdir(exist_ok=True)
            pq.write_table(rejected, folder / f"part-{self.parts:05d}.parquet", compression="zstd")
            self.parts += 1
        self.pending.append(reasons)
        self.pending_rows += rows
        if self.pending_rows >= self.params.validation_chunk_rows:
            self.flush()

    def flush(self) -> None:
        """Validate the buffered reason codes with GE (one validation per chunk of rows)."""
        if not self.pending_rows:
            return
        name = f"{date_partition(self.day)}-rows-{self.validation.runs:03d}"
        counts = self.validation.check_reasons(np.concatenate(self.pending), name)
        for reason, count in counts.items():
            self.ge_by_reason[reason] += count
        self.pending, self.pending_rows = [], 0


def ingest_date(
    ws: Workspace, day: str, logs: str | None = None, force: bool = False
) -> dict[str, Any]:
    """Ingest one date; returns its summary. Raises UserError when the date fails (its
    quarantine folder then holds the evidence and the previous good outputs stay in place).
    """
    dates_between(day, day)  # a well-formed date, or a UserError
    logs = logs or ws.raw_logs
    params = ws.params.ingest
    started = time.perf_counter()
    fs, files, ignored = discover(logs, day)
    if not files:
        raise UserError(f"no click-log files for {day} under {logs}")
    fingerprint = _fingerprint(files, params)
    if not force and (previous := _reusable(ws, day, fingerprint)) is not None:
        return {**previous, "reused": True}

    quarantine = ws.quarantine(day)
    docs = storage.join(quarantine, "data_docs", "index.html")
    with storage.staged_dir(quarantine, last="summary.json") as stage:
        run = _Run(ws, day, stage)
        reports = {
            f.name: FileReport(f.name, f.format + (".gz" if f.gzip else ""), f.size) for f in files
        }

        def on_problem(file: LogFile, message: str, data: bytes | None) -> None:
            reports[file.name].status = "unreadable"
            reports[file.name].error = message
            run.problem(fs, file, message, data)

        for batch in read_batches(fs, files, params, reports, on_problem):
            run.consume(batch, reports[batch.file.name])
        run.flush()
        for report in reports.values():
            if report.status == "ok" and report.rows + report.malformed == 0:
                report.status = "empty"
        ctr, creatives = run.aggregator.tables()
        validate_table(ctr, CTR, run.validation)
        validate_table(creatives, CTR_CREATIVES, run.validation)
        docs_index = run.validation.write_docs(stage / "data_docs")
        quarantined = sum(run.by_reason.values())
        fraction = quarantined / run.rows_read if run.rows_read else 0.0
        error = None
        if run.problems:
            error = f"{day}: {len(run.problems)} file(s) could not be read: " + "; ".join(
                run.problems[:5]
            )
        elif fraction > params.max_reject_fraction:
            worst = max(run.by_reason, key=lambda r: run.by_reason[r])
            error = (
                f"{day}: {quarantined} of {run.rows_read} rows quarantined "
                f"({fraction:.2%} > max_reject_fraction {params.max_reject_fraction:.2%}; "
                f"most: {worst} x{run.by_reason[worst]}); see {quarantine}"
            )
        summary = {
            "date": day,
            "status": "failed" if error else "ok",
            "error": error,
            "logs": str(logs),
            "files": [r.as_dict() for r in reports.values()],
            "ignored_files": ignored,
            "rows_read": run.rows_read,
            "accepted": run.rows_read - quarantined,
            "quarantined": quarantined,
            "quarantined_by_reason": {k: v for k, v in run.by_reason.items() if v},
            "reject_fraction": fraction,
            "max_reject_fraction": params.max_reject_fraction,
            "impressions": int(pc.sum(ctr.column("impressions")).as_py() or 0),
            "clicks": int(pc.sum(ctr.column("clicks")).as_py() or 0),
            "ctr_rows": ctr.num_rows,
            "creative_rows": creatives.num_rows,
            "outputs": {
                "ctr": ws.ctr_table(day),
                "ctr_creatives": ws.ctr_creative_table(day),
                "summary": summary_path(ws, day),
                "quarantine": quarantine,
            },
            "data_docs": docs if docs_index.exists() else None,
            "great_expectations": {
                "validations": run.validation.runs,
                "unexpected_by_reason": {k: v for k, v in run.ge_by_reason.items() if v},
            },
            "fingerprint": fingerprint,
            "seconds": round(time.perf_counter() - started, 3),
        }
        text = json.dumps(summary, indent=2, sort_keys=True)
        (stage / "summary.json").write_text(text, "utf-8")
        if not error:
            storage.write_parquet(ws.ctr_table(day), ctr)
            storage.write_parquet(ws.ctr_creative_table(day), creatives)
    if error:
        raise UserError(error)
    storage.write_text(summary_path(ws, day), text)
    return summary


def partition_dates(ws: Workspace, logs: str | None = None) -> list[str]:
    """Every ``dt=YYYY-MM-DD`` partition under the log root, oldest first."""
    root = logs or ws.raw_logs
    fs, path = storage.url_to_fs(root)
    if not fs.exists(path):
        raise UserError(f"no click logs under {root}")
    found = []
    for entry in fs.ls(path, detail=False):
        name = str(entry).rstrip("/").rsplit("/", 1)[-1]
        if name.startswith("dt="):
            found.append(name[3:])
    if not found:
        raise UserError(f"no dt=YYYY-MM-DD partitions under {root}")
    return sorted(found)


def ingest(
    ws: Workspace,
    start: str | None,
    end: str | None = None,
    logs: str | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Ingest every date from ``start`` to ``end`` (inclusive), each independently; with
    ``start`` None, every partition present (the nightly "pending" mode: current dates are
    reused, new ones ingested).

    All dates are attempted; if any failed, UserError lists them after the others finished.
    """
    days = partition_dates(ws, logs) if start is None else dates_between(start, end or start)
    results, failures = [], []
    for day in days:
        try:
            results.append(ingest_date(ws, day, logs, force))
        except UserError as exc:
            failures.append(str(exc))
    if failures:
        done = f"{len(results)} of {len(days)} date(s) ingested; " if len(days) > 1 else ""
        raise UserError(done + " | ".join(failures))
    if len(results) == 1:
        return results[0]
    keys = ("rows_read", "accepted", "quarantined", "impressions", "clicks")
    return {
        "dates": len(results),
        **{k: sum(int(r[k]) for r in results) for k in keys},
        "reused": sum(1 for r in results if r.get("reused")),
        "summaries": [summary_path(ws, r["date"]) for r in results],
    }
