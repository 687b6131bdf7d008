"""MONAI ``SwinUNETR`` (Hatamizadeh et al.), as an encoder, loading the self-supervised
Swin-ViT weights of Tang et al. (``model_swinvit.pt``) and MONAI bundles.

Blocks, input first: ``swinViT.patch_embed``, ``swinViT.layers1..4`` (with the v2
residual blocks ``layers{i}c`` before each stage), then the convolutional encoders
``encoder1..4, encoder10`` and decoders ``decoder5..1``, and the head ``out``.
The bottleneck is ``encoder10`` over the last Swin stage (``16 * feature_size`` wide).

The released SSL file holds ``{"state_dict": ...}`` whose keys are the Swin-ViT's with a
``module.`` prefix (DDP), the MLP layers named ``fc1/fc2`` (MONAI names them
``linear1/linear2``), and, in some copies, the SSL heads (``rotation_head``,
``contrastive_head``, ``conv``). :meth:`SwinUNETR.convert_state_dict` maps all of it onto
``swinViT.*`` as MONAI's ``SwinUNETR.load_from`` does, and the loader then checks every
Swin-ViT key strictly while the decoder starts from scratch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from monai.networks.nets.swin_unetr import SwinUNETR as MonaiSwinUNETR

from polyfm.medseg.models.base import MedSegNet

#: parts of the SSL model (research-contributions SwinUNETR/Pretrain SSLHead) that are not the Swin-ViT
SSL_HEAD_PREFIXES = ("rotation_head.", "rotation_pre.", "contrastive_head.", "contrastive_pre.", "conv.")


class SwinUNETR(MonaiSwinUNETR, MedSegNet):
    """``monai.networks.nets.SwinUNETR`` with the polyfm encoder contract (arguments as MONAI's;
    inputs must be divisible by ``patch_size ** 5``, i.e. 32)."""

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 1,
        out_channels: int = 14,
        feature_size: int = 48,
        depths: Sequence[int] = (2, 2, 2, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int = 7,
        patch_size: int = 2,
        qkv_bias: bool = True,
        mlp_ratio: float = 4.0,
        norm_name: str | tuple[Any, ...] = "instance",
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        dropout_path_rate: float = 0.0,
        normalize: bool = True,
        patch_norm: bool = False,
        use_checkpoint: bool = False,
        downsample: str = "merging",
        use_v2: bool = False,
    ) -> None:
        super().__init__(
            in_channels=in_channels,
            out_channels=out_channels,
            patch_size=patch_size,
            depths=tuple(depths),
            num_heads=tuple(num_heads),
            window_size=window_size,
            qkv_bias=qkv_bias,
            mlp_ratio=mlp_ratio,
            feature_size=feature_size,
            norm_name=norm_name,
            drop_rate=drop_rate,
            attn_drop_rate=attn_drop_rate,
            dropout_path_rate=dropout_path_rate,
            normalize=normalize,
            patch_norm=patch_norm,
            use_checkpoint=use_checkpoint,
            spatial_dims=spatial_dims,
            downsample=downsample,
            use_v2=use_v2,
        )
        self.config = {
            "spatial_dims": spatial_dims, "in_channels": in_channels, "out_channels": out_channels,
            "feature_size": feature_size, "depths": list(depths), "num_heads": list(num_heads),
            "window_size": window_size, "patch_size": patch_size, "qkv_bias": qkv_bias, "mlp_ratio": mlp_ratio,
            "norm_name": norm_name, "drop_rate": drop_rate, "attn_drop_rate": attn_drop_rate,
            "dropout_path_rate": dropout_path_rate, "normalize": normalize, "patch_norm": patch_norm,
            "use_checkpoint": use_checkpoint, "downsample": downsample, "use_v2": use_v2,
        }  # fmt: skip
        self.feature_dim = 16 * feature_size
        #: width of the last Swin stage (what the SSL heads read)
        self.swin_dim = 16 * feature_size

    def block_names(self) -> list[str]:
        names = ["swinViT.patch_embed"]
        for stage in range(1, 5):
            if self.config["use_v2"]:
                names.append(f"swinViT.layers{stage}c")
            names.append(f"swinViT.layers{stage}")
        names += ["encoder1", "encoder2", "encoder3", "encoder4", "encoder10"]
        names += ["decoder5", "decoder4", "decoder3", "decoder2", "decoder1", "out"]
        return names

    def head_names(self) -> list[str]:
        return ["out"]

    def swin_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last Swin-ViT stage, normalised as SwinUNETR's forward uses it ``(B, 16F, *S/32)``."""
        stages: list[torch.Tensor] = self.swinViT(x.contiguous(), self.normalize)
        return stages[4]

    def bottleneck_features(self, x: torch.Tensor) -> torch.Tensor:
        features: torch.Tensor = self.encoder10(self.swin_features(x))
        return features

    # -- checkpoints ------------------------------------------------------------------------
    @classmethod
    def convert_state_dict(cls, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``model_swinvit.pt`` (SSL layout), our own SSL runs (``swin_vit.``) and bundles -> our keys."""
        state = super().convert_state_dict(state_dict)
        if any(k.startswith("swinViT.") for k in state) and any(k.startswith(("encoder1.", "out.")) for k in state):
            return state  # a whole SwinUNETR (MONAI bundle or our own fine-tuned model)
        converted: dict[str, torch.Tensor] = {}
        for key, value in state.items():
            if key.startswith(SSL_HEAD_PREFIXES):
                continue  # the SSL heads do not exist in the segmentation network
            key = key.removeprefix("swin_vit.").removeprefix("swinViT.")
            key = key.replace(".mlp.fc1.", ".mlp.linear1.").replace(".mlp.fc2.", ".mlp.linear2.")
            converted[f"swinViT.{key}"] = value
        return converted

    @classmethod
    def checkpoint_ignores(cls, state_dict: Mapping[str, torch.Tensor]) -> tuple[tuple[str, ...], tuple[str, ...]]:
        if all(k.startswith("swinViT.") for k in state_dict):  # encoder-only (SSL) weights: the decoder is new
            # v1 SSL weights in a use_v2 model: the v2 residual blocks are new too (as MONAI's load_from leaves them)
            v2_blocks = tuple(f"swinViT.layers{i}c." for i in range(1, 5) if not any(k.startswith(f"swinViT.layers{i}c.") for k in state_dict))
            return ("encoder", "decoder", "out.", *v2_blocks), ()
        return (), ()

    @classmethod
    def checkpoint_hint(cls, state_dict: Mapping[str, torch.Tensor]) -> str:
        embed = state_dict.get("swinViT.patch_embed.proj.weight")
        if embed is None:
            return ""
        depths = [len({k.split(".")[4] for k in state_dict if k.startswith(f"swinViT.layers{i}.0.blocks.")}) for i in range(1, 5)]
        return (
            f"The checkpoint was trained with feature_size={embed.shape[0]}, in_channels={embed.shape[1]}, "
            f"spatial_dims={embed.ndim - 2}, depths={tuple(depths)}: build the model with those."
        )
