"""Real data: the Free Spoken Digit Dataset ($POLYFM_DATA_DIR/audio/fsdd, 8 kHz)."""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
import pytest
import soundfile as sf
import torch

from polyfm.audio.data import FSDDDataModule, read_fsdd
from polyfm.audio.models import Cnn6
from polyfm.core.adaptation import Adaptation
from polyfm.core.tasks import Classification, OptimConfig
from polyfm.core.trainer import build_trainer

DATA = os.environ.get("POLYFM_DATA_DIR")
pytestmark = pytest.mark.skipif(not DATA or not (Path(DATA) / "audio" / "fsdd" / "recordings").is_dir(), reason="POLYFM_DATA_DIR/audio/fsdd not available")


def test_fsdd_split_follows_the_dataset() -> None:
    root = Path(DATA) / "audio" / "fsdd"  # type: ignore[arg-type]
    train, train_labels, classes = read_fsdd(root, "train")
    test, _, _ = read_fsdd(root, "test")
    assert classes == [str(d) for d in range(10)]
    assert len(train) == 2250 and len(test) == 250
    assert all(int(p.stem.split("_")[2]) < 5 for p in test) and all(int(p.stem.split("_")[2]) >= 5 for p in train)
    assert train_labels[0] == int(train[0].name[0])


def test_8khz_input_reaches_the_model_at_32khz() -> None:
    dm = FSDDDataModule(sample_rate=32000, clip_seconds=1.0, batch_size=4, random_crop=False)
    dm.setup()
    batch = next(iter(dm.test_dataloader()))
    source, rate = sf.read(batch["meta"][0], dtype="float32")
    assert rate == 8000
    assert batch["input"].shape == (4, 32000)  # 1 s at 32 kHz, not 8000 samples
    # the resampled clip has 4x the samples of the source and the same content:
    # every 4th sample of the band-limited interpolation is the source sample
    n = min(len(source), 8000)
    resampled = batch["input"][0, : 4 * n : 4].numpy()
    assert abs(float((resampled - source[:n]).std())) < 0.05 * float(source[:n].std()) + 1e-4
    seen: list[tuple[int, ...]] = []
    model = Cnn6(base_channels=4, classes_num=10).eval()
    model.frontend.register_forward_hook(lambda module, inputs, output: seen.append((tuple(inputs[0].shape), tuple(output.shape))))
    with torch.no_grad():
        model(batch["input"])
    assert seen == [((4, 32000), (4, 1, 101, 64))]  # 1 + 32000 // 320 frames


def test_finetune_on_train_split_beats_chance_by_far(tmp_path: Path) -> None:
    """A small Cnn6 trained from scratch on (part of) the train split, scored on the
    dataset's own test split (index 0-4, all 250 clips). Chance is 10%."""
    L.seed_everything(0)
    dm = FSDDDataModule(sample_rate=32000, clip_seconds=0.5, max_train_clips=1000, val_indices=[], cache=True, batch_size=32)
    encoder = Cnn6(base_channels=4, mel_bins=32, hop_size=640, classes_num=10, spec_augment=False, block_dropout=0.0, head_dropout=0.0)
    task = Classification(encoder, 10, optim=OptimConfig(lr=1e-2, weight_decay=0.01, warmup_steps=5))
    trainer = build_trainer(
        max_epochs=8, default_root_dir=str(tmp_path), enable_progress_bar=False, enable_checkpointing=False,
        loggers=(), limit_val_batches=0, precision="32-true",
    )  # fmt: skip
    trainer.fit(task, dm)
    result = trainer.test(task, dm, verbose=False)[0]
    assert len(dm.test_set) == 250
    print(f"FSDD test accuracy (250 clips, chance 0.10): {result['test/acc']:.3f}")
    assert result["test/acc"] > 0.6, result


def test_demo_kit_with_real_data_builds_fsdd_runs() -> None:
    from polyfm.audio.samples import demo_kit

    kit = demo_kit(Path(DATA), quick=True)  # type: ignore[arg-type]
    assert kit.target == "fsdd-digits" and "FSDD" in kit.data_source
    pretrain = kit.make_pretrain_data()
    pretrain.setup()
    views = next(iter(pretrain.train_dataloader()))
    assert views["view1"].shape == views["view2"].shape == (32, 16000)
    finetune = kit.make_finetune_data(0.25, 0)
    finetune.setup()
    assert 200 <= len(finetune.train_set) <= 300 and len(finetune.test_set) == 250  # a quarter of 1000 clips, stratified
    encoder = kit.make_encoder()
    task = kit.make_task(encoder, Adaptation(mode="linear"))
    batch = next(iter(finetune.test_dataloader()))
    assert task(batch["input"]).shape == (32, 10)


def _recording(name: str = "3_jackson_12.wav") -> Path:
    return Path(DATA) / "audio" / "fsdd" / "recordings" / name  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "rate, subtype, suffix",
    [(22050, "PCM_24", ".wav"), (44100, "FLOAT", ".wav"), (44100, "PCM_16", ".flac"), (8000, "PCM_24", ".flac")],
    ids=["22k-24bit-wav", "44k-float-wav", "44k-flac", "8k-24bit-flac"],
)
def test_real_recording_as_stereo_file_matches_librosa_mono_load(tmp_path: Path, rate: int, subtype: str, suffix: str) -> None:
    """An FSDD recording re-encoded as a stereo file at another rate and bit depth: decoded,
    mixed down as librosa's ``mono=True`` (the channel mean) and resampled to 32 kHz, it
    matches ``librosa.load(sr=32000, mono=True)`` as PANNs' scripts load audio (the two
    resamplers differ slightly near Nyquist)."""
    librosa = pytest.importorskip("librosa")
    import numpy as np

    from polyfm.audio.data import load_audio

    source, source_rate = sf.read(_recording(), dtype="float32")
    assert source_rate == 8000
    mono = librosa.resample(source, orig_sr=8000, target_sr=rate) if rate != 8000 else source
    path = tmp_path / f"stereo_{rate}{suffix}"
    sf.write(path, np.stack([mono, -0.5 * mono], axis=1), rate, subtype=subtype)
    native = load_audio(path, sample_rate=rate).numpy()
    np.testing.assert_allclose(native, 0.25 * mono, atol=4e-5)  # mean of the channels, 16-bit quantisation at worst
    ours = load_audio(path, sample_rate=32000).numpy()
    expected = librosa.load(path, sr=32000, mono=True)[0]
    assert ours.shape == expected.shape
    assert np.corrcoef(ours, expected)[0, 1] > 0.999
    assert np.abs(ours - expected).max() < 0.03 * np.abs(expected).max()


def test_cnn14_8k_tags_every_real_recording_length_at_its_own_rate() -> None:
    """FSDD is 8 kHz: Cnn14_8k reads it without resampling, and the shortest recordings
    (1148 samples, 15 frames; PANNs' inference fails below 32) are zero-padded to the
    model's minimum instead of failing."""
    from polyfm.audio.inference import tag_file
    from polyfm.audio.models import Cnn14_8k

    model = Cnn14_8k(base_channels=4, classes_num=10)
    shortest = _recording("6_yweweler_3.wav")
    assert sf.info(shortest).frames == 1148 < model.min_samples() == 2480
    result = tag_file(model, shortest, top_k=3)
    assert result["waveform"].shape == (1, 2480) and len(result["tags"]) == 3
    longest = tag_file(model, _recording("3_lucas_7.wav"), top_k=1)
    assert longest["waveform"].shape == (1, sf.info(_recording("3_lucas_7.wav")).frames)  # native rate, untouched
    with pytest.raises(ValueError, match="at least 2480 samples"):
        model(torch.zeros(1, 1148))


def test_8khz_recordings_upsampled_for_a_32khz_model_match_librosa_logmel() -> None:
    """FSDD through a 32 kHz model's front end: our resampling (resampy's kaiser_best filter)
    vs ``librosa.load(sr=32000)`` as PANNs' inference script loads audio. An 8 kHz file has
    nothing above 4 kHz, so the upper mel bins hold only what the resampler lets through:
    torchaudio's default filter (quality="fast") puts 13-18 dB more there."""
    librosa = pytest.importorskip("librosa")
    from polyfm.audio.data import SincResampler, load_audio
    from polyfm.audio.models.frontend import LogMelFrontEnd

    frontend = LogMelFrontEnd()  # Cnn14's: 32 kHz, 64 bins, 50-14000 Hz; bins 40-63 lie above 3.6 kHz
    fast = SincResampler(8000, 32000, "fast")
    for name in ("3_jackson_12.wav", "0_george_0.wav", "7_yweweler_30.wav"):
        path = _recording(name)
        expected = frontend(torch.from_numpy(librosa.load(path, sr=32000, mono=True)[0])[None])[0, 0]
        ours = frontend(load_audio(path, sample_rate=32000)[None])[0, 0]
        assert ours.shape == expected.shape
        assert (ours - expected).abs().mean() < 0.5, name  # dB, all bins
        assert (ours - expected)[:, 40:].abs().mean() < 1.5, name
        leaky = frontend(fast(load_audio(path, sample_rate=8000))[None])[0, 0]
        assert (leaky - expected)[:, 40:].abs().mean() > 5.0, name


@pytest.mark.parametrize("sample_rate", [8000, 32000])
def test_tag_file_on_a_real_recording_matches_panns_pipeline(sample_rate: int) -> None:
    """PANNs' inference script: ``librosa.load(path, sr=model rate, mono=True)`` then the model.
    Ours: ``tag_file`` (soundfile, our resampling, our front end). Same random weights
    (panns_inference's Cnn14 at that configuration): clipwise outputs within 1e-4, at 8 kHz
    (no resampling; Cnn14_8k) and at 32 kHz (FSDD upsampled 4x; torchaudio's default
    resampling filter put this at 4e-4)."""
    import importlib.util

    librosa = pytest.importorskip("librosa")
    pytest.importorskip("torchlibrosa")
    if importlib.util.find_spec("panns_inference") is None:
        pytest.skip("panns_inference is not installed (packages/audio/requirements-test.txt)")
    from polyfm.audio.bench import load_panns_reference
    from polyfm.audio.inference import tag_file
    from polyfm.audio.models import Cnn14, Cnn14_8k
    from polyfm.audio.weights import WEIGHTS, split_torchlibrosa

    name = "panns-cnn14-8k" if sample_rate == 8000 else "panns-cnn14"
    config = dict(next(spec for spec in WEIGHTS if spec.name == name).config)
    torch.manual_seed(0)
    reference = load_panns_reference().Cnn14(**config)
    generator = torch.Generator().manual_seed(1)
    for module in reference.modules():  # non-trivial BatchNorm statistics
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.copy_(torch.rand(module.num_features, generator=generator) - 0.5)
            module.running_var.copy_(0.5 + 1.5 * torch.rand(module.num_features, generator=generator))
    reference.eval()
    ours = (Cnn14_8k if sample_rate == 8000 else Cnn14)().eval()
    ours.load_state_dict(split_torchlibrosa(reference.state_dict())[0], strict=True)
    path = _recording()
    with torch.no_grad():
        expected = reference(torch.from_numpy(librosa.load(path, sr=sample_rate, mono=True)[0])[None])["clipwise_output"][0]
    got = tag_file(ours, path, top_k=5)
    torch.testing.assert_close(got["output"]["clipwise_output"][0], expected, atol=1e-4, rtol=0)
    assert expected.std() > 1e-3
    assert [label for label, _ in got["tags"]] == [str(i) for i in torch.topk(expected, 5).indices.tolist()]
