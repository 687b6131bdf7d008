"""Trains the toy classifier deterministically; used by the kill-and-resume test.

python train_toy_script.py OUT_DIR EPOCHS SLEEP_PER_BATCH
Resumes from OUT_DIR/checkpoints/last.ckpt when it exists; writes OUT_DIR/final.safetensors.
"""

import sys
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from polyfm.core import Classification, OptimConfig, build_trainer
from polyfm.core.toy import ToyDataModule, ToyEncoder
from polyfm.core.weights import save_safetensors


class Slow(Callback):
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def on_train_batch_end(self, *args, **kwargs) -> None:
        time.sleep(self.seconds)


def main() -> None:
    out, epochs, sleep = Path(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
    torch.set_num_threads(1)
    L.seed_everything(7)
    task = Classification(ToyEncoder(dropout=0.2), 3, optim=OptimConfig(lr=1e-2, warmup_steps=3), head_dropout=0.1)
    trainer = build_trainer(
        max_epochs=epochs, default_root_dir=str(out), enable_progress_bar=False, loggers=("csv",), deterministic=True, callbacks=[Slow(sleep)]
    )
    last = out / "checkpoints" / "last.ckpt"
    trainer.fit(task, ToyDataModule(n_train=96, n_val=32, batch_size=16), ckpt_path=str(last) if last.exists() else None)
    save_safetensors(task.state_dict(), out / "final.safetensors")


if __name__ == "__main__":
    main()
