"""MONAI ``MedNeXt`` (Roy et al. 2023, a ConvNeXt-style 3D U-Net), as an encoder.

``variant`` picks one of the paper's four sizes (S, B, M, L) exactly as MONAI's
``create_mednext`` builds them (``MedNeXtS`` ... ``MedNeXtL``: 32 base filters, residual
blocks, group norm); every other argument left at ``None`` takes the variant's value, and one
given overrides it (``init_filters=8`` for a CPU-sized model). ``variant=None`` takes MONAI's plain
``MedNeXt`` defaults for those (``kernel_size`` stays 3 unless given; a bundle's ``network_def`` gets MONAI's 7). Blocks, input first: ``stem``, then per level ``enc_stages.i``
and ``down_blocks.i``, ``bottleneck``, then per decoder level ``up_blocks.i`` and ``dec_stages.i``,
and the heads ``out_0`` (full resolution) and ``out_blocks`` (deep supervision, one per decoder
level). In training mode with deep supervision MONAI returns a tuple, full resolution first, then
coarser outputs; the Segmentation task resizes the target for each and weights them 1, 1/2, ...
Decoder levels *add* the skip, so inputs must be divisible by ``2 ** len(blocks_down)`` (16).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from monai.networks.nets.mednext import MedNeXt as MonaiMedNeXt

from polyfm.medseg.models.base import MedSegNet

#: the paper's sizes, as ``monai.networks.nets.mednext.create_mednext`` builds them (32 filters, residual, group norm)
VARIANTS: dict[str, dict[str, Any]] = {
    "S": {"encoder_expansion_ratio": 2, "decoder_expansion_ratio": 2, "bottleneck_expansion_ratio": 2,
          "blocks_down": (2, 2, 2, 2), "blocks_bottleneck": 2, "blocks_up": (2, 2, 2, 2)},
    "B": {"encoder_expansion_ratio": (2, 3, 4, 4), "decoder_expansion_ratio": (4, 4, 3, 2), "bottleneck_expansion_ratio": 4,
          "blocks_down": (2, 2, 2, 2), "blocks_bottleneck": 2, "blocks_up": (2, 2, 2, 2)},
    "M": {"encoder_expansion_ratio": (2, 3, 4, 4), "decoder_expansion_ratio": (4, 4, 3, 2), "bottleneck_expansion_ratio": 4,
          "blocks_down": (3, 4, 4, 4), "blocks_bottleneck": 4, "blocks_up": (4, 4, 4, 3)},
    "L": {"encoder_expansion_ratio": (3, 4, 8, 8), "decoder_expansion_ratio": (8, 8, 4, 3), "bottleneck_expansion_ratio": 8,
          "blocks_down": (3, 4, 8, 8), "blocks_bottleneck": 8, "blocks_up": (8, 8, 4, 3)},
}  # fmt: skip
_PRESET_COMMON = {"use_residual_connection": True, "init_filters": 32}
#: MONAI's MedNeXt defaults, for variant=None
_MONAI_PLAIN = {"encoder_expansion_ratio": 2, "decoder_expansion_ratio": 2, "bottleneck_expansion_ratio": 2, "blocks_down": (2, 2, 2, 2),
                "blocks_bottleneck": 2, "blocks_up": (2, 2, 2, 2), "use_residual_connection": False, "init_filters": 32}  # fmt: skip


def _listed(value: Sequence[int] | int) -> list[int] | int:
    return value if isinstance(value, int) else [int(v) for v in value]


class MedNeXt(MonaiMedNeXt, MedSegNet):
    """``monai.networks.nets.MedNeXt`` with the polyfm encoder contract; ``variant`` S/B/M/L as MONAI's
    ``MedNeXtS/B/M/L`` (kernel size 3 by default, as those; MONAI's plain class defaults to 7)."""

    def __init__(
        self,
        variant: Literal["S", "B", "M", "L"] | None = "S",
        spatial_dims: int = 3,
        in_channels: int = 1,
        out_channels: int = 2,
        kernel_size: int = 3,
        deep_supervision: bool = False,
        init_filters: int | None = None,
        encoder_expansion_ratio: Sequence[int] | int | None = None,
        decoder_expansion_ratio: Sequence[int] | int | None = None,
        bottleneck_expansion_ratio: int | None = None,
        blocks_down: Sequence[int] | None = None,
        blocks_bottleneck: int | None = None,
        blocks_up: Sequence[int] | None = None,
        use_residual_connection: bool | None = None,
        norm_type: Literal["group", "layer"] = "group",
        global_resp_norm: bool = False,
    ) -> None:
        if variant is not None and str(variant).upper() not in VARIANTS:
            raise ValueError(f"MedNeXt variant={variant!r}: choose one of {', '.join(VARIANTS)} (the paper's sizes), or None for MONAI's plain MedNeXt.")
        preset = {**_PRESET_COMMON, **VARIANTS[str(variant).upper()]} if variant is not None else dict(_MONAI_PLAIN)
        given = {
            "init_filters": init_filters, "encoder_expansion_ratio": encoder_expansion_ratio, "decoder_expansion_ratio": decoder_expansion_ratio,
            "bottleneck_expansion_ratio": bottleneck_expansion_ratio, "blocks_down": blocks_down, "blocks_bottleneck": blocks_bottleneck,
            "blocks_up": blocks_up, "use_residual_connection": use_residual_connection,
        }  # fmt: skip
        resolved = {**preset, **{k: v for k, v in given.items() if v is not None}}
        down, up = list(resolved["blocks_down"]), list(resolved["blocks_up"])
        if len(up) != len(down):
            raise ValueError(f"MedNeXt needs as many decoder levels as encoder levels: blocks_down={down}, blocks_up={up}.")
        for key, levels in (("encoder_expansion_ratio", down), ("decoder_expansion_ratio", up)):
            ratio = resolved[key]
            if not isinstance(ratio, int) and len(ratio) != len(levels):  # MONAI would fail with an IndexError deep inside
                raise ValueError(f"MedNeXt {key}={list(ratio)} needs one value per level ({len(levels)}), or one int.")
        resolved = {k: _listed(v) if k.endswith(("ratio", "down", "up")) else v for k, v in resolved.items()}
        sizes: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in resolved.items()}  # MONAI takes tuples
        super().__init__(
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            out_channels=out_channels,
            kernel_size=kernel_size,
            deep_supervision=deep_supervision,
            norm_type=norm_type,
            global_resp_norm=global_resp_norm,
            **sizes,
        )
        self.config = {
            "variant": None if variant is None else str(variant).upper(), "spatial_dims": spatial_dims, "in_channels": in_channels,
            "out_channels": out_channels, "kernel_size": kernel_size, "deep_supervision": deep_supervision,
            **resolved, "norm_type": norm_type, "global_resp_norm": global_resp_norm,
        }  # fmt: skip
        self.deep_supervision = deep_supervision
        self.feature_dim = int(resolved["init_filters"]) * 2 ** len(down)

    @classmethod
    def monai_defaults(cls) -> dict[str, Any]:
        # a bundle's network_def names monai.networks.nets.MedNeXt: MONAI's plain class, not our S preset
        return {**super().monai_defaults(), "variant": None}

    def block_names(self) -> list[str]:
        names = ["stem"]
        for i in range(len(self.enc_stages)):
            names += [f"enc_stages.{i}", f"down_blocks.{i}"]
        names.append("bottleneck")
        for i in range(len(self.up_blocks)):
            names += [f"up_blocks.{i}", f"dec_stages.{i}"]
        return [*names, *self.head_names()]

    def head_names(self) -> list[str]:
        return ["out_0", "out_blocks"] if self.deep_supervision else ["out_0"]

    def bottleneck_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for stage, down in zip(self.enc_stages, self.down_blocks, strict=True):
            x = down(stage(x))
        features: torch.Tensor = self.bottleneck(x)
        return features
