"""``polyfm bench`` audio cases: every quick case builds and steps, ours and the reference
give outputs of the same shape, full mode covers all six families; the blocked
resampler equals torchaudio's."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
import torchaudio

from polyfm.audio.bench import FAMILIES, cases
from polyfm.audio.data import SincResampler
from polyfm.audio.models import MODELS

HAS_REFERENCE = importlib.util.find_spec("panns_inference") is not None and importlib.util.find_spec("torchlibrosa") is not None
CPU = torch.device("cpu")


def test_full_mode_lists_every_family() -> None:
    names = {case.name for case in cases(quick=False)}
    for family in MODELS:
        assert {f"audio/{family.lower()}/inference", f"audio/{family.lower()}/train-step"} <= names
    assert "audio/decode-resample" in names
    assert {f.name for f in FAMILIES} == set(MODELS)
    full = [case for case in cases(quick=False) if case.name != "audio/decode-resample"]
    assert all(case.items == 32 for case in full)
    # a reference exactly where panns_inference has the architecture
    with_reference = {case.name.split("/")[1] for case in full if case.reference is not None}
    assert with_reference == {"cnn14", "cnn14_16k", "cnn14_8k", "cnn14_decisionlevelmax"}


@pytest.mark.parametrize("case", cases(quick=True), ids=lambda case: case.name)
def test_quick_case_steps(case) -> None:
    out = case.ours(CPU)()
    if case.reference is None or not HAS_REFERENCE:
        assert out is not None
        return
    expected = case.reference(CPU)()
    if case.name.endswith(("/train-step", "/train-gpu-path")):
        assert out.ndim == 0 and math.isfinite(out.item()) and math.isfinite(expected.item())
    elif case.name.endswith("/inference"):
        assert out.shape == expected.shape == (case.items, 527)
    else:  # decode-resample: one waveform per clip, ours cropped to the clip length
        assert len(out) == len(expected) == case.items
        assert all(ours.shape == torch.Size([len(ref)]) for ours, ref in zip(out, expected))


@pytest.mark.parametrize("quality", ["best", "fast"])
@pytest.mark.parametrize(("source", "target"), [(8000, 32000), (44100, 32000), (48000, 16000), (22050, 44100), (32000, 32000)])
@pytest.mark.parametrize("shape", [(1,), (7,), (2, 8013)])
def test_sinc_resampler_matches_torchaudio(source: int, target: int, shape: tuple[int, ...], quality: str) -> None:
    x = torch.randn(*shape[:-1], shape[-1] * source // 8000 or 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    options = SincResampler.QUALITIES[quality]
    expected = torchaudio.functional.resample(x, source, target, **options)
    got = SincResampler(source, target, quality)(x)  # type: ignore[arg-type]
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=0)
    expected32 = torchaudio.functional.resample(x.float(), source, target, **options)
    torch.testing.assert_close(SincResampler(source, target, quality)(x.float()), expected32, atol=1e-6, rtol=2e-6)  # type: ignore[arg-type]
