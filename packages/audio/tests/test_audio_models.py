"""PANNs models: log-mel front end against librosa, shapes, official checkpoint layout."""

from __future__ import annotations

import logging

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
        {"sample_rate": 8000, "window_size": 256, "hop_size": 80, "mel_bins": 64, "fmin": 50, "fmax": 4000},  # Cnn14_8k
        # an odd rate up to Nyquist: torchaudio's melscale_fbanks misplaces every bin here (0.2 dB)
        {"sample_rate": 11025, "window_size": 256, "hop_size": 110, "mel_bins": 40, "fmin": 0, "fmax": 5512.5},
        {"sample_rate": 44100, "window_size": 2048, "hop_size": 441, "mel_bins": 128, "fmin": 0, "fmax": 22050},
    ],
    ids=["32k", "16k", "8k", "11025-nyquist", "44k-128mel"],
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
    frontend = LogMelFrontEnd(**config)
    ours = frontend(torch.from_numpy(y)[None])[0, 0].numpy()
    assert ours.shape == expected.shape == (1 + len(y) // config["hop_size"], config["mel_bins"])
    np.testing.assert_allclose(ours, expected, atol=2e-3)
    filters = librosa.filters.mel(
        sr=config["sample_rate"], n_fft=config["window_size"], n_mels=config["mel_bins"], fmin=config["fmin"], fmax=config["fmax"], htk=False, norm="slaney"
    )  # fmt: skip
    np.testing.assert_allclose(frontend.mel_fb.numpy(), filters.T, atol=1e-8, rtol=0)


def test_every_model_forward_shapes() -> None:
    x = torch.randn(2, 32000) * 0.1
    for name, cls in MODELS.items():
        kwargs = {"base_channels": 16, "classes_num": 5}
        model = cls(**kwargs).eval()
        x_in = torch.randn(2, model.sample_rate) * 0.1  # one second at the model's rate
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
    with pytest.raises(CheckpointError, match="expected md5 e25e26b84585b14c7754c91e48efc9be"):
        Cnn6.from_pretrained("panns-cnn6")  # random weights are not the released file
    import hashlib

    md5 = hashlib.md5((folder / "Cnn6_mAP=0.343.pth").read_bytes()).hexdigest()
    url = names["panns-cnn6"].files["Cnn6_mAP=0.343.pth"][0]
    monkeypatch.setitem(names["panns-cnn6"].files, "Cnn6_mAP=0.343.pth", (url, f"md5:{md5}"))  # pretend ours is the released file
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


def _random_cnn14(classes_num: int) -> Cnn14:
    torch.manual_seed(0)
    model = Cnn14(base_channels=8, classes_num=classes_num).eval()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
    return model


def test_finetuned_checkpoint_with_other_classes_num_loads_trunk_and_names_head(tmp_path, caplog) -> None:
    """A PANNs checkpoint fine-tuned to 10 classes, loaded with 527 (the constructor's
    ``pretrained=``) or 3 classes: the trunk loads, fc_audioset stays new, and the log says so."""
    source = _random_cnn14(classes_num=10)
    path = tmp_path / "finetuned_10_classes.pth"
    torch.save({"model": {f"module.{k}": v for k, v in to_panns_state_dict(source).items()}}, path)  # DataParallel prefix
    x = torch.randn(1, 32000) * 0.1
    with caplog.at_level(logging.WARNING, logger="polyfm.audio.models.base"):
        ours = Cnn14(base_channels=8, classes_num=3, pretrained=str(path)).eval()
    assert "fc_audioset.weight (10, 256) (model (3, 256))" in caplog.text and "fc_audioset.bias" in caplog.text
    assert "pass classes_num=10" in caplog.text and str(path) in caplog.text
    torch.testing.assert_close(ours(x)["embedding"], source(x)["embedding"])  # the trunk and fc1 came from the file
    assert not torch.equal(ours.fc_audioset.weight[:3], source.fc_audioset.weight[:3])
    same = Cnn14.from_pretrained(path, base_channels=8).eval()  # classes_num read from the file: all of it loads
    assert same.classes_num == 10
    torch.testing.assert_close(same(x)["clipwise_output"], source(x)["clipwise_output"])
    # any other mismatch is still an error naming the key
    with pytest.raises(CheckpointError, match=r"conv_block1.conv1.weight: \(16, 1, 3, 3\) vs \(8, 1, 3, 3\)"):
        Cnn14.from_pretrained(path, base_channels=16, classes_num=10)


def test_transfer_cnn14_and_compiled_checkpoints_load(tmp_path, caplog) -> None:
    """PANNs' finetune_template.py saves Transfer_Cnn14: ``base.*`` (a whole Cnn14,
    torchlibrosa tensors included) and ``fc_transfer.*`` (the new task's head); a model
    saved while wrapped in DataParallel and torch.compile has ``module._orig_mod.`` keys."""
    source = _random_cnn14(classes_num=527)
    state = {f"base.{k}": v for k, v in to_panns_state_dict(source).items()}
    state |= {"fc_transfer.weight": torch.zeros(4, 256), "fc_transfer.bias": torch.zeros(4)}
    path = tmp_path / "transfer.pth"
    torch.save({"iteration": 100, "model": state}, path)
    with caplog.at_level(logging.WARNING, logger="polyfm.audio.models.base"):
        ours = Cnn14.from_pretrained(path, base_channels=8).eval()
    assert "fc_transfer.bias (4,), fc_transfer.weight (4, 256)" in caplog.text
    x = torch.randn(1, 32000) * 0.1
    torch.testing.assert_close(ours(x)["clipwise_output"], source(x)["clipwise_output"])
    # saved from a torch.compile'd model inside DataParallel: module._orig_mod.<key>
    compiled = tmp_path / "compiled.pth"
    torch.save({"model": {f"module._orig_mod.{k}": v for k, v in to_panns_state_dict(source).items()}}, compiled)
    torch.testing.assert_close(Cnn14.from_pretrained(compiled, base_channels=8).eval()(x)["clipwise_output"], source(x)["clipwise_output"])


def test_registry_checkpoint_into_a_model_built_for_another_configuration() -> None:
    """``pretrained=`` by registry name checks the constructor arguments before any download."""
    with pytest.raises(CheckpointError, match=r"panns-cnn14-8k was trained with sample_rate=8000, window_size=256, hop_size=80, fmax=4000.*Cnn14_8k"):
        Cnn14(base_channels=4, pretrained="panns-cnn14-8k")
    with pytest.raises(CheckpointError, match=r"embedding_size=512, but this Cnn14 has embedding_size=128"):
        Cnn14(base_channels=4, pretrained="panns-cnn14-emb512")
    names = {spec.name: spec for spec in WEIGHTS}
    assert names["panns-cnn14-16k"].files["Cnn14_16k_mAP=0.438.pth"][1] == "md5:362fc5ff18f1d6ad2f6d464b45893f2c"
    assert {"panns-cnn14-8k", "panns-cnn14-emb512", "panns-cnn14-emb128", "panns-cnn14-emb32"} <= set(names)
    for spec in WEIGHTS:  # every entry builds at its own configuration (strict keys need matching shapes)
        assert MODELS[spec.family](**spec.config, base_channels=16).frontend.sample_rate == spec.config["sample_rate"]


def test_shortest_clip_each_family_takes_and_wavegram_hop() -> None:
    """``min_samples()`` runs; one hop less fails with an error that says how long clips must be."""
    for name, cls in MODELS.items():
        model = cls(base_channels=16, classes_num=3).eval()
        with torch.no_grad():
            assert model(torch.randn(1, model.min_samples()) * 0.1)["clipwise_output"].shape == (1, 3), name
            with pytest.raises(ValueError, match=f"at least {model.min_samples()} samples"):
                model(torch.randn(1, model.min_samples() - model.frontend.hop_size) * 0.1)
    from polyfm.audio.models import Wavegram_Logmel_Cnn14

    with pytest.raises(ValueError, match="hop_size=320, got 160"):  # its branches would pair different times
        Wavegram_Logmel_Cnn14(base_channels=16, sample_rate=16000, window_size=512, hop_size=160, fmax=8000)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_copy_of_an_official_checkpoint_loads(tmp_path, dtype: torch.dtype) -> None:
    """People halve the 300 MB files: the torchlibrosa tensors are then rounded to the
    dtype's precision, which must not read as "not a PANNs front end"; a wrong
    configuration is still refused."""
    model = _random_cnn14(classes_num=5)
    half = {k: v.to(dtype) if v.is_floating_point() else v for k, v in to_panns_state_dict(model).items()}
    path = tmp_path / "cnn14_half.pth"
    torch.save({"model": half}, path)
    loaded = Cnn14.from_pretrained(path, base_channels=8).eval()
    assert loaded.fc1.weight.dtype == torch.float32
    x = torch.randn(1, 32000) * 0.1
    torch.testing.assert_close(loaded(x)["clipwise_output"], model(x)["clipwise_output"], atol=1e-3, rtol=0)
    with pytest.raises(CheckpointError, match="mel filters differ"):
        Cnn14.from_pretrained(path, base_channels=8, fmax=13000)
