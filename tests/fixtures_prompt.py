"""Fixtures for the prompt model tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture()
def one_torch_thread() -> Iterator[None]:
    """Tiny models: a second intra-op thread only adds sync cost on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
