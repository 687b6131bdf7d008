"""SatMAE (Cong et al., NeurIPS 2022) and SatMAE++ (Noman et al., CVPR 2024), one file.

The group-channel ViT of ``sustainlab-group/SatMAE`` (``models_mae_group_channels.py``
for pretraining, ``models_vit_group_channels.py`` for fine-tuning) with the same
state-dict keys, so the released ``{'model': ...}`` checkpoints load unchanged:

* the Sentinel-2 bands are split into spectral groups (default (B2,B3,B4,B8),
  (B5,B6,B7,B8A), (B11,B12)), each with its own patch embedding ``patch_embed.{g}.proj``;
* every token gets a 2-D sin-cos position code of width ``embed_dim - channel_embed``
  *concatenated* with a 1-D sin-cos code of its group (width ``channel_embed``);
* the MAE masks tokens independently per group (or, ``spatial_mask``, the same
  locations in every group) and a per-group linear head ``decoder_pred.{g}``
  reconstructs each group's pixels; MSE on masked patches;
* SatMAE++'s multi-scale option adds the transposed-convolution upsampling blocks
  (``proj_up_conv``, ``up_block1``, ``up_block2``) and its loss
  ``0.6 * MSE + 0.4 * (L1 at x2 + L1 at x4) / 2``.

:class:`SatMAETemporal` is the temporal variant (three RGB frames sharing one patch
embedding, year/month/hour sin-cos codes of width 128 each).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch import nn

from polyfm.core.encoder import Encoder
from polyfm.core.errors import CheckpointError, ConfigError, DataError
from polyfm.core.weights import (
    PretrainedMixin,
    WeightSpec,
    fetch_weights,
    get_weights,
    load_checkpoint_file,
    load_state_dict_checked,
    strip_prefix,
    unwrap_state_dict,
)
from polyfm.geo.bands import (
    BandPlan,
    MissingBands,
    Normalization,
    canonical_band,
    conv_like,
    normalization_for,
    plan_bands,
    remap_in_channels,
)

# fMoW-Sentinel after the official --dropped_bands 0 9 10 (B1, B9, B10).
SATMAE_BANDS: list[str] = ["B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B11", "B12"]
SATMAE_GROUPS: list[list[int]] = [[0, 1, 2, 6], [3, 4, 5, 7], [8, 9]]
_SATMAE_GROUPS_DEFAULT: tuple[tuple[int, ...], ...] = tuple(tuple(g) for g in SATMAE_GROUPS)


# ----------------------------------------------------------------------------- sin-cos codes


def sincos_1d(dim: int, positions: torch.Tensor | np.ndarray[Any, Any]) -> torch.Tensor:
    """``[sin(p * w), cos(p * w)]`` with ``w = 1 / 10000^(2i/dim)`` (MAE's convention), float64."""
    if dim % 2:
        raise ConfigError(f"sin-cos width must be even, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
    pos = torch.as_tensor(positions, dtype=torch.float64).reshape(-1)
    out = pos[:, None] * omega[None, :].to(pos.device)
    return torch.cat([out.sin(), out.cos()], dim=1)


def sincos_2d(dim: int, grid_h: int, grid_w: int | None = None, cls_token: bool = True) -> torch.Tensor:
    """2-D code: first half encodes the column (x), second half the row (y), as in MAE."""
    grid_w = grid_h if grid_w is None else grid_w
    ys, xs = torch.meshgrid(torch.arange(grid_h, dtype=torch.float64), torch.arange(grid_w, dtype=torch.float64), indexing="ij")
    emb = torch.cat([sincos_1d(dim // 2, xs), sincos_1d(dim // 2, ys)], dim=1)
    if cls_token:
        emb = torch.cat([torch.zeros(1, dim, dtype=torch.float64), emb], dim=0)
    return emb


PosInterpolation = Literal["auto", "sincos", "bicubic"]


def _check_pos_interpolation(mode: str) -> None:
    if mode not in ("auto", "sincos", "bicubic"):
        raise ConfigError(f"pos_interpolation must be 'auto', 'sincos' or 'bicubic', got {mode!r}")


def is_sincos_table(pos_embed: torch.Tensor) -> bool:
    """Whether a ``(1, 1 + n*n, D)`` table is still the fixed 2-D sin-cos code (zero CLS row)."""
    grid = int(math.isqrt(pos_embed.shape[1] - 1))
    if grid * grid != pos_embed.shape[1] - 1 or pos_embed.shape[-1] % 4:
        return False
    reference = sincos_2d(pos_embed.shape[-1], grid).to(pos_embed.device)
    return bool(torch.allclose(pos_embed[0].detach().double(), reference, atol=1e-5))


def fit_pos_table(pos_embed: torch.Tensor, new_grid: tuple[int, int], mode: PosInterpolation = "auto") -> torch.Tensor:
    """A SatMAE position table for another patch grid.

    ``"sincos"``: the 2-D sin-cos code of the new grid, which is what the official
    ``main_finetune.py`` ends up with (it deletes a ``pos_embed`` of another shape before
    ``interpolate_pos_embed`` and keeps the model's own sin-cos table); ``"bicubic"``: MAE's
    ``interpolate_pos_embed``; ``"auto"``: sin-cos while the table is still the fixed code
    (every pretraining file), bicubic once it was learned (fine-tuned files), so learned
    offsets are kept.
    """
    side = math.isqrt(pos_embed.shape[1] - 1)
    if side * side == pos_embed.shape[1] - 1 and (side, side) == tuple(new_grid):
        return pos_embed
    _check_pos_interpolation(mode)
    if mode == "sincos" or (mode == "auto" and is_sincos_table(pos_embed)):
        return sincos_2d(pos_embed.shape[-1], *new_grid)[None].to(pos_embed)
    return resize_pos_embed(pos_embed, new_grid)


def resize_pos_embed(pos_embed: torch.Tensor, new_grid: tuple[int, int], extra_tokens: int = 1) -> torch.Tensor:
    """Bicubic resize of a ``(1, extra + h*w, D)`` table to ``new_grid`` (DeiT/MAE's interpolate_pos_embed)."""
    extra, grid = pos_embed[:, :extra_tokens], pos_embed[:, extra_tokens:]
    old = int(math.isqrt(grid.shape[1]))
    if old * old != grid.shape[1]:
        raise CheckpointError(f"position table of {grid.shape[1]} tokens is not a square grid")
    if (old, old) == tuple(new_grid):
        return pos_embed
    grid = grid.reshape(1, old, old, -1).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=new_grid, mode="bicubic", align_corners=False)
    return torch.cat([extra, grid.permute(0, 2, 3, 1).flatten(1, 2).to(pos_embed.dtype)], dim=1)


# ----------------------------------------------------------------------------- building blocks


class PatchEmbed(nn.Module):
    """A strided convolution (``proj``), as timm's PatchEmbed without its size checks."""

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        patches: torch.Tensor = self.proj(x)
        return patches.flatten(2).transpose(1, 2)


class ChannelsFirstLayerNorm(nn.Module):
    """LayerNorm over dim 1 of ``(B, C, H, W)`` (SatMAE++'s ``LayerNorm(data_format='channels_first')``)."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class ResidualBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual: torch.Tensor = self.conv2(self.relu(self.conv1(x)))
        return x + 0.5 * residual


class UpsampleBlock(nn.Module):
    """SatMAE++: x2 transposed conv -> LN -> leaky ReLU -> residual block -> LN; a 3x3 conv predicts pixels."""

    def __init__(self, channels: int, out_channels: int) -> None:
        super().__init__()
        self.up_conv = nn.ConvTranspose2d(channels, channels, kernel_size=4, stride=2, padding=1)
        self.up_norm = ChannelsFirstLayerNorm(channels)
        self.res_block = ResidualBlock(channels)
        self.res_norm = ChannelsFirstLayerNorm(channels)
        self.proj_out = nn.Conv2d(channels, out_channels, 3, padding=1)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = F.leaky_relu(self.up_norm(self.up_conv(x)))
        x = self.res_norm(self.res_block(x))
        return x, self.proj_out(x)


def _vit_blocks(dim: int, depth: int, heads: int, mlp_ratio: float, drop_path: float) -> nn.ModuleList:
    norm = partial(nn.LayerNorm, eps=1e-6)
    rates = torch.linspace(0, drop_path, depth, device="cpu").tolist() if depth else []  # cpu: also under torch.device("meta")
    # timm annotates norm_layer as type[nn.Module] but calls it as a factory (its own models pass partials)
    return nn.ModuleList(Block(dim, heads, mlp_ratio, qkv_bias=True, norm_layer=norm, drop_path=rates[i]) for i in range(depth))  # type: ignore[arg-type]


def _init_mae_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def _random_masking(x: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep a random ``1 - mask_ratio`` of tokens per sample (argsort of noise). mask: 1 = removed."""
    n, length, dim = x.shape
    keep = int(length * (1 - mask_ratio))
    noise = torch.rand(n, length, device=x.device) if noise is None else noise
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    kept = torch.gather(x, 1, ids_shuffle[:, :keep, None].expand(-1, -1, dim))
    mask = torch.ones(n, length, device=x.device)
    mask[:, :keep] = 0
    return kept, torch.gather(mask, 1, ids_restore), ids_restore


# ----------------------------------------------------------------------------- SatMAE


class SatMAE(Encoder, PretrainedMixin):
    """Group-channel SatMAE: encoder, optional MAE decoder, optional SatMAE++ multi-scale head.

    ``bands`` names the model's input channels in order; ``channel_groups`` indexes
    them. ``decoder_depth=0`` builds the encoder only (fine-tuning). ``global_pool``
    pools patch tokens into ``fc_norm`` (SatMAE's fine-tuning default), otherwise the
    normed CLS token. ``num_classes > 0`` adds the fine-tuned checkpoints' ``head``.
    ``pos_interpolation`` says how a position table meets another patch grid (a checkpoint
    of another image size, or an input of another size): see :func:`fit_pos_table`.
    """

    def __init__(
        self,
        img_size: int = 96,
        patch_size: int = 8,
        bands: Sequence[str] = tuple(SATMAE_BANDS),
        channel_groups: Sequence[Sequence[int]] = _SATMAE_GROUPS_DEFAULT,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        channel_embed: int = 256,
        mlp_ratio: float = 4.0,
        decoder_embed_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        decoder_channel_embed: int = 128,
        mask_ratio: float = 0.75,
        spatial_mask: bool = False,
        norm_pix_loss: bool = False,
        multiscale: bool = False,
        multiscale_proj_ratio: int = 4,
        global_pool: bool = True,
        num_classes: int = 0,
        drop_path_rate: float = 0.0,
        normalization: Mapping[str, Any] | None = None,
        pos_interpolation: PosInterpolation = "auto",
        pretrained: str | None = None,
        input_bands: Sequence[str] | None = None,
        missing_bands: MissingBands = "error",
    ) -> None:
        super().__init__()
        _check_pos_interpolation(pos_interpolation)
        self.pos_interpolation = pos_interpolation
        groups = [list(g) for g in channel_groups]
        bands = [canonical_band(b) for b in bands]
        flat = sorted(i for g in groups for i in g)
        if flat != list(range(len(bands))):
            raise ConfigError(f"channel_groups {groups} must cover each of the {len(bands)} bands {bands} exactly once")
        if img_size % patch_size:
            raise ConfigError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        if embed_dim % num_heads or (decoder_depth > 0 and decoder_embed_dim % decoder_num_heads):
            raise ConfigError(f"embed_dim {embed_dim} / decoder_embed_dim {decoder_embed_dim} must be divisible by "
                              f"num_heads {num_heads} / decoder_num_heads {decoder_num_heads}")
        self.img_size, self.patch_size = img_size, patch_size
        self.bands, self.channel_groups = bands, groups
        self.embed_dim, self.feature_dim = embed_dim, embed_dim
        self.mask_ratio, self.spatial_mask, self.norm_pix_loss = mask_ratio, spatial_mask, norm_pix_loss
        self.global_pool, self.multiscale = global_pool, multiscale
        self.normalization = Normalization.from_meta(normalization) if normalization else None
        # After adapt_bands(): which input channels each group's patch embedding reads,
        # and which groups exist in the input at all.
        self.input_bands: list[str] = list(bands)
        self.group_inputs: list[list[int]] = [list(g) for g in groups]
        self.active_groups: list[int] = list(range(len(groups)))
        self.band_plan: BandPlan | None = None

        # each token's code is [2-D position (width - channel code), group code]: both widths must stay positive
        for width, code, names in ((embed_dim, channel_embed, "embed_dim/channel_embed"),
                                   (decoder_embed_dim, decoder_channel_embed, "decoder_embed_dim/decoder_channel_embed")):
            if (names.startswith("embed") or decoder_depth > 0) and not 0 < code < width:
                raise ConfigError(f"{names} = {width}/{code}: the group code must be narrower than the token width (it is concatenated "
                                  f"with a 2-D position code of width {width} - {code}); set a smaller {names.split('/')[1]}")
        grid = img_size // patch_size
        num_groups = len(groups)
        self.patch_embed = nn.ModuleList(PatchEmbed(len(g), embed_dim, patch_size) for g in groups)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(sincos_2d(embed_dim - channel_embed, grid).float()[None], requires_grad=False)
        self.channel_embed = nn.Parameter(sincos_1d(channel_embed, torch.arange(num_groups)).float()[None], requires_grad=False)
        # The fine-tuning model's CLS channel code (zeros, learnable there).
        self.channel_cls_embed = nn.Parameter(torch.zeros(1, 1, channel_embed))
        self.blocks = _vit_blocks(embed_dim, depth, num_heads, mlp_ratio, drop_path_rate)
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.fc_norm = nn.LayerNorm(embed_dim, eps=1e-6) if global_pool else None
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else None

        self.decoder_depth = decoder_depth
        if decoder_depth > 0:
            self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
            self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
            self.decoder_pos_embed = nn.Parameter(
                sincos_2d(decoder_embed_dim - decoder_channel_embed, grid).float()[None], requires_grad=False
            )
            self.decoder_channel_embed = nn.Parameter(
                sincos_1d(decoder_channel_embed, torch.arange(num_groups + 1)).float()[None], requires_grad=False
            )
            self.decoder_blocks = _vit_blocks(decoder_embed_dim, decoder_depth, decoder_num_heads, mlp_ratio, 0.0)
            self.decoder_norm = nn.LayerNorm(decoder_embed_dim, eps=1e-6)
            self.decoder_pred = nn.ModuleList(nn.Linear(decoder_embed_dim, len(g) * patch_size**2) for g in groups)
        if multiscale:
            if decoder_depth <= 0:
                raise ConfigError("multiscale=True (SatMAE++) needs the MAE decoder: set decoder_depth > 0")
            width = len(bands) * multiscale_proj_ratio
            self.proj_up_conv = nn.Conv2d(len(bands), width, kernel_size=1)
            self.proj_up_norm = ChannelsFirstLayerNorm(width)
            self.up_block1 = UpsampleBlock(width, len(bands))
            self.up_block2 = UpsampleBlock(width, len(bands))
        self._init_weights()
        # For YAML recipes: load weights into this configuration, then map the data's bands.
        if wants_checkpoint(pretrained):
            self.load_pretrained(pretrained)  # type: ignore[arg-type]
        if input_bands is not None:
            self.adapt_bands(input_bands, missing_bands)

    def _init_weights(self) -> None:
        for embed in self._patch_embeds():
            weight = embed.proj.weight.data
            nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        if self.decoder_depth > 0:
            nn.init.normal_(self.mask_token, std=0.02)
        skip = {"up_block1", "up_block2"}
        for name, module in self.named_modules():
            if not any(name.startswith(s) for s in skip):
                _init_mae_weights(module)

    # -- encoder contract -------------------------------------------------------------
    def block_names(self) -> list[str]:
        # the token embeddings (all top-level parameters) come first, so freeze-k and
        # LLRD treat them as the input layer, as BEiT/MAE fine-tuning does
        embeddings = ["cls_token", "pos_embed", "channel_embed", "channel_cls_embed", "patch_embed"]
        tail = ["norm"] + (["fc_norm"] if self.fc_norm is not None else [])
        return [*embeddings, *(f"blocks.{i}" for i in range(len(self.blocks))), *tail]

    def _pos_channel(self, pos_embed: torch.Tensor, channel_embed: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """``(1, G, L, D)``: spatial code of each location concatenated with each group's code."""
        pos = fit_pos_table(pos_embed, grid, self.pos_interpolation)[:, 1:]  # (1, L, pD)
        groups, length = channel_embed.shape[1], pos.shape[1]
        return torch.cat([pos[:, None].expand(-1, groups, -1, -1), channel_embed[:, :, None].expand(-1, -1, length, -1)], dim=-1)

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != len(self.input_bands):
            raise DataError(
                f"SatMAE expects (B, {len(self.input_bands)}, H, W) with bands {self.input_bands}, got {tuple(x.shape)}. "
                "Map the data's bands with model.adapt_bands(data_bands, missing_bands=...) or select them in the datamodule."
            )
        if x.shape[-1] % self.patch_size or x.shape[-2] % self.patch_size:
            raise DataError(f"image size {tuple(x.shape[-2:])} is not a multiple of the patch size {self.patch_size}")

    def embed_groups(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Patch tokens of each present group with position + group codes: ``(B, G, L, D)``."""
        self._check_input(x)
        grid = (x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size)
        # index_select, not x[:, list]: the same copy, 2-4x faster on CPU than advanced indexing
        tokens = torch.stack(
            [self.patch_embed[g](x.index_select(1, torch.as_tensor(self.group_inputs[g], device=x.device))) for g in self.active_groups],
            dim=1,
        )
        codes = self._pos_channel(self.pos_embed, self.channel_embed[:, self.active_groups], grid)
        return tokens.add_(codes.to(tokens.dtype)), grid  # in place: stack's fresh output, not needed by its backward

    def forward_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """All tokens after the blocks (not normed): ``(B, 1 + G*L, D)`` and the patch grid."""
        tokens, grid = self.embed_groups(x)
        b, g, length, d = tokens.shape
        cls = self.cls_token + torch.cat([self.pos_embed[:, :1], self.channel_cls_embed], dim=-1)
        h = torch.cat([cls.expand(b, -1, -1), tokens.reshape(b, g * length, d)], dim=1)
        for block in self.blocks:
            h = block(h)
        return h, grid

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.forward_tokens(x)
        if self.global_pool and self.fc_norm is not None:
            pooled: torch.Tensor = self.fc_norm(h[:, 1:].mean(dim=1))
            return pooled
        normed: torch.Tensor = self.norm(h)
        return normed[:, 0]

    def forward_dense(self, x: torch.Tensor) -> torch.Tensor:
        """A feature map ``(B, D, H/p, W/p)``: normed patch tokens averaged over the groups."""
        tokens, grid = self.forward_tokens(x)
        normed: torch.Tensor = self.norm(tokens)
        h = normed[:, 1:]
        b, _, d = h.shape
        h = h.reshape(b, len(self.active_groups), grid[0] * grid[1], d).mean(1)
        return h.transpose(1, 2).reshape(b, d, *grid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.forward_features(x)
        if self.head is None:
            return features
        logits: torch.Tensor = self.head(features)
        return logits

    def _patch_embeds(self) -> list[PatchEmbed]:
        # nn.ModuleList is untyped: its entries are the PatchEmbeds built in __init__
        return [cast(PatchEmbed, embed) for embed in self.patch_embed]

    # -- MAE ----------------------------------------------------------------------------
    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """``(N, C, H, W)`` -> ``(N, L, C*p*p)`` with channel-major patches (``nchpwq->nhwcpq``)."""
        p, (n, c, hh, ww) = self.patch_size, imgs.shape
        x = imgs.reshape(n, c, hh // p, p, ww // p, p)
        return torch.einsum("nchpwq->nhwcpq", x).reshape(n, (hh // p) * (ww // p), c * p * p)

    def unpatchify(self, x: torch.Tensor, grid: tuple[int, int], channels: int) -> torch.Tensor:
        p, n = self.patch_size, x.shape[0]
        x = x.reshape(n, grid[0], grid[1], channels, p, p)
        return torch.einsum("nhwcpq->nchpwq", x).reshape(n, channels, grid[0] * p, grid[1] * p)

    def forward_encoder(self, x: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[int, int]]:
        tokens, grid = self.embed_groups(x)
        b, g, length, d = tokens.shape
        if self.spatial_mask:  # the same locations hidden in every group
            flat = tokens.permute(0, 2, 1, 3).reshape(b, length, g * d)
            kept, mask, ids_restore = _random_masking(flat, mask_ratio, noise)
            kept = kept.view(b, kept.shape[1], g, d).permute(0, 2, 1, 3).reshape(b, -1, d)
            mask = mask.repeat(1, g).view(b, g, length)
        else:  # every group masked independently
            kept, mask, ids_restore = _random_masking(tokens.reshape(b, g * length, d), mask_ratio, noise)
            mask = mask.view(b, g, length)
        h = torch.cat([self.cls_token.expand(b, -1, -1), kept], dim=1)
        for block in self.blocks:
            h = block(h)
        return self.norm(h), mask, ids_restore, grid

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Per-band pixel predictions ``(N, C, L, p*p)``."""
        if self.decoder_depth <= 0:
            raise ConfigError("this SatMAE was built without a decoder (decoder_depth=0); it cannot run the MAE objective")
        x = self.decoder_embed(latent)
        groups = len(self.active_groups)
        n, d = x.shape[0], x.shape[2]
        if self.spatial_mask:
            length = ids_restore.shape[1]
            visible = x[:, 1:].view(n, groups, -1, d).permute(0, 2, 1, 3)
            kept = visible.shape[1]
            visible = visible.reshape(n, kept, groups * d)
            full = torch.cat([visible, self.mask_token.repeat(n, length - kept, groups)], dim=1)
            full = torch.gather(full, 1, ids_restore[..., None].expand(-1, -1, full.shape[2]))
            full = full.view(n, length, groups, d).permute(0, 2, 1, 3).reshape(n, -1, d)
        else:
            full = torch.cat([x[:, 1:], self.mask_token.repeat(n, ids_restore.shape[1] + 1 - x.shape[1], 1)], dim=1)
            full = torch.gather(full, 1, ids_restore[..., None].expand(-1, -1, d))
        codes = self._pos_channel(self.decoder_pos_embed, self.decoder_channel_embed[:, self.active_groups], grid).reshape(1, -1, d)
        cls_code = torch.cat([self.decoder_pos_embed[:, :1], self.decoder_channel_embed[:, -1:]], dim=-1)
        h = torch.cat([x[:, :1], full], dim=1) + torch.cat([cls_code, codes], dim=1)
        for block in self.decoder_blocks:
            h = block(h)
        h = self.decoder_norm(h)[:, 1:]
        h = h.view(n, groups, -1, d)
        outputs = []
        for slot, g in enumerate(self.active_groups):
            pred = self.decoder_pred[g](h[:, slot])  # (N, L, g_c * p^2)
            outputs.append(pred.view(n, pred.shape[1], -1, self.patch_size**2).permute(0, 2, 1, 3))
        return torch.cat(outputs, dim=1)

    def _target(self, imgs: torch.Tensor) -> torch.Tensor:
        target = self.patchify(imgs)
        if self.norm_pix_loss:
            mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        n, length, _ = target.shape
        return target.view(n, length, imgs.shape[1], -1).permute(0, 2, 1, 3)  # (N, C, L, p^2)

    def mae_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error over the masked patches of every group (official ``forward_loss``)."""
        per_band = (pred - self._target(imgs)).pow(2).mean(-1)  # (N, C, L)
        total, removed = per_band.new_zeros(()), per_band.new_zeros(())
        for slot, g in enumerate(self.active_groups):
            total = total + (per_band[:, self.channel_groups[g]].mean(1) * mask[:, slot]).sum()
            removed = removed + mask[:, slot].sum()
        return total / removed.clamp(min=1)

    def forward_multiscale(self, pred: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        n, c, length, p2 = pred.shape
        image = self.unpatchify(pred.permute(0, 2, 1, 3).reshape(n, length, c * p2), grid, c)
        x = self.proj_up_norm(F.gelu(self.proj_up_conv(image)))
        x, out_2x = self.up_block1(x)
        _, out_4x = self.up_block2(x)
        return out_2x, out_4x

    def forward_mae(
        self,
        imgs: torch.Tensor,
        mask_ratio: float | None = None,
        imgs_up: Sequence[torch.Tensor] | None = None,
        noise: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """One MAE step. Returns ``loss`` (SatMAE++: ``0.6 mse + 0.4 l1``), ``mse``, ``pred``, ``mask``."""
        if self.band_plan is not None and self.band_plan.missing:
            raise ConfigError(
                f"MAE pretraining needs every model band in the input; missing {self.band_plan.missing}. "
                "Continue pretraining on data that has them, or fine-tune instead."
            )
        ratio = self.mask_ratio if mask_ratio is None else mask_ratio
        latent, mask, ids_restore, grid = self.forward_encoder(imgs, ratio, noise)
        pred = self.forward_decoder(latent, ids_restore, grid)
        mse = self.mae_loss(imgs, pred, mask)
        out = {"loss": mse, "mse": mse, "pred": pred, "mask": mask}
        if self.multiscale:
            if imgs_up is None or len(imgs_up) != 2:
                raise DataError("SatMAE++ multi-scale reconstruction needs imgs_up = [image at x2, image at x4]")
            out_2x, out_4x = self.forward_multiscale(pred, grid)
            l1 = 0.5 * F.l1_loss(out_2x, imgs_up[0]) + 0.5 * F.l1_loss(out_4x, imgs_up[1])
            out.update(loss=0.6 * mse + 0.4 * l1, l1=l1)
        return out

    # -- band awareness -----------------------------------------------------------------
    def adapt_bands(self, input_bands: Sequence[str], missing_bands: MissingBands = "error") -> BandPlan:
        """Make the model read inputs whose channels are ``input_bands`` (any order, any superset).

        Each group's patch embedding is rewritten for the input's channels (see
        :mod:`polyfm.geo.bands`); a group with none of its bands present is dropped.
        Returns the plan (``plan.describe()`` explains it)."""
        if self.band_plan is not None:
            raise ConfigError("adapt_bands() was already applied to this model; build or load a fresh one")
        plan = plan_bands(input_bands, self.bands, missing_bands)
        levels = self.normalization.normalised_mean() if self.normalization else [0.0] * len(self.bands)
        active: list[int] = []
        group_inputs: list[list[int]] = []
        embeds = self._patch_embeds()
        for g, members in enumerate(self.channel_groups):
            names = [self.bands[i] for i in members]
            conv = embeds[g].proj
            if not any(plan.present[i] for i in members):
                group_inputs.append([])
                continue
            weight, bias, channels = remap_in_channels(conv.weight.data, plan, names, levels)
            new = conv_like(conv, len(channels))
            new.weight.data.copy_(weight)
            if new.bias is not None and conv.bias is not None:  # patch embeddings always have one
                new.bias.data.copy_(conv.bias.data + bias)
            embeds[g].proj = new
            active.append(g)
            group_inputs.append(channels)
        self.active_groups, self.group_inputs = active, group_inputs
        self.input_bands, self.band_plan = list(plan.input_bands), plan
        return plan

    def input_normalization(self) -> Normalization | None:
        """The weights' normalisation laid out for ``input_bands`` (unused bands pass through)."""
        return normalization_for(self.input_bands, self.bands, self.normalization)

    # -- checkpoints --------------------------------------------------------------------
    @classmethod
    def _from_checkpoint(cls, path: Path, spec: WeightSpec | None, **config: Any) -> SatMAE:
        state = _read_state(path, spec)
        inferred = infer_satmae_config(state, str(path))
        if spec is not None and "normalization" in spec.meta:
            inferred["normalization"] = spec.meta["normalization"]
            inferred["bands"] = spec.meta["bands"]
        inferred.update(config)
        input_bands, missing = inferred.pop("input_bands", None), inferred.pop("missing_bands", "error")
        model = cls(**inferred)
        model.load_state(state, source=str(path))
        if input_bands is not None:
            model.adapt_bands(input_bands, missing)
        return model

    def load_pretrained(self, name_or_path: str) -> None:
        """Load a released checkpoint (a path or a registered name) into this configuration;
        the weights' bands and normalisation come with a registered name."""
        path, spec = resolve_checkpoint(name_or_path)
        if spec is not None and "normalization" in spec.meta:
            self.normalization = Normalization.from_meta(spec.meta["normalization"])
        self.load_state(_read_state(path, spec), source=str(path))

    def load_state(self, state: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
        """Load an official-layout state dict: position tables resized to this image size;
        what a pretraining or fine-tuning checkpoint legitimately lacks is allowed to be missing."""
        if self.band_plan is not None:
            raise ConfigError("load weights before adapt_bands(), not after")
        state = dict(state)
        kernel = state.get("patch_embed.0.proj.weight")
        if kernel is not None and kernel.shape[-1] != self.patch_size:
            raise CheckpointError(
                f"{source} was trained with {kernel.shape[-1]} px patches, this model has patch_size={self.patch_size}; "
                f"patch kernels are not resized (the official code cannot either): build it with patch_size={kernel.shape[-1]} "
                "and pick img_size instead"
            )
        grid = (self.img_size // self.patch_size,) * 2
        for key in ("pos_embed", "decoder_pos_embed"):
            if key in state and hasattr(self, key):
                state[key] = fit_pos_table(state[key], grid, self.pos_interpolation)
        ignore_missing = ["channel_cls_embed"]  # pretraining checkpoints have none (zeros at fine-tuning)
        if self.fc_norm is not None and "fc_norm.weight" not in state:
            ignore_missing.append("fc_norm.")  # fresh, as the official fine-tuning starts it
        if "norm.weight" not in state:
            ignore_missing.append("norm.")  # fine-tuned with global pooling: the official model deletes it
        if self.head is None:
            state = {k: v for k, v in state.items() if not k.startswith("head.")}
        ignore_unexpected = [] if self.decoder_depth > 0 else ["decoder_", "mask_token"]
        if not self.multiscale:
            ignore_unexpected += ["proj_up_", "up_block"]
        load_state_dict_checked(self, state, strict=True, ignore_missing=ignore_missing, ignore_unexpected=ignore_unexpected, source=source)


def wants_checkpoint(pretrained: str | Path | None) -> bool:
    """False for no weights. jsonargparse turns ``--model.init_args.encoder.init_args.pretrained=null``
    (a model nested in a task) into the string ``"None"``: that means no weights too, not a file."""
    return pretrained is not None and str(pretrained).strip().lower() not in ("", "none", "null")


def resolve_checkpoint(name_or_path: str | Path) -> tuple[Path, WeightSpec | None]:
    """A local file, or a registered weight fetched into the cache (clear error offline)."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path, None
    spec = get_weights(str(name_or_path))
    return fetch_weights(spec) / spec.primary_file, spec


def read_official_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint written by the official MAE-style training scripts.

    Those save ``{'model', 'optimizer', 'epoch', 'scaler', 'args'}`` where ``args`` is an
    ``argparse.Namespace``. Loading stays ``weights_only=True``; only ``Namespace`` (a plain
    attribute container, nothing executable) is added to the allowed types for this read.
    """
    import argparse

    with torch.serialization.safe_globals([argparse.Namespace]):
        return load_checkpoint_file(path)


_OWN_KEYS = ("patch_embed", "cls_token", "pos_embed", "blocks.", "conv1.", "layer1.")


def encoder_state(state: Mapping[str, torch.Tensor], source: str | Path) -> dict[str, torch.Tensor]:
    """The encoder's weights from a polyfm Lightning checkpoint (``polyfm fit`` output): a task
    keeps the encoder under ``encoder.``, ``Pretraining`` under ``model.``; the head, decoder
    heads and objective are left out. Official layouts pass through unchanged."""
    if any(k.startswith(_OWN_KEYS) for k in state):
        return dict(state)
    prefix = max(("encoder.", "model."), key=lambda p: sum(k.startswith(p) for k in state))
    inner = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not inner:
        return dict(state)
    if any(".lora_A." in k for k in inner):
        raise CheckpointError(
            f"{source} holds LoRA adapters (lora_A/lora_B around base_layer), not plain encoder weights. Predict or test with it "
            "through the task (polyfm predict/test --ckpt_path ...), or fine-tune again from the checkpoint the LoRA run started from"
        )
    return inner


def _read_state(path: Path, spec: WeightSpec | None) -> dict[str, torch.Tensor]:
    state = encoder_state(strip_prefix(unwrap_state_dict(read_official_checkpoint(path)), "module."), path)
    if spec is not None and spec.converter is not None:
        state = spec.converter(state)
    return state


def _refuse_plain_vit(state: Mapping[str, torch.Tensor], model: str, source: str = "checkpoint") -> None:
    """SatMAE's fMoW-RGB files (``fmow_pretrain.pth``, ``models_mae.py`` / ``models_vit.py``) are
    plain ViTs: one patch embedding and a full-width position table, no group or time codes."""
    proj, pos = state.get("patch_embed.proj.weight"), state.get("pos_embed")
    if proj is None or pos is None or pos.shape[-1] != proj.shape[0]:
        return
    raise CheckpointError(
        f"{source} is a plain ViT checkpoint ({proj.shape[1]} input channels, patch {proj.shape[-1]}, position table as wide as "
        f"the tokens, {pos.shape[-1]}), such as SatMAE's fMoW-RGB 'fmow_pretrain.pth': {model} cannot load it (it expects "
        + ("per-group 'patch_embed.{g}.proj'" if model == "SatMAE" else f"a position table {proj.shape[0] - 384} wide plus time codes")
        + "). Its keys are timm's VisionTransformer layout: build e.g. timm.create_model('vit_large_patch16_224', num_classes=0) "
        "and load the 'model' entry (decoder_* and mask_token keys removed), or use polyfm.core.transfer.load_trunk."
    )


def infer_satmae_config(state: Mapping[str, torch.Tensor], source: str = "checkpoint") -> dict[str, Any]:
    """Architecture from a checkpoint's shapes: width, depth, groups, patch, image size, decoder."""
    if "patch_embed.0.proj.weight" not in state:
        _refuse_plain_vit(state, "SatMAE", source)
        raise CheckpointError(
            f"{source} is not a group-channel SatMAE checkpoint: no 'patch_embed.0.proj.weight' "
            f"(first keys: {sorted(state)[:8]}). The temporal model loads with SatMAETemporal."
        )
    groups = sum(1 for k in state if k.startswith("patch_embed.") and k.endswith(".proj.weight"))
    embed_dim, _, patch, _ = state["patch_embed.0.proj.weight"].shape
    group_sizes = [state[f"patch_embed.{g}.proj.weight"].shape[1] for g in range(groups)]
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    channel_embed = state["channel_embed"].shape[-1]
    grid = int(math.isqrt(state["pos_embed"].shape[1] - 1))
    config: dict[str, Any] = {
        "embed_dim": int(embed_dim),
        "patch_size": int(patch),
        "depth": depth,
        "num_heads": {768: 12, 1024: 16, 1280: 16}.get(int(embed_dim), max(1, int(embed_dim) // 64)),
        "channel_embed": int(channel_embed),
        "img_size": grid * int(patch),
        # fc_norm: fine-tuned with global pooling; a head without fc_norm: fine-tuned on the
        # CLS token (norm kept); a pretraining file: SatMAE's fine-tuning default, pooling
        "global_pool": "fc_norm.weight" in state or "head.weight" not in state,
    }
    if group_sizes == [4, 4, 2]:
        config["channel_groups"], config["bands"] = SATMAE_GROUPS, SATMAE_BANDS
    else:  # contiguous groups over generic band names; pass bands/channel_groups to override
        start, custom = 0, []
        for size in group_sizes:
            custom.append(list(range(start, start + size)))
            start += size
        config["channel_groups"], config["bands"] = custom, [f"band{i}" for i in range(start)]
    if "decoder_embed.weight" in state:
        dec_dim = state["decoder_embed.weight"].shape[0]
        config.update(
            decoder_embed_dim=int(dec_dim),
            decoder_depth=1 + max(int(k.split(".")[1]) for k in state if k.startswith("decoder_blocks.")),
            decoder_num_heads=16,
            decoder_channel_embed=int(state["decoder_channel_embed"].shape[-1]),
        )
    else:
        config["decoder_depth"] = 0
    config["multiscale"] = "proj_up_conv.weight" in state
    if config["multiscale"]:
        config["multiscale_proj_ratio"] = state["proj_up_conv.weight"].shape[0] // sum(group_sizes)
    if "head.weight" in state:
        config["num_classes"] = int(state["head.weight"].shape[0])
    return config


# ----------------------------------------------------------------------------- temporal


class SatMAETemporal(Encoder, PretrainedMixin):
    """SatMAE's temporal MAE (``models_mae_temporal.py``): three frames of an RGB time
    series share ``patch_embed``; each token's code is the 2-D position (width
    ``embed_dim - 384``) concatenated with sin-cos codes of the frame's year, month and
    hour (128 each; 64 each in the decoder). Input ``{"images": (B, 3, C, H, W),
    "timestamps": (B, 3, 3)}`` with (year - 2002, month - 1, hour) per frame, as the official
    fMoW loader (``CustomDatasetFromImagesTemporal.parse_timestamp``) gives them. Features follow the
    fine-tuning model (``models_vit_temporal.py``): the CLS token gets the spatial table's
    first row, then mean-pooled tokens + ``fc_norm`` (``global_pool``) or the normed CLS."""

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 1024,
        depth: int = 24,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        decoder_embed_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        mask_ratio: float = 0.75,
        norm_pix_loss: bool = False,
        same_mask: bool = False,
        num_frames: int = 3,
        global_pool: bool = True,
        num_classes: int = 0,
    ) -> None:
        super().__init__()
        grid = img_size // patch_size
        self.patch_size, self.in_chans, self.num_frames = patch_size, in_chans, num_frames
        self.feature_dim = embed_dim
        self.mask_ratio, self.norm_pix_loss, self.same_mask = mask_ratio, norm_pix_loss, same_mask
        self.patch_embed = PatchEmbed(in_chans, embed_dim, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(sincos_2d(embed_dim - 384, grid).float()[None], requires_grad=False)
        self.blocks = _vit_blocks(embed_dim, depth, num_heads, mlp_ratio, 0.0)
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.fc_norm = nn.LayerNorm(embed_dim, eps=1e-6) if global_pool else None
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else None
        self.decoder_depth = decoder_depth
        if decoder_depth > 0:
            self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
            self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
            self.decoder_pos_embed = nn.Parameter(sincos_2d(decoder_embed_dim - 192, grid).float()[None], requires_grad=False)
            self.decoder_blocks = _vit_blocks(decoder_embed_dim, decoder_depth, decoder_num_heads, mlp_ratio, 0.0)
            self.decoder_norm = nn.LayerNorm(decoder_embed_dim, eps=1e-6)
            self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size**2 * in_chans)
        weight = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        if decoder_depth > 0:
            nn.init.normal_(self.mask_token, std=0.02)
        self.apply(_init_mae_weights)

    def block_names(self) -> list[str]:
        tail = ["norm"] + (["fc_norm"] if self.fc_norm is not None else [])
        return ["cls_token", "pos_embed", "patch_embed", *(f"blocks.{i}" for i in range(len(self.blocks))), *tail]

    def _time_codes(self, timestamps: torch.Tensor, width: int, tokens_per_frame: int) -> torch.Tensor:
        ts = timestamps.reshape(-1, 3).float()
        codes = torch.cat([sincos_1d(width, ts[:, i]) for i in range(3)], dim=1).float()  # (B*T, 3*width)
        codes = codes.reshape(-1, self.num_frames, 1, codes.shape[-1]).expand(-1, -1, tokens_per_frame, -1)
        return codes.reshape(codes.shape[0], -1, codes.shape[-1])

    def _embed(self, images: torch.Tensor, timestamps: torch.Tensor) -> torch.Tensor:
        if images.ndim != 5 or images.shape[1] != self.num_frames:
            raise DataError(f"SatMAETemporal expects images (B, {self.num_frames}, C, H, W), got {tuple(images.shape)}")
        x = torch.cat([self.patch_embed(images[:, t]) for t in range(self.num_frames)], dim=1)
        length = x.shape[1] // self.num_frames
        grid = int(math.isqrt(length))
        pos = fit_pos_table(self.pos_embed, (grid, grid))[:, 1:].repeat(x.shape[0], self.num_frames, 1)
        return x + torch.cat([pos, self._time_codes(timestamps.to(x.device), 128, length).to(x.dtype)], dim=-1)

    def _masking(self, x: torch.Tensor, mask_ratio: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if not self.same_mask:
            return _random_masking(x, mask_ratio)
        n, length, dim = x.shape
        per = length // self.num_frames
        # the official random_masking draws (N, L) noise before its same_mask branch and does not use it:
        # drawn here too, so a seeded run masks the tokens the official code masks
        torch.rand(n, length, device=x.device)
        shuffle = torch.argsort(torch.rand(n, per, device=x.device), dim=1)
        shuffles = [shuffle + t * per for t in range(self.num_frames)]
        keep = int(per * (1 - mask_ratio))
        ids_shuffle = torch.cat([s[:, :keep] for s in shuffles] + [s[:, keep:] for s in shuffles], dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        kept_len = int(length * (1 - mask_ratio))
        kept = torch.gather(x, 1, ids_shuffle[:, :kept_len, None].expand(-1, -1, dim))
        mask = torch.ones(n, length, device=x.device)
        mask[:, :kept_len] = 0
        return kept, torch.gather(mask, 1, ids_restore), ids_restore

    def forward_features(self, x: Mapping[str, torch.Tensor]) -> torch.Tensor:
        h = self._embed(x["images"], x["timestamps"])
        cls = self.cls_token + torch.cat([self.pos_embed[:, :1], self.pos_embed.new_zeros(1, 1, 384)], dim=-1)
        h = torch.cat([cls.expand(h.shape[0], -1, -1), h], dim=1)
        for block in self.blocks:
            h = block(h)
        if self.fc_norm is not None:
            pooled: torch.Tensor = self.fc_norm(h[:, 1:].mean(1))
            return pooled
        normed: torch.Tensor = self.norm(h)
        return normed[:, 0]

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """Channel-last patches (``nchpwq->nhwpqc``), as the temporal model's official code."""
        p, (n, c, hh, ww) = self.patch_size, imgs.shape
        x = imgs.reshape(n, c, hh // p, p, ww // p, p)
        return torch.einsum("nchpwq->nhwpqc", x).reshape(n, (hh // p) * (ww // p), p * p * c)

    def forward_mae(self, images: torch.Tensor, timestamps: torch.Tensor, mask_ratio: float | None = None) -> dict[str, torch.Tensor]:
        ratio = self.mask_ratio if mask_ratio is None else mask_ratio
        x = self._embed(images, timestamps)
        length = x.shape[1] // self.num_frames
        kept, mask, ids_restore = self._masking(x, ratio)
        h = torch.cat([self.cls_token.expand(kept.shape[0], -1, -1), kept], dim=1)
        for block in self.blocks:
            h = block(h)
        h = self.decoder_embed(self.norm(h))
        full = torch.cat([h[:, 1:], self.mask_token.repeat(h.shape[0], ids_restore.shape[1] + 1 - h.shape[1], 1)], dim=1)
        full = torch.gather(full, 1, ids_restore[..., None].expand(-1, -1, h.shape[2]))
        h = torch.cat([h[:, :1], full], dim=1)
        grid = int(math.isqrt(length))
        dpos = fit_pos_table(self.decoder_pos_embed, (grid, grid))
        pos = torch.cat([dpos[:, :1], dpos[:, 1:].repeat(1, self.num_frames, 1)], dim=1).expand(h.shape[0], -1, -1)
        times = self._time_codes(timestamps.to(h.device), 64, length)
        times = torch.cat([times.new_zeros(times.shape[0], 1, times.shape[2]), times], dim=1)
        h = h + torch.cat([pos, times.to(h.dtype)], dim=-1)
        for block in self.decoder_blocks:
            h = block(h)
        pred = self.decoder_pred(self.decoder_norm(h))[:, 1:]
        target = torch.cat([self.patchify(images[:, t]) for t in range(self.num_frames)], dim=1)
        if self.norm_pix_loss:
            mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        loss = ((pred - target).pow(2).mean(-1) * mask).sum() / mask.sum()
        return {"loss": loss, "pred": pred, "mask": mask}

    def forward(self, x: Mapping[str, torch.Tensor]) -> torch.Tensor:
        features = self.forward_features(x)
        if self.head is None:
            return features
        logits: torch.Tensor = self.head(features)
        return logits

    @classmethod
    def _from_checkpoint(cls, path: Path, spec: WeightSpec | None, **config: Any) -> SatMAETemporal:
        state = strip_prefix(unwrap_state_dict(read_official_checkpoint(path)), "module.")
        model = cls(**{**infer_temporal_config(state, str(path)), **config})
        model.load_state(state, source=str(path))
        return model

    def load_state(self, state: Mapping[str, torch.Tensor], source: str = "checkpoint") -> None:
        """Load a ``models_mae_temporal.py`` / ``models_vit_temporal.py`` state dict: position
        tables fitted to this image size (:func:`fit_pos_table`); a pretraining file may lack
        ``fc_norm``, a fine-tuned one ``norm`` (deleted there under global pooling) and the decoder."""
        state = dict(state)
        table_tokens = (self.pos_embed.shape[1] - 1, self.decoder_pos_embed.shape[1] - 1 if self.decoder_depth > 0 else 0)
        for key, tokens in zip(("pos_embed", "decoder_pos_embed"), table_tokens, strict=True):
            if key in state and tokens and state[key].shape[1] - 1 != tokens:  # another img_size: as SatMAE above
                state[key] = fit_pos_table(state[key], (math.isqrt(tokens),) * 2)
        if self.head is None:
            state = {k: v for k, v in state.items() if not k.startswith("head.")}
        ignore_missing = [p for p, key in (("fc_norm.", "fc_norm.weight"), ("norm.", "norm.weight")) if key not in state]
        ignore_unexpected = [] if self.decoder_depth > 0 else ["decoder_", "mask_token"]
        load_state_dict_checked(self, state, strict=True, ignore_missing=ignore_missing, ignore_unexpected=ignore_unexpected, source=source)


def infer_temporal_config(state: Mapping[str, torch.Tensor], source: str = "checkpoint") -> dict[str, Any]:
    """:class:`SatMAETemporal`'s architecture from a checkpoint's shapes (heads: 12/16/16 for
    ViT-B/L/H widths, as :func:`infer_satmae_config`; decoder heads: the official 16)."""
    if "patch_embed.proj.weight" not in state:
        raise CheckpointError(f"{source} is not a temporal SatMAE checkpoint (no 'patch_embed.proj.weight')")
    _refuse_plain_vit(state, "SatMAETemporal", source)
    embed_dim, in_chans, patch, _ = state["patch_embed.proj.weight"].shape
    grid = int(math.isqrt(state["pos_embed"].shape[1] - 1))
    inferred: dict[str, Any] = {
        "embed_dim": int(embed_dim), "in_chans": int(in_chans), "patch_size": int(patch), "img_size": grid * int(patch),
        "depth": 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks.")),
        "num_heads": {768: 12, 1024: 16, 1280: 16}.get(int(embed_dim), max(1, int(embed_dim) // 64)),
    }
    if "decoder_embed.weight" in state:
        inferred["decoder_embed_dim"] = int(state["decoder_embed.weight"].shape[0])
        inferred["decoder_depth"] = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("decoder_blocks."))
    else:
        inferred["decoder_depth"] = 0
    inferred["global_pool"] = "fc_norm.weight" in state or "head.weight" not in state
    if "head.weight" in state:
        inferred["num_classes"] = int(state["head.weight"].shape[0])
    return inferred
