"""Data contracts: the schema of every table artifact, the click-log row checks, and the Great
Expectations suites that validate both.

Row checks run vectorised with pyarrow/numpy (ids are checked once per distinct value of a
dictionary-encoded column), because GE on pandas slows down past ~1M rows (DESIGN.md section 6).
GE then validates the per-row ``reason`` column computed in bulk, one expectation per check, and
renders the results as HTML Data Docs. Small output tables are validated by GE directly on their
columns. GE takes seconds to import, so it is imported only inside :class:`Validation`.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from cg4ctr_tasks.errors import UserError
from cg4ctr_tasks.storage import SAFE_ID_PATTERN

LOG_COLUMNS = (
    "event_date",
    "item_id",
    "creative_id",
    "user_group",
    "device",
    "hour",
    "impressions",
    "clicks",
)
STRING_COLUMNS = ("event_date", "item_id", "creative_id", "user_group", "device")
ID_COLUMNS = ("item_id", "creative_id", "user_group", "device")
INTEGER_COLUMNS = ("hour", "impressions", "clicks")
LOG_KEY = ("event_date", "item_id", "creative_id", "user_group", "device", "hour")

OK = "ok"
# Quarantine reasons in priority order: a rejected row carries the first check it fails.
REASONS: dict[str, str] = {
    "malformed_row": "each line has exactly one field per header column",
    "missing_value": "every column holds a value",
    "unsafe_id": (
        f"item_id, creative_id, user_group and device match {SAFE_ID_PATTERN}, "
        "do not start with a dot and hold no '..'"
    ),
    "bad_date": "event_date is a calendar date written YYYY-MM-DD",
    "date_outside_partition": "event_date equals the partition date (dt=YYYY-MM-DD)",
    "non_integer_count": "impressions and clicks are integers (digits only in text formats)",
    "negative_count": "impressions and clicks are >= 0",
    "clicks_exceed_impressions": "clicks <= impressions",
    "bad_hour": "hour is an integer in 0..23",
    "duplicate_key": (
        "(event_date, item_id, creative_id, user_group, device, hour) occurs once per date; "
        "the first copy in file-name then row order is kept, later copies are quarantined"
    ),
}
REASON_CODES: tuple[str, ...] = (OK, *REASONS)
_CODE = {name: np.int8(i) for i, name in enumerate(REASON_CODES)}
_MAX_COUNT_DIGITS = 18  # int64-safe; longer digit strings are rejected as non-integer


def reason_code(name: str) -> np.int8:
    return _CODE[name]


@dataclass(frozen=True)
class CheckedRows:
    """Per-row verdicts of one batch plus the parsed integer columns (0 where invalid)."""

    reasons: np.ndarray  # int8 codes into REASON_CODES; 0 = accepted so far
    hour: np.ndarray
    impressions: np.ndarray
    clicks: np.ndarray


def _numpy_bool(values: pa.Array | pa.ChunkedArray) -> np.ndarray:
    return np.asarray(values.to_numpy(zero_copy_only=False), dtype=bool)


def _per_value(column: pa.ChunkedArray, verdict: Any) -> np.ndarray:
    """Apply ``verdict`` (Array -> numpy bool) once per distinct value, then spread to rows."""
    parts = []
    for chunk in column.chunks:
        if not pa.types.is_dictionary(chunk.type):
            chunk = chunk.dictionary_encode()
        values = verdict(chunk.dictionary) if len(chunk.dictionary) else np.zeros(0, bool)
        if len(values) == 0:
            parts.append(np.zeros(len(chunk), dtype=bool))
            continue
        parts.append(values[chunk.indices.fill_null(0).to_numpy(zero_copy_only=False)])
    return np.concatenate(parts) if parts else np.zeros(0, dtype=bool)


def _unsafe_ids(values: pa.Array) -> np.ndarray:
    """Vectorised twin of ``storage.safe_id`` (tested against it)."""
    good = pc.and_(
        pc.match_substring_regex(values, f"^{SAFE_ID_PATTERN}$"),
        pc.and_(
            pc.invert(pc.starts_with(values, ".")), pc.invert(pc.match_substring(values, ".."))
        ),
    )
    return ~_numpy_bool(good.fill_null(False))


def _date_verdicts(partition_date: str) -> tuple[Any, Any]:
    pattern = re.compile(r"^\d{4}-\d{2}-\d{2}$")

    def parses(text: str | None) -> bool:
        if text is None or not pattern.match(text):
            return False
        try:
            date.fromisoformat(text)
        except ValueError:
            return False
        return True

    def bad(values: pa.Array) -> np.ndarray:
        return np.array([not parses(v) for v in values.to_pylist()], dtype=bool)

    def outside(values: pa.Array) -> np.ndarray:
        return np.array([v != partition_date for v in values.to_pylist()], dtype=bool)

    return bad, outside


def _parse_integers(column: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """(values, not_integer) for an integer, floating or text column; nulls count as 0."""
    kind = column.type
    if pa.types.is_dictionary(kind):
        column = column.cast(kind.value_type)
        kind = kind.value_type
    if pa.types.is_integer(kind):
        values = column.cast(pa.int64()).fill_null(0).to_numpy()
        return np.array(values, dtype=np.int64), np.zeros(len(column), dtype=bool)
    if pa.types.is_floating(kind):
        floats = np.asarray(column.fill_null(0).to_numpy(zero_copy_only=False), dtype=np.float64)
        ok = np.isfinite(floats) & (np.floor(floats) == floats) & (np.abs(floats) < 2.0**62)
        return np.where(ok, floats, 0).astype(np.int64), ~ok
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        text = column.fill_null("0")
        ok = _numpy_bool(pc.match_substring_regex(text, rf"^-?[0-9]{{1,{_MAX_COUNT_DIGITS}}}$"))
        cleaned = pc.if_else(pa.array(ok), text, "0")
        return np.array(cleaned.cast(pa.int64()).to_numpy(), dtype=np.int64), ~ok
    return np.zeros(len(column), dtype=np.int64), np.ones(len(column), dtype=bool)


def check_rows(table: pa.Table, partition_date: str) -> CheckedRows:
    """Row verdicts for a log batch holding all of LOG_COLUMNS (any extra columns ignored).

    Every check runs over whole columns; string checks run once per distinct value. The
    duplicate-key check needs all earlier batches of the date, so the caller applies it.
    """
    rows = table.num_rows
    reasons = np.zeros(rows, dtype=np.int8)

    def mark(name: str, failing: np.ndarray) -> None:
        reasons[(reasons == 0) & failing] = _CODE[name]

    missing = np.zeros(rows, dtype=bool)
    for name in LOG_COLUMNS:
        missing |= _numpy_bool(table.column(name).is_null())
    mark("missing_value", missing)
    unsafe = np.zeros(rows, dtype=bool)
    for name in ID_COLUMNS:
        unsafe |= _per_value(table.column(name), _unsafe_ids)
    mark("unsafe_id", unsafe)
    bad_date, outside = _date_verdicts(partition_date)
    mark("bad_date", _per_value(table.column("event_date"), bad_date))
    mark("date_outside_partition", _per_value(table.column("event_date"), outside))
    impressions, impressions_bad = _parse_integers(table.column("impressions"))
    clicks, clicks_bad = _parse_integers(table.column("clicks"))
    mark("non_integer_count", impressions_bad | clicks_bad)
    mark("negative_count", (impressions < 0) | (clicks < 0))
    mark("clicks_exceed_impressions", clicks > impressions)
    hour, hour_bad = _parse_integers(table.column("hour"))
    mark("bad_hour", hour_bad | (hour < 0) | (hour > 23))
    rejected = reasons != 0
    for values in (hour, impressions, clicks):
        values[rejected] = 0
    return CheckedRows(reasons=reasons, hour=hour, impressions=impressions, clicks=clicks)


def reason_frame(codes: np.ndarray) -> pd.DataFrame:
    """The frame GE validates: one categorical ``reason`` column (cheap to hash and scan)."""
    categories = pd.Index(list(REASON_CODES))
    return pd.DataFrame({"reason": pd.Categorical.from_codes(codes.astype(np.int8), categories)})


# --- table contracts -------------------------------------------------------------------------

ColumnKind = str  # "id" | "string" | "int" | "float" | "tokens"


@dataclass(frozen=True)
class TableContract:
    """Columns (in order) with their kind, the unique key, and numeric invariants."""

    name: str
    columns: dict[str, ColumnKind]
    key: tuple[str, ...]
    non_negative: tuple[str, ...] = ()
    ordered_pairs: tuple[tuple[str, str], ...] = field(default=())  # (a, b): a <= b


CTR = TableContract(
    "ctr",
    {
        "item_id": "id",
        "creative_id": "id",
        "user_group": "id",
        "impressions": "int",
        "clicks": "int",
    },
    key=("item_id", "creative_id", "user_group"),
    non_negative=("impressions", "clicks"),
    ordered_pairs=(("clicks", "impressions"),),
)
CTR_CREATIVES = TableContract(
    "ctr_creatives",
    {"item_id": "id", "creative_id": "id", "impressions": "int", "clicks": "int"},
    key=("item_id", "creative_id"),
    non_negative=("impressions", "clicks"),
    ordered_pairs=(("clicks", "impressions"),),
)
ITEMS = TableContract(
    "items",
    {"item_id": "id", "category": "string", "title": "string", "image_uri": "string"},
    key=("item_id",),
)
CREATIVES = TableContract(
    "creatives",
    {"creative_id": "id", "item_id": "id", "image_uri": "string", "round": "int"},
    key=("creative_id",),
    non_negative=("round",),
)
CAPTIONS = TableContract(
    "captions",
    {"creative_id": "id", "image_uri": "string", "caption": "string", "tokens": "tokens"},
    key=("creative_id",),
)
CONTRACTS: dict[str, TableContract] = {
    c.name: c for c in (CTR, CTR_CREATIVES, ITEMS, CREATIVES, CAPTIONS)
}

# GE 1.24 cannot name pandas 3's default string dtype (StringDtype("pyarrow", na_value=nan)) in
# expect_column_values_to_be_in_type_list: "str"/"string" resolve to other dtypes and fail. So
# GE checks the numeric dtypes and validate_table checks the exact Arrow schema itself.
_NUMPY_KINDS = {"int": ("int64",), "float": ("float64",)}


def arrow_schema(contract: TableContract) -> pa.Schema:
    types = {
        "id": pa.string(),
        "string": pa.string(),
        "int": pa.int64(),
        "float": pa.float64(),
        "tokens": pa.list_(pa.string()),
    }
    return pa.schema([(name, types[kind]) for name, kind in contract.columns.items()])


# --- Great Expectations ----------------------------------------------------------------------


class _Engine:
    """The process-wide ephemeral GE context with its suites (built once: ~40 ms per
    expectation) and in-memory stores. Nothing is read from or written to a GE project folder.
    """

    def __init__(self) -> None:
        import great_expectations as gx
        from great_expectations.data_context.types.base import (
            DataContextConfig,
            InMemoryStoreBackendDefaults,
            ProgressBarsConfig,
        )

        self.gx = gx
        config = DataContextConfig(
            store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
            analytics_enabled=False,
            progress_bars=ProgressBarsConfig(globally=False),
        )
        self.context = gx.get_context(mode="ephemeral", project_config=config)
        self.source = self.context.data_sources.add_pandas("cg4ctr")
        self.definitions: dict[str, Any] = {}

    def definition(self, suite_name: str, build: Any) -> Any:
        if suite_name not in self.definitions:
            gx = self.gx
            suite = self.context.suites.add(gx.ExpectationSuite(name=suite_name))
            for expectation in build():
                suite.add_expectation(expectation)
            asset = self.source.add_dataframe_asset(suite_name)
            batch = asset.add_batch_definition_whole_dataframe(suite_name)
            self.definitions[suite_name] = self.context.validation_definitions.add(
                gx.ValidationDefinition(name=suite_name, data=batch, suite=suite)
            )
        return self.definitions[suite_name]


@functools.cache
def _engine() -> _Engine:
    return _Engine()


class Validation:
    """One stage run's validations: results kept in memory, HTML Data Docs on request.

    Starting a run forgets the previous run's results, so each run's Data Docs show only it.
    """

    def __init__(self) -> None:
        self.engine = _engine()
        self._gx = self.engine.gx
        self.context = self.engine.context
        store = self.context.validation_results_store
        for key in store.list_keys():
            store.remove_key(key)
        self.runs = 0

    def _definition(self, suite_name: str, build: Any) -> Any:
        return self.engine.definition(suite_name, build)

    def _run(self, suite_name: str, build: Any, frame: pd.DataFrame, run_name: str) -> Any:
        from great_expectations.core.run_identifier import RunIdentifier

        definition = self._definition(suite_name, build)
        self.runs += 1
        return definition.run(
            batch_parameters={"dataframe": frame},
            result_format="SUMMARY",
            run_id=RunIdentifier(run_name=run_name),
        )

    def check_reasons(self, codes: np.ndarray, run_name: str) -> dict[str, int]:
        """Validate a chunk's per-row reason codes; return GE's failing-row count per check."""
        gxe = self._gx.expectations

        def build() -> list[Any]:
            out = [gxe.ExpectColumnValuesToNotBeNull(column="reason")]
            for name, text in REASONS.items():
                out.append(
                    gxe.ExpectColumnValuesToNotBeInSet(
                        column="reason",
                        value_set=[name],
                        description=f"{name}: {text}",
                        meta={"reason": name},
                    )
                )
            return out

        result = self._run("click_log_rows", build, reason_frame(codes), run_name)
        counts: dict[str, int] = {}
        for item in result.results:
            name = (item.expectation_config.meta or {}).get("reason")
            if name is not None:
                counts[name] = int(item.result.get("unexpected_count") or 0)
        return counts

    def check_table(self, frame: pd.DataFrame, contract: TableContract, run_name: str) -> list[str]:
        """Validate a table against its contract; return one line per failed expectation."""
        gxe = self._gx.expectations

        def build() -> list[Any]:
            out: list[Any] = [
                gxe.ExpectTableColumnsToMatchOrderedList(column_list=list(contract.columns))
            ]
            for name, kind in contract.columns.items():
                if kind not in _NUMPY_KINDS:  # a null turns an int64 column to float64
                    out.append(gxe.ExpectColumnValuesToNotBeNull(column=name))
                else:
                    out.append(
                        gxe.ExpectColumnValuesToBeInTypeList(
                            column=name, type_list=list(_NUMPY_KINDS[kind])
                        )
                    )
            for name in contract.non_negative:
                out.append(gxe.ExpectColumnValuesToBeBetween(column=name, min_value=0))
            for low, high in contract.ordered_pairs:
                out.append(
                    gxe.ExpectColumnPairValuesAToBeGreaterThanB(
                        column_A=high, column_B=low, or_equal=True
                    )
                )
            if len(contract.key) == 1:
                out.append(gxe.ExpectColumnValuesToBeUnique(column=contract.key[0]))
            else:
                out.append(gxe.ExpectCompoundColumnsToBeUnique(column_list=list(contract.key)))
            return out

        result = self._run(f"table_{contract.name}", build, frame, run_name)
        failures = []
        for item in result.results:
            if not item.success:
                config = item.expectation_config
                shown = item.result.get("partial_unexpected_list") or item.result.get(
                    "observed_value"
                )
                failures.append(f"{config.type}({config.kwargs}) failed; e.g. {shown!r}"[:300])
        return failures

    def write_docs(self, directory: Path) -> Path:
        """Render every validation of this run as static HTML; returns the index page."""
        site: Any = {
            "class_name": "SiteBuilder",
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            "store_backend": {
                "class_name": "TupleFilesystemStoreBackend",
                "base_directory": str(directory),
            },
        }
        if "run" in self.context.get_site_names():
            self.context.update_data_docs_site(site_name="run", site_config=site)
        else:
            self.context.add_data_docs_site(site_name="run", site_config=site)
        self.context.build_data_docs(site_names=["run"])
        _prune_static_assets(directory)
        return directory / "index.html"


def _prune_static_assets(directory: Path) -> None:
    """GE copies ~4 MB of images and fonts per site; keep only the files the pages reference."""
    static = directory / "static"
    if not static.is_dir():
        return
    referenced = "".join(
        p.read_text("utf-8", errors="replace")
        for p in directory.rglob("*")
        if p.suffix in (".html", ".css") and p.is_file()
    )
    for path in static.rglob("*"):
        if path.is_file() and path.name not in referenced:
            path.unlink()


def _plain(kind: pa.DataType) -> pa.DataType:
    """large_string/large_list as string/list: pandas 3 writes its strings as large_string."""
    if pa.types.is_large_string(kind):
        return pa.string()
    if pa.types.is_large_list(kind) or pa.types.is_list(kind):
        return pa.list_(_plain(kind.value_type))
    return kind


def _schema_text(schema: pa.Schema) -> str:
    return ", ".join(f"{f.name}: {f.type}" for f in schema)


def validate_table(table: pa.Table, contract: TableContract, validation: Validation) -> None:
    """Raise UserError naming the schema difference or every expectation a table breaks.

    Ids are checked here once per distinct value; GE's regex expectation runs Python's ``re``
    per row (seconds on a million-row aggregate), so the GE suite covers the other invariants.
    """
    expected = arrow_schema(contract)
    if [(f.name, _plain(f.type)) for f in table.schema] != [(f.name, f.type) for f in expected]:
        raise UserError(
            f"{contract.name} table has schema {_schema_text(table.schema)}, "
            f"expected {_schema_text(expected)}"
        )
    failures = [
        f"{name} holds unsafe ids"
        for name, kind in contract.columns.items()
        if kind == "id" and _per_value(table.column(name), _unsafe_ids).any()
    ]
    failures += validation.check_table(table.to_pandas(), contract, f"{contract.name}-output")
    if failures:
        raise UserError(f"{contract.name} table breaks its contract: " + "; ".join(failures))
