"""MONAI ``UNETR`` (Hatamizadeh et al. 2022): a 12-layer ViT encoder on 16^3 patches with a
convolutional decoder fed from transformer layers 3, 6, 9 and 12, as an encoder.

Blocks, input first: ``vit.patch_embedding``, ``vit.blocks.0..11``, ``vit.norm``, ``encoder1..4``
(``encoder1`` reads the image itself, the others reshape ViT tokens), ``decoder5..2`` and the head
``out``. The ViT fixes the input size: ``img_size`` is the patch size of training and of the
sliding window (divisible by 16). ``bottleneck_features`` is the last ViT layer as a map
``(B, hidden_size, *img_size/16)``.

Checkpoints from MONAI 1.3/1.4 carry ``vit.blocks.{i}.cross_attn.*`` (MONAI then built a
cross-attention block in every transformer layer, used or not; MONAI's own
``ViT.load_old_state_dict`` drops them) and older ones lack ``norm_cross_attn``, which is built but
unused without cross-attention: both are reconciled here, with a log line.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from monai.networks.nets.unetr import UNETR as MonaiUNETR

from polyfm.medseg.models.base import MedSegNet

log = logging.getLogger(__name__)


class UNETR(MonaiUNETR, MedSegNet):
    """``monai.networks.nets.UNETR`` with the polyfm encoder contract (arguments as MONAI's; ``img_size``
    defaults to the 96^3 patches of MONAI's BTCV recipe)."""

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 1,
        out_channels: int = 14,
        img_size: Sequence[int] | int = 96,
        feature_size: int = 16,
        hidden_size: int = 768,
        mlp_dim: int = 3072,
        num_heads: int = 12,
        proj_type: str = "conv",
        norm_name: str | tuple[Any, ...] = "instance",
        conv_block: bool = True,
        res_block: bool = True,
        dropout_rate: float = 0.0,
        qkv_bias: bool = False,
    ) -> None:
        super().__init__(
            in_channels=in_channels,
            out_channels=out_channels,
            img_size=img_size if isinstance(img_size, int) else tuple(img_size),
            feature_size=feature_size,
            hidden_size=hidden_size,
            mlp_dim=mlp_dim,
            num_heads=num_heads,
            proj_type=proj_type,
            norm_name=norm_name,
            conv_block=conv_block,
            res_block=res_block,
            dropout_rate=dropout_rate,
            spatial_dims=spatial_dims,
            qkv_bias=qkv_bias,
        )
        self.config = {
            "spatial_dims": spatial_dims, "in_channels": in_channels, "out_channels": out_channels,
            "img_size": img_size if isinstance(img_size, int) else list(img_size), "feature_size": feature_size,
            "hidden_size": hidden_size, "mlp_dim": mlp_dim, "num_heads": num_heads, "proj_type": proj_type,
            "norm_name": norm_name, "conv_block": conv_block, "res_block": res_block, "dropout_rate": dropout_rate,
            "qkv_bias": qkv_bias,
        }  # fmt: skip
        self.feature_dim = hidden_size

    def block_names(self) -> list[str]:
        names = ["vit.patch_embedding", *(f"vit.blocks.{i}" for i in range(len(self.vit.blocks))), "vit.norm"]
        return [*names, "encoder1", "encoder2", "encoder3", "encoder4", "decoder5", "decoder4", "decoder3", "decoder2", "out"]

    def head_names(self) -> list[str]:
        return ["out"]

    def bottleneck_features(self, x: torch.Tensor) -> torch.Tensor:
        # MONAI leaves UNETR.proj_feat unannotated
        features: torch.Tensor = self.proj_feat(self.vit(x)[0])  # type: ignore[no-untyped-call]
        return features

    def fit_checkpoint(self, state_dict: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
        own = self.state_dict()
        stale = [k for k in state_dict if ".cross_attn." in k and k not in own]  # MONAI 1.3/1.4's unused blocks
        unused = [k for k in own if ".norm_cross_attn." in k and k not in state_dict]  # before MONAI 1.3: absent
        if stale or unused:
            log.info(
                "%s: a ViT saved by another MONAI version: dropped %d unused cross-attention tensors, kept the fresh "
                "(unused without cross-attention) norm_cross_attn for %d.", source, len(stale), len(unused),
            )  # fmt: skip
        state = {k: v for k, v in state_dict.items() if k not in set(stale)}
        return {**{k: own[k] for k in unused}, **state}
