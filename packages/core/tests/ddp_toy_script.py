"""Trains the toy classifier with DDP on 2 CPU processes (gloo); used by test_core_distributed.

python ddp_toy_script.py OUT_DIR
Each rank writes OUT_DIR/rank{N}.json: its view of the run (steps, samples seen, metrics)
and a fingerprint of its final parameters.
"""

import json
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from polyfm.core import Classification, OptimConfig, build_trainer
from polyfm.core.toy import ToyDataModule, ToyEncoder


class SamplesSeen(Callback):
    """Which training rows this rank saw: DDP must shard them, not repeat them."""

    def __init__(self) -> None:
        self.rows: list[list[float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.current_epoch == 0:
            self.rows.extend(batch["input"][:, 0].tolist())


def main() -> None:
    out = Path(sys.argv[1])
    torch.set_num_threads(1)
    L.seed_everything(7)
    task = Classification(ToyEncoder(), 3, optim=OptimConfig(lr=1e-2, warmup_steps=2))
    seen = SamplesSeen()
    trainer = build_trainer(
        max_epochs=2, default_root_dir=str(out), accelerator="cpu", devices=2, strategy="ddp", enable_progress_bar=False,
        loggers=("csv",), callbacks=[seen], monitor="val/loss",
    )  # fmt: skip
    data = ToyDataModule(n_train=128, n_val=32, batch_size=16)
    trainer.fit(task, data)
    params = torch.cat([p.detach().flatten() for p in task.parameters()])
    report = {
        "world_size": trainer.world_size,
        "global_step": trainer.global_step,
        "rows_seen": seen.rows,
        "val_loss": float(trainer.callback_metrics["val/loss"]),
        "param_sum": float(params.double().sum()),
        "param_norm": float(params.double().norm()),
        "best_checkpoint": trainer.checkpoint_callback.best_model_path,
    }
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main()
