"""polyfm.audio.predict: DCASE-style event post-processing on hand-made framewise arrays,
whole-file prediction (length-bucketed batches), and an ensemble's spread in the files."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import soundfile as sf
import torch

from polyfm.audio.data import AudioClipsDataModule, LengthBatchSampler, load_audio
from polyfm.audio.models import Cnn14, Cnn14_DecisionLevelMax
from polyfm.audio.predict import AudioPredictionWriter, detect_events, median_filter, median_window_frames
from polyfm.audio.tasks import SoundEventDetection
from polyfm.core.errors import ConfigError
from polyfm.core.predict import Ensemble
from polyfm.core.tasks import Classification

RATE = 32000


def _rows(path: Path, delimiter: str = ",") -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle, delimiter=delimiter))


def _column(values: list[float]) -> torch.Tensor:
    return torch.tensor(values).reshape(-1, 1)


# ----------------------------------------------------------------------------- post-processing by hand


def test_median_filter_removes_a_spike_and_fills_a_dropout() -> None:
    # frame 2: a one-frame spike; frames 5-9 an event with a one-frame dropout at 7 (hop 0.1 s)
    p = _column([0, 0, 0.9, 0, 0, 0.8, 0.8, 0.1, 0.8, 0.8, 0, 0])
    assert detect_events(p, 0.1, ["dog"]) == [(0.2, 0.3, "dog"), (0.5, 0.7, "dog"), (0.8, 1.0, "dog")]
    assert detect_events(p, 0.1, ["dog"], median_filter_seconds=0.3) == [(0.5, 1.0, "dog")]
    # 0.2 s is 2 frames, rounded up to 3 (a centred median); 0.04 s is under a frame: no filter
    assert median_window_frames(0.2, 0.1) == 3 and median_window_frames(0.04, 0.1) == 1


def test_median_window_per_class() -> None:
    p = torch.zeros(10, 2)
    p[4, 0] = p[4, 1] = 0.9  # the same spike in both classes
    assert detect_events(p, 0.1, ["dog", "cat"], median_filter_seconds=[0.3, 0.0]) == [(0.4, 0.5, "cat")]
    writer = AudioPredictionWriter(median_filter_seconds={"dog": 0.3})
    assert writer.median_seconds(["dog", "cat"]) == [0.3, 0.0]
    with pytest.raises(ConfigError, match=r"median_filter_seconds names \['bird'\].*not classes of the model \['dog', 'cat'\]"):
        AudioPredictionWriter(median_filter_seconds={"bird": 0.3}).median_seconds(["dog", "cat"])


def test_hysteresis_extends_events_above_the_offset_threshold() -> None:
    p = _column([0.1, 0.4, 0.6, 0.45, 0.35, 0.2, 0.45, 0.1])
    assert detect_events(p, 0.1, ["x"], threshold=0.5) == [(0.2, 0.3, "x")]
    # frames 1-4 stay >= 0.3 around the onset at frame 2; frame 6 is >= 0.3 but never reaches 0.5
    assert detect_events(p, 0.1, ["x"], threshold=0.5, offset_threshold=0.3) == [(0.1, 0.5, "x")]


def test_min_gap_merges_then_min_duration_drops() -> None:
    p = torch.zeros(12, 2)
    p[0:2, 0] = p[3:6, 0] = p[9:10, 0] = 0.9  # gaps of 0.1 s and 0.3 s
    p[7:8, 1] = 0.9  # one frame of the other class
    assert detect_events(p, 0.1, ["a", "b"]) == [(0.0, 0.2, "a"), (0.3, 0.6, "a"), (0.7, 0.8, "b"), (0.9, 1.0, "a")]
    assert detect_events(p, 0.1, ["a", "b"], min_gap_seconds=0.2) == [(0.0, 0.6, "a"), (0.7, 0.8, "b"), (0.9, 1.0, "a")]
    # merged first (0.6 s), then the 0.1 s events go; 0.2 s exactly (2 frames) is kept
    assert detect_events(p, 0.1, ["a", "b"], min_gap_seconds=0.2, min_event_seconds=0.2) == [(0.0, 0.6, "a")]
    assert detect_events(p, 0.1, ["a", "b"], min_event_seconds=0.2) == [(0.0, 0.2, "a"), (0.3, 0.6, "a")]
    # offsets cut at the file's end, durations measured after the cut
    assert detect_events(p, 0.1, ["a", "b"], end=0.95, min_event_seconds=0.06) == [(0.0, 0.2, "a"), (0.3, 0.6, "a"), (0.7, 0.8, "b")]


def test_median_filter_matches_scipy_nearest() -> None:
    ndimage = pytest.importorskip("scipy.ndimage")
    framewise = torch.rand(50, 4, generator=torch.Generator().manual_seed(0))
    windows = [1, 3, 5, 9]
    ours = median_filter(framewise, windows)
    for cls, window in enumerate(windows):
        expected = ndimage.median_filter(framewise[:, cls].numpy(), size=window, mode="nearest")
        np.testing.assert_allclose(ours[:, cls].numpy(), expected, rtol=0, atol=0)


def test_events_use_the_median_filtered_probabilities() -> None:
    """event_runs counts thresholded frames instead of sorting (a median is at or above a
    threshold when most of its window is): the same events as thresholding median_filter's
    output by hand, hysteresis included; classes that never reach the offset threshold are skipped."""
    framewise = torch.rand(300, 6, generator=torch.Generator().manual_seed(1))
    framewise[:, 5] *= 0.2  # never reaches 0.3
    windows = [1, 3, 5, 9, 3, 7]
    filtered = median_filter(framewise, windows)
    expected = []
    for cls in range(6):
        low, high = (filtered[:, cls] >= 0.3).tolist(), (filtered[:, cls] >= 0.6).tolist()
        start = None
        for frame, on in enumerate([*low, False]):
            if on and start is None:
                start = frame
            elif not on and start is not None:
                if any(high[start:frame]):
                    expected.append((round(start * 0.01, 4), round(frame * 0.01, 4), str(cls)))
                start = None
    assert len(expected) > 20 and not any(e[2] == "5" for e in expected)
    seconds = [w * 0.01 for w in windows]
    assert detect_events(framewise, 0.01, [str(c) for c in range(6)], threshold=0.6, offset_threshold=0.3, median_filter_seconds=seconds) == sorted(
        expected, key=lambda e: (e[0], int(e[2]), e[1]))
    assert detect_events(torch.zeros(20, 3), 0.01, ["a", "b", "c"], median_filter_seconds=0.05) == []


def test_writer_arguments_are_checked() -> None:
    with pytest.raises(ConfigError, match=r"offset_threshold \(0.7\) is above threshold \(0.5\)"):
        AudioPredictionWriter(threshold=0.5, offset_threshold=0.7)
    with pytest.raises(ConfigError, match=r"min_gap_seconds must be 0 or more seconds, got -0.1"):
        AudioPredictionWriter(min_gap_seconds=-0.1)
    with pytest.raises(ConfigError, match=r"threshold is a probability in \[0, 1\], got 1.5"):
        AudioPredictionWriter(threshold=1.5)
    with pytest.raises(ConfigError, match=r"median_filter_seconds must be 0 or more"):
        AudioPredictionWriter(median_filter_seconds={"dog": -1.0})


# ----------------------------------------------------------------------------- whole files


def _write(path: Path, seconds: float, seed: int, tone_from: float | None = None) -> Path:
    """Noise, and a 1 kHz tone from ``tone_from`` seconds on (so a crop sees something else)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    samples = int(round(seconds * RATE))
    signal = 0.05 * np.random.default_rng(seed).standard_normal(samples)
    if tone_from is not None:
        t = np.arange(samples) / RATE
        signal += 0.5 * np.sin(2 * np.pi * 1000 * t) * (t >= tone_from)
    sf.write(path, signal.astype(np.float32), RATE)
    return path


def _train_folder(root: Path) -> Path:
    for index, label in enumerate(("high", "low")):
        _write(root / label / f"{label}.wav", 0.5, seed=index)
    return root


def _trainer(tmp_path: Path, writer: AudioPredictionWriter) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, default_root_dir=tmp_path, callbacks=[writer])


def _sed(seed: int) -> SoundEventDetection:
    torch.manual_seed(seed)
    return SoundEventDetection(Cnn14_DecisionLevelMax(base_channels=4, block_dropout=0.0, head_dropout=0.0), num_classes=2).eval()


def test_whole_file_sed_covers_the_file_and_matches_the_model_on_the_whole_waveform(tmp_path: Path) -> None:
    """A file 3x clip_seconds long: framewise output for all of it (not the first clip), the
    clip output equal to the model run on the whole waveform directly."""
    long_file = _write(tmp_path / "new" / "long.wav", 1.5, seed=7, tone_from=0.9)
    data = AudioClipsDataModule(train=str(_train_folder(tmp_path / "clips")), predict=str(tmp_path / "new"), format="folder",
                                sample_rate=RATE, clip_seconds=0.5, batch_size=4)
    task = _sed(0)
    writer = AudioPredictionWriter(threshold=0.0)  # every frame active: one event per class over the whole file
    (prediction,) = _trainer(tmp_path, writer).predict(task, datamodule=data)

    waveform = load_audio(long_file, RATE)
    with torch.no_grad():
        direct = task(waveform[None])
        cropped = task(waveform[None, : RATE // 2])
    frames = 1 + len(waveform) // 320
    assert prediction["framewise_output"].shape == (1, frames, 2) and (frames - 1) * 0.01 >= 1.5 - 1e-9
    torch.testing.assert_close(prediction["framewise_output"][0], torch.sigmoid(direct["framewise_logits"][0]))
    torch.testing.assert_close(prediction["clipwise_output"][0], torch.sigmoid(direct["clip_logits"][0]))
    assert (torch.sigmoid(cropped["clip_logits"][0]) - prediction["clipwise_output"][0]).abs().max() > 1e-4  # not the first clip

    (row,) = _rows(tmp_path / "predictions" / "predictions.csv")
    assert row["duration_s"] == "1.5"
    expected = torch.sigmoid(direct["clip_logits"][0]).tolist()
    assert [float(row["high"]), float(row["low"])] == pytest.approx(expected, abs=1e-6)
    events = _rows(tmp_path / "predictions" / "predictions_events.tsv", "\t")
    assert sorted((e["event_label"], float(e["onset"]), float(e["offset"])) for e in events) == [("high", 0.0, 1.5), ("low", 0.0, 1.5)]


def test_whole_files_of_different_lengths_batch_by_length_and_keep_input_order(tmp_path: Path) -> None:
    """Files of 1.0, 0.5, 1.0 and 0.2 s with batch_size 4: batches {a, c}, {b}, {d}; each row
    equals the model on that file alone (d zero-padded to the model's 9920 samples, as
    tag_file), rows in input order."""
    new = tmp_path / "new"
    for name, seconds, seed in (("a", 1.0, 1), ("b", 0.5, 2), ("c", 1.0, 3), ("d", 0.2, 4)):
        _write(new / f"{name}.wav", seconds, seed, tone_from=seconds / 2)
    data = AudioClipsDataModule(train=str(_train_folder(tmp_path / "clips")), predict=str(new), format="folder",
                                sample_rate=RATE, clip_seconds=0.5, batch_size=4)
    data.setup("predict")
    assert data.predict_set is not None and data.predict_set.clip_samples is None
    assert LengthBatchSampler(torch.utils.data.SequentialSampler(data.predict_set), 4, False, data.predict_set).batches() == [[0, 2], [1], [3]]

    torch.manual_seed(0)
    task = Classification(Cnn14(base_channels=4, block_dropout=0.0, head_dropout=0.0), num_classes=2).eval()
    predictions = _trainer(tmp_path, AudioPredictionWriter()).predict(task, datamodule=data)
    assert [p["meta"] for p in predictions] == [[str(new / "a.wav"), str(new / "c.wav")], [str(new / "b.wav")], [str(new / "d.wav")]]

    rows = _rows(tmp_path / "predictions" / "predictions.csv")
    assert [Path(r["file"]).name for r in rows] == ["a.wav", "b.wav", "c.wav", "d.wav"]
    for row in rows:
        waveform = load_audio(row["file"], RATE)
        if len(waveform) < 9920:
            waveform = torch.nn.functional.pad(waveform, (0, 9920 - len(waveform)))
        with torch.no_grad():
            expected = task(waveform[None]).softmax(-1)[0].tolist()
        assert [float(row["high"]), float(row["low"])] == pytest.approx(expected, abs=1e-6), row["file"]


def test_predict_clip_seconds_crops_as_before(tmp_path: Path) -> None:
    _write(tmp_path / "new" / "long.wav", 1.5, seed=7)
    data = AudioClipsDataModule(train=str(_train_folder(tmp_path / "clips")), predict=str(tmp_path / "new"), format="folder",
                                sample_rate=RATE, clip_seconds=0.5, predict_clip_seconds=0.4)
    data.setup("predict")
    assert data.predict_set is not None and data.predict_set[0]["input"].shape == (int(0.4 * RATE),)
    with pytest.raises(ConfigError, match=r"predict_clip_seconds must be positive, or null for whole files; got 0"):
        AudioClipsDataModule(train="clips", predict_clip_seconds=0)


# ----------------------------------------------------------------------------- ensembles


def test_ensemble_of_two_sed_checkpoints_writes_the_members_spread(tmp_path: Path) -> None:
    """polyfm.core.predict.Ensemble over two checkpoints through trainer.predict: the table holds
    the members' mean and a <class>_std column (|a - b| / sqrt(2) for two members), the event
    list the framewise spread averaged over each event's frames."""
    long_file = _write(tmp_path / "new" / "x.wav", 0.8, seed=5, tone_from=0.4)
    members = [_sed(0), _sed(1)]
    checkpoints = []
    for number, member in enumerate(members):
        checkpoints.append(str(tmp_path / f"fold{number}.ckpt"))
        torch.save({"state_dict": member.state_dict()}, checkpoints[-1])
    data = AudioClipsDataModule(train=str(_train_folder(tmp_path / "clips")), predict=str(tmp_path / "new"), format="folder",
                                sample_rate=RATE, clip_seconds=0.5)
    ensemble = Ensemble(_sed(2), checkpoints)
    _trainer(tmp_path, AudioPredictionWriter(threshold=0.0)).predict(ensemble, datamodule=data, return_predictions=False)

    waveform = load_audio(long_file, RATE)[None]
    with torch.no_grad():
        clip = torch.stack([torch.sigmoid(m(waveform)["clip_logits"][0]) for m in members])  # (2, classes)
        frames = torch.stack([torch.sigmoid(m(waveform)["framewise_logits"][0]) for m in members])  # (2, frames, classes)
    (row,) = _rows(tmp_path / "predictions" / "predictions.csv")
    assert list(row)[-4:] == ["high", "high_std", "low", "low_std"]
    for cls, name in enumerate(("high", "low")):
        assert float(row[name]) == pytest.approx(float(clip[:, cls].mean()), abs=1e-6)
        assert float(row[f"{name}_std"]) == pytest.approx(float((clip[0, cls] - clip[1, cls]).abs() / 2**0.5), abs=1e-6)
        assert float(row[f"{name}_std"]) > 1e-4  # the members differ
    events = {e["event_label"]: e for e in _rows(tmp_path / "predictions" / "predictions_events.tsv", "\t")}
    assert set(events) == {"high", "low"}
    for cls, name in enumerate(("high", "low")):
        spread = (frames[0, :, cls] - frames[1, :, cls]).abs() / 2**0.5
        assert float(events[name]["probability_std"]) == pytest.approx(float(spread.mean()), abs=1e-6)


def test_ensemble_of_two_classifiers_writes_probability_std(tmp_path: Path) -> None:
    _write(tmp_path / "new" / "x.wav", 0.5, seed=5)
    checkpoints, members = [], []
    for seed in (0, 1):
        torch.manual_seed(seed)
        members.append(Classification(Cnn14(base_channels=4, block_dropout=0.0, head_dropout=0.0), num_classes=2).eval())
        checkpoints.append(str(tmp_path / f"seed{seed}.ckpt"))
        torch.save({"state_dict": members[-1].state_dict()}, checkpoints[-1])
    data = AudioClipsDataModule(train=str(_train_folder(tmp_path / "clips")), predict=str(tmp_path / "new"), format="folder",
                                sample_rate=RATE, clip_seconds=0.5)
    ensemble = Ensemble(Classification(Cnn14(base_channels=4), num_classes=2), checkpoints)
    _trainer(tmp_path, AudioPredictionWriter(output=str(tmp_path / "out.csv"))).predict(ensemble, datamodule=data, return_predictions=False)
    with torch.no_grad():
        probabilities = torch.stack([m(load_audio(tmp_path / "new" / "x.wav", RATE)[None]).softmax(-1)[0] for m in members])
    (row,) = _rows(tmp_path / "out.csv")
    best = int(probabilities.mean(0).argmax())
    assert row["prediction"] == ("high", "low")[best]
    assert float(row["probability_std"]) == pytest.approx(float((probabilities[0, best] - probabilities[1, best]).abs() / 2**0.5), abs=1e-6)
    assert float(row["high_std"]) == pytest.approx(float(row["low_std"]), abs=2e-6)  # two classes: the spreads mirror
