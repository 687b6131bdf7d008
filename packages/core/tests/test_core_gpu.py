"""The GPU path (run where CUDA is present; skipped on CPU-only CI)."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from polyfm.core import Classification, NonFiniteLossError, OptimConfig, build_trainer
from polyfm.core.toy import ToyDataModule, ToyEncoder

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_bf16_training_on_gpu_learns(tmp_path):
    L.seed_everything(0)
    task = Classification(ToyEncoder(), 3, optim=OptimConfig(lr=1e-2))
    trainer = build_trainer(max_epochs=3, default_root_dir=str(tmp_path), enable_progress_bar=False, loggers=())
    assert trainer.precision == "bf16-mixed"
    trainer.fit(task, ToyDataModule())
    assert trainer.test(task, ToyDataModule(), verbose=False)[0]["test/acc"] > 0.9


class Overflow(ToyDataModule):
    def build(self):
        train, val, test = super().build()
        train.inputs = train.inputs * 1e38  # finite in fp32, inf once squared in the trunk
        return train, val, test


def test_bf16_overflow_is_caught_as_a_non_finite_loss(tmp_path):
    task = Classification(ToyEncoder(), 3)
    trainer = build_trainer(max_epochs=1, default_root_dir=str(tmp_path), enable_progress_bar=False, loggers=())
    with pytest.raises(NonFiniteLossError, match="blob-1-"):
        trainer.fit(task, Overflow())


class OneBadSample(ToyDataModule):
    def build(self):
        train, val, test = super().build()
        train.inputs[100] = float("nan")
        return train, val, test


def test_deferred_non_finite_check_names_the_sample_and_never_checkpoints_poisoned_weights(tmp_path):
    """On CUDA the guard reads its flag a step or two late (no host sync per step), but
    resolves it before every checkpoint write: the newest checkpoint holds finite weights."""
    task = Classification(ToyEncoder(), 3)
    trainer = build_trainer(max_epochs=2, default_root_dir=str(tmp_path), enable_progress_bar=False, loggers=(), checkpoint_every_n_steps=1)
    with pytest.raises(NonFiniteLossError, match="blob-1-"):
        trainer.fit(task, OneBadSample())
    saved = sorted((tmp_path / "checkpoints").glob("*.ckpt"))
    assert saved
    for path in saved:
        state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point()), path
