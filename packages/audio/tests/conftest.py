"""Test settings for polyfm-audio."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    """The test models are tiny: one intra-op thread is as fast as two on an idle CPU,
    and many times faster on a shared, loaded one (no OpenMP spin-waiting)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
