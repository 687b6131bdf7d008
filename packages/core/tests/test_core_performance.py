"""The measurement side of the GPU path, checked on CPU: host syncs found in a step,
the data-wait fraction of a training loop, counted FLOPs and per-case memory."""

from __future__ import annotations

import collections
import time

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from polyfm.core import Classification, OptimConfig, build_trainer
from polyfm.core.bench import ResidentPeak, count_flops
from polyfm.core.performance import HostSyncCounter, UtilisationMonitor, expected_host_sync
from polyfm.core.toy import ToyDataModule, ToyEncoder


def test_host_sync_counter_finds_reads_and_data_dependent_ops():
    x = torch.randn(16)
    with HostSyncCounter() as counter:
        if (x > 0).any():  # bool(tensor)
            pass
        x.sum().item()
        x[x > 0]  # boolean-mask indexing: the output size needs the data
        x.nonzero()
        x.tolist()
        x.to("cpu")  # already on the host: no copy, no sync
        torch.where(x > 0, x, 0.0)  # three-argument where: elementwise, no sync
        with expected_host_sync():
            bool(x.sum() > 0)
    names = [name for name, _ in counter.calls]
    assert names == ["__bool__", "item", "__getitem__", "nonzero", "tolist"]
    assert all(__file__ in where for _, where in counter.calls), counter.calls


class _CountSteps(Callback):
    """Counts host syncs over whole loop iterations after warm-up, the optimizer's own
    CPU-only bookkeeping aside (on CUDA the tasks use fused AdamW)."""

    def __init__(self, start: int, stop: int) -> None:
        self.start, self.stop, self.counter = start, stop, HostSyncCounter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.start:
            self.counter.__enter__()
        if batch_idx == self.stop:
            self.counter.__exit__(None, None, None)


def test_training_loop_has_no_host_sync_per_step(tmp_path):
    """The step (forward, loss, non-finite guard, logging, backward, clipping) and the
    progress bar between steps make the host wait for the device at most every
    ``metrics_every_n_steps`` steps: here, over 8 steps that avoid a bar refresh, never."""
    L.seed_everything(0)
    task = Classification(ToyEncoder(), 3, optim=OptimConfig(lr=1e-2))
    watch = _CountSteps(start=1, stop=9)
    trainer = build_trainer(max_steps=10, default_root_dir=str(tmp_path), loggers=("csv",), log_every_n_steps=50,
                            enable_checkpointing=False, callbacks=[watch], limit_val_batches=0)  # fmt: skip
    trainer.fit(task, ToyDataModule(batch_size=16))
    syncs = collections.Counter(call for call in watch.counter.calls if "optimizer_step" not in call[1])
    assert not syncs, syncs.most_common(5)


class _SlowDataModule(ToyDataModule):
    def __init__(self, delay_s: float) -> None:
        super().__init__(batch_size=8)
        self.delay_s = delay_s

    def train_dataloader(self):
        for batch in super().train_dataloader():
            time.sleep(self.delay_s)
            yield batch


def _wait_fraction(tmp_path, delay_s: float) -> dict[str, float]:
    monitor = UtilisationMonitor(skip_first=2)
    trainer = build_trainer(max_steps=14, default_root_dir=str(tmp_path), loggers=(), enable_progress_bar=False,
                            enable_checkpointing=False, callbacks=[monitor], limit_val_batches=0)  # fmt: skip
    trainer.fit(Classification(ToyEncoder(), 3), _SlowDataModule(delay_s))
    return monitor.summary


def test_utilisation_monitor_tells_a_data_bound_loop_from_a_compute_bound_one(tmp_path):
    # the delay dwarfs the toy step (~10 ms) even on a loaded machine, where steps stretch several-fold
    delay_s = 0.25
    slow = _wait_fraction(tmp_path / "slow", delay_s=delay_s)
    fast = _wait_fraction(tmp_path / "fast", delay_s=0.0)
    assert slow["steps"] == fast["steps"] == 12
    assert slow["data_wait_fraction"] > 0.6, slow
    # the extra wait per step is the loader's delay, not the step's time
    assert 0.9 * delay_s < slow["data_wait_s_per_step"] - fast["data_wait_s_per_step"] < delay_s + 0.1, (fast, slow)
    assert fast["samples_per_s"] > 2 * slow["samples_per_s"]


def test_flops_are_counted_for_forward_and_backward():
    layer, x = torch.nn.Linear(64, 32, bias=False), torch.randn(16, 64, requires_grad=True)
    forward = 2 * 16 * 64 * 32
    assert count_flops(lambda: layer(x)) == forward
    assert count_flops(lambda: layer(x).sum().backward()) == 3 * forward  # input and weight gradients


def test_resident_peak_sees_a_case_allocation():
    with ResidentPeak() as peak:
        block = torch.ones(256, 1024, 1024 // 4)  # 256 MB of float32, touched
        del block
    assert peak.mb is not None and 200 < peak.mb < 400, peak.mb
