"""MONAI ``UNet`` (Kerfoot et al.: residual units, strided convolutions), as an encoder.

MONAI nests the network as ``Sequential(down, SkipConnection(submodule), up)`` from the
top level down to a bottom layer; the blocks, input first, are the down layers from the
top, the bottom, then the up layers back to the top. The top up layer produces the
classes, so it is the head. The MONAI bundle ``spleen_ct_segmentation`` is this network.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeGuard

import torch
from monai.networks.layers.simplelayers import SkipConnection
from monai.networks.nets.unet import UNet as MonaiUNet
from torch import nn

from polyfm.medseg.models.base import MedSegNet


def _is_level(module: nn.Module) -> TypeGuard[nn.Sequential]:
    return isinstance(module, nn.Sequential) and len(module) == 3 and isinstance(module[1], SkipConnection)


def _skip(level: nn.Sequential) -> SkipConnection:
    skip = level[1]
    assert isinstance(skip, SkipConnection)  # what _is_level checked
    return skip


class UNet(MonaiUNet, MedSegNet):
    """``monai.networks.nets.UNet`` with the polyfm encoder contract (arguments as MONAI's)."""

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 1,
        out_channels: int = 2,
        channels: Sequence[int] = (16, 32, 64, 128, 256),
        strides: Sequence[int] = (2, 2, 2, 2),
        kernel_size: int = 3,
        up_kernel_size: int = 3,
        num_res_units: int = 2,
        act: str | tuple[Any, ...] = "PRELU",
        norm: str | tuple[Any, ...] = "INSTANCE",
        dropout: float = 0.0,
        bias: bool = True,
        adn_ordering: str = "NDA",
    ) -> None:
        super().__init__(
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            out_channels=out_channels,
            channels=tuple(channels),
            strides=tuple(strides),
            kernel_size=kernel_size,
            up_kernel_size=up_kernel_size,
            num_res_units=num_res_units,
            act=act,
            norm=norm,
            dropout=dropout,
            bias=bias,
            adn_ordering=adn_ordering,
        )
        self.config = {
            "spatial_dims": spatial_dims, "in_channels": in_channels, "out_channels": out_channels,
            "channels": list(channels), "strides": list(strides), "kernel_size": kernel_size,
            "up_kernel_size": up_kernel_size, "num_res_units": num_res_units, "act": act, "norm": norm,
            "dropout": dropout, "bias": bias, "adn_ordering": adn_ordering,
        }  # fmt: skip
        self.feature_dim = int(channels[-1])

    def _levels(self) -> tuple[list[tuple[str, nn.Sequential]], tuple[str, nn.Module]]:
        """((prefix, level) from the top down, (prefix, the bottom layer))."""
        levels: list[tuple[str, nn.Sequential]] = []
        prefix, node = "model", self.model
        while _is_level(node):
            levels.append((prefix, node))
            prefix, node = f"{prefix}.1.submodule", _skip(node).submodule
        return levels, (prefix, node)

    def block_names(self) -> list[str]:
        levels, (bottom, _) = self._levels()
        downs = [f"{prefix}.0" for prefix, _ in levels]
        ups = [f"{prefix}.2" for prefix, _ in reversed(levels)]
        return [*downs, bottom, *ups]

    def head_names(self) -> list[str]:
        return ["model.2"]

    def bottleneck_features(self, x: torch.Tensor) -> torch.Tensor:
        levels, (_, bottom) = self._levels()
        for _, level in levels:
            x = level[0](x)
        features: torch.Tensor = bottom(x)
        return features
