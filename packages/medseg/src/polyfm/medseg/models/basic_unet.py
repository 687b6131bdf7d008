"""MONAI ``BasicUNet``: the plain two-convolution U-Net (five levels, fixed), as an encoder.

Blocks, input first: ``conv_0``, ``down_1..4`` (``down_4`` is the bottleneck),
``upcat_4..1``, ``final_conv`` (the head, a 1x1 convolution).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from monai.networks.nets.basic_unet import BasicUNet as MonaiBasicUNet

from polyfm.medseg.models.base import MedSegNet


class BasicUNet(MonaiBasicUNet, MedSegNet):
    """``monai.networks.nets.BasicUNet`` with the polyfm encoder contract (arguments as MONAI's)."""

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 1,
        out_channels: int = 2,
        features: Sequence[int] = (32, 32, 64, 128, 256, 32),
        act: str | tuple[Any, ...] = ("LeakyReLU", {"negative_slope": 0.1, "inplace": True}),
        norm: str | tuple[Any, ...] = ("instance", {"affine": True}),
        bias: bool = True,
        dropout: float = 0.0,
        upsample: str = "deconv",
    ) -> None:
        super().__init__(
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            out_channels=out_channels,
            features=tuple(features),
            act=act,
            norm=norm,
            bias=bias,
            dropout=dropout,
            upsample=upsample,
        )
        self.config = {
            "spatial_dims": spatial_dims, "in_channels": in_channels, "out_channels": out_channels,
            "features": list(features), "act": act, "norm": norm, "bias": bias, "dropout": dropout, "upsample": upsample,
        }  # fmt: skip
        self.feature_dim = int(features[4])

    def block_names(self) -> list[str]:
        return ["conv_0", "down_1", "down_2", "down_3", "down_4", "upcat_4", "upcat_3", "upcat_2", "upcat_1", "final_conv"]

    def head_names(self) -> list[str]:
        return ["final_conv"]

    def bottleneck_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_0(x)
        for down in (self.down_1, self.down_2, self.down_3, self.down_4):
            x = down(x)
        return x
