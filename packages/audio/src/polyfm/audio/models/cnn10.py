"""Cnn10 (PANNs): four Cnn14 conv blocks (64 ... 512 channels, 3x3, 2x2 average pooling),
``fc1`` 512 -> 512 (the embedding), ``fc_audioset``. AudioSet mAP 0.380."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from polyfm.audio.chunked import ChunkedInput
from polyfm.audio.models.base import PannsModel, init_bn, init_layer
from polyfm.audio.models.cnn14 import ConvBlock


class Cnn10(PannsModel):
    """PANNs Cnn10; arguments as :class:`~polyfm.audio.models.cnn14.Cnn14`."""

    family = "cnn10"
    #: the block type; Cnn6 swaps in one 5x5 convolution per block
    conv_block_type: type[nn.Module] = ConvBlock
    pooling = 16  # four 2x2 poolings

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
        widths = [base_channels * m for m in (1, 2, 4, 8)]
        block = self.conv_block_type
        self.conv_block1 = block(1, widths[0])
        self.conv_block2 = block(widths[0], widths[1])
        self.conv_block3 = block(widths[1], widths[2])
        self.conv_block4 = block(widths[2], widths[3])
        self.feature_dim = widths[3]
        self.fc1 = nn.Linear(widths[3], widths[3], bias=True)
        self.fc_audioset = nn.Linear(widths[3], classes_num, bias=True)
        init_bn(self.bn0)
        init_layer(self.fc1)
        init_layer(self.fc_audioset)
        if pretrained:
            self.load_panns_checkpoint(pretrained)

    def block_names(self) -> list[str]:
        return ["bn0", "conv_block1", "conv_block2", "conv_block3", "conv_block4", "fc1"]

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        """Conv blocks 1-4 with PANNs' dropout: ``(B, 1, T, F)`` -> ``(B, C, T/16, F/16)``."""
        self.check_size(x)
        for block in (self.conv_block1, self.conv_block2, self.conv_block3, self.conv_block4):
            x = block(x, pool_size=(2, 2), pool_type="avg")
            x = F.dropout(x, p=self.block_dropout, training=self.training)
        return x

    def forward(self, input: torch.Tensor | ChunkedInput, mixup_lambda: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        if isinstance(input, ChunkedInput):  # a long file, chunk by chunk (chunked prediction)
            return self.forward_chunked(input)
        x = self.log_mel(self.as_waveform(input))
        self.check_size(x)
        x = self.augment(x, mixup_lambda)
        return self.clip_head(self.pool_clip(self.trunk(x)))
