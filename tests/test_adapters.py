from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from typer.testing import CliRunner

from cg4ctr_tasks import storage
from cg4ctr_tasks.adapters import import_cg4ctr_json, import_tianchi
from cg4ctr_tasks.cli import app
from cg4ctr_tasks.contracts import CREATIVES, ITEMS, Validation, validate_table
from cg4ctr_tasks.errors import UserError
from cg4ctr_tasks.ingest import ingest
from cg4ctr_tasks.workspace import Workspace

# (item_id, image_name, ds, pv, clk): the CreativeRanking layout, tab-separated
TIANCHI = [
    ("1001", "1001_a.jpg", 20200801, 120, 6),
    ("1001", "1001_b.jpg", 20200801, 80, 1),
    ("1002", "1002_a.jpg", 20200801, 300, 9),
    ("1001", "1001_a.jpg", 20200802, 100, 4),
    ("1002", "1002_a.jpg", 20200802, 50, 2),
    ("1002", "1002_c.jpg", 20200802, 70, 3),
]


def write_tianchi(folder: Path, rows: list[tuple], header: bool) -> tuple[Path, Path]:
    images = folder / "images"
    images.mkdir(parents=True)
    for name in {r[1] for r in rows}:
        storage.write_png(images / name, np.full((8, 8, 3), 200, np.uint8))
    lines = ["item_id\timage_name\tds\tpv\tclk"] if header else []
    lines += ["\t".join(str(v) for v in row) for row in rows]
    tsv = folder / "train.txt"
    tsv.write_text("\n".join(lines) + "\n")
    return tsv, images


@pytest.mark.parametrize("header", [True, False])
def test_tianchi_file_becomes_ctr_tables(tmp_path: Path, header: bool) -> None:
    tsv, images = write_tianchi(tmp_path / "public", TIANCHI, header)
    ws = Workspace.open(tmp_path / "ws")
    figures = import_tianchi(ws, str(tsv), str(images), "2020-01-01")
    assert figures["dates"] == ["2020-08-01", "2020-08-02"]
    assert figures["creatives"] == 4 and figures["items"] == 2
    totals = ingest(ws, "2020-08-01", "2020-08-02")
    assert totals["accepted"] == len(TIANCHI)
    assert totals["impressions"] == sum(r[3] for r in TIANCHI)
    per_creative = storage.read_parquet(ws.ctr_creative_table("2020-08-02"))
    assert per_creative.to_dict("records") == [
        {"item_id": "1001", "creative_id": "1001_a", "impressions": 100, "clicks": 4},
        {"item_id": "1002", "creative_id": "1002_a", "impressions": 50, "clicks": 2},
        {"item_id": "1002", "creative_id": "1002_c", "impressions": 70, "clicks": 3},
    ]
    validation = Validation()
    for path, contract in ((ws.items_table, ITEMS), (ws.creatives_table, CREATIVES)):
        table = pa.Table.from_pandas(storage.read_parquet(path), preserve_index=False)
        validate_table(table, contract, validation)
    creatives = storage.read_parquet(ws.creatives_table)
    limits = ws.params.storage
    for uri in creatives["image_uri"]:
        image = storage.read_image_array(
            ws.resolve(uri), limits.max_image_bytes, limits.max_image_pixels
        )
        assert image.shape == (8, 8, 3)


def test_tianchi_day_numbers_and_bad_rows(tmp_path: Path) -> None:
    rows = [(str(i % 40), f"{i % 40}_{i}.jpg", 3 + i % 2, 20, 1) for i in range(200)]
    rows.append(("7", "../evil.jpg", 3, 10, 1))  # unsafe creative id: quarantined by ingest
    rows.append(("8", "8_x.jpg", 4, 5, 9))  # clicks > pv: quarantined by ingest
    tsv, images = write_tianchi(tmp_path / "public", rows, header=False)
    ws = Workspace.open(tmp_path / "ws")
    figures = import_tianchi(ws, str(tsv), str(images), "2021-06-30")
    assert figures["dates"] == ["2021-06-30", "2021-07-01"]
    assert figures["creatives_with_unsafe_ids"] == 1
    totals = ingest(ws, "2021-06-30", "2021-07-01")
    assert totals["rows_read"] == 202
    assert totals["quarantined"] == 2 and totals["accepted"] == 200
    with pytest.raises(UserError, match="exists; pass --force"):
        import_tianchi(ws, str(tsv), str(images), "2021-06-30")


def test_cg4ctr_json_becomes_a_log_partition(tmp_path: Path) -> None:
    document = {
        "5001": [
            {"creative_id": "c1", "creative_image_hash": "ab12", "exp_impression_cnt": 400.0,
             "exp_click_cnt": 12},
            {"creative_id": "c2", "creative_image_hash": "cd34", "exp_impression_cnt": 90,
             "exp_click_cnt": 2},
        ],
        "5002": [{"creative_id": "c3", "exp_impression_cnt": 10, "exp_click_cnt": 0}],
    }  # fmt: skip
    source = tmp_path / "cg4ctr.json"
    source.write_text(json.dumps(document))
    ws = Workspace.open(tmp_path / "ws")
    runner = CliRunner()
    result = runner.invoke(
        app,
        ["import-logs", "-w", str(ws.root), "--format", "cg4ctr-json", "--source", str(source),
         "--date", "2024-01-05", "--json"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["rows"] == 3
    summary = ingest(ws, "2024-01-05")
    assert summary["accepted"] == 3 and summary["impressions"] == 500 and summary["clicks"] == 14
    with pytest.raises(UserError, match="not valid JSON"):
        source.write_text("{")
        import_cg4ctr_json(ws, str(source), "2024-01-05")
