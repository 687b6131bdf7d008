"""Pretraining objectives for geo encoders: SatMAE's MAE (SatMAE++ multi-scale) and SoftCon.

Both are callables ``objective(model, batch) -> {"loss": ..., ...}`` for
:class:`polyfm.core.pretrain.Pretraining`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, cast

import torch
import torch.nn.functional as F
from torch import nn

from polyfm.core.errors import ConfigError, DataError
from polyfm.core.pretrain import SoftContrastive


class _MaskedAutoencoder(Protocol):
    """What SatMAEObjective needs of a model (SatMAE)."""

    def forward_mae(self, imgs: torch.Tensor, mask_ratio: float | None = None,
                    imgs_up: Sequence[torch.Tensor] | None = None) -> dict[str, torch.Tensor]: ...


class _MaskableEncoder(Protocol):
    """What SoftConObjective needs of a model: features, with a token mask for ViTs."""

    def forward_features(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor: ...


class SatMAEObjective(nn.Module):
    """SatMAE's masked reconstruction on ``batch["input"]`` (normalised multispectral chips).

    With a multi-scale (SatMAE++) model, ``batch["input_2x"]``/``batch["input_4x"]``
    hold the x2/x4 images; when absent, ``batch["input"]`` is taken as the x4 image and
    the model input and x2 target are made from it by area downsampling (so an input
    chip of 4 * img_size pixels trains all three scales, as SatMAE++ does).
    """

    def __init__(self, mask_ratio: float | None = None) -> None:
        super().__init__()
        self.mask_ratio = mask_ratio

    # Same signature as polyfm.core.pretrain.Objective, so LightningCLI (jsonargparse)
    # accepts this module where a recipe's ``objective:`` expects that protocol.
    def __call__(self, model: nn.Module, batch: Any) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = super().__call__(model, batch)
        return out

    def forward(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        x = batch["input"]
        imgs_up = None
        if getattr(model, "multiscale", False):
            if "input_2x" in batch and "input_4x" in batch:
                imgs_up = [batch["input_2x"], batch["input_4x"]]
            else:
                if x.shape[-1] % 4 or x.shape[-2] % 4:
                    raise DataError(f"SatMAE++ needs chips divisible by 4 to build its x2/x4 targets, got {tuple(x.shape[-2:])}")
                imgs_up = [F.avg_pool2d(x, 2), x]
                x = F.avg_pool2d(x, 4)
        # models are duck-typed nn.Modules (attribute access on one is typed Tensor | Module)
        out = cast(_MaskedAutoencoder, model).forward_mae(x, self.mask_ratio, imgs_up=imgs_up)
        return {k: v for k, v in out.items() if k in ("loss", "mse", "l1")}


def random_views(x: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Two EO views of each chip: one random flip + 90-degree rotation shared by both (so a
    Siamese mask covers the same ground in both), and independent gain and noise."""
    first: list[torch.Tensor] = []
    second: list[torch.Tensor] = []
    for sample in x:
        if torch.rand((), generator=generator) < 0.5:
            sample = sample.flip(-1)
        sample = torch.rot90(sample, int(torch.randint(0, 4, (), generator=generator)), dims=(-2, -1))
        for out in (first, second):
            gain = 1.0 + 0.1 * torch.randn((), generator=generator)
            out.append(sample * gain + 0.02 * torch.randn(sample.shape, generator=generator).to(sample))
    return torch.stack(first), torch.stack(second)


class SoftConObjective(nn.Module):
    """SoftCon: contrastive learning with soft targets from multi-label land-cover vectors.

    ``batch["input"]`` (chips) and ``batch["labels"]`` (``(B, K)`` land-cover fractions or
    multi-hot vectors). Two views are made per chip; scenes whose label vectors are alike
    are partial positives (core's :class:`~polyfm.core.pretrain.SoftContrastive`: the
    softmax of label cosine similarity mixed with identity), so each anchor has several
    positives with soft weights. **Siamese masking**: the same random patch mask hides
    the same locations in both views (ViT: DINOv2's ``mask_token``; CNN: the masked
    blocks set to the normalised mean, 0). A 2-layer MLP projector sits on the features.
    """

    def __init__(
        self,
        feature_dim: int,
        projection_dim: int = 128,
        temperature: float = 0.1,
        target_temperature: float = 0.1,
        identity_weight: float = 0.5,
        mask_ratio: float = 0.3,
        patch_size: int = 14,
    ) -> None:
        super().__init__()
        if not 0.0 <= mask_ratio < 1.0:
            raise ConfigError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        self.mask_ratio, self.patch_size = mask_ratio, patch_size
        self.projector = nn.Sequential(nn.Linear(feature_dim, feature_dim), nn.GELU(), nn.Linear(feature_dim, projection_dim))
        self._masks: torch.Tensor | None = None
        self.soft = SoftContrastive(temperature, target_temperature, identity_weight, embed=self._embed, projector=self.projector)

    # Same signature as polyfm.core.pretrain.Objective, so LightningCLI (jsonargparse)
    # accepts this module where a recipe's ``objective:`` expects that protocol.
    def __call__(self, model: nn.Module, batch: Any) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = super().__call__(model, batch)
        return out

    def _embed(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        encoder = cast(_MaskableEncoder, model)  # a duck-typed nn.Module, as in SatMAEObjective
        if self._masks is None:
            return encoder.forward_features(x)
        if hasattr(model, "mask_token"):  # ViT: token-level masking
            return encoder.forward_features(x, masks=self._masks)
        grid = self._masks.reshape(x.shape[0], x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size)
        pixel_mask = grid.repeat_interleave(self.patch_size, 1).repeat_interleave(self.patch_size, 2)
        return encoder.forward_features(x.masked_fill(pixel_mask[:, None], 0.0))

    def forward(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        x, labels = batch["input"], batch.get("labels", batch.get("target"))
        if labels is None:
            raise DataError("SoftCon needs batch['labels'] (B, K): the scenes' multi-label land-cover vectors")
        patch = getattr(getattr(model, "patch_embed", None), "patch_size", (self.patch_size,))[0]
        self.patch_size = int(patch)
        grid = (x.shape[-2] // self.patch_size) * (x.shape[-1] // self.patch_size)
        self._masks = None
        if self.mask_ratio > 0 and grid > 1:
            self._masks = torch.rand(x.shape[0], grid, device=x.device) < self.mask_ratio
        try:
            view1, view2 = random_views(x)
            out: dict[str, torch.Tensor] = self.soft(model, {"view1": view1, "view2": view2, "labels": labels.float()})
        finally:
            self._masks = None
        return out
