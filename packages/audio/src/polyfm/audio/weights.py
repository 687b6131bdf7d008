"""PANNs' released checkpoints (Zenodo record 3987831) and the torchlibrosa key layout.

Every released file is ``{'model': state_dict, ...}`` with PANNs' module names. Besides
the trunk, the state dict holds the torchlibrosa front end as tensors:
``spectrogram_extractor.stft.conv_real.weight`` / ``conv_imag.weight`` (Hann-windowed
DFT bases, ``(window_size//2+1, 1, window_size)``) and ``logmel_extractor.melW``
(Slaney mel filters, ``(window_size//2+1, mel_bins)``). Our front end computes the same
transform with torchaudio, so these tensors are not parameters of our models: loading
checks them against the model's configuration and drops them; ``to_panns_state_dict``
writes them back, so our models save in the official layout (panns_inference and
audioset_tagging_cnn load them).

Zenodo publishes md5 only: the registry's checksums are ``md5:<hex>`` where we know it, else ``None``
(recorded as unverified).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from polyfm.core.errors import CheckpointError
from polyfm.core.weights import StateDict, WeightSpec, load_checkpoint_file, unwrap_state_dict

if TYPE_CHECKING:  # the models import this module when loading checkpoints
    from polyfm.audio.models.base import PannsModel
    from polyfm.audio.models.frontend import LogMelFrontEnd

STFT_REAL = "spectrogram_extractor.stft.conv_real.weight"
STFT_IMAG = "spectrogram_extractor.stft.conv_imag.weight"
MEL_W = "logmel_extractor.melW"
TORCHLIBROSA_KEYS = (STFT_REAL, STFT_IMAG, MEL_W)

ZENODO = "https://zenodo.org/record/3987831/files"
AUDIOSET_LABELS_URL = "https://raw.githubusercontent.com/qiuqiangkong/audioset_tagging_cnn/master/metadata/class_labels_indices.csv"
LICENSE = "CC-BY-4.0"  # the Zenodo record's licence; the PANNs code is MIT

CONFIG_32K: dict[str, Any] = {"sample_rate": 32000, "window_size": 1024, "hop_size": 320, "mel_bins": 64, "fmin": 50, "fmax": 14000, "classes_num": 527}
CONFIG_16K: dict[str, Any] = {"sample_rate": 16000, "window_size": 512, "hop_size": 160, "mel_bins": 64, "fmin": 50, "fmax": 8000, "classes_num": 527}
CONFIG_8K: dict[str, Any] = {"sample_rate": 8000, "window_size": 256, "hop_size": 80, "mel_bins": 64, "fmin": 50, "fmax": 4000, "classes_num": 527}


def read_panns_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a PANNs ``.pth`` with ``weights_only=True``. Training checkpoints hold the
    sampler's numpy state beside the weights; core allows numpy's plain-data rebuilders
    (and nothing else) for exactly this."""
    return load_checkpoint_file(path)


def split_torchlibrosa(state: Mapping[str, torch.Tensor]) -> tuple[StateDict, StateDict]:
    """Split a PANNs state dict into (trunk, torchlibrosa front-end tensors)."""
    trunk = {k: v for k, v in state.items() if k not in TORCHLIBROSA_KEYS}
    frontend = {k: v for k, v in state.items() if k in TORCHLIBROSA_KEYS}
    return trunk, frontend


def torchlibrosa_frontend_state(window_size: int, mel_fb: torch.Tensor) -> StateDict:
    """The tensors torchlibrosa stores for a Hann STFT of ``window_size`` and a mel matrix."""
    n = torch.arange(window_size, dtype=torch.float64)
    k = torch.arange(window_size // 2 + 1, dtype=torch.float64)
    angle = 2 * math.pi * k[:, None] * n[None, :] / window_size
    window = torch.hann_window(window_size, periodic=True, dtype=torch.float64)
    return {
        STFT_REAL: (torch.cos(angle) * window)[:, None, :].float(),
        STFT_IMAG: (-torch.sin(angle) * window)[:, None, :].float(),
        MEL_W: mel_fb.detach().float().cpu().clone(),
    }


def check_torchlibrosa_frontend(tensors: Mapping[str, torch.Tensor], frontend: LogMelFrontEnd, source: str = "checkpoint") -> None:
    """Refuse a checkpoint whose front end was built for another configuration.

    The STFT size is read from the DFT bases, the sample rate / fmin / fmax / mel bins
    from the mel matrix. Missing tensors are fine (our own checkpoints have none).
    """
    window_size, mel_fb = frontend.window_size, frontend.mel_fb
    setting = (
        f"sample_rate={frontend.sample_rate}, window_size={window_size}, hop_size={frontend.hop_size}, "
        f"mel_bins={frontend.mel_bins}, fmin={frontend.fmin}, fmax={frontend.fmax}"
    )
    if STFT_REAL in tensors:
        got = tuple(tensors[STFT_REAL].shape)
        if got != (window_size // 2 + 1, 1, window_size):
            raise CheckpointError(
                f"{source}: its STFT has window_size={got[-1]}, but the model was built with {setting}. "
                f"Pass window_size={got[-1]} and the matching sample_rate/hop_size/fmax (16 kHz PANNs: 16000/512/160/8000)."
            )
        expected = torchlibrosa_frontend_state(window_size, mel_fb)
        for key in (STFT_REAL, STFT_IMAG):
            if key in tensors and not torch.allclose(tensors[key].float(), expected[key], atol=_tolerance(tensors[key], 1e-4)):
                raise CheckpointError(f"{source}: {key} is not a Hann-windowed DFT basis; this is not a PANNs front end.")
    if MEL_W in tensors:
        mel = tensors[MEL_W].float()
        if tuple(mel.shape) != tuple(mel_fb.shape):
            raise CheckpointError(
                f"{source}: its mel matrix {MEL_W} has shape {tuple(mel.shape)} (freq bins, mel bins), "
                f"the model's {tuple(mel_fb.shape)} ({setting}). Pass the checkpoint's window_size and mel_bins."
            )
        error = (mel - mel_fb.float().cpu()).abs().max().item()
        if error > _tolerance(tensors[MEL_W], 1e-5, scale=float(mel.abs().max())):
            raise CheckpointError(
                f"{source}: its mel filters differ from the model's ({setting}) by up to {error:.3g}: "
                "the checkpoint was trained with another sample_rate, fmin or fmax. Pass the checkpoint's values."
            )


def _tolerance(tensor: torch.Tensor, float32: float, scale: float = 1.0) -> float:
    """How far a stored front-end tensor may be from ours: ``float32`` for fp32/fp64 files,
    two rounding steps of the file's dtype for half-precision copies (fp16: 1e-3 relative,
    bf16: 8e-3; other configurations differ by the filters' whole height)."""
    if tensor.dtype in (torch.float16, torch.bfloat16):
        return max(float32, 2 * torch.finfo(tensor.dtype).eps * scale)
    return float32


def to_panns_state_dict(model: PannsModel) -> StateDict:
    """Our model's state dict in the official layout, torchlibrosa tensors included."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    frontend = model.frontend
    state.update(torchlibrosa_frontend_state(frontend.window_size, frontend.mel_fb))
    return state


def panns_to_polyfm(checkpoint: Mapping[str, Any]) -> StateDict:
    """Converter for ``polyfm weights convert``: unwrap ``{'model': ...}`` and drop the
    torchlibrosa tensors (our front end recomputes them from the configuration)."""
    return split_torchlibrosa(unwrap_state_dict(checkpoint))[0]


# md5 sums as Zenodo lists them (the only checksum it publishes); core checks them on every fetch.
ZENODO_MD5 = {
    "Cnn14_mAP=0.431.pth": "541141fa2ee191a88f24a3219fff024e",
    "Cnn14_16k_mAP=0.438.pth": "362fc5ff18f1d6ad2f6d464b45893f2c",
    "Cnn10_mAP=0.380.pth": "bfb1f1f9968938fa8ef4012b8471f5f6",
    "Cnn6_mAP=0.343.pth": "e25e26b84585b14c7754c91e48efc9be",
    "Wavegram_Logmel_Cnn14_mAP=0.439.pth": "17fa9ab65af3c0eb5ffbc5f65552c4e1",
}


def _spec(name: str, family: str, filename: str, config: Mapping[str, Any], mean_ap: float, description: str) -> WeightSpec:
    return WeightSpec(
        name=name,
        family=family,
        files={filename: (f"{ZENODO}/{filename.replace('=', '%3D')}?download=1", f"md5:{ZENODO_MD5[filename]}" if filename in ZENODO_MD5 else None)},
        license=LICENSE,
        meta={
            **{k: config[k] for k in ("sample_rate", "window_size", "hop_size", "mel_bins", "fmin", "fmax")},
            "input": "mono waveform, float in [-1, 1]",
            "classes": "AudioSet ontology, 527 classes",
            "labels_url": AUDIOSET_LABELS_URL,
            "audioset_mAP": mean_ap,
            "source": "Kong et al., PANNs (2020); Zenodo record 3987831",
        },
        config=dict(config),
        converter=panns_to_polyfm,
        description=description,
    )


WEIGHTS: list[WeightSpec] = [
    _spec("panns-cnn14", "Cnn14", "Cnn14_mAP=0.431.pth", CONFIG_32K, 0.431, "Cnn14, AudioSet tagging, 32 kHz"),
    _spec("panns-cnn14-16k", "Cnn14_16k", "Cnn14_16k_mAP=0.438.pth", CONFIG_16K, 0.438, "Cnn14, AudioSet tagging, 16 kHz"),
    _spec("panns-cnn14-8k", "Cnn14_8k", "Cnn14_8k_mAP=0.416.pth", CONFIG_8K, 0.416, "Cnn14, AudioSet tagging, 8 kHz"),
    # the paper's embedding-size study: Cnn14 with a narrower fc1 (Cnn14(embedding_size=...))
    _spec("panns-cnn14-emb512", "Cnn14", "Cnn14_emb512_mAP=0.420.pth", {**CONFIG_32K, "embedding_size": 512}, 0.420, "Cnn14, 512-d embedding, 32 kHz"),
    _spec("panns-cnn14-emb128", "Cnn14", "Cnn14_emb128_mAP=0.412.pth", {**CONFIG_32K, "embedding_size": 128}, 0.412, "Cnn14, 128-d embedding, 32 kHz"),
    _spec("panns-cnn14-emb32", "Cnn14", "Cnn14_emb32_mAP=0.364.pth", {**CONFIG_32K, "embedding_size": 32}, 0.364, "Cnn14, 32-d embedding, 32 kHz"),
    _spec("panns-cnn10", "Cnn10", "Cnn10_mAP=0.380.pth", CONFIG_32K, 0.380, "Cnn10, AudioSet tagging, 32 kHz"),
    _spec("panns-cnn6", "Cnn6", "Cnn6_mAP=0.343.pth", CONFIG_32K, 0.343, "Cnn6, AudioSet tagging, 32 kHz"),
    _spec(
        "panns-cnn14-decision-level-max",
        "Cnn14_DecisionLevelMax",
        "Cnn14_DecisionLevelMax_mAP=0.385.pth",
        CONFIG_32K,
        0.385,
        "Cnn14 with framewise (sound event detection) output, 32 kHz",
    ),
    _spec(
        "panns-wavegram-logmel-cnn14",
        "Wavegram_Logmel_Cnn14",
        "Wavegram_Logmel_Cnn14_mAP=0.439.pth",
        CONFIG_32K,
        0.439,
        "Wavegram-Logmel-Cnn14, AudioSet tagging, 32 kHz",
    ),
]
