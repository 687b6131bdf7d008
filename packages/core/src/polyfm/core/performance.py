"""The GPU path, as one callback: channels_last for CNNs, opt-in torch.compile, and
TF32 matmuls. bf16 autocast comes from the Trainer's precision ("bf16-mixed", the
default on CUDA), fused AdamW from the tasks, pinned memory and persistent workers
from ``DictDataModule``."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn


def has_convolutions(module: nn.Module, dims: int = 2) -> bool:
    kind = {2: nn.Conv2d, 3: nn.Conv3d}[dims]
    return any(isinstance(m, kind) for m in module.modules())


class GpuPath(Callback):
    """Applied at ``setup``. ``channels_last``: "auto" converts models with 2D/3D
    convolutions (PANNs, ResNets, U-Nets) when training on CUDA. ``compile``: wraps the
    task's encoder/model in ``torch.compile`` (opt-in: compilation costs minutes)."""

    def __init__(self, channels_last: bool | str = "auto", compile: bool = False, compile_mode: str | None = None) -> None:
        self.channels_last, self.compile, self.compile_mode = channels_last, compile, compile_mode

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        on_cuda = trainer.strategy.root_device.type == "cuda"
        if on_cuda:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
            torch.backends.cudnn.benchmark = True
        convert = self.channels_last is True or (self.channels_last == "auto" and on_cuda)
        if convert:
            if has_convolutions(pl_module, 3):
                pl_module.to(memory_format=torch.channels_last_3d)
            elif has_convolutions(pl_module, 2):
                pl_module.to(memory_format=torch.channels_last)
        if self.compile:
            for name in ("encoder", "model"):
                inner = getattr(pl_module, name, None)
                if isinstance(inner, nn.Module):
                    compiled: Any = torch.compile(inner, mode=self.compile_mode)
                    setattr(pl_module, name, compiled)
                    break
