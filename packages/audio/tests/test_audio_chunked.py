"""Chunked whole-file prediction (``predict_chunk_seconds``): chunk plans, offset reads that
equal the whole file's resampled samples, framewise outputs stitched onto the whole file's
timeline, events equal to whole-file ones, and the options' errors."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import soundfile as sf
import torch

from polyfm.audio.chunked import file_frames, plan_chunks, read_span
from polyfm.audio.data import AudioClipsDataModule, load_audio
from polyfm.audio.models import Cnn14, Cnn14_DecisionLevelMax
from polyfm.audio.predict import AudioPredictionWriter
from polyfm.audio.tasks import SoundEventDetection
from polyfm.core.errors import ConfigError, DataError
from polyfm.core.predict import Ensemble
from polyfm.core.tasks import Classification

RATE, HOP = 32000, 320
GRID = HOP * 32  # Cnn14's hop x pooling: chunk starts fall on it
#: stitched vs whole-file framewise probabilities when every kept frame is >= 2 s (200 frames) from
#: a chunk edge (the 4 s default overlap), beyond the model's 192-frame reach: they differ only by
#: float rounding (measured 6e-8) and the resampling's summation order (6e-7 in the samples); with
#: 1.56 s of context (a 3 s overlap) the difference is 4e-5, at 1 s 1e-3
FRAME_TOLERANCE = 1e-5


class KeepingWriter(AudioPredictionWriter):
    """The writer, also keeping each file's (stitched) framewise output for the test to read."""

    def reset(self) -> None:
        super().reset()
        self.framewise: dict[str, torch.Tensor] = {}

    def add_file(self, trainer: Any, pl_module: Any, kind: str, index: int, file: str, scores: torch.Tensor, spread: Any,
                 framewise: torch.Tensor | None, framewise_spread: Any) -> None:
        super().add_file(trainer, pl_module, kind, index, file, scores, spread, framewise, framewise_spread)
        if framewise is not None:
            self.framewise[Path(file).name] = framewise.clone()


def _write(path: Path, seconds: float, rate: int = RATE, seed: int = 0, tone: tuple[float, float] | None = None) -> Path:
    """Noise, plus a 1 kHz tone over ``tone`` = (from, to) seconds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    samples = int(round(seconds * rate))
    signal = 0.05 * np.random.default_rng(seed).standard_normal(samples)
    if tone is not None:
        t = np.arange(samples) / rate
        signal += 0.5 * np.sin(2 * np.pi * 1000 * t) * ((t >= tone[0]) & (t < tone[1]))
    sf.write(path, signal.astype(np.float32), rate)
    return path


def _rows(path: Path, delimiter: str = ",") -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle, delimiter=delimiter))


def _data(tmp_path: Path, **options: Any) -> AudioClipsDataModule:
    clips = tmp_path / "clips"
    for index, label in enumerate(("high", "low")):
        _write(clips / label / f"{label}.wav", 0.5, seed=index)
    return AudioClipsDataModule(train=str(clips), predict=str(tmp_path / "new"), format="folder", sample_rate=RATE, clip_seconds=0.5,
                                **{"batch_size": 4, **options})


def _predict(tmp_path: Path, task: L.LightningModule, writer: AudioPredictionWriter, folder: str, return_predictions: bool = True,
             **options: Any) -> list[Any]:
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path / folder, callbacks=[writer])
    return trainer.predict(task, datamodule=_data(tmp_path, **options), return_predictions=return_predictions)  # type: ignore[return-value]


def _sed(seed: int = 0) -> SoundEventDetection:
    torch.manual_seed(seed)
    return SoundEventDetection(Cnn14_DecisionLevelMax(base_channels=4, block_dropout=0.0, head_dropout=0.0), num_classes=2).eval()


def _tone_detector(path: Path, tone: tuple[float, float], seed: int = 0, gain: float = 10.0) -> SoundEventDetection:
    """A random-weight SED model whose head is set to tell ``path``'s tone from its noise: class
    "high" along the difference of the mean segment embeddings inside and outside the tone
    (logit +gain/2 inside, -gain/2 outside), "low" the opposite. A random head barely moves
    (logits within 1e-3), which would leave nothing for events and seams to show."""
    task = _sed(seed)
    with torch.no_grad():
        embedding = task.encoder(load_audio(path, RATE)[None])["segment_embedding"][0]  # (segments, features), 0.32 s each
        starts = torch.arange(len(embedding)) * 0.32
        inside = embedding[(starts >= tone[0] + 0.32) & (starts + 0.64 <= tone[1])].mean(0)
        outside = embedding[(starts + 0.64 <= tone[0]) | (starts >= tone[1] + 0.32)].mean(0)
        direction = (inside - outside) * gain / (inside - outside).square().sum()
        middle = float(direction @ (inside + outside) / 2)
        task.head.weight.copy_(torch.stack([direction, -direction]))
        task.head.bias.copy_(torch.tensor([-middle, middle]))
    return task


# ----------------------------------------------------------------------------- plans and reads


@pytest.mark.parametrize("samples", [100_000, 10 * RATE + 17, 30_000, 5_000])
def test_chunk_plan_covers_every_frame_once_on_the_model_grid(samples: int) -> None:
    spans = plan_chunks(samples, chunk=3 * RATE, overlap=RATE, hop=HOP, align=GRID)
    written = []
    for span in spans:
        assert span.start % GRID == 0 and span.stop <= samples and span.stop - span.start <= 3 * RATE
        assert 0 <= span.keep_from < span.keep_to <= file_frames(span.stop - span.start, HOP)  # inside the chunk's own frames
        written.extend(range(span.start // HOP + span.keep_from, span.start // HOP + span.keep_to))
    assert written == list(range(file_frames(samples, HOP)))  # in order, each frame once
    assert spans[-1].stop == samples
    if len(spans) > 1:  # every chunk as long as asked, less at most one grid step (the last one ends at the file's end)
        assert all(3 * RATE - GRID < span.stop - span.start for span in spans)


@pytest.mark.parametrize("source_rate", [8000, 16000, 22050, 44100, 32000])
def test_offset_reads_equal_the_whole_files_resampled_samples(tmp_path: Path, source_rate: int) -> None:
    """read_span decodes around the span (stereo, mixed down) and resamples with a margin: no
    seam against load_audio's whole-file resampling, at the file's start, middle and end."""
    x = (0.1 * np.random.default_rng(0).standard_normal(3 * source_rate + 13)).astype(np.float32)
    path = tmp_path / "stereo.wav"
    sf.write(path, np.stack([x, -0.5 * x], axis=1), source_rate)
    whole = load_audio(path, RATE)
    for start, stop in ((0, 5000), (12345, 70000), (40000, len(whole)), (len(whole) - 10, len(whole))):
        torch.testing.assert_close(read_span(path, start, stop, RATE), whole[start:stop], atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- stitched outputs


def test_stitched_framewise_output_equals_the_whole_files(tmp_path: Path) -> None:
    """A 12 s file at 16 kHz (resampled per chunk) in 8 s chunks overlapping by the default 4 s:
    the stitched timeline has the whole file's 1 + samples // hop frames (10 ms each) and equals
    the whole-file output within FRAME_TOLERANCE everywhere, boundaries included; the clip output
    is the max over the stitched frames (the model's max over segments)."""
    path = _write(tmp_path / "new" / "long.wav", 12.0, rate=16000, seed=3, tone=(4.0, 7.5))
    task = _tone_detector(path, (4.0, 7.5))
    whole_writer, chunk_writer = KeepingWriter(threshold=0.0), KeepingWriter(threshold=0.0)
    _predict(tmp_path, task, whole_writer, "whole")
    predictions = _predict(tmp_path, task, chunk_writer, "chunked", predict_chunk_seconds=8.0)

    whole, stitched = whole_writer.framewise["long.wav"], chunk_writer.framewise["long.wav"]
    samples = len(load_audio(tmp_path / "new" / "long.wav", RATE))
    assert stitched.shape == whole.shape == (file_frames(samples, HOP), 2) == (1201, 2)
    torch.testing.assert_close(stitched, whole, atol=FRAME_TOLERANCE, rtol=0)
    # chunks at 0 and 3.84 s (8 s each, one batch), the last from 4.16 s to the file's end (a batch of its own length)
    assert [len(p["meta"]) for p in predictions] == [2, 1]
    assert whole[:, 0].max() - whole[:, 0].min() > 0.9  # the outputs span [0, 1]: the tolerance is not vacuous
    (whole_row,) = _rows(tmp_path / "whole" / "predictions" / "predictions.csv")
    (chunk_row,) = _rows(tmp_path / "chunked" / "predictions" / "predictions.csv")
    assert chunk_row["duration_s"] == "12.0" and chunk_row["sample_rate"] == "16000"
    assert [float(chunk_row[c]) for c in ("high", "low")] == pytest.approx([float(whole_row[c]) for c in ("high", "low")], abs=FRAME_TOLERANCE)
    assert [float(chunk_row[c]) for c in ("high", "low")] == pytest.approx(stitched.max(0).values.tolist(), abs=1e-6)
    events = _rows(tmp_path / "chunked" / "predictions" / "predictions_events.tsv", "\t")  # threshold 0: the whole file, per class
    assert sorted((e["event_label"], float(e["onset"]), float(e["offset"])) for e in events) == [("high", 0.0, 12.0), ("low", 0.0, 12.0)]


def test_short_overlap_leaves_seams_the_default_does_not(tmp_path: Path) -> None:
    """The overlap is what makes chunks agree: 0.64 s (0.32 s of context at a boundary) leaves
    differences far above FRAME_TOLERANCE at the chunk boundaries."""
    task = _tone_detector(_write(tmp_path / "new" / "long.wav", 8.0, seed=4, tone=(2.0, 5.0)), (2.0, 5.0))
    whole_writer, seam_writer = KeepingWriter(threshold=0.0), KeepingWriter(threshold=0.0)
    _predict(tmp_path, task, whole_writer, "whole")
    _predict(tmp_path, task, seam_writer, "seams", predict_chunk_seconds=3.0, predict_chunk_overlap_seconds=0.64)
    assert (seam_writer.framewise["long.wav"] - whole_writer.framewise["long.wav"]).abs().max() > 100 * FRAME_TOLERANCE


def test_events_chunked_equal_whole_file_events(tmp_path: Path) -> None:
    """A 1 kHz tone from 3.3 to 7.1 s in a 10 s noise file, across chunk boundaries (6 s chunks):
    the event list, after median filtering and hysteresis, equals the whole-file one to the frame.
    The default overlap is capped at half the chunk (3 s here: frames keep 1.56 s of context on
    each side, outputs within 4e-5 of the whole file's), so this is the looser case."""
    task = _tone_detector(_write(tmp_path / "new" / "tone.wav", 10.0, seed=5, tone=(3.3, 7.1)), (3.3, 7.1), seed=1)
    options = {"threshold": 0.6, "offset_threshold": 0.4, "median_filter_seconds": 0.15}
    _predict(tmp_path, task, AudioPredictionWriter(**options), "whole")
    _predict(tmp_path, task, AudioPredictionWriter(**options), "chunked", predict_chunk_seconds=6.0, batch_size=2)

    def events(folder: str) -> list[tuple[str, float, float]]:
        rows = _rows(tmp_path / folder / "predictions" / "predictions_events.tsv", "\t")
        return sorted((r["event_label"], float(r["onset"]), float(r["offset"])) for r in rows if r["event_label"])

    whole, chunked = events("whole"), events("chunked")
    assert [label for label, *_ in whole] == ["high", "low", "low"], whole  # the tone, and the noise before and after it
    ((onset, offset),) = [(on, off) for label, on, off in whole if label == "high"]
    assert abs(onset - 3.3) < 0.65 and abs(offset - 7.1) < 0.65  # within two 0.32 s segments (the model's smoothing widens it)
    assert len(chunked) == len(whole)
    for (label_a, onset_a, offset_a), (label_b, onset_b, offset_b) in zip(whole, chunked, strict=True):
        assert label_a == label_b and abs(onset_a - onset_b) <= 0.01 + 1e-9 and abs(offset_a - offset_b) <= 0.01 + 1e-9


def test_clip_model_in_chunks_averages_the_chunks_by_the_frames_each_keeps(tmp_path: Path) -> None:
    """A clip classifier (Cnn14, no frames): the file's probabilities are the chunks' probabilities
    weighted by the frames each chunk contributes to the timeline (a distribution again)."""
    path = _write(tmp_path / "new" / "x.wav", 3.0, seed=6)
    torch.manual_seed(0)
    task = Classification(Cnn14(base_channels=4, block_dropout=0.0, head_dropout=0.0), num_classes=2).eval()
    _predict(tmp_path, task, AudioPredictionWriter(), "chunked", predict_chunk_seconds=2.0, predict_chunk_overlap_seconds=1.0)
    waveform = load_audio(path, RATE)
    expected, weight = torch.zeros(2), 0
    for span in plan_chunks(len(waveform), 2 * RATE, RATE, HOP, GRID):
        with torch.no_grad():
            expected += task(waveform[None, span.start : span.stop]).softmax(-1)[0] * (span.keep_to - span.keep_from)
        weight += span.keep_to - span.keep_from
    (row,) = _rows(tmp_path / "chunked" / "predictions" / "predictions.csv")
    assert [float(row["high"]), float(row["low"])] == pytest.approx((expected / weight).tolist(), abs=1e-6)
    assert float(row["high"]) + float(row["low"]) == pytest.approx(1.0, abs=1e-5)


def test_ensemble_in_chunks_stitches_the_members_spread(tmp_path: Path) -> None:
    """Ensemble of two SED checkpoints, chunked: the framewise spread is stitched like the mean,
    so each event's probability_std equals the whole-file run's; the clip columns are the max of
    the stitched member mean, and their _std the spread at that frame."""
    path = _write(tmp_path / "new" / "tone.wav", 9.0, seed=8, tone=(3.0, 6.0))
    checkpoints = []
    for seed in (0, 1):
        checkpoints.append(str(tmp_path / f"seed{seed}.ckpt"))
        torch.save({"state_dict": _tone_detector(path, (3.0, 6.0), seed=seed).state_dict()}, checkpoints[-1])
    writers = {"whole": KeepingWriter(threshold=0.6), "chunked": KeepingWriter(threshold=0.6)}
    _predict(tmp_path, Ensemble(_sed(2), checkpoints), writers["whole"], "whole", return_predictions=False)
    _predict(tmp_path, Ensemble(_sed(2), checkpoints), writers["chunked"], "chunked", predict_chunk_seconds=6.0, predict_chunk_overlap_seconds=4.0)
    events = {name: _rows(tmp_path / name / "predictions" / "predictions_events.tsv", "\t") for name in writers}
    assert [e["event_label"] for e in events["chunked"]] == [e["event_label"] for e in events["whole"]] and events["whole"]
    for whole, chunked in zip(events["whole"], events["chunked"], strict=True):
        assert float(chunked["probability_std"]) == pytest.approx(float(whole["probability_std"]), abs=FRAME_TOLERANCE)
    (row,) = _rows(tmp_path / "chunked" / "predictions" / "predictions.csv")
    stitched = writers["chunked"].framewise["tone.wav"]
    assert [float(row["high"]), float(row["low"])] == pytest.approx(stitched.max(0).values.tolist(), abs=1e-6)
    assert float(row["high_std"]) > 0 and float(row["low_std"]) > 0


def test_a_run_that_misses_chunks_says_which_file(tmp_path: Path) -> None:
    _write(tmp_path / "new" / "long.wav", 5.0, seed=7)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path, callbacks=[AudioPredictionWriter()], limit_predict_batches=1)
    with pytest.raises(DataError, match=r"not every chunk of \['.*long\.wav \(1 chunks\)'\] was predicted"):
        trainer.predict(_sed(), datamodule=_data(tmp_path, predict_chunk_seconds=2.0, batch_size=1))


def test_sed_recipe_predicts_in_chunks_from_the_command_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """finetune-sed.yaml through the CLI: fit one step, then predict a 3 s file in 1.5 s chunks
    (as docs/audio.md's command, --return_predictions false): one row, and with threshold 0 one
    event per class over the whole file, as whole-file prediction writes."""
    import polyfm.audio
    from polyfm.core.cli import main as polyfm_cli

    monkeypatch.chdir(tmp_path)
    for label in ("high", "low"):
        _write(tmp_path / "clips" / label / f"{label}.wav", 0.5, seed=len(label))
    _write(tmp_path / "new" / "long.wav", 3.0, seed=9, tone=(1.0, 2.0))
    (tmp_path / "events.tsv").write_text("filename\tonset\toffset\tevent_label\nlow/low.wav\t0.1\t0.3\tlow\nhigh/high.wav\t0.0\t0.4\thigh\n")
    recipe = Path(polyfm.audio.__file__).parent / "recipes" / "finetune-sed.yaml"
    small = ["--data.init_args.num_workers=0", "--data.init_args.batch_size=4", "--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false"]
    polyfm_cli(["fit", "--config", str(recipe), "--model.init_args.encoder.init_args.pretrained=", "--model.init_args.encoder.init_args.base_channels=4",
                "--model.init_args.num_classes=2", "--data.init_args.train=events.tsv", f"--data.init_args.audio_root={tmp_path / 'clips'}",
                "--data.init_args.val=null", "--data.init_args.clip_seconds=0.5", "--trainer.max_steps=1", "--trainer.limit_val_batches=0",
                "--model.init_args.threshold=0.0", *small])
    run = tmp_path / "runs/audio-sed/logs/version_0"
    polyfm_cli(["predict", "--config", str(run / "config.yaml"), "--ckpt_path", str(run / "checkpoints/last.ckpt"), "--data.init_args.predict=new",
                "--data.init_args.predict_chunk_seconds=1.5", "--data.init_args.predict_chunk_overlap_seconds=0.64", "--return_predictions", "false"])
    out = tmp_path / "runs/audio-sed/predictions"
    (row,) = _rows(out / "predictions.csv")
    assert row["labels"] == "high;low" and row["duration_s"] == "3.0"
    events = _rows(out / "predictions_events.tsv", "\t")
    assert sorted((e["event_label"], float(e["onset"]), float(e["offset"])) for e in events) == [("high", 0.0, 3.0), ("low", 0.0, 3.0)]
    # the option reaches the chunked path: a chunk shorter than the model's grid allows is refused there, named
    with pytest.raises(SystemExit):
        polyfm_cli(["predict", "--config", str(run / "config.yaml"), "--ckpt_path", str(run / "checkpoints/last.ckpt"), "--data.init_args.predict=new",
                    "--data.init_args.predict_chunk_seconds=0.5"])
    assert "predict_chunk_seconds=0.5 with predict_chunk_overlap_seconds=0.25: Cnn14_DecisionLevelMax needs chunks" in capsys.readouterr().err


# ----------------------------------------------------------------------------- bad options


def test_bad_chunk_options_name_the_argument(tmp_path: Path) -> None:
    def make(**options: Any) -> AudioClipsDataModule:
        return AudioClipsDataModule(train="clips", **options)

    with pytest.raises(ConfigError, match=r"predict_chunk_overlap_seconds \(10.0\) must be less than predict_chunk_seconds \(10.0\)"):
        make(predict_chunk_seconds=10.0, predict_chunk_overlap_seconds=10.0)
    with pytest.raises(ConfigError, match=r"predict_chunk_overlap_seconds \(12.0\) must be less than predict_chunk_seconds \(10.0\)"):
        make(predict_chunk_seconds=10.0, predict_chunk_overlap_seconds=12.0)
    for value in (0, -5.0):
        with pytest.raises(ConfigError, match=rf"predict_chunk_seconds must be positive seconds .*; got {value}"):
            make(predict_chunk_seconds=value)
    with pytest.raises(ConfigError, match=r"predict_chunk_overlap_seconds must be 0 or more seconds; got -1.0"):
        make(predict_chunk_seconds=10.0, predict_chunk_overlap_seconds=-1.0)
    with pytest.raises(ConfigError, match=r"predict_chunk_overlap_seconds=2.0 is given without predict_chunk_seconds"):
        make(predict_chunk_overlap_seconds=2.0)
    with pytest.raises(ConfigError, match=r"predict_chunk_seconds=10.0 runs whole files in chunks, predict_clip_seconds=5.0 crops them"):
        make(predict_chunk_seconds=10.0, predict_clip_seconds=5.0)
    # too short for the model's grid: named with the model's minimum, when the model is known
    _write(tmp_path / "new" / "x.wav", 1.0)
    data = _data(tmp_path, predict_chunk_seconds=0.5)
    data.setup("predict")
    with pytest.raises(ConfigError, match=r"predict_chunk_seconds=0.5 with predict_chunk_overlap_seconds=0.25: Cnn14_DecisionLevelMax needs chunks of at least 0.63 s"):
        data.chunked_predict_set(_sed().encoder)
    data = _data(tmp_path, predict_chunk_seconds=2.0, predict_chunk_overlap_seconds=1.8)
    data.setup("predict")
    with pytest.raises(ConfigError, match=r"advance by at least its 0.32 s grid"):
        data.chunked_predict_set(_sed().encoder)
