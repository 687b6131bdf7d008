"""Cross-domain trunks: transformer blocks pretrained in one domain, reused in another.

A :class:`PatchTransformer` is a new input adapter (patches of a spectrogram or image,
patches of a time series, or precomputed tokens) in front of a stack of transformer
blocks, with the engine's encoder contract. ``load_trunk`` fills the blocks from
another domain's checkpoint, mapped by key prefix:

* ``vit`` layout (timm ``blocks.N.norm1/attn.qkv/attn.proj/norm2/mlp.fc1/mlp.fc2``,
  optional DINOv2 layer scale ``ls1/ls2``): SatMAE, SoftCon ViT-S/14 and ViT-B/14, timm ViTs;
* ``roberta`` layout (``[roberta.]encoder.layer.N.attention.self.query|key|value`` ...):
  ChemBERTa / ChemBERTa-2. RoBERTa layers are post-norm; the trunk is then built
  post-norm too, so the mapped blocks compute exactly what they computed in RoBERTa.

Input and output adapters are always new; width, depth and head count come from the
source. A block that does not fit is an error that names the key and both shapes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from polyfm.core.encoder import Encoder
from polyfm.core.errors import CheckpointError, ConfigError

InputKind = Literal["image", "series", "tokens"]
_VIT_BLOCK = re.compile(r"^(?P<prefix>.*?)blocks\.(?P<index>\d+)\.(?P<rest>.+)$")
_ROBERTA_LAYER = re.compile(r"^(?P<prefix>.*?)encoder\.layer\.(?P<index>\d+)\.(?P<rest>.+)$")


class TrunkBlock(nn.Module):
    """A transformer block with timm's parameter names; pre-norm (ViT) or post-norm (BERT)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, post_norm: bool = False, layer_scale: bool = False, eps: float = 1e-6) -> None:
        super().__init__()
        if dim % num_heads:
            raise ConfigError(f"width {dim} is not divisible by num_heads {num_heads}.")
        self.num_heads, self.post_norm = num_heads, post_norm
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn: Any = nn.Module()  # a plain container so parameter names match timm's
        self.attn.qkv = nn.Linear(dim, 3 * dim)
        self.attn.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        hidden = int(dim * mlp_ratio)
        self.mlp: Any = nn.Module()
        self.mlp.fc1 = nn.Linear(dim, hidden)
        self.mlp.fc2 = nn.Linear(hidden, dim)
        self.ls1 = _LayerScale(dim) if layer_scale else nn.Identity()
        self.ls2 = _LayerScale(dim) if layer_scale else nn.Identity()

    def attention(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        batch, tokens, dim = x.shape
        qkv = self.attn.qkv(x).reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        mask = None if key_padding_mask is None else ~key_padding_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=mask)
        return self.attn.proj(out.transpose(1, 2).reshape(batch, tokens, dim))

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.post_norm:
            x = self.norm1(x + self.attention(x, key_padding_mask))
            return self.norm2(x + self.mlp.fc2(F.gelu(self.mlp.fc1(x))))
        x = x + self.ls1(self.attention(self.norm1(x), key_padding_mask))
        return x + self.ls2(self.mlp.fc2(F.gelu(self.mlp.fc1(self.norm2(x)))))


class _LayerScale(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), 1e-5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class PatchTransformer(Encoder):
    """New input adapter + transferable transformer trunk + mean/CLS pooling.

    ``input_kind``: ``image`` (``(B, C, H, W)``, e.g. a log-mel spectrogram with C=1),
    ``series`` (``(B, L, C)``, patches of ``patch_size`` steps over all channels), or
    ``tokens`` (``(B, N, in_channels)``)."""

    def __init__(
        self,
        input_kind: InputKind = "image",
        in_channels: int = 1,
        patch_size: int = 16,
        embed_dim: int = 384,
        depth: int = 6,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        max_tokens: int = 1024,
        post_norm: bool = False,
        layer_scale: bool = False,
        pool: Literal["cls", "mean"] = "mean",
        norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self.input_kind, self.patch_size, self.pool, self.post_norm = input_kind, patch_size, pool, post_norm
        self.feature_dim = embed_dim
        if input_kind == "image":
            self.patch_embed: nn.Module = nn.Conv2d(in_channels, embed_dim, patch_size, stride=patch_size)
        elif input_kind == "series":
            self.patch_embed = nn.Linear(in_channels * patch_size, embed_dim)
        elif input_kind == "tokens":
            self.patch_embed = nn.Linear(in_channels, embed_dim)
        else:
            raise ConfigError(f"input_kind must be image, series or tokens, got {input_kind!r}.")
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.randn(1, max_tokens + 1, embed_dim) * 0.02)
        self.blocks = nn.ModuleList(TrunkBlock(embed_dim, num_heads, mlp_ratio, post_norm, layer_scale, norm_eps) for _ in range(depth))
        self.norm = nn.Identity() if post_norm else nn.LayerNorm(embed_dim, eps=norm_eps)

    def block_names(self) -> list[str]:
        return ["patch_embed", *(f"blocks.{i}" for i in range(len(self.blocks))), "norm"]

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_kind == "image":
            return self.patch_embed(x).flatten(2).transpose(1, 2)
        if self.input_kind == "series":
            batch, length, channels = x.shape
            usable = length - length % self.patch_size
            patches = x[:, length - usable :].reshape(batch, usable // self.patch_size, self.patch_size * channels)
            return self.patch_embed(patches)
        return self.patch_embed(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.tokens(x)
        if tokens.shape[1] + 1 > self.pos_embed.shape[1]:
            raise ConfigError(f"{tokens.shape[1]} tokens exceed max_tokens={self.pos_embed.shape[1] - 1}; raise max_tokens or patch_size.")
        h = torch.cat([self.cls_token.expand(len(tokens), -1, -1), tokens], dim=1) + self.pos_embed[:, : tokens.shape[1] + 1]
        for block in self.blocks:
            h = block(h)
        h = self.norm(h)
        return h[:, 0] if self.pool == "cls" else h[:, 1:].mean(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)

    def load_trunk(self, state_dict: Mapping[str, torch.Tensor], source: str = "checkpoint", blocks: int | None = None) -> list[str]:
        """Copy the source's transformer blocks into ``self.blocks``; returns the keys loaded."""
        mapped = map_trunk_state(state_dict, source=source)
        own = self.state_dict()
        depth = len(self.blocks) if blocks is None else blocks
        source_depth = 1 + max((int(k.split(".")[1]) for k in mapped), default=-1)
        if source_depth < depth:
            raise CheckpointError(f"{source} has {source_depth} transformer blocks; this trunk needs {depth}. Build it with depth<={source_depth}.")
        loaded = []
        for key, value in mapped.items():
            if int(key.split(".")[1]) >= depth:
                continue
            if key not in own:
                raise CheckpointError(f"{source}: block key {key} has no place in this trunk (layer scale or norm layout differs); "
                                      f"build PatchTransformer with post_norm={not self.post_norm} or layer_scale=True to match.")
            if own[key].shape != value.shape:
                raise CheckpointError(f"{source}: {key} has shape {tuple(value.shape)} but the trunk expects {tuple(own[key].shape)}; "
                                      "build the trunk with the source's width and mlp_ratio (see trunk_config()).")
            own[key] = value
            loaded.append(key)
        expected = [k for k in own if k.startswith("blocks.") and int(k.split(".")[1]) < depth]
        missing = sorted(set(expected) - set(loaded))
        if missing:
            raise CheckpointError(f"{source}: the trunk's blocks were not all found in the checkpoint; missing {missing[:8]}.")
        self.load_state_dict(own)
        return loaded


def detect_layout(state_dict: Mapping[str, torch.Tensor]) -> Literal["vit", "roberta"]:
    if any(_ROBERTA_LAYER.match(k) and ".attention.self." in k for k in state_dict):
        return "roberta"
    if any(_VIT_BLOCK.match(k) and ".attn.qkv." in k for k in state_dict):
        return "vit"
    sample = ", ".join(list(state_dict)[:6])
    raise CheckpointError(f"No transformer blocks recognised (timm 'blocks.N.attn.qkv' or RoBERTa 'encoder.layer.N.attention'); keys start: {sample}")


def map_trunk_state(state_dict: Mapping[str, torch.Tensor], source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Source block weights under our names (``blocks.N.*``), whatever the prefix."""
    layout = detect_layout(state_dict)
    mapped: dict[str, torch.Tensor] = {}
    if layout == "vit":
        prefixes = {m.group("prefix") for k in state_dict if (m := _VIT_BLOCK.match(k)) and ".attn.qkv." in k}
        prefix = min(prefixes, key=len)  # the encoder's blocks, not a decoder's ("decoder_blocks" has no bare "blocks." prefix)
        for key, value in state_dict.items():
            match = _VIT_BLOCK.match(key)
            if match and match.group("prefix") == prefix:
                mapped[f"blocks.{match.group('index')}.{match.group('rest')}"] = value
        return mapped
    names = {
        "attention.output.dense": "attn.proj",
        "attention.output.LayerNorm": "norm1",
        "intermediate.dense": "mlp.fc1",
        "output.dense": "mlp.fc2",
        "output.LayerNorm": "norm2",
    }
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        match = _ROBERTA_LAYER.match(key)
        if match:
            layers.setdefault(match.group("index"), {})[match.group("rest")] = value
    for index, params in layers.items():
        for kind in ("weight", "bias"):
            parts = [params.get(f"attention.self.{n}.{kind}") for n in ("query", "key", "value")]
            if any(p is None for p in parts):
                raise CheckpointError(f"{source}: layer {index} lacks attention.self.query/key/value.{kind}.")
            mapped[f"blocks.{index}.attn.qkv.{kind}"] = torch.cat(parts)  # type: ignore[arg-type]
            for theirs, ours in names.items():
                if f"{theirs}.{kind}" in params:
                    mapped[f"blocks.{index}.{ours}.{kind}"] = params[f"{theirs}.{kind}"]
    return mapped


def trunk_config(state_dict: Mapping[str, torch.Tensor], head_dim: int = 64) -> dict[str, object]:
    """Width, depth, MLP ratio and norm placement of a source trunk, for building a PatchTransformer.
    Head count is not stored in weights: ``width // head_dim`` (64 for ViT-S/B, RoBERTa-base; ChemBERTa-2 77M
    uses 12 heads of 32, pass head_dim=32)."""
    layout = detect_layout(state_dict)
    mapped = map_trunk_state(state_dict)
    width = mapped["blocks.0.attn.proj.weight"].shape[0]
    hidden = mapped["blocks.0.mlp.fc1.weight"].shape[0]
    depth = 1 + max(int(k.split(".")[1]) for k in mapped)
    return {
        "embed_dim": width,
        "depth": depth,
        "num_heads": max(1, width // head_dim),
        "mlp_ratio": hidden / width,
        "post_norm": layout == "roberta",
        "layer_scale": any(".ls1." in k for k in mapped),
    }
