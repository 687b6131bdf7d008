"""Cnn14 (Kong et al. 2020, PANNs): six blocks of two 3x3 conv+BN+ReLU with 2x2 average
pooling (1x1 after the last), 64 ... 2048 channels, mean over frequency, max + mean over
time, ``fc1`` (the 2048-d embedding) and ``fc_audioset`` (527 AudioSet tags, sigmoid).
AudioSet mAP 0.431 (32 kHz), 0.438 (``Cnn14_16k``) and 0.416 (``Cnn14_8k``);
``embedding_size`` gives PANNs' Cnn14_emb512 / emb128 / emb32 (a narrower ``fc1``). Module names follow
``audioset_tagging_cnn/pytorch/models.py`` so the released checkpoints load key for key.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from polyfm.audio.chunked import ChunkedInput
from polyfm.audio.models.base import PannsModel, init_bn, init_layer


class ConvBlock(nn.Module):
    """Two 3x3 convolutions (no bias) with BatchNorm and ReLU, then pooling."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), bias=False)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        for layer in (self.conv1, self.conv2):
            init_layer(layer)
        for bn in (self.bn1, self.bn2):
            init_bn(bn)

    def forward(self, x: torch.Tensor, pool_size: tuple[int, int] = (2, 2), pool_type: str = "avg") -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        if pool_type == "avg":
            return F.avg_pool2d(x, kernel_size=pool_size)
        if pool_type == "max":
            return F.max_pool2d(x, kernel_size=pool_size)
        if pool_type == "avg+max":
            return F.avg_pool2d(x, kernel_size=pool_size) + F.max_pool2d(x, kernel_size=pool_size)
        raise ValueError(f"pool_type must be avg, max or avg+max, got {pool_type!r}")


class Cnn14(PannsModel):
    """PANNs Cnn14. Arguments are PANNs' (sample_rate, window_size, hop_size, mel_bins,
    fmin, fmax, classes_num) plus ours: ``base_channels`` (64 in the released model;
    smaller values give a narrow Cnn14 for tests and demos), ``embedding_size`` (the width
    of ``fc1``, the embedding: ``32 * base_channels`` = 2048 by default; 512, 128 and 32 in
    PANNs' Cnn14_emb512/emb128/emb32), SpecAugment and dropout
    switches, and ``pretrained`` (a registry name or ``.pth`` path loaded at the end of
    construction, for YAML recipes). Input: mono waveforms ``(B, samples)`` at ``sample_rate``."""

    family = "cnn14"

    def __init__(
        self,
        sample_rate: int = 32000,
        window_size: int = 1024,
        hop_size: int = 320,
        mel_bins: int = 64,
        fmin: float = 50.0,
        fmax: float = 14000.0,
        classes_num: int = 527,
        base_channels: int = 64,
        embedding_size: int | None = None,
        spec_augment: bool = True,
        time_drop_width: int = 64,
        freq_drop_width: int = 8,
        block_dropout: float = 0.2,
        head_dropout: float = 0.5,
        pretrained: str | None = None,
    ) -> None:
        super().__init__(
            sample_rate, window_size, hop_size, mel_bins, fmin, fmax, classes_num,
            spec_augment, time_drop_width, freq_drop_width, block_dropout, head_dropout,
        )  # fmt: skip
        widths = [base_channels * m for m in (1, 2, 4, 8, 16, 32)]
        self.conv_block1 = ConvBlock(1, widths[0])
        self.conv_block2 = ConvBlock(widths[0], widths[1])
        self.conv_block3 = ConvBlock(widths[1], widths[2])
        self.conv_block4 = ConvBlock(widths[2], widths[3])
        self.conv_block5 = ConvBlock(widths[3], widths[4])
        self.conv_block6 = ConvBlock(widths[4], widths[5])
        self.feature_dim = embedding_size or widths[5]
        self.fc1 = nn.Linear(widths[5], self.feature_dim, bias=True)
        self.fc_audioset = nn.Linear(self.feature_dim, classes_num, bias=True)
        init_bn(self.bn0)
        init_layer(self.fc1)
        init_layer(self.fc_audioset)
        if pretrained:
            self.load_panns_checkpoint(pretrained)

    def block_names(self) -> list[str]:
        return ["bn0", *(f"conv_block{i}" for i in range(1, 7)), "fc1"]

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        """Conv blocks 1-6 with PANNs' dropout: ``(B, 1, T, F)`` -> ``(B, C, T/32, F/32)``."""
        self.check_size(x)
        blocks = [self.conv_block1, self.conv_block2, self.conv_block3, self.conv_block4, self.conv_block5, self.conv_block6]
        for index, block in enumerate(blocks):
            x = block(x, pool_size=(1, 1) if index == 5 else (2, 2), pool_type="avg")
            x = F.dropout(x, p=self.block_dropout, training=self.training)
        return x

    def forward(self, input: torch.Tensor | ChunkedInput, mixup_lambda: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        if isinstance(input, ChunkedInput):  # a long file, chunk by chunk (chunked prediction)
            return self.forward_chunked(input)
        x = self.log_mel(self.as_waveform(input))
        x = self.augment(x, mixup_lambda)
        x = self.trunk(x)
        return self.clip_head(self.pool_clip(x))


class Cnn14_16k(Cnn14):  # noqa: N801 - PANNs' own class name
    """Cnn14 on 16 kHz audio: window 512, hop 160, 50-8000 Hz (AudioSet mAP 0.438).
    Only the front-end defaults differ; ``options`` are Cnn14's other arguments."""

    def __init__(
        self,
        sample_rate: int = 16000,
        window_size: int = 512,
        hop_size: int = 160,
        mel_bins: int = 64,
        fmin: float = 50.0,
        fmax: float = 8000.0,
        **options: Any,
    ) -> None:
        super().__init__(sample_rate, window_size, hop_size, mel_bins, fmin, fmax, **options)


class Cnn14_8k(Cnn14):  # noqa: N801 - PANNs' own class name
    """Cnn14 on 8 kHz audio (telephone band, FSDD): window 256, hop 80, 50-4000 Hz
    (AudioSet mAP 0.416), the same 100 frames per second as the 16 and 32 kHz models.
    ``options`` are Cnn14's other arguments."""

    def __init__(
        self,
        sample_rate: int = 8000,
        window_size: int = 256,
        hop_size: int = 80,
        mel_bins: int = 64,
        fmin: float = 50.0,
        fmax: float = 4000.0,
        **options: Any,
    ) -> None:
        super().__init__(sample_rate, window_size, hop_size, mel_bins, fmin, fmax, **options)
