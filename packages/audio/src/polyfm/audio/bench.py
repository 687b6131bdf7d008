"""Bench entry (``polyfm bench``): ours vs panns_inference, same configuration, same process.

For every PANNs family we ship (``polyfm.audio.models.MODELS``):

* ``audio/<family>/inference``: forward in eval mode (clips/s);
* ``audio/<family>/train-step``: forward + BCE on ``clipwise_output`` + backward +
  AdamW step, train mode (SpecAugment and dropout on, as PANNs trains) (clips/s).

The reference is panns_inference's class of the same name, with the same arguments
and inputs: ``Cnn14`` and ``Cnn14_DecisionLevelMax``; ``Cnn14_16k`` and ``Cnn14_8k`` are
compared with panns_inference's ``Cnn14`` built with the 16 / 8 kHz configuration (PANNs'
``Cnn14_16k`` and ``Cnn14_8k`` are that same class body). panns_inference has no ``Cnn10``, ``Cnn6`` or
``Wavegram_Logmel_Cnn14``: those cases have no reference (``reference=None``) and
report our throughput only.

* ``audio/cnn14/train-gpu-path``: our step on polyfm's GPU path (bf16 autocast, fp32
  log-mel, channels_last, fused AdamW) vs the reference's fp32 loop (the GPU target).

* ``audio/decode-resample``: soundfile decode of 8 kHz WAVs + resampling to 32 kHz +
  fixed-length crop (clips/s), vs ``librosa.load(sr=32000)`` as PANNs' scripts load audio.

Quick mode (CPU, seconds): 2 s clips, batch 2, Cnn14 and Cnn14_DecisionLevelMax only
(both with a reference). Full mode: all seven families, 10 s clips, batch 32.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from polyfm.core.bench import BenchCase, gpu_path_train_step, scratch_dir

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


@dataclass(frozen=True)
class Family:
    """One benched model family: our class name in ``MODELS``, its sample rate, and the
    panns_inference class and positional arguments of the reference (None: no reference)."""

    name: str
    sample_rate: int = 32000
    reference: str | None = None
    reference_args: tuple[float, ...] = (32000, 1024, 320, 64, 50, 14000, 527)


FAMILIES = [
    Family("Cnn14", reference="Cnn14"),
    Family("Cnn14_16k", 16000, reference="Cnn14", reference_args=(16000, 512, 160, 64, 50, 8000, 527)),
    Family("Cnn14_8k", 8000, reference="Cnn14", reference_args=(8000, 256, 80, 64, 50, 4000, 527)),
    Family("Cnn10"),
    Family("Cnn6"),
    Family("Cnn14_DecisionLevelMax", reference="Cnn14_DecisionLevelMax"),
    Family("Wavegram_Logmel_Cnn14"),
]
QUICK_FAMILIES = ("Cnn14", "Cnn14_DecisionLevelMax")


def _clips(batch: int, samples: int, device: torch.device) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return (0.1 * torch.randn(batch, samples, generator=generator)).to(device)


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
        torch.autograd.backward(loss)  # loss.backward(), whose torch signature is unannotated
        optimizer.step()
        return loss

    return step


MODES: dict[str, Callable[[torch.nn.Module, torch.Tensor], Step]] = {"inference": _inference, "train-step": _train_step}


def _gpu_path_case(family: Family, batch: int, seconds: float) -> BenchCase:
    """``audio/<family>/train-gpu-path``: our training step on polyfm's GPU path (bf16
    autocast with the log-mel kept in fp32, channels_last, fused AdamW) against the
    reference's own loop as PANNs trains (fp32, the same step as ``train-step``): the
    issue's "Cnn14 training at least 2x the reference" figure. On CPU both are fp32."""

    def ours(device: torch.device) -> Step:
        model = _model(family, False).to(device)
        x = _clips(batch, int(family.sample_rate * seconds), device)
        target = (torch.rand(batch, 527, generator=torch.Generator().manual_seed(1)) < 0.05).float().to(device)
        # from logits: BCE on probabilities is refused under autocast (and is less stable)
        return gpu_path_train_step(model, lambda m: F.binary_cross_entropy_with_logits(m(x)["logits"].float(), target))

    return BenchCase(
        name=f"audio/{family.name.lower()}/train-gpu-path", unit="clips", items=batch, ours=ours,
        reference=_builder(family, "train-step", True, batch, seconds), reference_name=f"{_reference_name(family)}, fp32 loop",
    )  # fmt: skip


def _model(family: Family, reference: bool) -> torch.nn.Module:
    """Ours (``MODELS[name]()``, defaults = PANNs' configuration) or the reference, seeded."""
    torch.manual_seed(0)
    if reference:
        assert family.reference is not None
        reference_model: torch.nn.Module = getattr(load_panns_reference(), family.reference)(*family.reference_args)
        return reference_model
    from polyfm.audio.models import MODELS

    model: torch.nn.Module = MODELS[family.name]()
    return model


def _builder(family: Family, mode: str, reference: bool, batch: int, seconds: float) -> Callable[[torch.device], Step]:
    """The one place steps are built: model, inputs and mode are the same for both sides."""

    def build(device: torch.device) -> Step:
        model = _model(family, reference).to(device)
        return MODES[mode](model, _clips(batch, int(family.sample_rate * seconds), device))

    return build


def _family_cases(family: Family, batch: int, seconds: float) -> list[BenchCase]:
    return [
        BenchCase(
            name=f"audio/{family.name.lower()}/{mode}",
            unit="clips",
            items=batch,
            ours=_builder(family, mode, False, batch, seconds),
            reference=_builder(family, mode, True, batch, seconds) if family.reference else None,
            reference_name=_reference_name(family),
        )
        for mode in MODES
    ]


def _reference_name(family: Family) -> str:
    if family.reference is None:
        return ""
    name = f"panns_inference.models.{family.reference}"
    return name if family.reference == family.name else f"{name} ({family.sample_rate // 1000} kHz configuration)"


def _wav_files(clips: int) -> list[Path]:
    import soundfile as sf

    folder = scratch_dir("polyfm-audio-bench-")
    rng = np.random.default_rng(0)
    paths = []
    for index in range(clips):
        path = folder / f"clip{index}.wav"
        sf.write(path, (0.1 * rng.standard_normal(8000 * 2)).astype(np.float32), 8000, subtype="PCM_16")
        paths.append(path)
    return paths


def _decode_resample_case(clips: int) -> BenchCase:
    """8 kHz 2 s WAVs to 32 kHz: ours (soundfile + torchaudio's sinc kernel as a blocked
    matmul, ``polyfm.audio.data.load_audio``) vs librosa.load, which the
    PANNs scripts use (soxr resampling)."""

    def ours(device: torch.device) -> Step:
        from polyfm.audio.data import load_audio

        paths = _wav_files(clips)
        return lambda: [load_audio(p, sample_rate=32000, clip_samples=32000 * 2) for p in paths]

    def reference(device: torch.device) -> Step:
        import librosa

        paths = _wav_files(clips)
        return lambda: [librosa.load(p, sr=32000, mono=True)[0] for p in paths]

    return BenchCase(
        name="audio/decode-resample", unit="clips", items=clips, ours=ours, reference=reference, reference_name="librosa.load"
    )


def cases(quick: bool) -> list[BenchCase]:
    seconds, batch = (2.0, 2) if quick else (10.0, 32)
    families = [f for f in FAMILIES if f.name in QUICK_FAMILIES] if quick else FAMILIES
    model_cases = [case for family in families for case in _family_cases(family, batch, seconds)]
    cnn14 = next(f for f in FAMILIES if f.name == "Cnn14")
    return [*model_cases, _gpu_path_case(cnn14, batch, seconds), _decode_resample_case(32 if quick else 256)]
