"""Tiny Time Mixers (TTM): the IBM granite-tsfm forecaster, in pure torch.

The module tree and parameter names follow granite-tsfm's ``TinyTimeMixerForPrediction``
exactly, so the released hub checkpoints (``config.json`` + ``model.safetensors``,
ibm-granite/granite-timeseries-ttm-r1 and -r2) load with strict key checks:

    backbone.encoder.patcher                  patch embedding (Linear patch_length -> d_model)
    backbone.encoder.freq_mod                 resolution prefix (frequency token -> one extra patch)
    backbone.encoder.positional_encoder       optional positional encoding
    backbone.encoder.mlp_mixer_encoder        TSMixer block (adaptive patching levels)
    decoder.adapter / decoder.decoder_block   small mixer on top (common- or mix-channel)
    head.base_forecast_block                  flatten patches -> forecast horizon
    head.fcm_block                            forecast channel mixer with exogenous infusion

Data flow: past values (B, L, C) -> per-window scaling (std/mean/none, with the observed
mask) -> patches (B, C, P, patch_length) -> encoder (B, C, P, d_model) -> decoder ->
head (B, H, C) -> inverse scaling. The forecast comes back in the units of the input.

The config field names are those of ``config.json`` (``TTMConfig``); only the r1/r2
architecture is implemented: the r3 extensions (multi-scale, register tokens, FFT
patches, quantile heads, decomposition, gate variants) are refused with a clear error.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from polyfm.core.adaptation import Adaptation
from polyfm.core.encoder import Encoder
from polyfm.core.errors import CheckpointError, ConfigError
from polyfm.core.performance import expected_host_sync
from polyfm.core.weights import (
    PretrainedMixin,
    WeightSpec,
    diff_keys,
    load_checkpoint_file,
    load_state_dict_checked,
    unwrap_state_dict,
)

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # the hub layouts, preferred first


def hf_cache_folder(repo: str, revision: str) -> Path | None:
    """The snapshot folder of ``repo@revision`` (a branch or a commit hash) in the Hugging Face hub
    cache, if it holds config.json and a weights file (safetensors, or an older pytorch_model.bin)."""
    home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")).expanduser()
    root = Path(os.environ.get("HF_HUB_CACHE", home / "hub")).expanduser() / f"models--{repo.replace('/', '--')}"
    ref = root / "refs" / revision
    folder = root / "snapshots" / (ref.read_text().strip() if ref.exists() else revision)
    complete = (folder / "config.json").exists() and any((folder / name).exists() for name in WEIGHT_FILES)
    return folder if complete else None


def read_config_json(path: str | Path) -> dict[str, Any]:
    """A config.json as a dict, or a CheckpointError naming the file."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"Cannot read the TTM config {path}: {exc}. Download it again or fix the JSON.") from exc
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} holds a JSON {type(raw).__name__}, not an object of TinyTimeMixerConfig fields.")
    return raw


log = logging.getLogger("polyfm.ts")


def check_ids(ids: torch.Tensor, size: int, what: str, field_name: str, hint: str = "") -> None:
    """Name an id outside an embedding's vocabulary (nn.Embedding only says 'index out of range in self').
    Checked on CPU only: on an accelerator the read would make the host wait for it."""
    if ids.device.type != "cpu" or not ids.numel():
        return
    with expected_host_sync():
        bad = (ids < 0) | (ids >= size)
        if bool(bad.any()):
            raise ValueError(f"{what} holds {ids[bad][0].item()}, outside this TTM's {field_name}={size} (ids 0..{size - 1}). {hint}".rstrip())
_UNSET = object()
# config overrides after which the decoder/head may hold parts the checkpoint does not have
_STRUCTURAL_OVERRIDES = {
    "decoder_mode", "num_input_channels", "enable_forecast_channel_mixing", "exogenous_channel_indices",
    "prediction_channel_indices", "fcm_use_mixer", "fcm_context_length", "fcm_gated_attn", "fcm_mix_layers",
    "categorical_vocab_size_list", "decoder_raw_residual",
}

# Frequency tokens of granite-tsfm's DEFAULT_FREQUENCY_MAPPING (resolution prefix tuning).
FREQUENCY_TOKENS: dict[str, int] = {
    "oov": 0, "min": 1, "2min": 2, "5min": 3, "10min": 4, "15min": 5, "30min": 6, "h": 7, "d": 8, "W": 9,
}


# ----------------------------------------------------------------------------- configuration


@dataclass
class TTMConfig:
    """The architecture fields of granite-tsfm's ``TinyTimeMixerConfig`` (same names)."""

    context_length: int = 64
    patch_length: int = 8
    num_input_channels: int = 1
    prediction_length: int = 16
    patch_stride: int = 8
    prediction_channel_indices: list[int] | None = None
    exogenous_channel_indices: list[int] | None = None
    d_model: int = 16
    expansion_factor: int = 2
    num_layers: int = 3
    dropout: float = 0.2
    mode: str = "common_channel"
    gated_attn: bool = True
    norm_mlp: str = "LayerNorm"
    self_attn: bool = False
    self_attn_heads: int = 1
    use_positional_encoding: bool = False
    positional_encoding_type: str = "sincos"
    scaling: str | bool | None = "std"
    loss: str | None = "mse"
    quantile: float = 0.5  # loss="pinball"
    huber_delta: float = 1.0  # loss="huber"
    norm_eps: float = 1e-5
    adaptive_patching_levels: int = 0
    resolution_prefix_tuning: bool = False
    frequency_token_vocab_size: int = 5
    head_dropout: float = 0.2
    decoder_num_layers: int = 8
    decoder_d_model: int = 8
    decoder_adaptive_patching_levels: int = 0
    decoder_raw_residual: bool = False
    decoder_mode: str = "common_channel"
    use_decoder: bool = True
    enable_forecast_channel_mixing: bool = False
    fcm_gated_attn: bool = True
    fcm_context_length: int = 1
    fcm_use_mixer: bool = False
    fcm_mix_layers: int = 2
    fcm_prepend_past: bool = True
    fcm_prepend_past_offset: int | None = None
    categorical_vocab_size_list: list[int] | None = None
    prediction_filter_length: int | None = None
    # derived (not read from config.json: recomputed)
    num_patches: int = field(default=0, repr=False)

    # r3-only fields and the values that keep them off; anything else is refused.
    _R3_OFF = {
        "multi_scale": False, "register_tokens": 0, "fft_length": 0, "multi_quantile_head": False,
        "decompose": False, "enable_base_norm_always": False, "masked_context_length": None,
        "gate_mode": "softmax", "use_register_context_gating": False,
    }

    def __post_init__(self) -> None:
        if self.patch_length != self.patch_stride:
            raise ConfigError(f"TTM needs patch_stride == patch_length (got {self.patch_stride} and {self.patch_length}).")
        if self.context_length <= self.patch_length:
            raise ConfigError(f"context_length ({self.context_length}) must exceed patch_length ({self.patch_length}).")
        for name, allowed in (("mode", _MODES), ("decoder_mode", _MODES)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"TTM {name}={getattr(self, name)!r}; choose one of {sorted(allowed)}.")
        if self.loss not in _LOSSES:
            raise ConfigError(f"TTM loss={self.loss!r}; choose one of {sorted(str(x) for x in _LOSSES - {None})} or None (granite-tsfm's point losses).")
        if self.loss == "pinball" and not 0.0 < self.quantile < 1.0:
            raise ConfigError(f"TTM quantile={self.quantile!r} (loss='pinball') must lie strictly between 0 and 1.")
        if self.prediction_filter_length is not None and not 0 < self.prediction_filter_length <= self.prediction_length:
            raise ConfigError("prediction_filter_length must be positive and at most prediction_length.")
        if self.prediction_channel_indices is not None:
            self.prediction_channel_indices = sorted(self.prediction_channel_indices)
        if self.exogenous_channel_indices is not None:
            self.exogenous_channel_indices = sorted(self.exogenous_channel_indices)
            if self.prediction_channel_indices is None:
                exog = set(self.exogenous_channel_indices)
                self.prediction_channel_indices = [i for i in range(self.num_input_channels) if i not in exog]
        for name in ("prediction_channel_indices", "exogenous_channel_indices"):
            bad = [i for i in getattr(self, name) or [] if not 0 <= i < self.num_input_channels]
            if bad:
                raise ConfigError(f"TTM {name} {bad} out of range for num_input_channels={self.num_input_channels}.")
        if self.enable_forecast_channel_mixing and self.fcm_use_mixer and self.fcm_context_length < 1:
            # the mixer embeds each forecast step's window of neighbours; without neighbours there is none
            raise ConfigError("fcm_use_mixer=True needs fcm_context_length >= 1 (granite-tsfm fails on this combination too).")
        if self.categorical_vocab_size_list is not None and self.decoder_mode != "mix_channel":
            raise ConfigError("static categorical inputs need decoder_mode='mix_channel' (as in granite-tsfm).")
        self.num_patches = (self.context_length - self.patch_length) // self.patch_stride + 1
        self.num_patches += 1 if self.resolution_prefix_tuning else 0

    @property
    def output_length(self) -> int:
        return self.prediction_filter_length or self.prediction_length

    @property
    def channel_specific(self) -> bool:
        """Whether any weight or index depends on the channel count (else any count works, as in granite-tsfm)."""
        return (
            "mix_channel" in (self.mode, self.decoder_mode)
            or self.enable_forecast_channel_mixing
            or self.prediction_channel_indices is not None
            or self.exogenous_channel_indices is not None
            or self.categorical_vocab_size_list is not None
        )

    @property
    def output_channels(self) -> int:
        return len(self.prediction_channel_indices) if self.prediction_channel_indices is not None else self.num_input_channels

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config") -> TTMConfig:
        """Build from a ``config.json`` dict; HF bookkeeping keys are ignored, r3 features refused."""
        for key, off in cls._R3_OFF.items():
            if key in raw and raw[key] != off:
                raise ConfigError(
                    f"{source}: {key}={raw[key]!r} is a TTM-r3 feature polyfm's TTM does not implement "
                    "(r1/r2 architectures only)."
                )
        if raw.get("loss") == "nll":
            raise ConfigError(f"{source}: loss='nll' (distribution head) is disabled in granite-tsfm and not supported.")
        if raw.get("model_type", "tinytimemixer") != "tinytimemixer":
            raise ConfigError(f"{source}: model_type={raw.get('model_type')!r}, expected 'tinytimemixer'.")
        names = cls.field_names()
        unknown = sorted(k for k in raw if k not in names and k not in cls._R3_OFF and k not in _IGNORED_KEYS
                         and not k.startswith(_IGNORED_PREFIXES))
        if unknown:  # a newer granite-tsfm field we do not know: say so rather than drop it silently
            log.warning("%s: config field(s) %s are not TTM r1/r2 architecture fields and are ignored", source, unknown)
        config = cls(**{k: v for k, v in raw.items() if k in names})
        stored = raw.get("num_patches")
        if stored is not None and stored != config.num_patches:
            # granite-tsfm builds from the stored value; a stale one would give other weight shapes than ours
            raise ConfigError(
                f"{source}: num_patches={stored} disagrees with context_length={config.context_length}, "
                f"patch_length={config.patch_length}, resolution_prefix_tuning={config.resolution_prefix_tuning} "
                f"(which give {config.num_patches}). Remove num_patches or fix the lengths."
            )
        return config

    @classmethod
    def field_names(cls) -> set[str]:
        """The fields a caller may set (config.json names)."""
        return {f.name for f in fields(cls)} - {"num_patches"}

    @classmethod
    def from_json(cls, path: str | Path) -> TTMConfig:
        return cls.from_dict(read_config_json(path), source=str(path))

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out.update(model_type="tinytimemixer", architectures=["TinyTimeMixerForPrediction"])
        return out

    def derive(self, **changes: Any) -> TTMConfig:
        """A copy with some fields changed, unvalidated and with num_patches kept unless given
        (the sub-blocks' configs, as granite-tsfm's deepcopies of its config)."""
        new = copy.copy(self)
        for name, value in changes.items():
            setattr(new, name, value)
        return new


_MODES = {"common_channel", "mix_channel"}
# config.json keys that do not change TinyTimeMixerForPrediction's forecast in r1/r2: Hugging Face
# bookkeeping, weight initialisation, the disabled distribution head, and r3 options that only act when
# an r3 switch in TTMConfig._R3_OFF is on (those switches are refused).
_HF_KEYS = {  # transformers.PretrainedConfig's generic attributes (older versions write them all)
    "architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "_name_or_path", "return_dict",
    "output_hidden_states", "output_attentions", "use_return_dict", "id2label", "label2id", "problem_type", "auto_map",
    "chunk_size_feed_forward", "is_encoder_decoder", "is_decoder", "torchscript", "pruned_heads", "tie_word_embeddings",
    "cross_attention_hidden_size", "add_cross_attention", "tie_encoder_decoder", "finetuning_task", "tokenizer_class",
    "prefix", "bos_token_id", "pad_token_id", "eos_token_id", "sep_token_id", "decoder_start_token_id",
    "task_specific_params", "tf_legacy_loss", "use_bfloat16", "output_scores", "return_dict_in_generate",
    "_attn_implementation_autoset", "max_length", "min_length", "do_sample", "early_stopping", "num_beams",
    "num_beam_groups", "diversity_penalty", "temperature", "top_k", "top_p", "typical_p", "repetition_penalty",
    "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids", "num_return_sequences",
    "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty",
    "suppress_tokens", "begin_suppress_tokens", "epsilon_cutoff", "eta_cutoff",
}
_IGNORED_KEYS = _HF_KEYS | {
    "init_std", "post_init", "init_linear", "init_embed", "init_processing", "patch_last", "num_patches",
    "distribution_output", "num_parallel_samples", "mask_value", "light_mode", "use_fft_embedding", "get_one_freq_emb",
    "point_extra_weight", "residual_context_length", "forecast_loss_type", "joint_loss_weight", "residual_loss_weight",
    "quantile_levels", "combine_quantiles_via_variance", "penalize_large_width_ratio", "width_penalty_mode",
}
_IGNORED_PREFIXES = ("trend_", "mq_", "fft_d_freq_")
_LOSSES = {"mse", "mae", "huber", "pinball", None}


# ----------------------------------------------------------------------------- building blocks


class GatedAttention(nn.Module):
    """Softmax gate over the last dimension: x * softmax(W x + b)."""

    def __init__(self, size: int):
        super().__init__()
        self.attn_layer = nn.Linear(size, size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * F.softmax(self.attn_layer(x), dim=-1)


class MixerMLP(nn.Module):
    def __init__(self, in_features: int, out_features: int, expansion_factor: int, dropout: float):
        super().__init__()
        self.fc1 = nn.Linear(in_features, in_features * expansion_factor)
        self.dropout1 = nn.Dropout(dropout)
        self.fc2 = nn.Linear(in_features * expansion_factor, out_features)
        self.dropout2 = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.dropout2(self.fc2(self.dropout1(F.gelu(self.fc1(x)))))
        return out


class BatchNormOverTime(nn.Module):
    """BatchNorm1d over d_model for (N, sequence, d_model) inputs."""

    def __init__(self, d_model: int, eps: float):
        super().__init__()
        self.batchnorm = nn.BatchNorm1d(d_model, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed: torch.Tensor = self.batchnorm(x.transpose(1, 2))
        return normed.transpose(1, 2)


class NormLayer(nn.Module):
    """LayerNorm over d_model, or BatchNorm over (batch*channels, patches, d_model)."""

    def __init__(self, config: TTMConfig):
        super().__init__()
        self.batch = "batch" in config.norm_mlp.lower()
        self.norm = BatchNormOverTime(config.d_model, config.norm_eps) if self.batch else nn.LayerNorm(config.d_model, eps=config.norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.batch:
            normed: torch.Tensor = self.norm(x.reshape(x.shape[0] * x.shape[1], x.shape[2], x.shape[3]))
            return normed.reshape(x.shape)
        out: torch.Tensor = self.norm(x)
        return out


class PatchSelfAttention(nn.Module):
    """The optional 'tiny' multi-head self-attention across patches."""

    def __init__(self, embed_dim: int, num_heads: int, dropout: float):
        super().__init__()
        if embed_dim % num_heads:
            raise ConfigError(f"d_model ({embed_dim}) must be divisible by self_attn_heads ({num_heads}).")
        self.num_heads, self.head_dim, self.dropout = num_heads, embed_dim // num_heads, dropout
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.out_proj = nn.Linear(embed_dim, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)

        q = heads(self.q_proj(x) * self.head_dim**-0.5)
        weights = F.softmax(q @ heads(self.k_proj(x)).transpose(-1, -2), dim=-1)
        weights = F.dropout(weights, p=self.dropout, training=self.training)
        out = (weights @ heads(self.v_proj(x))).transpose(1, 2).reshape(batch, length, width)
        projected: torch.Tensor = self.out_proj(out)
        return projected


class PatchMixerBlock(nn.Module):
    """Mixes across patches (time): MLP over the patch axis, then the gate."""

    def __init__(self, config: TTMConfig):
        super().__init__()
        self.norm = NormLayer(config)
        self.self_attn = config.self_attn
        self.gated_attn = config.gated_attn
        self.mlp = MixerMLP(config.num_patches, config.num_patches, config.expansion_factor, config.dropout)
        if config.gated_attn:
            self.gating_block = GatedAttention(config.num_patches)
        if config.self_attn:
            self.self_attn_layer = PatchSelfAttention(config.d_model, config.self_attn_heads, config.dropout)
            self.norm_attn = NormLayer(config)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        residual = hidden
        hidden = self.norm(hidden)
        if self.self_attn:
            b, c, p, d = hidden.shape
            attended = self.self_attn_layer(hidden.reshape(b * c, p, d)).reshape(b, c, p, d)
        hidden = self.mlp(hidden.transpose(2, 3))
        if self.gated_attn:
            hidden = self.gating_block(hidden)
        hidden = hidden.transpose(2, 3)
        if self.self_attn:
            hidden = self.norm_attn(hidden + attended)
        return hidden + residual


class FeatureMixerBlock(nn.Module):
    """Mixes across the hidden features of each patch."""

    def __init__(self, config: TTMConfig):
        super().__init__()
        self.norm = NormLayer(config)
        self.gated_attn = config.gated_attn
        self.mlp = MixerMLP(config.d_model, config.d_model, config.expansion_factor, config.dropout)
        if config.gated_attn:
            self.gating_block = GatedAttention(config.d_model)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.mlp(self.norm(hidden))
        if self.gated_attn:
            out = self.gating_block(out)
        return out + hidden


class ChannelMixerBlock(nn.Module):
    """Mixes across channels (mix_channel mode): the gate comes before the MLP here."""

    def __init__(self, config: TTMConfig):
        super().__init__()
        self.norm = NormLayer(config)
        self.gated_attn = config.gated_attn
        self.mlp = MixerMLP(config.num_input_channels, config.num_input_channels, config.expansion_factor, config.dropout)
        if config.gated_attn:
            self.gating_block = GatedAttention(config.num_input_channels)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        out = self.norm(hidden).permute(0, 3, 2, 1)
        if self.gated_attn:
            out = self.gating_block(out)
        mixed: torch.Tensor = self.mlp(out)
        return mixed.permute(0, 3, 2, 1) + hidden


class MixerLayer(nn.Module):
    """One TSMixer layer: (channel mixing), patch mixing, feature mixing."""

    def __init__(self, config: TTMConfig):
        super().__init__()
        self.mix_channels = config.mode == "mix_channel"
        if config.num_patches > 1:
            self.patch_mixer = PatchMixerBlock(config)
        self.feature_mixer = FeatureMixerBlock(config)
        if self.mix_channels:
            self.channel_feature_mixer = ChannelMixerBlock(config)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.mix_channels:
            hidden = self.channel_feature_mixer(hidden)
        if hasattr(self, "patch_mixer"):
            hidden = self.patch_mixer(hidden)
        out: torch.Tensor = self.feature_mixer(hidden)
        return out


class AdaptivePatchingLevel(nn.Module):
    """num_layers mixer layers on a view with 2**level times more, 2**level times narrower patches."""

    def __init__(self, config: TTMConfig, level: int):
        super().__init__()
        factor = 2**level
        if config.d_model // factor <= 4:  # granite-tsfm disables levels that would be too narrow
            factor = 1
        if config.d_model % factor:
            raise ConfigError(f"d_model ({config.d_model}) must be divisible by 2**level for every adaptive patching level.")
        self.factor = factor
        inner = config.derive(num_patches=config.num_patches * factor, d_model=config.d_model // factor)
        self.mixer_layers = nn.ModuleList(MixerLayer(inner) for _ in range(config.num_layers))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        b, c, p, d = hidden.shape
        hidden = hidden.reshape(b, c, p * self.factor, d // self.factor)
        for layer in self.mixer_layers:
            hidden = layer(hidden)
        return hidden.reshape(b, c, p, d)


class MixerBlock(nn.Module):
    """The TSMixer trunk: plain layers, or adaptive patching levels from coarsest split to none."""

    def __init__(self, config: TTMConfig):
        super().__init__()
        if config.adaptive_patching_levels > 0:
            levels = reversed(range(config.adaptive_patching_levels))
            self.mixers = nn.ModuleList(AdaptivePatchingLevel(config, level) for level in levels)
        else:
            self.mixers = nn.ModuleList(MixerLayer(config) for _ in range(config.num_layers))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        for mixer in self.mixers:
            hidden = mixer(hidden)
        return hidden


class Patchify(nn.Module):
    """(B, L, C) -> (B, C, num_patches, patch_length), keeping the most recent points."""

    def __init__(self, sequence_length: int, patch_length: int, patch_stride: int):
        super().__init__()
        self.sequence_length, self.patch_length, self.patch_stride = sequence_length, patch_length, patch_stride
        num_patches = (max(sequence_length, patch_length) - patch_length) // patch_stride + 1
        self.sequence_start = sequence_length - (patch_length + patch_stride * (num_patches - 1))

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        if values.shape[-2] != self.sequence_length:
            raise ValueError(f"Input length {values.shape[-2]} does not match the model's {self.sequence_length}.")
        out = values[:, self.sequence_start:, :].unfold(-2, self.patch_length, self.patch_stride)
        return out.transpose(-2, -3).contiguous()


class PositionalEncoding(nn.Module):
    def __init__(self, config: TTMConfig):
        super().__init__()
        p, d = config.num_patches, config.d_model
        if config.positional_encoding_type == "random":
            self.position_enc = nn.Parameter(torch.randn(p, d))
        elif config.positional_encoding_type == "sincos":
            enc = torch.zeros(p, d)
            position = torch.arange(0, p).unsqueeze(1)
            div_term = torch.exp(torch.arange(0, d, 2) * -(math.log(10000.0) / d))
            enc[:, 0::2] = torch.sin(position * div_term)
            enc[:, 1::2] = torch.cos(position * div_term)
            enc = enc - enc.mean()
            self.position_enc = nn.Parameter(enc / (enc.std() * 10), requires_grad=False)
        else:
            raise ConfigError(f"positional_encoding_type {config.positional_encoding_type!r}: use 'random' or 'sincos'.")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.position_enc


# ----------------------------------------------------------------------------- scaling


class StdScaler(nn.Module):
    """Per-window, per-channel mean/std over observed points (RevIN-style), minimum variance 1e-5."""

    minimum_scale = 1e-5

    def forward(self, data: torch.Tensor, observed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        count = observed.sum(1, keepdim=True).clamp_min(1)
        loc = (data * observed).sum(1, keepdim=True) / count
        variance = (((data - loc) * observed) ** 2).sum(1, keepdim=True) / count
        scale = torch.sqrt(variance + self.minimum_scale)
        return (data - loc) / scale, loc, scale


class MeanScaler(nn.Module):
    """Scale by the mean absolute observed value; windows with none observed use the batch's."""

    minimum_scale = 1e-10

    def forward(self, data: torch.Tensor, observed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ts_sum = (data * observed).abs().sum(1, keepdim=True)
        count = observed.sum(1, keepdim=True)
        scale = ts_sum / count.clamp(min=1)
        default = torch.squeeze(ts_sum.sum(0) / count.sum(0).clamp(min=1))
        scale = torch.where(count > 0, scale, default).clamp(min=self.minimum_scale)
        return data / scale, torch.zeros_like(scale), scale


class NoScaler(nn.Module):
    def forward(self, data: torch.Tensor, observed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return data, torch.zeros_like(data).mean(1, keepdim=True), torch.ones_like(data).mean(1, keepdim=True)


def make_scaler(scaling: str | bool | None) -> nn.Module:
    if scaling == "mean":
        return MeanScaler()
    if scaling == "std" or scaling is True:
        return StdScaler()
    return NoScaler()


# ----------------------------------------------------------------------------- backbone, decoder, head


class TTMEncoder(nn.Module):
    """Patch embedding, resolution prefix, positional encoding and the mixer trunk."""

    def __init__(self, config: TTMConfig):
        super().__init__()
        self.patcher = nn.Linear(config.patch_length, config.d_model)
        self.positional_encoder = PositionalEncoding(config) if config.use_positional_encoding else None
        self.mlp_mixer_encoder = MixerBlock(config)
        self.resolution_prefix_tuning = config.resolution_prefix_tuning
        self.frequency_token_vocab_size = config.frequency_token_vocab_size  # for the id check (Sequential items are typed Module)
        if config.resolution_prefix_tuning:
            mid = (config.patch_length + config.d_model) // 2
            self.freq_mod = nn.Sequential(
                nn.Embedding(config.frequency_token_vocab_size, config.patch_length),
                nn.Linear(config.patch_length, mid),
                nn.GELU(),
                nn.Linear(mid, config.d_model),
            )

    def forward(self, patches: torch.Tensor, freq_token: torch.Tensor | None = None) -> torch.Tensor:
        hidden = self.patcher(patches)  # (B, C, P, d_model)
        if self.resolution_prefix_tuning:
            if freq_token is None:
                raise ValueError(
                    "This TTM uses resolution prefix tuning: pass freq_token (B,) with the series' frequency token "
                    f"(polyfm.ts.models.ttm.FREQUENCY_TOKENS, e.g. {FREQUENCY_TOKENS['h']} for hourly)."
                )
            b, c, _, d = hidden.shape
            if freq_token.numel() != b:
                raise ValueError(f"freq_token must hold one token per window, shape ({b},); got shape {tuple(freq_token.shape)}.")
            check_ids(freq_token.reshape(b), self.frequency_token_vocab_size, "freq_token", "frequency_token_vocab_size",
                      "(FREQUENCY_TOKENS goes up to 9: build the TTM with frequency_token_vocab_size >= 10 to use all of them)")
            prefix = self.freq_mod(freq_token.long().reshape(b)).view(b, 1, 1, d).expand(b, c, 1, d)
            hidden = torch.cat((prefix, hidden), dim=-2)
        if self.positional_encoder is not None:
            hidden = self.positional_encoder(hidden)
        out: torch.Tensor = self.mlp_mixer_encoder(hidden)
        return out


class TTMBackbone(nn.Module):
    """Scaling, patching and the encoder (granite-tsfm's ``TinyTimeMixerModel``)."""

    def __init__(self, config: TTMConfig):
        super().__init__()
        self.encoder = TTMEncoder(config)
        self.patching = Patchify(config.context_length, config.patch_length, config.patch_stride)
        self.scaler = make_scaler(config.scaling)

    def forward(
        self, past_values: torch.Tensor, past_observed_mask: torch.Tensor, freq_token: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        scaled, loc, scale = self.scaler(past_values, past_observed_mask)
        patches = self.patching(scaled)
        return self.encoder(patches, freq_token), patches, loc, scale


class StaticCategoricalEmbedding(nn.Module):
    """One embedding per static categorical variable, repeated over patches as extra channels."""

    def __init__(self, vocab_sizes: list[int], d_model: int, num_patches: int):
        super().__init__()
        self.embedding_layers = nn.ModuleList(nn.Embedding(vocab, d_model) for vocab in vocab_sizes)
        self.vocab_sizes = list(vocab_sizes)  # ModuleList items are typed Module: keep the sizes for the id check
        self.num_patches = num_patches

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        count = len(self.embedding_layers)
        if values.dim() != 2 or values.shape[1] != count:
            raise ValueError(f"static_categorical_values must be (batch, {count}) token ids, one per categorical variable; "
                             f"got shape {tuple(values.shape)}.")
        for i, size in enumerate(self.vocab_sizes):
            check_ids(values[:, i], size, f"static_categorical_values[:, {i}]", f"categorical_vocab_size_list[{i}]")
        embedded = torch.stack([layer(values[:, i].long()) for i, layer in enumerate(self.embedding_layers)], dim=1)
        return embedded.unsqueeze(2).repeat(1, 1, self.num_patches, 1)


class TTMDecoder(nn.Module):
    """A small mixer over the backbone's patches, in its own channel mode."""

    def __init__(self, config: TTMConfig):
        super().__init__()
        self.adapter = nn.Linear(config.d_model, config.decoder_d_model) if config.d_model != config.decoder_d_model else None
        self.decoder_raw_residual = config.decoder_raw_residual
        if config.decoder_raw_residual:
            self.decoder_raw_embedding = nn.Linear(config.patch_length, config.decoder_d_model)
        self.num_input_channels = config.num_input_channels
        inner = config.derive(
            num_layers=config.decoder_num_layers,
            d_model=config.decoder_d_model,
            dropout=config.head_dropout,
            adaptive_patching_levels=config.decoder_adaptive_patching_levels,
            mode=config.decoder_mode,
        )
        self.decoder_cat_embedding_layer: StaticCategoricalEmbedding | None
        if config.categorical_vocab_size_list is not None:
            inner = inner.derive(num_input_channels=config.num_input_channels + len(config.categorical_vocab_size_list))
            self.decoder_cat_embedding_layer = StaticCategoricalEmbedding(
                config.categorical_vocab_size_list, inner.d_model, inner.num_patches
            )
        else:
            self.decoder_cat_embedding_layer = None
        self.decoder_block = MixerBlock(inner)

    def forward(self, hidden: torch.Tensor, patches: torch.Tensor, static_categorical_values: torch.Tensor | None) -> torch.Tensor:
        if self.adapter is not None:
            hidden = self.adapter(hidden)
        if self.decoder_raw_residual:
            if patches.shape[-2] == hidden.shape[-2] - 1:  # a resolution prefix has no raw patch: pad one of zeros
                patches = torch.cat([patches.new_zeros(*patches.shape[:-2], 1, patches.shape[-1]), patches], dim=-2)
            hidden = hidden + self.decoder_raw_embedding(patches)
        if self.decoder_cat_embedding_layer is not None:
            if static_categorical_values is None:
                raise ValueError("This TTM was configured with static categorical variables: pass static_categorical_values.")
            hidden = torch.cat((hidden, self.decoder_cat_embedding_layer(static_categorical_values)), dim=1)
        out: torch.Tensor = self.decoder_block(hidden)
        return out[:, : self.num_input_channels] if self.decoder_cat_embedding_layer is not None else out


class ForecastChannelMixer(nn.Module):
    """Reconciles base forecasts across channels and infuses exogenous (known-future) channels.

    Each forecast step sees its neighbours (``fcm_context_length`` on each side, the last
    context points prepended) in all channels; an MLP adds a correction to the base forecast.
    """

    def __init__(self, config: TTMConfig):
        super().__init__()
        self.context = config.fcm_context_length
        window = 2 * self.context + 1
        self.prediction_channel_indices = config.prediction_channel_indices
        self.exogenous_channel_indices = config.exogenous_channel_indices
        prediction_count = config.output_channels
        exogenous_count = len(config.exogenous_channel_indices or [])
        total = prediction_count + exogenous_count
        self.prediction_length = config.prediction_length
        self.fcm_use_mixer = config.fcm_use_mixer
        features = window
        if config.fcm_use_mixer:
            # a mixer whose "patches" are the channels and whose "channels" are the forecast steps
            mixer_config = config.derive(
                num_patches=total, patch_length=window, patch_stride=window, num_input_channels=config.prediction_length,
                d_model=window * 2, num_layers=config.fcm_mix_layers, dropout=config.head_dropout,
                mode="common_channel", gated_attn=config.fcm_gated_attn, adaptive_patching_levels=0,
            )
            self.exog_mixer = MixerBlock(mixer_config)
            features = window * 2
            self.fcm_embedding = nn.Linear(window, window * 2)
        self.mlp = nn.Linear(total * features, prediction_count)
        self.fcm_gated_attn = config.fcm_gated_attn
        if config.fcm_gated_attn:
            self.fcm_gating_block = GatedAttention(total * features)
        if self.context > 0:
            self.fcm_patch_block = Patchify(config.prediction_length + 2 * self.context, window, 1)
        self.fcm_prepend_past = config.fcm_prepend_past
        offset = config.fcm_prepend_past_offset
        self.prepend = slice(-self.context, None) if offset is None else slice(-(offset + self.context), -offset)

    def forward(self, base: torch.Tensor, past_values: torch.Tensor, future_values: torch.Tensor | None) -> torch.Tensor:
        residual = base
        past = past_values[:, self.prepend, :]
        past_prepend = past[..., self.prediction_channel_indices] if self.prediction_channel_indices is not None else past
        if self.exogenous_channel_indices:
            if future_values is None:
                raise ValueError(
                    "This TTM mixes in exogenous channels: pass their known future values "
                    "(future_values or future_known_values, shape (B, H, C))."
                )
            base = torch.cat((base, future_values[..., self.exogenous_channel_indices]), dim=-1)
            past_prepend = torch.cat((past_prepend, past[..., self.exogenous_channel_indices]), dim=-1)
        if self.context > 0:
            pad = base.new_zeros(base.shape[0], self.context, base.shape[2])
            head = past_prepend if self.fcm_prepend_past else pad
            extended = self.fcm_patch_block(torch.cat((head, base, pad), dim=1)).transpose(1, 2)  # (B, H, C, window)
            if self.fcm_use_mixer:
                extended = self.exog_mixer(self.fcm_embedding(extended))
            extended = extended.flatten(start_dim=2)
        else:
            extended = base
        if self.fcm_gated_attn:
            extended = self.fcm_gating_block(extended)
        mixed: torch.Tensor = self.mlp(extended)
        return mixed + residual


class TTMHead(nn.Module):
    """Flatten patches -> horizon per channel; select channels; filter length; channel mixing."""

    def __init__(self, config: TTMConfig):
        super().__init__()
        self.prediction_channel_indices = config.prediction_channel_indices
        self.prediction_filter_length = config.prediction_filter_length
        self.dropout_layer = nn.Dropout(config.head_dropout)
        width = config.decoder_d_model if config.use_decoder else config.d_model
        self.base_forecast_block = nn.Linear(config.num_patches * width, config.prediction_length)
        self.flatten = nn.Flatten(start_dim=-2)
        self.enable_forecast_channel_mixing = config.enable_forecast_channel_mixing
        if config.enable_forecast_channel_mixing:
            self.fcm_block = ForecastChannelMixer(config.derive(prediction_length=config.output_length))

    def forward(self, hidden: torch.Tensor, past_values: torch.Tensor, future_values: torch.Tensor | None) -> torch.Tensor:
        base: torch.Tensor = self.base_forecast_block(self.dropout_layer(self.flatten(hidden)))
        forecast = base.transpose(-1, -2)
        if self.prediction_channel_indices is not None:
            forecast = forecast[..., self.prediction_channel_indices]
        if self.prediction_filter_length is not None:
            forecast = forecast[:, : self.prediction_filter_length, :]
            if future_values is not None:
                future_values = future_values[:, : self.prediction_filter_length, :]
        if self.enable_forecast_channel_mixing:
            forecast = self.fcm_block(forecast, past_values=past_values, future_values=future_values)
        return forecast


# ----------------------------------------------------------------------------- the model


class TTM(Encoder, PretrainedMixin):
    """Tiny Time Mixer for forecasting (granite-tsfm ``TinyTimeMixerForPrediction``).

    ``forward(past_values (B, L, C), ...)`` returns a dict whose ``prediction_outputs`` is
    the forecast (B, H, C_out) in the units of ``past_values``. ``forward_features`` gives
    the backbone embedding pooled over channels and patches (B, d_model) for probes.
    The defaults are the r2 512-96 architecture.
    """

    def __init__(
        self,
        context_length: int = 512,
        prediction_length: int = 96,
        patch_length: int = 64,
        num_input_channels: int = 1,
        d_model: int = 192,
        num_layers: int = 2,
        expansion_factor: int = 2,
        dropout: float = 0.4,
        mode: str = "common_channel",
        gated_attn: bool = True,
        norm_mlp: str = "LayerNorm",
        self_attn: bool = False,
        self_attn_heads: int = 1,
        use_positional_encoding: bool = False,
        positional_encoding_type: str = "sincos",
        scaling: str | None = "std",
        loss: str | None = "mse",
        quantile: float = 0.5,
        huber_delta: float = 1.0,
        norm_eps: float = 1e-5,
        adaptive_patching_levels: int = 3,
        resolution_prefix_tuning: bool = False,
        frequency_token_vocab_size: int = 5,
        head_dropout: float = 0.4,
        use_decoder: bool = True,
        decoder_num_layers: int = 2,
        decoder_d_model: int = 128,
        decoder_adaptive_patching_levels: int = 0,
        decoder_raw_residual: bool = False,
        decoder_mode: str = "common_channel",
        prediction_channel_indices: list[int] | None = None,
        exogenous_channel_indices: list[int] | None = None,
        enable_forecast_channel_mixing: bool = False,
        fcm_gated_attn: bool = True,
        fcm_context_length: int = 1,
        fcm_use_mixer: bool = False,
        fcm_mix_layers: int = 2,
        fcm_prepend_past: bool = True,
        fcm_prepend_past_offset: int | None = None,
        categorical_vocab_size_list: list[int] | None = None,
        prediction_filter_length: int | None = None,
        pretrained: str | None = None,
    ):
        """``pretrained`` (a registry name, hub id, folder, or a weights/Lightning checkpoint file) loads its weights
        into this architecture, strictly: the arguments must describe the checkpoint's (see its config.json)."""
        super().__init__()
        arguments = {k: v for k, v in locals().items() if k not in ("self", "__class__", "pretrained")}
        self.config = TTMConfig(patch_stride=patch_length, **arguments)
        self._build()
        if pretrained:
            # a bare weights file without config.json beside it (a Lightning .ckpt of the pretraining or fine-tuning
            # recipe, a safetensors file): these arguments are its architecture
            bare = Path(pretrained).is_file() and not (Path(pretrained).parent / "config.json").exists()
            source = TTM.from_pretrained(pretrained, **({**arguments, "patch_stride": patch_length} if bare else {}))
            load_state_dict_checked(self, source.state_dict(), strict=True, source=str(pretrained))

    @classmethod
    def from_config(cls, config: TTMConfig | dict[str, Any]) -> TTM:
        config = TTMConfig.from_dict(config) if isinstance(config, dict) else config
        model = cls.__new__(cls)
        Encoder.__init__(model)
        model.config = config
        model._build()
        return model

    def _build(self) -> None:
        config = self.config
        self.feature_dim = config.d_model
        self.backbone = TTMBackbone(config)
        if config.use_decoder:
            self.decoder = TTMDecoder(config)
        self.head = TTMHead(config)

    # --- Encoder contract

    def block_names(self) -> list[str]:
        """Backbone blocks, input first. Decoder and head are the forecasting head (trained in head-only mode)."""
        names = ["backbone.encoder.patcher"]
        if self.config.resolution_prefix_tuning:
            names.append("backbone.encoder.freq_mod")
        if self.config.use_positional_encoding:
            names.append("backbone.encoder.positional_encoder")
        names += [f"backbone.encoder.mlp_mixer_encoder.mixers.{i}" for i in range(len(self.backbone.encoder.mlp_mixer_encoder.mixers))]
        return names

    def block_index(self, parameter_name: str) -> int:
        """Decoder and head are the task head: past the last backbone block (full LR under layer decay)."""
        if parameter_name.startswith(("decoder.", "head.")):
            return len(self.block_names())
        return super().block_index(parameter_name)

    def forward_features(self, x: torch.Tensor, freq_token: torch.Tensor | None = None, past_observed_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Backbone embedding (B, C, P, d_model) averaged over channels and patches: (B, d_model)."""
        values, mask = self._fit_length(x, past_observed_mask)
        hidden: torch.Tensor = self.backbone(values, mask, freq_token)[0]
        return hidden.mean(dim=(1, 2))

    # --- forecasting

    def _fit_length(self, past_values: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Keep the last context_length points; left-pad shorter inputs with zeros marked unobserved."""
        if past_values.dim() != 3:
            raise ValueError(f"past_values must be (batch, time, channels), got shape {tuple(past_values.shape)}.")
        if self.config.channel_specific and past_values.shape[-1] != self.config.num_input_channels:
            raise ValueError(
                f"past_values has {past_values.shape[-1]} channels; this TTM was built for "
                f"num_input_channels={self.config.num_input_channels} (its channel mixing, channel selection or exogenous "
                "mixer depend on the channel count; a common-channel TTM takes any number)."
            )
        length = self.config.context_length
        if mask is None:
            mask = torch.ones_like(past_values)
        else:
            mask = mask.to(past_values.dtype)
        if past_values.shape[1] > length:
            past_values, mask = past_values[:, -length:], mask[:, -length:]
        elif past_values.shape[1] < length:
            pad = length - past_values.shape[1]
            past_values = torch.cat([past_values.new_zeros(past_values.shape[0], pad, past_values.shape[2]), past_values], 1)
            mask = torch.cat([mask.new_zeros(mask.shape[0], pad, mask.shape[2]), mask], 1)
        return past_values, mask

    def forward(
        self,
        past_values: torch.Tensor,
        future_values: torch.Tensor | None = None,
        past_observed_mask: torch.Tensor | None = None,
        future_observed_mask: torch.Tensor | None = None,
        freq_token: torch.Tensor | None = None,
        static_categorical_values: torch.Tensor | None = None,
        future_known_values: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Forecast. ``future_known_values`` carries the exogenous channels' future (the
        Forecasting task keeps ``future_values`` to itself); it is used when ``future_values``
        is not given. With ``future_values`` a ``loss`` is returned as granite-tsfm does."""
        # Unlike granite-tsfm, left padding of a short input is always marked unobserved, so the
        # per-window scaling ignores it (identical results for full-length inputs).
        past_values, mask = self._fit_length(past_values, past_observed_mask)
        hidden, patches, loc, scale = self.backbone(past_values, mask, freq_token)
        decoded = self.decoder(hidden, patches, static_categorical_values) if self.config.use_decoder else hidden
        known = future_values if future_values is not None else future_known_values
        forecast = self.head(decoded, past_values=past_values, future_values=known)
        if self.config.prediction_channel_indices is not None:
            loc = loc[..., self.config.prediction_channel_indices]
            scale = scale[..., self.config.prediction_channel_indices]
        forecast = forecast * scale + loc
        out = {"prediction_outputs": forecast, "backbone_hidden_state": hidden, "decoder_hidden_state": decoded, "loc": loc, "scale": scale}
        if future_values is not None and self.config.loss is not None:
            out["loss"] = self.loss_fn(forecast, future_values, future_observed_mask)
        return out

    def select_target(self, values: torch.Tensor) -> torch.Tensor:
        """Cut ground truth (B, H, C) to what the model forecasts: filter length, prediction channels."""
        values = values[:, : self.config.output_length]
        indices = self.config.prediction_channel_indices
        if indices is not None and values.shape[-1] == self.config.num_input_channels:
            values = values[..., indices]
        return values

    def loss_fn(self, forecast: torch.Tensor, future_values: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        target = self.select_target(future_values)
        if mask is not None:
            keep = self.select_target(mask).bool()
            forecast, target = forecast[keep], target[keep]
        if self.config.loss == "mae":
            return F.l1_loss(forecast, target)
        if self.config.loss == "huber":
            return F.huber_loss(forecast, target, delta=self.config.huber_delta)
        if self.config.loss == "pinball":  # quantile loss at config.quantile, mean over all points
            errors = target - forecast
            q = self.config.quantile
            return torch.maximum(q * errors, (q - 1) * errors).mean()
        return F.mse_loss(forecast, target)

    # --- checkpoints

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write the hub layout: config.json + model.safetensors (official key names)."""
        from polyfm.core.weights import save_safetensors

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(self.config.to_dict(), indent=2))
        save_safetensors(self.state_dict(), folder / "model.safetensors", metadata={"format": "pt"})
        return folder

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike[str], **config: Any) -> TTM:
        """A local folder/file, a registry name (``ttm-r2-512-96``) or a hub id
        (``ibm-granite/granite-timeseries-ttm-r2``, ``...-ttm-r2@1024-96-r2``). A hub id already in the
        Hugging Face cache (e.g. downloaded by granite-tsfm) is read from there."""
        from polyfm.ts.weights import HUB_ALIASES, WEIGHTS

        revision = config.pop("revision", None)  # granite-tsfm / transformers style: (hub id, revision=branch)
        if revision is not None:
            if Path(name_or_path).exists() or "@" in str(name_or_path):
                raise ConfigError(f"revision={revision!r} applies to a hub id without '@branch'; got {str(name_or_path)!r}.")
            name_or_path = f"{name_or_path}@{revision}"
        name = HUB_ALIASES.get(str(name_or_path), str(name_or_path))
        spec = next((s for s in WEIGHTS if s.name == name), None)
        if spec is not None and not Path(name_or_path).exists():
            cached = hf_cache_folder(spec.meta["hub_repo"], spec.meta["revision"])
            if cached is not None:
                return cls._from_checkpoint(cached, spec, **config)
        return super().from_pretrained(name, **config)

    @classmethod
    def _from_checkpoint(cls, path: Path, spec: WeightSpec | None, **config: Any) -> TTM:
        """Load a hub folder (config.json + model.safetensors) or a bare weights file plus config kwargs.

        Keyword overrides that change no weight shape are allowed (e.g. ``prediction_filter_length``,
        ``head_dropout``, ``num_input_channels`` in common-channel mode).
        """
        unknown = sorted(set(config) - TTMConfig.field_names())
        if unknown:  # a misspelt or unsupported override must not be dropped silently
            raise ConfigError(f"TTM.from_pretrained got unknown keyword(s) {unknown}; the accepted ones are TTMConfig's "
                              "fields (config.json names, e.g. prediction_filter_length, num_input_channels) and revision.")
        path = Path(path)
        folder = path if path.is_dir() else path.parent
        weights = path if path.is_file() else next((folder / name for name in WEIGHT_FILES if (folder / name).exists()), None)
        if weights is None:
            raise CheckpointError(f"{folder} holds no model.safetensors (or pytorch_model.bin): not a TTM hub folder.")
        raw: dict[str, Any] = {}
        if (folder / "config.json").exists():
            raw = read_config_json(folder / "config.json")
        elif spec is None and not config:
            raise CheckpointError(f"{folder} has no config.json: pass the TTM configuration as keyword arguments.")
        changed = {k for k, v in config.items() if raw.get(k, _UNSET) != v}
        if changed & {"context_length", "patch_length", "patch_stride", "resolution_prefix_tuning"}:
            raw.pop("num_patches", None)  # derived from the lengths: recomputed for the override
        raw.update(config)
        model = cls.from_config(TTMConfig.from_dict(raw, source=str(folder / "config.json")))
        state = unwrap_wrapper_prefixes(unwrap_state_dict(load_checkpoint_file(weights)), set(model.state_dict()), str(weights))
        if spec is not None and spec.converter is not None:
            state = spec.converter(state)
        # Overrides may add parts the checkpoint lacks (a mix-channel decoder, the forecast channel mixer for
        # exogenous channels): those start fresh, as granite-tsfm's fine-tuning recipes do; the backbone must
        # still load completely and every shape must match.
        adds_parts = bool(changed & _STRUCTURAL_OVERRIDES)
        load_state_dict_checked(model, state, strict=True, source=str(weights), ignore_missing=("decoder.", "head.") if adds_parts else ())
        fresh = diff_keys(model, state).missing
        if fresh:
            parts = sorted({".".join(k.split(".")[:2]) for k in fresh})
            log.warning("%s: %s changed; %d tensors initialised fresh in %s", weights, sorted(changed & _STRUCTURAL_OVERRIDES),
                        len(fresh), parts)
        return model


# what wraps a TTM's keys when it was saved from inside something else: DataParallel/DDP, torch.compile,
# a LightningModule such as polyfm's Forecasting task (its ``model`` attribute)
_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.")


def unwrap_wrapper_prefixes(state: dict[str, torch.Tensor], own: set[str], source: str) -> dict[str, torch.Tensor]:
    """A state dict whose keys all miss ours but match them after dropping leading wrapper prefixes, unwrapped
    (logged); keys without such a prefix (a task's metrics or extra heads) are left out and counted in the log."""
    if own & set(state):
        return state

    def strip(key: str) -> str:
        while prefix := next((p for p in _WRAPPER_PREFIXES if key.startswith(p)), None):
            key = key[len(prefix):]
        return key

    unwrapped = {strip(k): v for k, v in state.items() if strip(k) != k}
    if not own & set(unwrapped):
        return state  # the strict load reports the key diff (with core's prefix hint)
    first = next(k for k in state if strip(k) != k)
    wrapper = first[: len(first) - len(strip(first))]
    others = [k for k in state if strip(k) == k]
    log.warning("%s: keys carry a %r prefix (a wrapped model); stripped it%s", source, wrapper,
                f", leaving out {len(others)} other keys ({others[:3]})" if others else "")
    return unwrapped


def head_only(model: Encoder) -> Adaptation:
    """TTM's few-shot 'head-only' recipe: freeze the backbone, train decoder and head.

    (``Adaptation(mode="linear")`` would freeze the whole model, since in forecasting the
    decoder and head are part of the model rather than a task head.)
    """
    return Adaptation(mode="freeze", freeze_blocks=len(model.block_names()))
