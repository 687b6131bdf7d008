"""Bench entry (``polyfm bench``): ours vs panns_inference, same configuration, same process.

* ``audio/cnn14/inference``: Cnn14 forward on 10 s clips (clips/s), eval mode;
* ``audio/cnn14/train-step``: forward + BCE + backward + AdamW step (clips/s);
* ``audio/decode-resample``: soundfile decode of 8 kHz WAVs + resampling to 32 kHz +
  fixed-length crop (clips/s), vs ``librosa.load(sr=32000)`` as PANNs' scripts load audio.

Quick mode uses 2 s clips and a small batch so it runs on a CPU in seconds.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import tempfile
import types
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from polyfm.core.bench import BenchCase

Step = Callable[[], object]


def load_panns_reference() -> types.ModuleType:
    """panns_inference's ``models`` module, without running its package ``__init__``.

    ``import panns_inference`` executes ``panns_inference/config.py``, which downloads
    AudioSet's label CSV into ``~/panns_data`` (with ``wget``) when it is missing. The
    models module needs none of that: we register an empty package object whose
    ``__path__`` is panns_inference's folder under a private name, and import
    ``<that name>.models`` from it (its relative import of ``pytorch_utils`` resolves
    in the same folder). No network, no files written, and the real ``panns_inference``
    name is left untouched. Raises ImportError when panns_inference is not installed.
    """
    name = "_polyfm_panns_reference"
    if f"{name}.models" in sys.modules:
        return sys.modules[f"{name}.models"]
    spec = importlib.util.find_spec("panns_inference")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("panns_inference is not installed (pip install -r packages/audio/requirements-test.txt)")
    package = types.ModuleType(name)
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules[name] = package
    return importlib.import_module(f"{name}.models")


def _clips(batch: int, seconds: float, device: torch.device) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return (0.1 * torch.randn(batch, int(32000 * seconds), generator=generator)).to(device)


def _inference(model: torch.nn.Module, x: torch.Tensor) -> Step:
    model.eval()

    def step() -> object:
        with torch.inference_mode():
            return model(x)["clipwise_output"]

    return step


def _train_step(model: torch.nn.Module, x: torch.Tensor) -> Step:
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    target = (torch.rand(len(x), 527, generator=torch.Generator().manual_seed(1)) < 0.05).float().to(x.device)

    def step() -> object:
        optimizer.zero_grad(set_to_none=True)
        loss = F.binary_cross_entropy(model(x)["clipwise_output"], target)
        loss.backward()
        optimizer.step()
        return loss

    return step


def _ours(device: torch.device) -> torch.nn.Module:
    from polyfm.audio.models import Cnn14

    return Cnn14().to(device)


def _reference(device: torch.device) -> torch.nn.Module:
    models = load_panns_reference()
    return models.Cnn14(32000, 1024, 320, 64, 50, 14000, 527).to(device)


def _wav_files(clips: int) -> list[Path]:
    import soundfile as sf

    folder = Path(tempfile.mkdtemp(prefix="polyfm-audio-bench-"))
    rng = np.random.default_rng(0)
    paths = []
    for index in range(clips):
        path = folder / f"clip{index}.wav"
        sf.write(path, (0.1 * rng.standard_normal(8000 * 2)).astype(np.float32), 8000, subtype="PCM_16")
        paths.append(path)
    return paths


def _decode_resample_case(clips: int) -> BenchCase:
    """8 kHz 2 s WAVs to 32 kHz: ours (soundfile + torchaudio) vs librosa.load, which the
    PANNs scripts use (soxr resampling)."""

    def ours(device: torch.device) -> Step:
        from polyfm.audio.data import load_audio

        paths = _wav_files(clips)
        return lambda: [load_audio(p, sample_rate=32000, clip_samples=32000 * 2) for p in paths]

    def reference(device: torch.device) -> Step:
        import librosa

        paths = _wav_files(clips)
        return lambda: [librosa.load(p, sr=32000, mono=True)[0] for p in paths]

    return BenchCase(name="audio/decode-resample", unit="clips", items=clips, ours=ours, reference=reference, reference_name="librosa.load")


def cases(quick: bool) -> list[BenchCase]:
    seconds, batch = (2.0, 2) if quick else (10.0, 32)
    return [
        BenchCase(
            name="audio/cnn14/inference",
            unit="clips",
            items=batch,
            ours=lambda d: _inference(_ours(d), _clips(batch, seconds, d)),
            reference=lambda d: _inference(_reference(d), _clips(batch, seconds, d)),
            reference_name="panns_inference.models.Cnn14",
        ),
        BenchCase(
            name="audio/cnn14/train-step",
            unit="clips",
            items=batch,
            ours=lambda d: _train_step(_ours(d), _clips(batch, seconds, d)),
            reference=lambda d: _train_step(_reference(d), _clips(batch, seconds, d)),
            reference_name="panns_inference.models.Cnn14",
        ),
        _decode_resample_case(8 if quick else 256),
    ]
