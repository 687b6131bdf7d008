"""Test settings for polyfm-audio."""

from __future__ import annotations

from collections.abc import Callable, Iterator

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


def _random_batchnorm(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Random BatchNorm running statistics (mean in [-0.5, 0.5), variance in [0.5, 2)): fresh
    ones (0 and 1) leave a random-weight PANNs model's outputs nearly alike for every input."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.running_mean.copy_(torch.rand(module.num_features, generator=generator) - 0.5)
                module.running_var.copy_(0.5 + 1.5 * torch.rand(module.num_features, generator=generator))
    return model


@pytest.fixture
def random_batchnorm() -> Callable[..., torch.nn.Module]:
    """:func:`_random_batchnorm`, for tests that need outputs that differ (chunked vs whole-file equality)."""
    return _random_batchnorm
