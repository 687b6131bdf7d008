"""Parity with panns_inference (the reference PANNs code) on random weights.

panns_inference is imported without its package ``__init__`` (which would download
AudioSet's label CSV): see ``polyfm.audio.bench.load_panns_reference``.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from polyfm.audio.bench import load_panns_reference
from polyfm.audio.models import Cnn14, Cnn14_8k, Cnn14_16k, Cnn14_DecisionLevelMax
from polyfm.audio.weights import WEIGHTS, check_torchlibrosa_frontend, split_torchlibrosa
from polyfm.core.errors import CheckpointError

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


def _pair(ref_cls, our_cls, config=CONFIG_32K, ours_config=None):
    torch.manual_seed(0)
    ref = ref_cls(**config)
    if config["mel_bins"] != 64:  # panns_inference fixes bn0 at 64 bins; PANNs' Cnn14_mel32/mel128 size it to mel_bins
        ref.bn0 = torch.nn.BatchNorm2d(config["mel_bins"])
    _randomise_batchnorm(ref, 1)
    ref.eval()
    state = ref.state_dict()
    ours = our_cls(**(ours_config or {}))
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


def test_cnn14_8k_matches_panns_inference_at_8khz(tmp_path) -> None:
    """The released Cnn14_8k_mAP=0.416.pth configuration (8000/256/80, 64 bins, 50-4000 Hz):
    panns_inference's Cnn14 built with it vs our Cnn14_8k, on a 1 s clip plus an odd tail,
    and through the registry's configuration."""
    config = {"sample_rate": 8000, "window_size": 256, "hop_size": 80, "mel_bins": 64, "fmin": 50, "fmax": 4000, "classes_num": 527}
    spec = {w.name: w for w in WEIGHTS}["panns-cnn14-8k"]
    assert dict(spec.config) == config and spec.family == "Cnn14_8k"
    assert spec.files["Cnn14_8k_mAP=0.416.pth"][0] == "https://zenodo.org/record/3987831/files/Cnn14_8k_mAP%3D0.416.pth?download=1"
    ref, ours = _pair(reference.Cnn14, Cnn14_8k, config)
    waveform = 0.3 * torch.randn(2, 8000 + 37, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected, got = ref(waveform), ours(waveform)
    for key in ("clipwise_output", "embedding"):
        torch.testing.assert_close(got[key], expected[key], atol=1e-4, rtol=0)
    assert expected["clipwise_output"].std() > 1e-3
    path = tmp_path / "Cnn14_8k_mAP=0.416.pth"
    torch.save({"model": ref.state_dict()}, path)
    with pytest.raises(CheckpointError, match="window_size=256"):
        Cnn14.from_pretrained(path)  # 32 kHz defaults: refused, naming the checkpoint's window
    loaded = Cnn14.from_pretrained(path, **{k: v for k, v in config.items() if k != "classes_num"}).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(waveform)["clipwise_output"], expected["clipwise_output"], atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "config, samples, batch",
    [
        # 128 mel bins up to Nyquist, an odd clip length, batch of one
        ({"sample_rate": 32000, "window_size": 1024, "hop_size": 320, "mel_bins": 128, "fmin": 50, "fmax": 16000, "classes_num": 10}, 32000 + 123, 1),
        # an odd sample rate (torchaudio's mel filters were 0.2 dB off here) at a half-integer Nyquist
        ({"sample_rate": 11025, "window_size": 256, "hop_size": 110, "mel_bins": 64, "fmin": 0, "fmax": 5512.5, "classes_num": 5}, 11025, 1),
    ],
    ids=["mel128-fmax-nyquist-odd-length", "11025hz-odd-rate"],
)
def test_cnn14_other_configurations_match_panns_inference(config: dict, samples: int, batch: int) -> None:
    ref, ours = _pair(reference.Cnn14, Cnn14, config, ours_config=config)
    waveform = 0.3 * torch.randn(batch, samples, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        expected, got = ref(waveform), ours(waveform)
        reference_logmel = ref.logmel_extractor(ref.spectrogram_extractor(waveform))
        torch.testing.assert_close(ours.frontend(waveform), reference_logmel, atol=1e-3, rtol=0)  # dB
    for key in ("clipwise_output", "embedding"):
        torch.testing.assert_close(got[key], expected[key], atol=1e-4, rtol=0)


def test_cnn14_emb512_layout_loads_and_matches(tmp_path) -> None:
    """PANNs' Cnn14_emb512 is Cnn14 with fc1 2048 -> 512: the reference with those layers
    swapped in, saved in the official layout, loads into Cnn14 with embedding_size read
    from the file."""
    torch.manual_seed(0)
    ref = reference.Cnn14(**CONFIG_32K)
    ref.fc1, ref.fc_audioset = torch.nn.Linear(2048, 512), torch.nn.Linear(512, 527)
    _randomise_batchnorm(ref, 1)
    ref.eval()
    path = tmp_path / "Cnn14_emb512_mAP=0.420.pth"
    torch.save({"model": ref.state_dict()}, path)
    ours = Cnn14.from_pretrained(path).eval()
    assert ours.feature_dim == 512
    waveform = 0.3 * torch.randn(1, 32000, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected, got = ref(waveform), ours(waveform)
    assert got["embedding"].shape == (1, 512)
    for key in ("clipwise_output", "embedding"):
        torch.testing.assert_close(got[key], expected[key], atol=1e-4, rtol=0)
    spec = {w.name: w for w in WEIGHTS}["panns-cnn14-emb512"]
    assert spec.config["embedding_size"] == 512 and spec.primary_file == path.name


# ----------------------------------------------------------------------------- adversarial sweep

CONFIG_16K = {"sample_rate": 16000, "window_size": 512, "hop_size": 160, "mel_bins": 64, "fmin": 50, "fmax": 8000, "classes_num": 527}
CONFIG_8K = {"sample_rate": 8000, "window_size": 256, "hop_size": 80, "mel_bins": 64, "fmin": 50, "fmax": 4000, "classes_num": 527}
RELEASED = {"32k": (Cnn14, CONFIG_32K), "16k": (Cnn14_16k, CONFIG_16K), "8k": (Cnn14_8k, CONFIG_8K)}


def _noise(batch: int, samples: int) -> torch.Tensor:
    return 0.3 * torch.randn(batch, samples, generator=torch.Generator().manual_seed(samples))


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_clip_length_edges_against_panns_inference(name: str) -> None:
    """Below half a window (reflect padding) and below the 32 frames the trunk pools, panns_inference
    fails inside torch (a padding or pooling RuntimeError); ours raises a ValueError saying the
    shortest clip. From ``min_samples()`` (31 hops: exactly 32 frames) on, odd lengths included, equal."""
    cls, config = RELEASED[name]
    ref, ours = _pair(reference.Cnn14, cls, config)
    hop, window = config["hop_size"], config["window_size"]
    assert ours.min_samples() == 31 * hop
    for samples in (1, window // 2, window // 2 + 1, window, 31 * hop - 1):
        x = _noise(1, samples)
        with torch.no_grad():
            with pytest.raises(RuntimeError):
                ref(x)
            with pytest.raises(ValueError, match=rf"too short for window_size={window}|at least {31 * hop} samples"):
                ours(x)
    for samples in (31 * hop, 31 * hop + 1, 32 * hop + 7, 101 * hop - 1):
        x = _noise(1, samples)
        with torch.no_grad():
            expected, got = ref(x), ours(x)
        for key in ("clipwise_output", "embedding"):
            torch.testing.assert_close(got[key], expected[key], atol=1e-4, rtol=0, msg=f"{samples} samples: {key}")


def test_batch_rows_equal_single_clip_runs() -> None:
    """Batch 1 vs many: each row of a batch of 4 (an odd length) equals the clip run alone, and the reference's batch."""
    ref, ours = _pair(reference.Cnn14, Cnn14)
    x = _noise(4, 32000 + 17)
    with torch.no_grad():
        batch, expected = ours(x), ref(x)
        singles = [ours(x[i : i + 1]) for i in range(4)]
    for key in ("clipwise_output", "embedding"):
        # float rounding only (the convolutions sum in another order per batch size): measured 1.2e-6
        torch.testing.assert_close(batch[key], torch.cat([s[key] for s in singles]), atol=1e-5, rtol=0)
        torch.testing.assert_close(batch[key], expected[key], atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_decision_level_max_framewise_length_at_each_rate(name: str) -> None:
    """panns_inference's Cnn14_DecisionLevelMax built at 32 / 16 / 8 kHz vs ours with the same
    arguments: ``framewise_output`` has the log-mel's ``1 + samples // hop`` frames (segments
    repeated 32 times, padded with the last one; none padded at exactly 64 frames), and equals
    the reference's at the shortest clip, at 64 frames, one sample short of 65 and at odd lengths."""
    _, config = RELEASED[name]
    ref, ours = _pair(reference.Cnn14_DecisionLevelMax, Cnn14_DecisionLevelMax, config, ours_config=config)
    hop = config["hop_size"]
    for samples in (31 * hop, 63 * hop, 64 * hop - 1, 95 * hop + 5):
        x = _noise(2, samples)
        with torch.no_grad():
            expected, got = ref(x), ours(x)
        assert got["framewise_output"].shape == expected["framewise_output"].shape == (2, 1 + samples // hop, 527)
        for key in ("framewise_output", "clipwise_output"):
            torch.testing.assert_close(got[key], expected[key], atol=1e-4, rtol=0, msg=f"{samples} samples: {key}")
