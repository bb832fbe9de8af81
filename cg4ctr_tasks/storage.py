"""Storage: fsspec paths (local or s3://), atomic writes, safe ids and guarded image reads.

Every stage writes through these helpers so that a crash never leaves a half-written output in
place (temp + rename locally; S3 PUTs are atomic per object) and no external string becomes a
path before it has been checked.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from cg4ctr_tasks.errors import RejectedInput

SAFE_ID_PATTERN = r"[A-Za-z0-9_.-]{1,128}"
_SAFE_ID = re.compile(rf"^{SAFE_ID_PATTERN}$")


def safe_id(value: object, what: str = "id") -> str:
    """Return ``value`` if it may become a file name, else raise naming what was wrong.

    Allowed: 1-128 of ``[A-Za-z0-9_.-]``, not ``.``/``..`` and not starting with a dot, so an
    id can never climb out of its folder or hide as a dotfile.
    """
    text = str(value)
    shown = text if len(text) <= 60 else text[:57] + "..."
    if not _SAFE_ID.match(text):
        raise RejectedInput(
            f"unsafe {what} {shown!r}: ids must match {SAFE_ID_PATTERN} ({len(text)} chars given)"
        )
    if text.startswith(".") or ".." in text:
        raise RejectedInput(f"unsafe {what} {shown!r}: dots may not start an id or repeat")
    return text


def is_safe_id(value: object) -> bool:
    try:
        safe_id(value)
    except RejectedInput:
        return False
    return True


def is_remote(url: str | Path) -> bool:
    return "://" in str(url) and not str(url).startswith("file://")


def url_to_fs(url: str | Path, **storage_options: Any) -> tuple[fsspec.AbstractFileSystem, str]:
    """fsspec filesystem + path; S3 options (endpoint, credentials) come from the environment."""
    text = str(url)
    if text.startswith("s3://"):
        endpoint = os.environ.get("CG4CTR_S3_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint and "client_kwargs" not in storage_options:
            storage_options["client_kwargs"] = {"endpoint_url": endpoint}
    fs, path = fsspec.core.url_to_fs(text, **storage_options)
    return fs, path


def join(base: str | Path, *parts: str) -> str:
    """Join path parts; each part that is not a fixed name must already be a safe id."""
    text = str(base).rstrip("/")
    for part in parts:
        for piece in str(part).split("/"):
            if piece in ("", ".", ".."):
                raise RejectedInput(f"unsafe path component {part!r} under {base}")
        text = f"{text}/{part}"
    return text


def exists(url: str | Path) -> bool:
    fs, path = url_to_fs(url)
    return bool(fs.exists(path))


def makedirs(url: str | Path) -> None:
    fs, path = url_to_fs(url)
    fs.makedirs(path, exist_ok=True)


@contextlib.contextmanager
def atomic_local_path(target: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success rename it over ``target``.

    Works for files and directories. On error the temporary is removed and any previous
    ``target`` stays in place untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}{suffix}"
    try:
        yield tmp
        if tmp.is_dir() and target.is_dir():
            old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(target, old)
            os.replace(tmp, target)
            _remove(old)
        else:
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            _remove(tmp)


def _remove(path: Path) -> None:
    if path.is_dir():
        import shutil

        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def write_bytes(url: str | Path, data: bytes) -> None:
    """Write bytes atomically: temp + rename locally, a single PUT on object stores."""
    if is_remote(url):
        fs, path = url_to_fs(url)
        fs.pipe_file(path, data)
        return
    with atomic_local_path(url) as tmp:
        tmp.write_bytes(data)


def read_bytes(url: str | Path, max_bytes: int | None = None) -> bytes:
    fs, path = url_to_fs(url)
    if max_bytes is not None:
        size = fs.size(path)
        if size is not None and size > max_bytes:
            raise RejectedInput(f"{url}: {size} bytes exceeds the limit of {max_bytes}")
    data: bytes = fs.cat_file(path)
    return data


def write_text(url: str | Path, text: str) -> None:
    write_bytes(url, text.encode("utf-8"))


def write_parquet(url: str | Path, frame: pd.DataFrame | pa.Table) -> None:
    table = (
        frame if isinstance(frame, pa.Table) else pa.Table.from_pandas(frame, preserve_index=False)
    )
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    write_bytes(url, sink.getvalue())


def read_parquet(url: str | Path, columns: list[str] | None = None) -> pd.DataFrame:
    fs, path = url_to_fs(url)
    with fs.open(path, "rb") as handle:
        return pq.read_table(handle, columns=columns).to_pandas()


def decode_image(data: bytes, source: str, max_pixels: int) -> Image.Image:
    """Decode image bytes to RGB with a pixel limit checked *before* the pixels are decoded."""
    try:
        with Image.open(io.BytesIO(data)) as probe:
            width, height = probe.size
            if width * height > max_pixels:
                raise RejectedInput(
                    f"{source}: {width}x{height} pixels exceeds the limit of {max_pixels}"
                )
            probe.verify()
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return img.convert("RGB")
    except RejectedInput:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise RejectedInput(f"{source}: decompression bomb rejected ({exc})") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise RejectedInput(f"{source}: not a readable image ({exc})") from None


def read_image(url: str | Path, max_bytes: int, max_pixels: int) -> Image.Image:
    """Read an image with a file-size limit and a pixel-count limit (decompression bombs)."""
    return decode_image(read_bytes(url, max_bytes=max_bytes), str(url), max_pixels)


def read_image_array(url: str | Path, max_bytes: int, max_pixels: int) -> np.ndarray:
    return np.asarray(read_image(url, max_bytes, max_pixels), dtype=np.uint8)


def encode_png(array: np.ndarray) -> bytes:
    sink = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(sink, format="PNG", optimize=False)
    return sink.getvalue()


def write_png(url: str | Path, array: np.ndarray) -> None:
    write_bytes(url, encode_png(array))


@contextlib.contextmanager
def staged_dir(target: str | Path, last: str | None = None) -> Iterator[Path]:
    """Yield a local folder that replaces the folder ``target`` when the block succeeds.

    Locally: an atomic rename (:func:`atomic_local_path`). On an object store there is no
    folder rename, so the old objects are removed and the folder is uploaded, the file named
    ``last`` after all others: readers that test for ``last`` never see a half-uploaded folder
    as complete. Writers stage locally because ``save_pretrained``/``save_file``/GE Data Docs
    write to local paths only.
    """
    if not is_remote(target):
        with atomic_local_path(target) as path:
            path.mkdir(parents=True)
            yield path
        return
    with tempfile.TemporaryDirectory(prefix="cg4ctr-stage-") as tmp:
        yield Path(tmp)
        fs, remote = url_to_fs(target)
        remote = remote.rstrip("/")
        if fs.exists(remote):
            fs.rm(remote, recursive=True)
        files = sorted(p for p in Path(tmp).rglob("*") if p.is_file())
        final = [p for p in files if last is not None and p.name == last and p.parent == Path(tmp)]
        rest = [p for p in files if p not in final]
        for group in (rest, final):
            if group:
                fs.put(
                    [str(p) for p in group],
                    [f"{remote}/{p.relative_to(tmp).as_posix()}" for p in group],
                )


LOCAL_CACHE_ENV = "CG4CTR_LOCAL_CACHE"


def local_cache_root() -> Path:
    """Machine-local cache of object-store folders: ``$CG4CTR_LOCAL_CACHE`` or
    ``~/.cache/cg4ctr`` (a per-machine path, like ``HF_HOME``, so not a workspace param)."""
    configured = os.environ.get(LOCAL_CACHE_ENV)
    return Path(configured) if configured else Path.home() / ".cache" / "cg4ctr"


def local_copy(url: str | Path) -> str:
    """A local folder holding the folder ``url`` (``url`` itself when local).

    ``from_pretrained``, ``load_lora_weights`` and safetensors' ``load_file`` read local
    files only. An object-store folder is downloaded once per content (key: its URL and each
    object's name, size and ETag) into :func:`local_cache_root`, so the many shards a worker
    runs share one copy and a folder overwritten in place is fetched again.
    """
    if not is_remote(url):
        return str(url)
    fs, path = url_to_fs(url)
    path = path.rstrip("/")
    fs.invalidate_cache(path)  # a listing cached earlier in this process may be stale
    listing = fs.find(path, detail=True)
    if not listing:
        raise RejectedInput(f"{url}: no such folder")
    digest = hashlib.sha256(str(url).encode())
    for name in sorted(listing):
        info = listing[name]
        digest.update(f"\0{name}\0{info.get('size')}\0{info.get('ETag', '')}".encode())
    target = local_cache_root() / "folders" / digest.hexdigest()[:32]
    if not target.is_dir():
        with atomic_local_path(target) as tmp:
            tmp.mkdir()
            names = sorted(listing)
            local = [tmp / n[len(path) + 1 :] for n in names]
            for file in local:
                file.parent.mkdir(parents=True, exist_ok=True)
            fs.get(names, [str(file) for file in local])
    return str(target)
