"""Parity with panns_inference (the reference PANNs code) on random weights.

panns_inference is imported without its package ``__init__`` (which would download
AudioSet's label CSV): see ``polyfm.audio.bench.load_panns_reference``.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from polyfm.audio.bench import load_panns_reference
from polyfm.audio.models import Cnn14, Cnn14_16k, Cnn14_DecisionLevelMax
from polyfm.audio.weights import check_torchlibrosa_frontend, split_torchlibrosa

pytest.importorskip("torchlibrosa")
if importlib.util.find_spec("panns_inference") is None:  # not importorskip: importing the package would download
    pytest.skip("panns_inference is not installed (packages/audio/requirements-test.txt)", allow_module_level=True)
reference = load_panns_reference()


def _randomise_batchnorm(model: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            n = module.num_features
            module.running_mean.copy_(torch.rand(n, generator=generator) - 0.5)
            module.running_var.copy_(0.5 + 1.5 * torch.rand(n, generator=generator))
            module.weight.data.copy_(0.5 + torch.rand(n, generator=generator))
            module.bias.data.copy_(0.4 * torch.rand(n, generator=generator) - 0.2)


CONFIG_32K = {"sample_rate": 32000, "window_size": 1024, "hop_size": 320, "mel_bins": 64, "fmin": 50, "fmax": 14000, "classes_num": 527}


def _pair(ref_cls, our_cls, config=CONFIG_32K):
    torch.manual_seed(0)
    ref = ref_cls(**config)
    _randomise_batchnorm(ref, 1)
    ref.eval()
    state = ref.state_dict()
    ours = our_cls()
    trunk, frontend = split_torchlibrosa(state)
    assert set(frontend) == {"spectrogram_extractor.stft.conv_real.weight", "spectrogram_extractor.stft.conv_imag.weight", "logmel_extractor.melW"}
    check_torchlibrosa_frontend(frontend, ours.frontend)
    ours.load_state_dict(trunk, strict=True)
    return ref, ours.eval()


def test_cnn14_matches_panns_inference(tmp_path) -> None:
    ref, ours = _pair(reference.Cnn14, Cnn14)
    waveform = 0.3 * torch.randn(2, 32000, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected, got = ref(waveform), ours(waveform)
    for key in ("clipwise_output", "embedding"):
        torch.testing.assert_close(got[key], expected[key], atol=1e-4, rtol=0)
    assert expected["clipwise_output"].std() > 1e-3  # a non-trivial comparison
    # the released-file path: {'model': state_dict} with torchlibrosa tensors, strict keys
    torch.save({"model": ref.state_dict()}, tmp_path / "Cnn14_mAP=0.431.pth")
    loaded = Cnn14.from_pretrained(tmp_path / "Cnn14_mAP=0.431.pth").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(waveform)["embedding"], expected["embedding"], atol=1e-4, rtol=0)


def test_cnn14_decision_level_max_matches_panns_inference() -> None:
    ref, ours = _pair(reference.Cnn14_DecisionLevelMax, Cnn14_DecisionLevelMax)
    waveform = 0.3 * torch.randn(1, 32000 * 2 + 123, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected, got = ref(waveform), ours(waveform)
    assert got["framewise_output"].shape == expected["framewise_output"].shape
    for key in ("framewise_output", "clipwise_output"):
        torch.testing.assert_close(got[key], expected[key], atol=1e-4, rtol=0)


def test_cnn14_16k_matches_panns_inference_at_16khz() -> None:
    """panns_inference's Cnn14 built with PANNs' 16 kHz settings (512/160, 50-8000 Hz) vs our Cnn14_16k."""
    config = {"sample_rate": 16000, "window_size": 512, "hop_size": 160, "mel_bins": 64, "fmin": 50, "fmax": 8000, "classes_num": 527}
    ref, ours = _pair(reference.Cnn14, Cnn14_16k, config)
    waveform = 0.3 * torch.randn(2, 16000, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected, got = ref(waveform), ours(waveform)
    for key in ("clipwise_output", "embedding"):
        torch.testing.assert_close(got[key], expected[key], atol=1e-4, rtol=0)
