"""Cnn6 (PANNs): four blocks of one 5x5 conv+BN+ReLU with 2x2 average pooling
(64 ... 512 channels), ``fc1`` 512 -> 512 (the embedding), ``fc_audioset``.
AudioSet mAP 0.343; the cheapest PANNs model. The trunk and head are Cnn10's."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from polyfm.audio.models.base import init_bn, init_layer
from polyfm.audio.models.cnn10 import Cnn10


class ConvBlock5x5(nn.Module):
    """One 5x5 convolution (no bias) with BatchNorm and ReLU, then pooling."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=(5, 5), stride=(1, 1), padding=(2, 2), bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        init_layer(self.conv1)
        init_bn(self.bn1)

    def forward(self, x: torch.Tensor, pool_size: tuple[int, int] = (2, 2), pool_type: str = "avg") -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        if pool_type == "avg":
            return F.avg_pool2d(x, kernel_size=pool_size)
        if pool_type == "max":
            return F.max_pool2d(x, kernel_size=pool_size)
        if pool_type == "avg+max":
            return F.avg_pool2d(x, kernel_size=pool_size) + F.max_pool2d(x, kernel_size=pool_size)
        raise ValueError(f"pool_type must be avg, max or avg+max, got {pool_type!r}")


class Cnn6(Cnn10):
    """PANNs Cnn6: Cnn10's layout (same module names, widths and head) with one 5x5
    convolution per block. Arguments as :class:`~polyfm.audio.models.cnn14.Cnn14`."""

    family = "cnn6"
    conv_block_type = ConvBlock5x5
