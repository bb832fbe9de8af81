from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cg4ctr_tasks import storage
from cg4ctr_tasks.errors import RejectedInput
from cg4ctr_tasks.workspace import Workspace, round_name


@pytest.mark.parametrize("good", ["item-0001", "a", "A_b.c-9", "x" * 128, "v1.2"])
def test_safe_ids_accepted(good: str) -> None:
    assert storage.safe_id(good) == good


@pytest.mark.parametrize(
    "bad",
    [
        "",
        ".",
        "..",
        "../../etc/passwd",
        "a/b",
        "a\\b",
        "x" * 129,
        "x" * 10_000,
        ".hidden",
        "a..b",
        "é",
        "a b",
        "a\x00b",
        "/abs",
    ],
)
def test_unsafe_ids_rejected_with_a_clear_error(bad: str) -> None:
    with pytest.raises(RejectedInput, match="unsafe id"):
        storage.safe_id(bad)
    assert not storage.is_safe_id(bad)


def test_long_id_error_is_truncated_but_names_the_length() -> None:
    with pytest.raises(RejectedInput) as info:
        storage.safe_id("y" * 10_000, "creative_id")
    message = str(info.value)
    assert "creative_id" in message and "10000 chars" in message
    assert len(message) < 300


def test_join_refuses_traversal(tmp_path: Path) -> None:
    assert storage.join(str(tmp_path), "a", "b.png").endswith("/a/b.png")
    for part in ("..", "a/../../b", "", "./x"):
        with pytest.raises(RejectedInput):
            storage.join(str(tmp_path), part)


def test_workspace_paths_never_leave_the_workspace(tmp_path: Path) -> None:
    ws = Workspace.open(tmp_path)
    assert ws.round_dir(7).endswith("data/rounds/round-007")
    with pytest.raises(RejectedInput):
        ws.model_dir("../../etc")
    with pytest.raises(RejectedInput):
        ws.image_path("items", "../secret.png")
    with pytest.raises(ValueError):
        round_name(-1)


def test_atomic_write_keeps_previous_file_on_crash(tmp_path: Path) -> None:
    target = tmp_path / "out.txt"
    storage.write_text(str(target), "good")
    with pytest.raises(RuntimeError), storage.atomic_local_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash mid-write")
    assert target.read_text() == "good"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]  # no temp left behind


def test_atomic_directory_replace(tmp_path: Path) -> None:
    target = tmp_path / "dir"
    for content in ("one", "two"):
        with storage.atomic_local_path(target) as tmp:
            tmp.mkdir()
            (tmp / "f").write_text(content)
    assert (target / "f").read_text() == "two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir"]


def test_parquet_roundtrip(tmp_path: Path) -> None:
    frame = pd.DataFrame({"a": [1, 2], "b": ["x", "y"]})
    storage.write_parquet(str(tmp_path / "t.parquet"), frame)
    pd.testing.assert_frame_equal(storage.read_parquet(str(tmp_path / "t.parquet")), frame)


def _png(size: tuple[int, int], mode: str = "RGB") -> bytes:
    sink = io.BytesIO()
    Image.new(mode, size).save(sink, format="PNG")
    return sink.getvalue()


def test_read_image_limits(tmp_path: Path) -> None:
    ok = tmp_path / "ok.png"
    ok.write_bytes(_png((8, 8)))
    assert storage.read_image_array(str(ok), 10_000, 100).shape == (8, 8, 3)

    with pytest.raises(RejectedInput, match="69 bytes exceeds the limit of 10$"):
        storage.read_image(str(ok), max_bytes=10, max_pixels=100)
    with pytest.raises(RejectedInput, match="8x8 pixels exceeds"):
        storage.read_image(str(ok), max_bytes=10_000, max_pixels=63)


def test_decompression_bomb_rejected_before_decoding(tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png((20_000, 20_000), mode="1"))  # tiny file, 400 Mpx once decoded
    assert bomb.stat().st_size < 200_000
    with pytest.raises(RejectedInput, match="decompression bomb|20000x20000 pixels exceeds"):
        storage.read_image(str(bomb), max_bytes=1_000_000, max_pixels=40_000_000)


@pytest.mark.parametrize("payload", [b"", b"not an image", _png((4, 4))[:30]])
def test_corrupt_images_rejected(tmp_path: Path, payload: bytes) -> None:
    bad = tmp_path / "bad.png"
    bad.write_bytes(payload)
    with pytest.raises(RejectedInput, match="not a readable image"):
        storage.read_image(str(bad), 10_000, 10_000)


def test_png_roundtrip_is_exact(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    storage.write_png(str(tmp_path / "x.png"), array)
    np.testing.assert_array_equal(
        storage.read_image_array(str(tmp_path / "x.png"), 10**6, 10**6), array
    )


def test_staged_dir_on_s3_replaces_the_folder_only_on_success(s3_endpoint: str) -> None:
    from tests.fixtures_s3 import S3_BUCKET

    folder = f"s3://{S3_BUCKET}/staged/model"
    with storage.staged_dir(folder, last="config.json") as tmp:
        (tmp / "weights.bin").write_bytes(b"v1")
        (tmp / "config.json").write_text("{}")
    with pytest.raises(RuntimeError), storage.staged_dir(folder) as tmp:
        (tmp / "weights.bin").write_bytes(b"half-written")
        raise RuntimeError("crash while saving")
    assert storage.read_bytes(storage.join(folder, "weights.bin")) == b"v1"
    with storage.staged_dir(folder, last="config.json") as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "weights.bin").write_bytes(b"v2")
        (tmp / "config.json").write_text("{}")
    assert not storage.exists(storage.join(folder, "weights.bin"))  # old objects removed
    assert storage.read_bytes(storage.join(folder, "sub", "weights.bin")) == b"v2"


def test_local_copy_of_an_s3_folder_is_cached_by_content(
    s3_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.fixtures_s3 import S3_BUCKET

    monkeypatch.setenv(storage.LOCAL_CACHE_ENV, str(tmp_path / "cache"))
    folder = f"s3://{S3_BUCKET}/local-copy/lora"
    storage.write_bytes(storage.join(folder, "a", "weights.bin"), b"one")
    first = storage.local_copy(folder)
    assert Path(first, "a", "weights.bin").read_bytes() == b"one"
    assert storage.local_copy(folder) == first  # the shards of one worker share a copy
    storage.write_bytes(storage.join(folder, "a", "weights.bin"), b"two")
    second = storage.local_copy(folder)
    assert second != first and Path(second, "a", "weights.bin").read_bytes() == b"two"
    assert storage.local_copy(tmp_path) == str(tmp_path)  # local folders are used in place
