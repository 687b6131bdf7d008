"""The part of every PANNs model that is not its trunk: configuration with PANNs' own
argument names, the front end, the encoder contract and loading released checkpoints.

A family file (``cnn14.py``, ``cnn10.py`` ...) adds its blocks with PANNs' module names
(``bn0``, ``conv_block1`` ..., ``fc1``, ``fc_audioset``) so the released state dicts
load key for key.
"""

from __future__ import annotations

import inspect
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from polyfm.audio.chunked import ChunkedInput, stitch_time_map
from polyfm.audio.models.frontend import LogMelFrontEnd, SpecAugment, do_mixup
from polyfm.core.encoder import Encoder
from polyfm.core.errors import CheckpointError
from polyfm.core.weights import PretrainedMixin, WeightSpec, load_state_dict_checked, unwrap_state_dict

log = logging.getLogger(__name__)
HEAD_KEYS = ("fc_audioset.weight", "fc_audioset.bias")
#: key prefixes of wrappers around the whole model: DataParallel / DDP, then torch.compile
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
#: PANNs' finetune_template.py wraps the AudioSet model as ``base`` and adds ``fc_transfer``
TRANSFER_PREFIX, TRANSFER_HEAD = "base.", "fc_transfer."
#: where the PANNs model sits in polyfm's Lightning checkpoints: Pretraining(model=...), fine-tuning tasks' encoder
LIGHTNING_PREFIXES = ("model.", "encoder.")


def init_layer(layer: nn.Linear | nn.Conv1d | nn.Conv2d) -> None:
    """PANNs' initialisation: Xavier-uniform weights, zero bias."""
    nn.init.xavier_uniform_(layer.weight)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)


def init_bn(bn: nn.BatchNorm1d | nn.BatchNorm2d) -> None:
    nn.init.ones_(bn.weight)
    nn.init.zeros_(bn.bias)


class PannsModel(Encoder, PretrainedMixin):
    """Base class: builds the log-mel front end, ``spec_augmenter`` and ``bn0``.

    ``forward(waveform, mixup_lambda=None)`` returns PANNs' output dict
    (``clipwise_output``, ``embedding``, plus ``logits`` before the sigmoid);
    ``forward_features(waveform)`` returns the embedding (``fc1`` after ReLU and
    PANNs' dropout), which is what fine-tuning heads and linear probes use.
    """

    #: family name used by the weights registry
    family: str = "panns"
    #: how many times the conv blocks halve time and mel bins (Cnn14: five 2x2 poolings)
    pooling: int = 32
    #: the head every family builds (declared here for the shared clip_head)
    fc1: nn.Linear
    fc_audioset: nn.Linear

    def __init__(
        self,
        sample_rate: int = 32000,
        window_size: int = 1024,
        hop_size: int = 320,
        mel_bins: int = 64,
        fmin: float = 50.0,
        fmax: float = 14000.0,
        classes_num: int = 527,
        spec_augment: bool = True,
        time_drop_width: int = 64,
        freq_drop_width: int = 8,
        block_dropout: float = 0.2,
        head_dropout: float = 0.5,
    ) -> None:
        super().__init__()
        self.sample_rate, self.classes_num = sample_rate, classes_num
        self.block_dropout, self.head_dropout = block_dropout, head_dropout
        self.frontend = LogMelFrontEnd(sample_rate, window_size, hop_size, mel_bins, fmin, fmax)
        self.spec_augmenter = SpecAugment(time_drop_width, 2, freq_drop_width, 2) if spec_augment else nn.Identity()
        self.bn0 = nn.BatchNorm2d(mel_bins)

    # -- shared forward pieces ------------------------------------------------------------
    @staticmethod
    def as_waveform(x: torch.Tensor) -> torch.Tensor:
        """Accept ``(B, samples)`` or ``(B, 1, samples)`` mono waveforms."""
        if x.dim() == 3 and x.shape[1] == 1:
            x = x[:, 0]
        if x.dim() != 2:
            raise ValueError(f"expected mono waveforms (batch, samples), got shape {tuple(x.shape)}; mix channels down first.")
        return x

    def log_mel(self, waveform: torch.Tensor) -> torch.Tensor:
        """Log-mel normalised by ``bn0`` over mel bins: ``(B, 1, frames, mel_bins)``."""
        x = self.frontend(waveform)
        normalised: torch.Tensor = self.bn0(x.transpose(1, 3)).transpose(1, 3)
        return normalised

    def check_size(self, x: torch.Tensor) -> None:
        """PANNs fails deep inside the pooling on too short clips or too few mel bins; say why instead."""
        if x.shape[2] < self.pooling or x.shape[3] < self.pooling:
            raise ValueError(
                f"{type(self).__name__} pools time and mel bins by {self.pooling}: got {x.shape[2]} frames x {x.shape[3]} mel bins. "
                f"Use clips of at least {self.min_samples()} samples ({self.min_samples() / self.sample_rate:.2f} s; "
                "clip_seconds pads shorter ones) or a smaller hop_size."
            )

    def min_samples(self) -> int:
        """The shortest waveform this model takes: ``pooling`` log-mel frames, and more than
        half a window (reflect padding). ``tag_file`` zero-pads shorter files to it."""
        return max((self.pooling - 1) * self.frontend.hop_size, self.frontend.window_size // 2 + 1)

    def augment(self, x: torch.Tensor, mixup_lambda: torch.Tensor | None) -> torch.Tensor:
        """SpecAugment then mixup on the spectrogram, in training only (as PANNs)."""
        if self.training:
            x = self.spec_augmenter(x)
            if mixup_lambda is not None:
                x = do_mixup(x, mixup_lambda)
        return x

    def pool_clip(self, x: torch.Tensor) -> torch.Tensor:
        """PANNs' clip pooling: mean over frequency, then max + mean over time."""
        x = torch.mean(x, dim=3)
        return torch.amax(x, dim=2) + torch.mean(x, dim=2)

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        """The conv blocks: ``(B, 1, frames, mel_bins)`` -> ``(B, C, frames / pooling, mel_bins / pooling)``."""
        raise NotImplementedError(f"{type(self).__name__} has no trunk")

    def time_map(self, waveform: torch.Tensor) -> torch.Tensor:
        """The trunk's output averaged over mel bins, ``(B, C, frames // pooling)``: the last
        map with a time axis before the clip pooling (or the segment head), in eval mode
        (no augmentation). Chunked inference (:func:`~polyfm.audio.chunked.stitch_time_map`: chunked
        ``predict`` and ``tag_file``) runs this per chunk and stitches it on the file's grid;
        :meth:`head_from_map` finishes it."""
        return torch.mean(self.trunk(self.log_mel(self.as_waveform(waveform))), dim=3)

    def head_from_map(self, x: torch.Tensor, frames: int) -> dict[str, torch.Tensor]:
        """``forward``'s outputs from a :meth:`time_map` ``(B, C, steps)`` of input with ``frames``
        log-mel frames: max + mean over time, then :meth:`clip_head`."""
        return self.clip_head(torch.amax(x, dim=2) + torch.mean(x, dim=2))

    def forward_chunked(self, files: ChunkedInput) -> dict[str, torch.Tensor]:
        """``forward``'s outputs for whole files run chunk by chunk (what ``forward`` does with a
        :class:`~polyfm.audio.chunked.ChunkedInput`): their time maps stitched on the file's grid
        (:func:`~polyfm.audio.chunked.stitch_time_map`), then :meth:`head_from_map` once, so every
        output is the whole file's. Inference only: training draws dropout and augmentation per clip."""
        if self.training:
            raise ValueError(f"{type(self).__name__} runs files in chunks for inference only: call model.eval() first")
        stitched, _ = stitch_time_map(self, files)
        return self.head_from_map(stitched, files.frames)

    def input_frames(self, x: torch.Tensor | ChunkedInput) -> int:
        """The log-mel frame count of an input: a waveform's ``1 + samples // hop``, or a chunked input's whole files'."""
        return x.frames if isinstance(x, ChunkedInput) else self.num_frames(self.as_waveform(x).shape[-1])

    def clip_head(self, pooled: torch.Tensor) -> dict[str, torch.Tensor]:
        """``fc1`` -> embedding, ``fc_audioset`` -> clipwise output, as PANNs."""
        x = nn.functional.dropout(pooled, p=self.head_dropout, training=self.training)
        x = torch.relu(self.fc1(x))
        embedding = nn.functional.dropout(x, p=self.head_dropout, training=self.training)
        logits = self.fc_audioset(x)
        return {"clipwise_output": torch.sigmoid(logits), "embedding": embedding, "logits": logits}

    def forward_features(self, x: torch.Tensor | ChunkedInput) -> torch.Tensor:
        embedding: torch.Tensor = self(x)["embedding"]
        return embedding

    def num_frames(self, num_samples: int) -> int:
        return self.frontend.num_frames(num_samples)

    # -- released checkpoints -----------------------------------------------------------
    def load_panns_checkpoint(self, name_or_path: str | Path) -> PannsModel:
        """Load released weights (a registry name such as ``panns-cnn14``, or a ``.pth`` /
        ``.safetensors`` path) into this model, strictly, after checking the torchlibrosa
        front end. This is what the ``pretrained`` constructor argument does, so YAML
        recipes can start from the official checkpoints."""
        from polyfm.core.weights import fetch_weights, get_weights

        path = Path(name_or_path).expanduser()
        if not path.exists():
            spec = get_weights(str(name_or_path))
            self._check_registry_config(spec)
            path = fetch_weights(spec) / spec.primary_file  # checked against Zenodo's md5
        return self.load_panns_state(_read_state(path), source=str(path))

    def _check_registry_config(self, spec: WeightSpec) -> None:
        """Name the constructor arguments a registry checkpoint needs and this model lacks
        (``Cnn14(pretrained="panns-cnn14-16k")`` would otherwise fail on the mel filters)."""
        frontend = self.frontend
        have: dict[str, float | None] = {
            "sample_rate": frontend.sample_rate, "window_size": frontend.window_size, "hop_size": frontend.hop_size,
            "mel_bins": frontend.mel_bins, "fmin": frontend.fmin, "fmax": frontend.fmax,
            "embedding_size": getattr(self, "feature_dim", None),
        }  # fmt: skip
        wrong = {k: v for k, v in spec.config.items() if k in have and ((mine := have[k]) is None or float(mine) != float(v))}
        if wrong:
            needed = ", ".join(f"{k}={v}" for k, v in wrong.items())
            built = ", ".join(f"{k}={have[k]}" for k in wrong)
            raise CheckpointError(
                f"{spec.name} was trained with {needed}, but this {type(self).__name__} has {built}. "
                f"Pass those arguments, use the {spec.family} class, or {spec.family}.from_pretrained({spec.name!r})."
            )

    def load_panns_state(self, state: dict[str, torch.Tensor], source: str = "checkpoint") -> PannsModel:
        """Load a state dict in PANNs' layout (torchlibrosa tensors optional, checked, dropped).

        Strict, except for the AudioSet head: a checkpoint fine-tuned with another
        ``classes_num`` (``fc_audioset`` of another height) loads its trunk into this model,
        keeps this model's freshly initialised ``fc_audioset`` and logs which keys were not
        loaded. Every other missing, unexpected or misshapen key is an error.
        """
        from polyfm.audio.weights import check_torchlibrosa_frontend, split_torchlibrosa

        trunk, frontend_tensors = split_torchlibrosa(state)
        check_torchlibrosa_frontend(frontend_tensors, self.frontend, source=source)
        own = self.state_dict()
        # only another number of classes (rows); another width is a wrong embedding_size or base_channels
        head = [k for k in HEAD_KEYS if k in trunk and k in own and trunk[k].shape[0] != own[k].shape[0] and trunk[k].shape[1:] == own[k].shape[1:]]
        if head:
            shapes = ", ".join(f"{k} {tuple(trunk[k].shape)} (model {tuple(own[k].shape)})" for k in head)
            log.warning(
                "%s: not loaded: %s: the checkpoint has %d classes, the model classes_num=%d. The trunk is loaded; "
                "fc_audioset is newly initialised (train it, or pass classes_num=%d to use the checkpoint's head).",
                source, shapes, trunk[head[0]].shape[0], own[head[0]].shape[0], trunk[head[0]].shape[0],
            )  # fmt: skip
            trunk = {k: v for k, v in trunk.items() if k not in head}
        load_state_dict_checked(self, trunk, strict=True, ignore_missing=tuple(head), source=source)
        return self

    @classmethod
    def _from_checkpoint(cls, path: Path, spec: WeightSpec | None, **config: Any) -> PannsModel:
        """Build from a PANNs ``.pth`` (``{'model': state_dict}``) or one of ours.

        ``config`` takes PANNs' argument names (sample_rate, window_size, hop_size,
        mel_bins, fmin, fmax, classes_num); ``classes_num`` defaults to the
        checkpoint's. The torchlibrosa front-end tensors are checked against this
        model's configuration, so a 16 kHz checkpoint given 32 kHz settings fails
        loudly instead of producing quietly wrong features.
        """
        state = _read_state(path)
        if "classes_num" not in config and "fc_audioset.weight" in state:
            config["classes_num"] = int(state["fc_audioset.weight"].shape[0])
        fc1 = state.get("fc1.weight")
        if "embedding_size" in inspect.signature(cls).parameters and "embedding_size" not in config and fc1 is not None:
            config["embedding_size"] = int(fc1.shape[0])  # Cnn14_emb512 / emb128 / emb32 files
        try:
            model = cls(**config)
        except TypeError as exc:
            raise CheckpointError(f"{cls.__name__} does not take {sorted(config)}: {exc}") from exc
        return model.load_panns_state(state, source=str(path))


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    """The state dict inside a PANNs file (``{'model': ...}``), ``module.`` / ``_orig_mod.`` prefixes removed;
    a ``Transfer_Cnn14`` file (PANNs' finetune_template.py: ``base.*`` + ``fc_transfer.*``)
    gives its ``base`` and a warning that ``fc_transfer`` (the new task's head) is not loaded."""
    from polyfm.audio.weights import read_panns_checkpoint

    raw = read_panns_checkpoint(path)
    state = unwrap_state_dict(raw)
    if "pytorch-lightning_version" in raw:
        state = _lightning_model_state(state, path)
    for prefix in WRAPPER_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    if state and all(k.startswith((TRANSFER_PREFIX, TRANSFER_HEAD)) for k in state) and any(k.startswith(TRANSFER_PREFIX) for k in state):
        head = sorted(k for k in state if k.startswith(TRANSFER_HEAD))
        if head:
            shapes = ", ".join(f"{k} {tuple(state[k].shape)}" for k in head)
            log.warning(
                "%s is a PANNs Transfer_* checkpoint: loading its base model; not loaded: %s (the fine-tuning head; "
                "put it into your task's head if you need it).", path, shapes,
            )  # fmt: skip
        state = {k[len(TRANSFER_PREFIX) :]: v for k, v in state.items() if k.startswith(TRANSFER_PREFIX)}
    return state


def _lightning_model_state(state: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """The PANNs model inside a ``.ckpt`` written by ``polyfm fit`` (a pretraining recipe's
    ``model.*`` or a fine-tuning task's ``encoder.*``), so ``pretrained=`` continues from it;
    the rest (the objective's projection head, the task's head) is named and left out. Such
    files hold no front-end tensors: build the model with the run's sample rate and mel settings."""
    for prefix in LIGHTNING_PREFIXES:
        if any(k.startswith(prefix) for k in state):
            left = sorted({k.split(".")[0] for k in state if not k.startswith(prefix)})
            if left:
                log.warning("%s: loading the %r weights of this Lightning checkpoint; not loaded: %s (pretraining or task heads)", path, prefix[:-1], left)
            return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    return state
