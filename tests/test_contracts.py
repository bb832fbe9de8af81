from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from cg4ctr_tasks import storage
from cg4ctr_tasks.contracts import (
    CREATIVES,
    CTR,
    ITEMS,
    LOG_COLUMNS,
    REASON_CODES,
    Validation,
    _unsafe_ids,
    check_rows,
    validate_table,
)
from cg4ctr_tasks.errors import UserError
from cg4ctr_tasks.workspace import Workspace

DAY = "2026-03-01"
IDS = [
    "item-0001",
    "a",
    "A_b.c-9",
    "x" * 128,
    "v1.2",
    "",
    ".",
    "..",
    "../../etc/passwd",
    "a/b",
    "x" * 129,
    "x" * 10_000,
    ".hidden",
    "a..b",
    "é",
    "a b",
    "a\x00b",
]


def test_vectorised_id_check_agrees_with_storage_safe_id() -> None:
    unsafe = _unsafe_ids(pa.array(IDS))
    assert list(~unsafe) == [storage.is_safe_id(v) for v in IDS]


def log_table(rows: list[tuple[object, ...]]) -> pa.Table:
    arrays = []
    for values in zip(*rows, strict=True):
        array = pa.array(values)
        arrays.append(array.dictionary_encode() if pa.types.is_string(array.type) else array)
    return pa.table(arrays, names=list(LOG_COLUMNS))


def test_check_rows_gives_the_first_failing_check() -> None:
    table = log_table(
        [
            (DAY, "i", "c", "g", "ios", 3, 10, 2),  # ok
            (DAY, None, "c", "g", "ios", 3, 10, 2),  # missing_value
            (DAY, "../x", "c", "g", "ios", 3, 10, 2),  # unsafe_id
            ("2026-3-1", "i", "c", "g", "ios", 3, 10, 2),  # bad_date
            ("2026-03-02", "i", "c", "g", "ios", 3, 10, 2),  # date_outside_partition
            (DAY, "i", "c", "g", "ios", 3, -1, -2),  # negative_count
            (DAY, "i", "c", "g", "ios", 3, 1, 2),  # clicks_exceed_impressions
            (DAY, "i", "c", "g", "ios", -1, 1, 0),  # bad_hour
            ("2026-02-30", "../x", "c", "g", "ios", 99, -1, 5),  # unsafe_id comes first
        ]
    )
    checked = check_rows(table, DAY)
    assert [REASON_CODES[c] for c in checked.reasons] == [
        "ok",
        "missing_value",
        "unsafe_id",
        "bad_date",
        "date_outside_partition",
        "negative_count",
        "clicks_exceed_impressions",
        "bad_hour",
        "unsafe_id",
    ]
    assert checked.impressions.tolist() == [10, 0, 0, 0, 0, 0, 0, 0, 0]


def test_text_and_float_counts_must_be_integers() -> None:
    for counts, bad in (
        (["5", "1.5", "2.0", "abc", "-3", "9" * 19], [0, 1, 1, 1, 0, 1]),
        ([5.0, 1.5, 2.0, float("nan"), -3.0, 1e30], [0, 1, 0, 1, 0, 1]),
    ):
        n = len(counts)
        table = log_table([(DAY, "i", f"c{k}", "g", "ios", 1, counts[k], 0) for k in range(n)])
        reasons = [REASON_CODES[c] for c in check_rows(table, DAY).reasons]
        expected = ["non_integer_count" if b else "ok" for b in bad]
        expected[4] = "negative_count"
        assert reasons == expected


def test_ge_counts_equal_the_bulk_verdicts() -> None:
    rng = np.random.default_rng(0)
    codes = rng.integers(0, len(REASON_CODES), 5_000).astype(np.int8)
    counts = Validation().check_reasons(codes, "test")
    expected = np.bincount(codes, minlength=len(REASON_CODES))
    assert counts == {name: int(expected[i]) for i, name in enumerate(REASON_CODES) if i}


def ctr_table(**overrides: list[object]) -> pa.Table:
    columns: dict[str, list[object]] = {
        "item_id": ["i1", "i1", "i2"],
        "creative_id": ["c1", "c2", "c3"],
        "user_group": ["g0", "g0", "g1"],
        "impressions": [10, 5, 0],
        "clicks": [1, 5, 0],
    }
    columns.update(overrides)
    types = {"impressions": pa.int64(), "clicks": pa.int64()}
    return pa.table({k: pa.array(v, types.get(k, pa.string())) for k, v in columns.items()})


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"clicks": [1, 6, 0]}, "column_pair_values_a_to_be_greater_than_b"),
        ({"creative_id": ["c1", "c1", "c3"]}, "compound_columns_to_be_unique"),
        ({"impressions": [10, -5, 0], "clicks": [1, -6, 0]}, "to_be_between"),
        ({"user_group": ["g0", "../g", "g1"]}, "user_group holds unsafe ids"),
    ],
)
def test_output_contract_catches_broken_tables(overrides: dict, message: str) -> None:
    validation = Validation()
    validate_table(ctr_table(), CTR, validation)
    with pytest.raises(UserError, match=message):
        validate_table(ctr_table(**overrides), CTR, validation)


def test_schema_mismatch_is_named() -> None:
    table = ctr_table().set_column(3, "impressions", pa.array([1.0, 2.0, 3.0]))
    with pytest.raises(UserError, match="impressions: double"):
        validate_table(table, CTR, Validation())


def test_tiny_world_public_tables_meet_their_contracts(tiny_world: Path) -> None:
    ws = Workspace.open(tiny_world)
    validation = Validation()
    for path, contract in ((ws.items_table, ITEMS), (ws.creatives_table, CREATIVES)):
        table = pa.Table.from_pandas(storage.read_parquet(path), preserve_index=False)
        validate_table(table.select(list(contract.columns)), contract, validation)
