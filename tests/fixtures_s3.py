"""A real S3-protocol server for tests: moto's server mode on a free localhost port.

The session fixture ``s3_endpoint`` starts ``moto_server`` (installed with the dev extras),
creates the bucket ``S3_BUCKET``, points ``storage.url_to_fs`` at it through
``CG4CTR_S3_ENDPOINT_URL`` and sets fake credentials in the environment (never printed).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

S3_BUCKET = "cg4ctr-test"
_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_until_up(url: str, process: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"moto_server exited with code {process.returncode}")
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except (urllib.error.URLError, OSError):
            time.sleep(0.2)
    raise RuntimeError(f"moto_server did not answer on {url} within {timeout:.0f} s")


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """Endpoint URL of a running moto S3 server with the bucket ``S3_BUCKET`` created."""
    server = Path(sys.executable).with_name("moto_server")
    if not server.exists():
        pytest.skip("moto_server is not installed (pip install -e '.[dev]')")
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(
        [str(server), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    saved = {k: os.environ.get(k) for k in [*_ENV, "CG4CTR_S3_ENDPOINT_URL"]}
    try:
        _wait_until_up(f"{endpoint}/moto-api/", process)
        os.environ.update(_ENV)
        os.environ["CG4CTR_S3_ENDPOINT_URL"] = endpoint
        from cg4ctr_tasks import storage

        fs, _ = storage.url_to_fs(f"s3://{S3_BUCKET}")
        fs.mkdir(S3_BUCKET)
        yield endpoint
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
