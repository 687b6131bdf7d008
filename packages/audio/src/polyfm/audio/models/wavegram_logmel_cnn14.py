"""Wavegram-Logmel-Cnn14 (PANNs' best system, AudioSet mAP 0.439): a learned 1-D
front end on the waveform (the "wavegram": strided conv, three dilated conv blocks with
max pooling, reshaped to 32 frequency-like bins) concatenated after ``conv_block1``
with the log-mel branch, then the rest of Cnn14 (``conv_block2`` takes both).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from polyfm.audio.chunked import ChunkedInput
from polyfm.audio.models.base import PannsModel, init_bn, init_layer
from polyfm.audio.models.cnn14 import ConvBlock
from polyfm.audio.models.frontend import do_mixup


class ConvPreWavBlock(nn.Module):
    """Two 1-D convolutions (the second dilated by 2) with BatchNorm and ReLU, then max pooling."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(in_channels, out_channels, kernel_size=3, stride=1, padding=1, bias=False)
        self.conv2 = nn.Conv1d(out_channels, out_channels, kernel_size=3, stride=1, dilation=2, padding=2, bias=False)
        self.bn1 = nn.BatchNorm1d(out_channels)
        self.bn2 = nn.BatchNorm1d(out_channels)
        for layer in (self.conv1, self.conv2):
            init_layer(layer)
        for bn in (self.bn1, self.bn2):
            init_bn(bn)

    def forward(self, x: torch.Tensor, pool_size: int) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return F.max_pool1d(x, kernel_size=pool_size)


class Wavegram_Logmel_Cnn14(PannsModel):  # noqa: N801 - PANNs' own class name
    """PANNs Wavegram-Logmel-Cnn14; arguments as Cnn14 (``base_channels`` must be a
    multiple of 16: the wavegram is reshaped into ``2 * base_channels / 32`` channels)."""

    family = "wavegram_logmel_cnn14"

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
        if base_channels % 16:
            raise ValueError(f"base_channels must be a multiple of 16 for the wavegram reshape, got {base_channels}")
        if hop_size != 320:  # else the concatenation would silently pair unrelated times
            raise ValueError(
                f"Wavegram_Logmel_Cnn14's waveform branch steps 320 samples per frame (stride 5, pools of 4, 4, 4), so the "
                f"log-mel branch must too: hop_size=320, got {hop_size}. Use Cnn14 for other hop sizes."
            )
        b = base_channels
        self.pre_conv0 = nn.Conv1d(1, b, kernel_size=11, stride=5, padding=5, bias=False)
        self.pre_bn0 = nn.BatchNorm1d(b)
        self.pre_block1 = ConvPreWavBlock(b, b)
        self.pre_block2 = ConvPreWavBlock(b, 2 * b)
        self.pre_block3 = ConvPreWavBlock(2 * b, 2 * b)
        self.pre_block4 = ConvBlock(2 * b // 32, b)
        widths = [b * m for m in (1, 2, 4, 8, 16, 32)]
        self.conv_block1 = ConvBlock(1, widths[0])
        self.conv_block2 = ConvBlock(2 * widths[0], widths[1])
        self.conv_block3 = ConvBlock(widths[1], widths[2])
        self.conv_block4 = ConvBlock(widths[2], widths[3])
        self.conv_block5 = ConvBlock(widths[3], widths[4])
        self.conv_block6 = ConvBlock(widths[4], widths[5])
        self.feature_dim = widths[5]
        self.fc1 = nn.Linear(widths[5], widths[5], bias=True)
        self.fc_audioset = nn.Linear(widths[5], classes_num, bias=True)
        init_layer(self.pre_conv0)
        init_bn(self.pre_bn0)
        init_bn(self.bn0)
        init_layer(self.fc1)
        init_layer(self.fc_audioset)
        if pretrained:
            self.load_panns_checkpoint(pretrained)

    def block_names(self) -> list[str]:
        wavegram = ["pre_conv0", "pre_bn0", "pre_block1", "pre_block2", "pre_block3", "pre_block4"]
        return [*wavegram, "bn0", *(f"conv_block{i}" for i in range(1, 7)), "fc1"]

    def min_samples(self) -> int:
        # the wavegram branch has a fixed 320-sample step (stride 5, then pools of 4, 4, 4)
        return max(super().min_samples(), 320 * self.pooling)

    def wavegram(self, waveform: torch.Tensor) -> torch.Tensor:
        """``(B, samples)`` -> ``(B, base_channels, frames/2, 32)``."""
        a = F.relu(self.pre_bn0(self.pre_conv0(waveform[:, None, :])))
        a = self.pre_block1(a, pool_size=4)
        a = self.pre_block2(a, pool_size=4)
        a = self.pre_block3(a, pool_size=4)
        a = a.reshape(a.shape[0], -1, 32, a.shape[-1]).transpose(2, 3)
        wavegram: torch.Tensor = self.pre_block4(a, pool_size=(2, 1))
        return wavegram

    def forward(self, input: torch.Tensor | ChunkedInput, mixup_lambda: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        if isinstance(input, ChunkedInput):  # a long file, chunk by chunk (chunked prediction)
            return self.forward_chunked(input)
        return self.clip_head(self.pool_clip(self.branches(self.as_waveform(input), mixup_lambda)))

    def time_map(self, waveform: torch.Tensor) -> torch.Tensor:
        return torch.mean(self.branches(self.as_waveform(waveform), None), dim=3)

    def branches(self, waveform: torch.Tensor, mixup_lambda: torch.Tensor | None) -> torch.Tensor:
        """Log-mel and wavegram branches joined after ``conv_block1``, then blocks 2-6: ``(B, samples)`` -> ``(B, C, T/32, F/32)``."""
        if waveform.shape[-1] < self.min_samples():
            raise ValueError(
                f"{type(self).__name__} needs clips of at least {self.min_samples()} samples "
                f"({self.min_samples() / self.sample_rate:.2f} s), got {waveform.shape[-1]}; pad them (clip_seconds)."
            )
        x = self.log_mel(waveform)
        self.check_size(x)
        a = self.wavegram(waveform)
        x = self.augment(x, mixup_lambda)
        if self.training and mixup_lambda is not None:
            a = do_mixup(a, mixup_lambda)
        x = self.conv_block1(x, pool_size=(2, 2), pool_type="avg")
        # For 10 s clips both branches have the same length; for other lengths they can
        # differ by a frame (PANNs would fail on the concatenation): keep the common part.
        steps = min(x.shape[2], a.shape[2])
        x = torch.cat((x[:, :, :steps], a[:, :, :steps]), dim=1)
        x = F.dropout(x, p=self.block_dropout, training=self.training)
        for index, block in enumerate((self.conv_block2, self.conv_block3, self.conv_block4, self.conv_block5, self.conv_block6)):
            x = block(x, pool_size=(1, 1) if index == 4 else (2, 2), pool_type="avg")
            x = F.dropout(x, p=self.block_dropout, training=self.training)
        return x
