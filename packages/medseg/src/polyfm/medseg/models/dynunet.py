"""MONAI ``DynUNet``: the nnU-Net-style dynamic U-Net, with optional deep supervision.

Blocks, input first: ``input_block``, ``downsamples.i``, ``bottleneck``, ``upsamples.i``
(MONAI stores them deepest first, which is input-to-output order), then the heads
``output_block`` and ``deep_supervision_heads``. In training mode with deep supervision
MONAI returns the outputs stacked on dim 1; polyfm's Segmentation task unstacks them and
weights the heads 1, 1/2, 1/4... as nnU-Net does. In eval mode only the full-resolution
output comes back, so sliding-window inference sees a plain tensor.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from monai.networks.nets.dynunet import DynUNet as MonaiDynUNet
from monai.networks.nets.dynunet import DynUNetSkipLayer
from torch import nn

from polyfm.medseg.models.base import MedSegNet

log = logging.getLogger(__name__)


class DynUNet(MonaiDynUNet, MedSegNet):
    """``monai.networks.nets.DynUNet`` with the polyfm encoder contract (arguments as MONAI's;
    ``filters`` default to nnU-Net's ``min(2**(5+i), 320)``)."""

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 1,
        out_channels: int = 2,
        kernel_size: Sequence[int | Sequence[int]] = (3, 3, 3, 3, 3),
        strides: Sequence[int | Sequence[int]] = (1, 2, 2, 2, 2),
        upsample_kernel_size: Sequence[int | Sequence[int]] | None = None,
        filters: Sequence[int] | None = None,
        dropout: float | None = None,
        norm_name: str | tuple[Any, ...] = ("INSTANCE", {"affine": True}),
        act_name: str | tuple[Any, ...] = ("leakyrelu", {"inplace": True, "negative_slope": 0.01}),
        deep_supervision: bool = False,
        deep_supr_num: int = 1,
        res_block: bool = False,
        trans_bias: bool = False,
    ) -> None:
        upsample_kernel_size = list(strides[1:]) if upsample_kernel_size is None else list(upsample_kernel_size)
        super().__init__(
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            out_channels=out_channels,
            kernel_size=list(kernel_size),
            strides=list(strides),
            upsample_kernel_size=upsample_kernel_size,
            filters=None if filters is None else list(filters),
            dropout=dropout,
            norm_name=norm_name,
            act_name=act_name,
            deep_supervision=deep_supervision,
            deep_supr_num=deep_supr_num,
            res_block=res_block,
            trans_bias=trans_bias,
        )
        self.config = {
            "spatial_dims": spatial_dims, "in_channels": in_channels, "out_channels": out_channels,
            "kernel_size": list(kernel_size), "strides": list(strides), "upsample_kernel_size": upsample_kernel_size,
            "filters": None if filters is None else list(filters), "dropout": dropout, "norm_name": norm_name,
            "act_name": act_name, "deep_supervision": deep_supervision, "deep_supr_num": deep_supr_num,
            "res_block": res_block, "trans_bias": trans_bias,
        }  # fmt: skip
        self.feature_dim = int(self.filters[-1])

    def block_names(self) -> list[str]:
        names = ["input_block", *(f"downsamples.{i}" for i in range(len(self.downsamples))), "bottleneck"]
        names += [f"upsamples.{i}" for i in range(len(self.upsamples))]
        names.append("output_block")
        if self.deep_supervision:
            names.append("deep_supervision_heads")
        return names

    def head_names(self) -> list[str]:
        return ["output_block", "deep_supervision_heads"] if self.deep_supervision else ["output_block"]

    def bottleneck_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.input_block(x)
        for down in self.downsamples:
            x = down(x)
        features: torch.Tensor = self.bottleneck(x)
        return features

    @classmethod
    def foreign_checkpoint(cls, checkpoint: dict[str, Any], file: Path) -> tuple[dict[str, Any], dict[str, Any]]:
        from polyfm.medseg.nnunet import convert_nnunet, is_nnunet_checkpoint

        if is_nnunet_checkpoint(checkpoint):  # nnU-Net's PlainConvUNet is this network (see polyfm.medseg.nnunet)
            return convert_nnunet(checkpoint, file)
        return {}, checkpoint

    def fit_checkpoint(self, state_dict: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
        # Deep supervision heads only shape the training loss; a model built with fewer of them (or none:
        # inference, fine-tuning without deep supervision) gives the same full-resolution output.
        own = self.state_dict(keep_vars=True)
        extra = [k for k in state_dict if (k.startswith("deep_supervision_heads.") or ".super_head." in k) and k not in own]
        if extra:
            log.info("%s: dropped %d deep-supervision head tensors the model does not build (deep_supervision=%s, "
                     "deep_supr_num=%d).", source, len(extra), self.deep_supervision, self.deep_supr_num)  # fmt: skip
        state = {k: v for k, v in state_dict.items() if k not in set(extra)}
        # MONAI's skip_layers hold second references to the same modules; converted checkpoints name each once
        aliases: dict[int, list[str]] = {}
        for key, tensor in own.items():
            aliases.setdefault(id(tensor), []).append(key)
        for names in aliases.values():
            present = next((state[n] for n in names if n in state), None)
            if present is not None:
                state.update({n: present for n in names if n not in state})
        return state

    def _after_reset_head(self, fresh: nn.Module) -> None:
        # MONAI's skip layers hold their own references to the supervision heads; repoint them.
        if not self.deep_supervision:
            return
        heads = iter(self.deep_supervision_heads)
        layer: nn.Module = self.skip_layers
        while isinstance(layer, DynUNetSkipLayer):
            if layer.super_head is not None:
                layer.super_head = next(heads)
            layer = layer.next_layer
