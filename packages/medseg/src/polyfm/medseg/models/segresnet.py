"""MONAI ``SegResNet`` (Myronenko 2018, without the VAE branch), as an encoder.

The network of the model-zoo bundles ``wholeBody_ct_segmentation`` (104 TotalSegmentator
structures), ``brats_mri_segmentation`` (4 MR channels in, 3 tumour regions out) and
``renalStructures_CECT_segmentation``. Blocks, input first: ``convInit``, ``down_layers.i``
(the last is the bottleneck), then per decoder level ``up_samples.i`` and ``up_layers.i``,
then ``conv_final.0`` (the last norm; ``act_mod`` too when the activation has weights) and the
head ``conv_final.2``, the 1x1 convolution to the classes. Decoder levels *add* the skip
(no concatenation), so inputs must be divisible by ``2 ** (len(blocks_down) - 1)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from monai.networks.nets.segresnet import SegResNet as MonaiSegResNet

from polyfm.medseg.models.base import MedSegNet


class SegResNet(MonaiSegResNet, MedSegNet):
    """``monai.networks.nets.SegResNet`` with the polyfm encoder contract (arguments as MONAI's;
    ``norm_name``/``num_groups`` are MONAI's older spelling of ``norm``, kept because bundles use them)."""

    def __init__(
        self,
        spatial_dims: int = 3,
        init_filters: int = 8,
        in_channels: int = 1,
        out_channels: int = 2,
        dropout_prob: float | None = None,
        act: str | tuple[Any, ...] = ("RELU", {"inplace": True}),
        norm: str | tuple[Any, ...] = ("GROUP", {"num_groups": 8}),
        norm_name: str = "",
        num_groups: int = 8,
        blocks_down: Sequence[int] = (1, 2, 2, 4),
        blocks_up: Sequence[int] = (1, 1, 1),
        upsample_mode: str = "nontrainable",
    ) -> None:
        if len(blocks_up) != len(blocks_down) - 1:
            raise ValueError(f"SegResNet needs one up level fewer than down levels: blocks_down={list(blocks_down)}, blocks_up={list(blocks_up)}.")
        super().__init__(
            spatial_dims=spatial_dims,
            init_filters=init_filters,
            in_channels=in_channels,
            out_channels=out_channels,
            dropout_prob=dropout_prob,
            act=act,
            norm=norm,
            norm_name=norm_name,
            num_groups=num_groups,
            use_conv_final=True,  # the head; without it there is no class output to fine-tune
            blocks_down=tuple(blocks_down),
            blocks_up=tuple(blocks_up),
            upsample_mode=upsample_mode,
        )
        self.config = {
            "spatial_dims": spatial_dims, "init_filters": init_filters, "in_channels": in_channels,
            "out_channels": out_channels, "dropout_prob": dropout_prob, "act": act, "norm": norm, "norm_name": norm_name,
            "num_groups": num_groups, "blocks_down": list(blocks_down), "blocks_up": list(blocks_up), "upsample_mode": upsample_mode,
        }  # fmt: skip
        self.feature_dim = init_filters * 2 ** (len(blocks_down) - 1)

    def block_names(self) -> list[str]:
        names = ["convInit", *(f"down_layers.{i}" for i in range(len(self.down_layers)))]
        for i in range(len(self.up_layers)):
            names += [f"up_samples.{i}", f"up_layers.{i}"]
        names.append("conv_final.0")
        if any(True for _ in self.act_mod.parameters()):  # PReLU: registered under act_mod first
            names.append("act_mod")
        return [*names, "conv_final.2"]

    def head_names(self) -> list[str]:
        return ["conv_final.2"]

    def bottleneck_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode(x)[0]
