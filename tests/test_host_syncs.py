"""Every domain's fine-tuning step is free of host syncs written by polyfm, found on CPU.

A host sync (``.item()``, ``if tensor:``, boolean-mask indexing) makes the host wait
for the GPU and leaves the GPU idle while the next step is launched; it is the usual
reason for GPU utilisation well under 100% with a fast data pipeline. ``HostSyncCounter``
records them on any device, so this runs on CPU-only CI. Syncs inside third-party code
are listed in docs/benchmarks.md (transformers checks an attention mask's contents to
pick the flash kernel); the optimizer's CPU bookkeeping is left out (CUDA runs use fused
AdamW, which keeps its step counts on the device).
"""

from __future__ import annotations

import collections
from pathlib import Path

import lightning as L
import pytest
from lightning.pytorch.callbacks import Callback

from polyfm.core.adaptation import Adaptation
from polyfm.core.kit import installed_kits, load_kit
from polyfm.core.performance import HostSyncCounter
from polyfm.core.trainer import build_trainer

POLYFM_SOURCES = str(Path(__file__).resolve().parents[1] / "packages")


class _Watch(Callback):
    def __init__(self) -> None:
        self.counter, self.steps = HostSyncCounter(), 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 1:  # after the first step: lazy initialisation may read values once
            self.counter.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= 2:
            self.steps += 1
        if trainer.global_step == 5:
            self.counter.__exit__(None, None, None)


@pytest.mark.parametrize("domain", installed_kits(include_registered=False))
def test_domain_training_step_has_no_host_sync_of_ours(domain, tmp_path):
    kit = load_kit(domain, None, quick=True)
    L.seed_everything(0)
    task = kit.make_task(kit.make_encoder(), Adaptation())
    watch = _Watch()
    trainer = build_trainer(max_steps=5, default_root_dir=str(tmp_path), loggers=(), enable_checkpointing=False,
                            callbacks=[watch], limit_val_batches=0, enable_model_summary=False)  # fmt: skip
    task.train()
    trainer.fit(task, kit.make_finetune_data(1.0, 0))
    assert watch.steps == 4
    ours = collections.Counter(call for call in watch.counter.calls if call[1].startswith(POLYFM_SOURCES))
    assert not ours, f"host syncs in polyfm code during {domain} steps: {ours.most_common(5)}"
