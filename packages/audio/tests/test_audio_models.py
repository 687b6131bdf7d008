"""PANNs models: log-mel front end against librosa, shapes, official checkpoint layout."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from polyfm.audio.models import MODELS, Cnn6, Cnn14, Cnn14_16k, Cnn14_DecisionLevelMax
from polyfm.audio.models.frontend import LogMelFrontEnd, SpecAugment, do_mixup, mixup_lambdas
from polyfm.audio.weights import MEL_W, STFT_REAL, WEIGHTS, panns_to_polyfm, to_panns_state_dict
from polyfm.core.errors import CheckpointError


@pytest.mark.parametrize(
    "config",
    [
        {"sample_rate": 32000, "window_size": 1024, "hop_size": 320, "mel_bins": 64, "fmin": 50, "fmax": 14000},
        {"sample_rate": 16000, "window_size": 512, "hop_size": 160, "mel_bins": 64, "fmin": 50, "fmax": 8000},
    ],
)
def test_logmel_matches_librosa(config: dict) -> None:
    librosa = pytest.importorskip("librosa")
    rng = np.random.default_rng(0)
    t = np.arange(config["sample_rate"]) / config["sample_rate"]
    y = (0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(len(t))).astype(np.float32)
    mel = librosa.feature.melspectrogram(
        y=y, sr=config["sample_rate"], n_fft=config["window_size"], hop_length=config["hop_size"], win_length=config["window_size"],
        window="hann", center=True, pad_mode="reflect", power=2.0, n_mels=config["mel_bins"], fmin=config["fmin"],
        fmax=config["fmax"], htk=False, norm="slaney",
    )  # fmt: skip
    expected = librosa.power_to_db(mel, ref=1.0, amin=1e-10, top_db=None).T
    ours = LogMelFrontEnd(**config)(torch.from_numpy(y)[None])[0, 0].numpy()
    assert ours.shape == expected.shape == (1 + len(y) // config["hop_size"], config["mel_bins"])
    np.testing.assert_allclose(ours, expected, atol=2e-3)


def test_every_model_forward_shapes() -> None:
    x = torch.randn(2, 32000) * 0.1
    for name, cls in MODELS.items():
        kwargs = {"base_channels": 16, "classes_num": 5}
        model = cls(**kwargs).eval()
        if name == "Cnn14_16k":
            x_in = torch.randn(2, 16000) * 0.1
        else:
            x_in = x
        out = model(x_in)
        assert out["clipwise_output"].shape == (2, 5), name
        assert out["embedding"].shape == (2, model.feature_dim), name
        assert torch.all((out["clipwise_output"] >= 0) & (out["clipwise_output"] <= 1))
        assert model.forward_features(x_in).shape == (2, model.feature_dim)
        names = model.block_names()
        params = [n for n, _ in model.named_parameters()]
        for block in names:
            assert any(p.startswith(block + ".") for p in params), (name, block)
    sed = Cnn14_DecisionLevelMax(base_channels=16, classes_num=5).eval()
    out = sed(x)
    assert out["framewise_output"].shape == (2, 1 + 32000 // 320, 5)
    assert torch.allclose(out["clipwise_output"], out["framewise_output"].amax(dim=1))


def test_spec_augment_masks_only_in_training() -> None:
    x = torch.ones(4, 1, 200, 64)
    aug = SpecAugment(time_drop_width=64, time_stripes_num=2, freq_drop_width=8, freq_stripes_num=2).train()
    masked = aug(x)
    assert (masked == 0).any() and (masked == 1).any()
    assert torch.equal(aug.eval()(x), x)


def test_mixup_pairs() -> None:
    lam = mixup_lambdas(6, alpha=1.0)
    assert lam.shape == (6,) and torch.allclose(lam[0::2] + lam[1::2], torch.ones(3))
    x = torch.arange(6.0)[:, None].repeat(1, 3)
    mixed = do_mixup(x, lam)
    assert mixed.shape == (3, 3)
    assert torch.allclose(mixed[:, 0], x[0::2, 0] * lam[0::2] + x[1::2, 0] * lam[1::2])
    with pytest.raises(ValueError, match="even"):
        mixup_lambdas(3)


def _save_official(model: torch.nn.Module, path) -> None:
    torch.save({"model": to_panns_state_dict(model), "iteration": 0}, path)


def test_from_pretrained_official_layout(tmp_path) -> None:
    torch.manual_seed(0)
    model = Cnn14(base_channels=8, classes_num=7).eval()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
    path = tmp_path / "Cnn14_mAP=0.431.pth"
    _save_official(model, path)
    state = torch.load(path, weights_only=True)["model"]
    assert {STFT_REAL, MEL_W, "bn0.running_var", "conv_block1.conv1.weight", "conv_block6.bn2.weight", "fc1.weight", "fc_audioset.bias"} <= set(state)
    loaded = Cnn14.from_pretrained(path, base_channels=8).eval()  # classes_num read from the checkpoint
    assert loaded.classes_num == 7
    x = torch.randn(2, 32000) * 0.1
    torch.testing.assert_close(loaded(x)["clipwise_output"], model(x)["clipwise_output"])
    # a converted (safetensors) copy has no torchlibrosa tensors and loads too
    assert STFT_REAL not in panns_to_polyfm({"model": state})


def test_from_pretrained_refuses_wrong_config(tmp_path) -> None:
    path16 = tmp_path / "Cnn14_16k.pth"
    _save_official(Cnn14_16k(base_channels=8, classes_num=3), path16)
    with pytest.raises(CheckpointError, match="window_size=512"):
        Cnn14.from_pretrained(path16, base_channels=8)
    Cnn14.from_pretrained(path16, base_channels=8, sample_rate=16000, window_size=512, hop_size=160, fmax=8000)
    path = tmp_path / "cnn14.pth"
    _save_official(Cnn14(base_channels=8, classes_num=3), path)
    with pytest.raises(CheckpointError, match="mel filters differ"):
        Cnn14.from_pretrained(path, base_channels=8, fmax=11000)
    with pytest.raises(CheckpointError, match="missing from the checkpoint|shape mismatch"):
        Cnn6.from_pretrained(path, base_channels=8)


def test_registry_names_and_offline_error(tmp_path, monkeypatch) -> None:
    names = {spec.name: spec for spec in WEIGHTS}
    assert {"panns-cnn14", "panns-cnn14-16k", "panns-cnn10", "panns-cnn6", "panns-cnn14-decision-level-max", "panns-wavegram-logmel-cnn14"} <= set(names)
    assert names["panns-cnn14"].files["Cnn14_mAP=0.431.pth"][0] == "https://zenodo.org/record/3987831/files/Cnn14_mAP%3D0.431.pth?download=1"
    assert names["panns-cnn14-16k"].config["sample_rate"] == 16000
    monkeypatch.setenv("POLYFM_CACHE", str(tmp_path))
    monkeypatch.setenv("POLYFM_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="zenodo.org"):
        Cnn6.from_pretrained("panns-cnn6")
    # a file put where the error says is picked up by name, with the registry's configuration
    folder = tmp_path / "weights" / "panns-cnn6"
    folder.mkdir(parents=True)
    reference = Cnn6().eval()
    _save_official(reference, folder / "Cnn6_mAP=0.343.pth")
    with pytest.raises(CheckpointError, match="Zenodo lists md5 e25e26b84585b14c7754c91e48efc9be"):
        Cnn6.from_pretrained("panns-cnn6")  # random weights are not the released file
    import hashlib

    md5 = hashlib.md5((folder / "Cnn6_mAP=0.343.pth").read_bytes()).hexdigest()
    monkeypatch.setitem(names["panns-cnn6"].meta, "zenodo_md5", md5)  # pretend ours is the released file
    loaded = Cnn6.from_pretrained("panns-cnn6").eval()
    x = torch.randn(1, 32000) * 0.1
    torch.testing.assert_close(loaded(x)["embedding"], reference(x)["embedding"])


def test_training_checkpoint_with_numpy_sampler_state_loads_safely(tmp_path) -> None:
    """PANNs' main.py saves {'iteration', 'model', 'sampler'}; the sampler holds numpy arrays."""
    import pickle

    model = Cnn6(base_channels=4, classes_num=5).eval()
    sampler = {"indexes_per_class": [np.arange(7), np.arange(3)], "queue": [np.int64(4)], "pointers_of_classes": [0, 1]}
    path = tmp_path / "600000_iterations.pth"
    torch.save({"iteration": 600000, "model": to_panns_state_dict(model), "sampler": sampler, "test_mAP": np.float64(0.343)}, path)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)  # what a plain safe load says
    loaded = Cnn6.from_pretrained(path, base_channels=4).eval()
    x = torch.randn(1, 32000) * 0.1
    torch.testing.assert_close(loaded(x)["embedding"], model(x)["embedding"])

    class Payload:  # anything beyond numpy data is still refused
        def __reduce__(self):
            return (print, ("code ran",))

    bad = tmp_path / "bad.pth"
    torch.save({"model": to_panns_state_dict(model), "extra": Payload(), "arr": np.arange(2)}, bad)
    with pytest.raises(CheckpointError, match="Refused to load"):
        Cnn6.from_pretrained(bad, base_channels=4)
