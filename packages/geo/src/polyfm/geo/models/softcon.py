"""SoftCon backbones (Wang et al. 2024, zhu-xlab/softcon): ResNet-50 and DINOv2 ViT-S/14, ViT-B/14.

The released files load unchanged:

* ``B13_rn50_softcon.pth`` / ``B2_rn50_softcon.pth``: a torchvision ResNet-50 state dict
  whose ``conv1`` reads 13 (Sentinel-2 L1C) or 2 (Sentinel-1 VV, VH) channels and
  whose ``fc`` is the identity (2048-d features);
* ``B13_vits14_softcon.pth``, ``B13_vitb14_softcon.pth``, ``B2_*``: the DINOv2 ViT key
  layout (``patch_embed.proj``, ``blocks.N.ls1.gamma``, ``mask_token``...), image 224,
  patch 14, LayerScale 1e-5, no register tokens; features are the normed CLS token.
  The ViT is timm's VisionTransformer (same keys as DINOv2) plus DINOv2's
  ``mask_token``, which Siamese masking uses.

``from_imagenet``/``from_dinov2`` start continual pretraining from an RGB
checkpoint: the RGB kernels go to B4, B3, B2 and every other band gets the
spectrally nearest RGB kernel, all rescaled by 3/C so the first layer's output
keeps the magnitude it had on RGB (see :func:`expand_rgb_kernel`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torchvision.models.resnet import Bottleneck, ResNet

from polyfm.core.encoder import Encoder
from polyfm.core.errors import CheckpointError, ConfigError, DataError
from polyfm.core.weights import (
    PretrainedMixin,
    WeightSpec,
    load_state_dict_checked,
    strip_prefix,
    unwrap_state_dict,
)
from polyfm.geo.bands import (
    SENTINEL1_BANDS,
    SENTINEL2_BANDS,
    BandPlan,
    MissingBands,
    Normalization,
    canonical_band,
    conv_like,
    normalization_for,
    plan_bands,
    remap_in_channels,
    wavelength,
)
from polyfm.geo.models.satmae import encoder_state, read_official_checkpoint, resolve_checkpoint, wants_checkpoint

RGB_ORDER = ["B4", "B3", "B2"]  # ImageNet / DINOv2 kernels read R, G, B


def default_bands(in_chans: int) -> list[str]:
    if in_chans == 13:
        return list(SENTINEL2_BANDS)
    if in_chans == 2:
        return list(SENTINEL1_BANDS)
    if in_chans == 3:
        return list(RGB_ORDER)
    return [f"band{i}" for i in range(in_chans)]


def expand_rgb_kernel(rgb_weight: torch.Tensor, bands: Sequence[str]) -> torch.Tensor:
    """Initialise a C-band kernel from an RGB one (continual pretraining).

    Bands named R/G/B (B4/B3/B2) take their kernel; every other band with a known
    wavelength takes the kernel of the nearest of the three; bands with no wavelength
    (SAR) take the mean RGB kernel. The result is scaled by 3/C so the summed kernel
    (and the first layer's output scale) stays that of the RGB model.
    """
    rgb_wl = [wavelength(b) for b in RGB_ORDER]
    columns = []
    for band in (canonical_band(b) for b in bands):
        if band in RGB_ORDER:
            columns.append(rgb_weight[:, RGB_ORDER.index(band)])
            continue
        wl = wavelength(band)
        if wl is None:
            columns.append(rgb_weight.mean(dim=1))
        else:
            nearest = min(range(3), key=lambda i: abs(rgb_wl[i] - wl))  # type: ignore[operator]
            columns.append(rgb_weight[:, nearest])
    return torch.stack(columns, dim=1) * (3.0 / len(columns))


class _BandAware:
    """Shared band bookkeeping: declared bands, normalisation, adapt_bands()."""

    bands: list[str]
    input_bands: list[str]
    normalization: Normalization | None
    band_plan: BandPlan | None

    def _first_conv(self) -> nn.Conv2d:  # pragma: no cover - abstract
        raise NotImplementedError

    def _set_first_conv(self, conv: nn.Conv2d, bias_delta: torch.Tensor) -> None:  # pragma: no cover
        raise NotImplementedError

    def adapt_bands(self, input_bands: Sequence[str], missing_bands: MissingBands = "error") -> BandPlan:
        """Rewrite the first layer to read ``input_bands`` (see :mod:`polyfm.geo.bands`)."""
        if self.band_plan is not None:
            raise ConfigError("adapt_bands() was already applied to this model; build or load a fresh one")
        plan = plan_bands(input_bands, self.bands, missing_bands)
        levels = self.normalization.normalised_mean() if self.normalization else [0.0] * len(self.bands)
        conv = self._first_conv()
        weight, bias, channels = remap_in_channels(conv.weight.data, plan, self.bands, levels)
        # The new layer reads every input channel; bands it does not use get zero
        # kernels (they are absent from the model, not zero-filled model bands).
        full = weight.new_zeros((weight.shape[0], len(plan.input_bands), *weight.shape[2:]))
        full[:, channels] = weight
        new = conv_like(conv, len(plan.input_bands))
        new.weight.data.copy_(full)
        if conv.bias is not None and new.bias is not None:
            new.bias.data.copy_(conv.bias.data)
        self._set_first_conv(new, bias)
        self.input_bands, self.band_plan = list(plan.input_bands), plan
        return plan

    def input_normalization(self) -> Normalization | None:
        """The weights' normalisation laid out for ``input_bands``."""
        return normalization_for(self.input_bands, self.bands, self.normalization)

    def _finish_init(self, pretrained: str | None, input_bands: Sequence[str] | None, missing_bands: MissingBands) -> None:
        # For YAML recipes: load weights into this configuration, then map the data's bands.
        if wants_checkpoint(pretrained):
            path, spec = resolve_checkpoint(pretrained)  # type: ignore[arg-type]
            if spec is not None and "normalization" in spec.meta:
                self.normalization = Normalization.from_meta(spec.meta["normalization"])
            self.load_state(_read_softcon_state(path), source=str(path))
        if input_bands is not None:
            self.adapt_bands(input_bands, missing_bands)

    def load_state(self, state: dict[str, torch.Tensor], source: str = "checkpoint") -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _check_channels(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != len(self.input_bands):
            raise DataError(
                f"{type(self).__name__} expects (B, {len(self.input_bands)}, H, W) with bands {self.input_bands}, got {tuple(x.shape)}. "
                "Map the data's bands with model.adapt_bands(data_bands, missing_bands=...)."
            )


# ----------------------------------------------------------------------------- ResNet-50


class SoftConResNet50(ResNet, _BandAware, Encoder, PretrainedMixin):  # type: ignore[misc]  # torchvision ships no type information
    """torchvision ResNet-50 with a ``in_chans``-channel ``conv1`` and ``fc = Identity``."""

    # torchvision's ResNet attributes, declared because mypy sees its base class as Any
    conv1: nn.Conv2d
    bn1: nn.BatchNorm2d
    relu: nn.ReLU
    maxpool: nn.MaxPool2d
    layer1: nn.Sequential
    layer2: nn.Sequential
    layer3: nn.Sequential
    layer4: nn.Sequential
    avgpool: nn.AdaptiveAvgPool2d

    def __init__(
        self,
        in_chans: int = 13,
        bands: Sequence[str] | None = None,
        normalization: Mapping[str, Any] | None = None,
        pretrained: str | None = None,
        input_bands: Sequence[str] | None = None,
        missing_bands: MissingBands = "error",
    ) -> None:
        super().__init__(Bottleneck, [3, 4, 6, 3])
        self.conv1 = nn.Conv2d(in_chans, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.fc = nn.Identity()
        self.feature_dim = 2048
        self.bands = [canonical_band(b) for b in (bands or default_bands(in_chans))]
        if len(self.bands) != in_chans:
            raise ConfigError(f"{in_chans} input channels but {len(self.bands)} band names: {self.bands}")
        self.input_bands = list(self.bands)
        self.normalization = Normalization.from_meta(normalization) if normalization else None
        self.band_plan = None
        self._finish_init(pretrained, input_bands, missing_bands)

    def _first_conv(self) -> nn.Conv2d:
        return self.conv1

    def _set_first_conv(self, conv: nn.Conv2d, bias_delta: torch.Tensor) -> None:
        self.conv1 = conv
        # conv1 has no bias: a constant added after it is the same as a shifted BN mean.
        running_mean = self.bn1.running_mean
        if running_mean is None:  # torchvision's BatchNorm2d always tracks running statistics
            raise ConfigError("bn1 keeps no running statistics, so the band mapping's bias cannot be folded into it")
        running_mean.sub_(bias_delta.to(running_mean))

    def block_names(self) -> list[str]:
        return ["conv1", "bn1", "layer1", "layer2", "layer3", "layer4"]

    def forward_pyramid(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Feature maps at strides 4, 8, 16, 32 (256, 512, 1024, 2048 channels)."""
        self._check_channels(x)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        features = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
            features.append(x)
        return features

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.avgpool(self.forward_pyramid(x)[-1]), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)

    @classmethod
    def from_imagenet(cls, state_dict: Mapping[str, torch.Tensor], bands: Sequence[str]) -> SoftConResNet50:
        """Continual pretraining start: an ImageNet ResNet-50 state dict, first layer expanded to ``bands``."""
        model = cls(in_chans=len(bands), bands=bands)
        state = {k: v for k, v in state_dict.items() if not k.startswith("fc.")}
        state["conv1.weight"] = expand_rgb_kernel(state["conv1.weight"], bands)
        load_state_dict_checked(model, state, source="ImageNet ResNet-50")
        return model

    def load_state(self, state: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
        if "conv1.weight" not in state:
            raise CheckpointError(f"{source} is not a ResNet-50 checkpoint (no 'conv1.weight'; first keys {sorted(state)[:6]})")
        if self.band_plan is not None:
            raise ConfigError("load weights before adapt_bands(), not after")
        load_state_dict_checked(self, {k: v for k, v in state.items() if not k.startswith("fc.")}, source=source)

    @classmethod
    def _from_checkpoint(cls, path: Path, spec: WeightSpec | None, **config: Any) -> SoftConResNet50:
        state = _read_softcon_state(path)
        if "conv1.weight" not in state:
            raise CheckpointError(f"{path} is not a ResNet-50 checkpoint (no 'conv1.weight'; first keys {sorted(state)[:6]})")
        kwargs = _meta_kwargs(spec, ("bands", "normalization"))
        kwargs["in_chans"] = int(state["conv1.weight"].shape[1])
        kwargs.update(config)
        input_bands, missing = kwargs.pop("input_bands", None), kwargs.pop("missing_bands", "error")
        model = cls(**kwargs)
        model.load_state(state, source=str(path))
        if input_bands is not None:
            model.adapt_bands(input_bands, missing)
        return model


# ----------------------------------------------------------------------------- DINOv2 ViT

VIT_SIZES: dict[str, dict[str, int]] = {
    "small": {"embed_dim": 384, "depth": 12, "num_heads": 6},
    "base": {"embed_dim": 768, "depth": 12, "num_heads": 12},
    "large": {"embed_dim": 1024, "depth": 24, "num_heads": 16},
}


class SoftConViT(VisionTransformer, _BandAware, Encoder, PretrainedMixin):
    """DINOv2-layout ViT (timm) for multispectral / SAR input, features = normed CLS token."""

    def __init__(
        self,
        size: str = "small",
        in_chans: int = 13,
        img_size: int = 224,
        patch_size: int = 14,
        embed_dim: int | None = None,
        depth: int | None = None,
        num_heads: int | None = None,
        init_values: float = 1e-5,
        drop_path_rate: float = 0.0,
        bands: Sequence[str] | None = None,
        normalization: Mapping[str, Any] | None = None,
        pretrained: str | None = None,
        input_bands: Sequence[str] | None = None,
        missing_bands: MissingBands = "error",
    ) -> None:
        if size not in VIT_SIZES:
            raise ConfigError(f"size must be one of {sorted(VIT_SIZES)}, got {size!r}")
        dims = {**VIT_SIZES[size], **{k: v for k, v in {"embed_dim": embed_dim, "depth": depth, "num_heads": num_heads}.items() if v is not None}}
        super().__init__(
            img_size=img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            num_classes=0,
            global_pool="token",
            init_values=init_values,
            drop_path_rate=drop_path_rate,
            dynamic_img_size=True,
            embed_dim=dims["embed_dim"],
            depth=dims["depth"],
            num_heads=dims["num_heads"],
        )
        self.mask_token = nn.Parameter(torch.zeros(1, dims["embed_dim"]))  # DINOv2's, used by Siamese masking
        self.feature_dim = dims["embed_dim"]
        self.bands = [canonical_band(b) for b in (bands or default_bands(in_chans))]
        if len(self.bands) != in_chans:
            raise ConfigError(f"{in_chans} input channels but {len(self.bands)} band names: {self.bands}")
        self.input_bands = list(self.bands)
        self.normalization = Normalization.from_meta(normalization) if normalization else None
        self.band_plan = None
        self._finish_init(pretrained, input_bands, missing_bands)

    def _first_conv(self) -> nn.Conv2d:
        proj = self.patch_embed.proj
        if not isinstance(proj, nn.Conv2d):
            raise ConfigError(f"the patch embedding's projection is a {type(proj).__name__}, not a Conv2d: its bands cannot be remapped")
        return proj

    def _set_first_conv(self, conv: nn.Conv2d, bias_delta: torch.Tensor) -> None:
        if conv.bias is None:  # timm's patch embedding has a bias; the band mapping folds missing bands into it
            raise ConfigError("the patch embedding has no bias to fold the missing bands' contribution into")
        conv.bias.data.add_(bias_delta)
        self.patch_embed.proj = conv

    def block_names(self) -> list[str]:
        # token embeddings first (cls, position, mask token are top-level parameters)
        return ["cls_token", "pos_embed", "mask_token", "patch_embed", *(f"blocks.{i}" for i in range(len(self.blocks))), "norm"]

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        """CLS token + DINOv2's position code for the input's patch grid (``x``: ``(B, H, W, D)``)."""
        b, h, w, d = x.shape
        table, cls_token = self._tables()
        pos = dinov2_pos_embed(table, (h, w))
        x = torch.cat([cls_token.expand(b, -1, -1), x.reshape(b, h * w, d)], dim=1)
        embedded: torch.Tensor = self.pos_drop(x + pos.to(x.dtype))
        return embedded

    def _tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The position table and CLS token (timm types both optional; this model always builds them)."""
        if self.pos_embed is None or self.cls_token is None:
            raise ConfigError("SoftConViT needs timm's position table and CLS token (class_token=True, pos_embed='learn')")
        return self.pos_embed, self.cls_token

    def forward_tokens(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        """Normed tokens ``(B, 1 + N, D)``; ``masks`` ``(B, N)`` bool replaces patches by ``mask_token``."""
        self._check_channels(x)
        h = self.patch_embed(x)  # (B, H, W, D) with dynamic_img_size
        if masks is not None:
            flat = h.reshape(h.shape[0], -1, h.shape[-1])
            flat = torch.where(masks[..., None], self.mask_token.to(flat.dtype)[None], flat)
            h = flat.reshape(h.shape)
        h = self._pos_embed(h)
        h = self.norm_pre(self.patch_drop(h))
        for block in self.blocks:
            h = block(h)
        normed: torch.Tensor = self.norm(h)
        return normed

    def forward_features(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        return self.forward_tokens(x, masks)[:, 0]

    def forward_dense(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.forward_tokens(x)[:, self.num_prefix_tokens :]
        grid = (x.shape[-2] // self.patch_embed.patch_size[0], x.shape[-1] // self.patch_embed.patch_size[1])
        return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, *grid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.forward_features(x)

    @classmethod
    def from_dinov2(cls, state_dict: Mapping[str, torch.Tensor], bands: Sequence[str], size: str = "small", **config: Any) -> SoftConViT:
        """Continual pretraining start: an RGB DINOv2 state dict, patch embedding expanded to ``bands``."""
        model = cls(size=size, in_chans=len(bands), bands=bands, **config)
        state = dict(state_dict)
        state["patch_embed.proj.weight"] = expand_rgb_kernel(state["patch_embed.proj.weight"], bands)
        _fit_pos_embed(model, state)
        load_state_dict_checked(model, state, strict=False, ignore_missing=["mask_token"], source="DINOv2 ViT")
        return model

    def load_state(self, state: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
        if "patch_embed.proj.weight" not in state:
            raise CheckpointError(f"{source} is not a DINOv2 ViT checkpoint (no 'patch_embed.proj.weight'; first keys {sorted(state)[:6]})")
        if self.band_plan is not None:
            raise ConfigError("load weights before adapt_bands(), not after")
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
        _fit_pos_embed(self, state)
        # torchgeo's converted "_enc" files drop mask_token; keep ours at zero then.
        load_state_dict_checked(self, state, strict=True, ignore_missing=["mask_token"], source=source)

    @classmethod
    def _from_checkpoint(cls, path: Path, spec: WeightSpec | None, **config: Any) -> SoftConViT:
        state = strip_prefix(_read_softcon_state(path), "backbone.")
        if "patch_embed.proj.weight" not in state:
            raise CheckpointError(f"{path} is not a DINOv2 ViT checkpoint (no 'patch_embed.proj.weight'; first keys {sorted(state)[:6]})")
        embed_dim, in_chans, patch, _ = state["patch_embed.proj.weight"].shape
        size = next((name for name, dims in VIT_SIZES.items() if dims["embed_dim"] == embed_dim), None)
        if size is None:
            raise CheckpointError(f"{path}: no known ViT size has width {embed_dim}; pass embed_dim, depth and num_heads")
        kwargs = _meta_kwargs(spec, ("bands", "normalization", "img_size"))
        kwargs.update(size=size, in_chans=int(in_chans), patch_size=int(patch))
        kwargs["depth"] = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
        kwargs.update(config)
        input_bands, missing = kwargs.pop("input_bands", None), kwargs.pop("missing_bands", "error")
        model = cls(**kwargs)
        model.load_state(state, source=str(path))
        if input_bands is not None:
            model.adapt_bands(input_bands, missing)
        return model


def _meta_kwargs(spec: WeightSpec | None, keys: Sequence[str]) -> dict[str, Any]:
    meta = dict(spec.meta) if spec is not None else {}
    return {k: meta[k] for k in keys if k in meta}


def _read_softcon_state(path: Path) -> dict[str, torch.Tensor]:
    return encoder_state(strip_prefix(unwrap_state_dict(read_official_checkpoint(path)), "module."), path)


def dinov2_pos_embed(pos_embed: torch.Tensor, grid: tuple[int, int], offset: float = 0.1) -> torch.Tensor:
    """A ``(1, 1 + n*n, D)`` table for a ``grid`` of patches the way DINOv2's
    ``interpolate_pos_encoding`` computes it (the code SoftCon was trained and evaluated with).

    Bicubic, no antialiasing, driven by the *scale factor* ``(grid + 0.1) / n`` rather than by
    the output size: the source coordinates differ slightly from a size-driven resize (timm's
    ``resample_abs_pos_embed``, which also antialiases when shrinking): with random N(0, 0.05)
    weights that moved the features by 1.4e-5 at 112 px and 5.8e-5 at 98 x 154 (now < 1e-7).
    """
    side = math.isqrt(pos_embed.shape[1] - 1)
    if side * side != pos_embed.shape[1] - 1:
        raise CheckpointError(f"position table of {pos_embed.shape[1] - 1} patch tokens is not a square grid")
    if (side, side) == tuple(grid):
        return pos_embed
    patches = pos_embed[:, 1:].float().reshape(1, side, side, -1).permute(0, 3, 1, 2)
    scale = ((grid[0] + offset) / side, (grid[1] + offset) / side)
    patches = F.interpolate(patches, scale_factor=scale, mode="bicubic")
    if tuple(patches.shape[-2:]) != tuple(grid):  # cannot happen with the 0.1 offset; guard the contract
        raise ConfigError(f"DINOv2 interpolation gave a {tuple(patches.shape[-2:])} grid, expected {tuple(grid)}")
    patches = patches.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], -1)
    return torch.cat([pos_embed[:, :1].float(), patches], dim=1).to(pos_embed.dtype)


def _fit_pos_embed(model: SoftConViT, state: dict[str, torch.Tensor]) -> None:
    # a model built for another image size stores the table DINOv2 would compute on the fly
    if "pos_embed" in state and state["pos_embed"].shape != model._tables()[0].shape:
        state["pos_embed"] = dinov2_pos_embed(state["pos_embed"], tuple(model.patch_embed.grid_size))
