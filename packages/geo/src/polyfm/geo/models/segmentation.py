"""Semantic segmentation on a geo encoder: a UPerNet decoder (pyramid pooling + FPN + fusion).

A CNN encoder gives its own pyramid (``forward_pyramid``: strides 4-32); a ViT gives
one map at its patch stride (``forward_dense``), turned into four scales with
transposed convolutions and pooling as in ViTDet's simple feature pyramid. The coarsest
level goes through UPerNet's pyramid pooling module (global context at ``pool_scales``),
the others through lateral 1x1 convolutions; a top-down pathway, 3x3 smoothing, and the
fused concatenation of all levels feed a 1x1 classifier; logits are upsampled to the input size.
"""

from __future__ import annotations

from typing import Protocol, cast

import torch
import torch.nn.functional as F
from torch import nn

from polyfm.core.encoder import Encoder
from polyfm.core.errors import ConfigError


class _PyramidEncoder(Protocol):
    """A CNN encoder with its own feature pyramid (SoftCon's ResNet-50)."""

    feature_dim: int

    def forward_pyramid(self, x: torch.Tensor) -> list[torch.Tensor]: ...


class _DenseEncoder(Protocol):
    """A ViT encoder giving one map at its patch stride."""

    feature_dim: int

    def forward_dense(self, x: torch.Tensor) -> torch.Tensor: ...


def _conv_bn_relu(cin: int, cout: int, k: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class SimpleFeaturePyramid(nn.Module):
    """One ViT map (stride s) -> maps at s/4, s/2, s, 2s."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.up4 = nn.Sequential(nn.ConvTranspose2d(dim, dim, 2, 2), nn.BatchNorm2d(dim), nn.GELU(), nn.ConvTranspose2d(dim, dim, 2, 2))
        self.up2 = nn.ConvTranspose2d(dim, dim, 2, 2)
        self.down2 = nn.MaxPool2d(2, ceil_mode=True)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [self.up4(x), self.up2(x), x, self.down2(x)]


class PyramidPooling(nn.Module):
    """UPerNet's pyramid pooling module: the map average-pooled to each of ``pool_scales``
    (1 = global), projected, upsampled back and fused with the map itself by a 3x3 conv."""

    def __init__(self, in_channels: int, channels: int, pool_scales: tuple[int, ...]) -> None:
        super().__init__()
        # no BatchNorm on the pooled branches: a 1x1 map of a batch of one has a single value per channel
        self.branches = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(scale), nn.Conv2d(in_channels, channels, 1), nn.ReLU(inplace=True)) for scale in pool_scales
        )
        self.bottleneck = _conv_bn_relu(in_channels + channels * len(pool_scales), channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = [F.interpolate(branch(x), size=x.shape[-2:], mode="bilinear", align_corners=False) for branch in self.branches]
        fused: torch.Tensor = self.bottleneck(torch.cat([x, *pooled], 1))
        return fused


class DenseSegmenter(Encoder):
    """``encoder`` + UPerNet decoder -> logits ``(B, num_classes, H, W)``.

    ``pool_scales``: the pyramid pooling module's output sizes on the coarsest level
    (UPerNet's ``(1, 2, 3, 6)``); ``()`` replaces it with a plain lateral 1x1 convolution
    (the FPN-only decoder of polyfm before 2026-12, whose checkpoints load with it).

    ``block_names()`` lists the encoder's blocks (prefixed) then ``decoder``, so
    ``Adaptation(mode="freeze", freeze_blocks=len(encoder.block_names()))`` trains the
    decoder on a frozen encoder (the segmentation linear probe).
    """

    dense = True

    def __init__(
        self, encoder: nn.Module, num_classes: int, decoder_channels: int = 64, pool_scales: tuple[int, ...] = (1, 2, 3, 6)
    ) -> None:
        super().__init__()
        pool_scales = tuple(int(scale) for scale in pool_scales)
        if any(scale < 1 for scale in pool_scales):
            raise ConfigError(f"DenseSegmenter(pool_scales={pool_scales}): pooled sizes are positive integers, e.g. (1, 2, 3, 6); () for none")
        self.encoder = encoder
        self.num_classes = num_classes
        self.feature_dim = num_classes
        # the encoder is duck-typed (any module with these methods); nn.Module's attribute access is typed Tensor | Module
        self.pyramid: SimpleFeaturePyramid | None
        if hasattr(encoder, "forward_pyramid"):
            dim = cast(_PyramidEncoder, encoder).feature_dim
            in_channels = [256, 512, 1024, 2048] if dim == 2048 else [dim] * 4
            self.pyramid = None
        elif hasattr(encoder, "forward_dense"):
            dim = cast(_DenseEncoder, encoder).feature_dim
            in_channels = [dim] * 4
            self.pyramid = SimpleFeaturePyramid(dim)
        else:
            raise ConfigError(f"{type(encoder).__name__} has neither forward_pyramid nor forward_dense: it cannot feed a segmentation decoder")
        self.decoder = nn.ModuleDict(
            {
                # the coarsest level's "lateral" is the pyramid pooling module when there is one
                "lateral": nn.ModuleList(
                    PyramidPooling(c, decoder_channels, pool_scales) if i == len(in_channels) - 1 and pool_scales else nn.Conv2d(c, decoder_channels, 1)
                    for i, c in enumerate(in_channels)
                ),
                "smooth": nn.ModuleList(_conv_bn_relu(decoder_channels, decoder_channels, 3) for _ in in_channels),
                "fuse": _conv_bn_relu(decoder_channels * len(in_channels), decoder_channels, 3),
                "classifier": nn.Conv2d(decoder_channels, num_classes, 1),
            }
        )

    def block_names(self) -> list[str]:
        own_names = getattr(self.encoder, "block_names", None)
        inner: list[str] = own_names() if callable(own_names) else ["encoder"]
        names = [f"encoder.{n}" for n in inner]
        return names + (["pyramid"] if self.pyramid is not None else []) + ["decoder"]

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.pyramid is None:
            return cast(_PyramidEncoder, self.encoder).forward_pyramid(x)
        levels: list[torch.Tensor] = self.pyramid(cast(_DenseEncoder, self.encoder).forward_dense(x))
        return levels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # ModuleDict.__getitem__ is typed nn.Module; these two entries are the ModuleLists built above
        lateral, smoothing = cast(nn.ModuleList, self.decoder["lateral"]), cast(nn.ModuleList, self.decoder["smooth"])
        levels = [lat(f) for lat, f in zip(lateral, self.features(x), strict=True)]
        for i in range(len(levels) - 1, 0, -1):  # top-down
            levels[i - 1] = levels[i - 1] + F.interpolate(levels[i], size=levels[i - 1].shape[-2:], mode="bilinear", align_corners=False)
        levels = [smooth(level) for smooth, level in zip(smoothing, levels, strict=True)]
        size = levels[0].shape[-2:]
        fused = self.decoder["fuse"](torch.cat([F.interpolate(level, size=size, mode="bilinear", align_corners=False) for level in levels], 1))
        logits = self.decoder["classifier"](fused)
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x)


class TiledInferer:
    """Sliding-window inference for scenes larger than memory allows: ``inferer(x, model)``.

    Windows of ``window`` pixels with ``overlap`` (fraction) cover the scene; logits are
    blended with a separable triangular weight so window borders count less; the scene
    is padded (reflect) to fit. Pass it as ``Segmentation(..., inferer=TiledInferer(...))``.
    """

    def __init__(self, window: int = 224, overlap: float = 0.25, batch_size: int = 8) -> None:
        if not 0.0 <= overlap < 1.0:
            raise ConfigError(f"overlap must be in [0, 1), got {overlap}")
        self.window, self.overlap, self.batch_size = window, overlap, batch_size

    def _starts(self, length: int) -> list[int]:
        step = max(1, int(self.window * (1 - self.overlap)))
        starts = list(range(0, max(length - self.window, 0) + 1, step))
        if starts[-1] + self.window < length:
            starts.append(length - self.window)
        return starts

    def __call__(self, x: torch.Tensor, model: nn.Module) -> torch.Tensor:
        h, w = x.shape[-2:]
        pad_h, pad_w = max(0, self.window - h), max(0, self.window - w)
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h), mode="reflect" if min(h, w) > max(pad_h, pad_w) else "replicate")
        hh, ww = x.shape[-2:]
        ramp = torch.minimum(torch.arange(1, self.window + 1), torch.arange(self.window, 0, -1)).float().to(x.device)
        weight = (ramp[:, None] * ramp[None, :]) / ramp.max() ** 2
        corners = [(top, left) for top in self._starts(hh) for left in self._starts(ww)]
        output: torch.Tensor | None = None
        total = x.new_zeros(1, 1, hh, ww)
        for i in range(0, len(corners), self.batch_size):
            chunk = corners[i : i + self.batch_size]
            tiles = torch.cat([x[..., top : top + self.window, left : left + self.window] for top, left in chunk])
            logits = model(tiles)
            logits = logits[0] if isinstance(logits, list | tuple) else logits
            if output is None:
                output = x.new_zeros(x.shape[0], logits.shape[1], hh, ww)
            for j, (top, left) in enumerate(chunk):
                part = logits[j * x.shape[0] : (j + 1) * x.shape[0]]
                output[..., top : top + self.window, left : left + self.window] += part * weight
                total[..., top : top + self.window, left : left + self.window] += weight
        assert output is not None
        return (output / total)[..., :h, :w]
