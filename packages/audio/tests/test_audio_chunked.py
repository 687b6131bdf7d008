"""Chunked whole-file prediction (``predict_chunk_seconds``): chunk plans, offset reads that
equal the whole file's resampled samples, the model stitching its chunks' time maps so that clip
models, SED models and ensembles give the whole file's outputs and events, and the options' errors."""

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
from polyfm.audio.models import Cnn6, Cnn10, Cnn14, Cnn14_16k, Cnn14_DecisionLevelMax, Wavegram_Logmel_Cnn14
from polyfm.audio.predict import AudioPredictionWriter
from polyfm.audio.tasks import SoundEventDetection
from polyfm.core.errors import ConfigError
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
    """The writer, also keeping each file's clip output and (stitched) framewise output, unrounded, for the test to read."""

    def reset(self) -> None:
        super().reset()
        self.framewise: dict[str, torch.Tensor] = {}
        self.scores: dict[str, torch.Tensor] = {}

    def add_file(self, trainer: Any, pl_module: Any, kind: str, index: int, file: str, scores: torch.Tensor, spread: Any,
                 framewise: torch.Tensor | None, framewise_spread: Any) -> None:
        super().add_file(trainer, pl_module, kind, index, file, scores, spread, framewise, framewise_spread)
        self.scores[Path(file).name] = scores.clone()
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
    # one batch, one file: chunks at 0 and 3.84 s (8 s each) and from 4.16 s to the file's end, stitched by the model
    assert [len(p["meta"]) for p in predictions] == [1] and predictions[0]["framewise_output"].shape == (1, 1201, 2)
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


def _aimed_at_the_tone(task: L.LightningModule, path: Path, tone: tuple[float, float], gain: float = 8.0) -> L.LightningModule:
    """Random trunk weights (and BatchNorm statistics, given by the caller); the task's last linear layer set to tell ``path``'s tone from its noise
    (class 0 along the difference of the features of the tone and of as long a stretch of noise,
    class 1 against it), so that the outputs span [0, 1] and follow the tone (a random head leaves
    them near uniform and deaf to it, which would make equality vacuous)."""
    task.eval()
    with torch.no_grad():
        waveform, (start, stop) = load_audio(path, RATE), (int(tone[0] * RATE), int(tone[1] * RATE))
        key = "segment_embedding" if isinstance(task, SoundEventDetection) else "embedding"
        inside, outside = (task.encoder(waveform[None, a:b])[key][0].reshape(-1, task.encoder.feature_dim).mean(0)  # type: ignore[union-attr, operator]
                           for a, b in ((start, stop), (stop + RATE, stop + RATE + stop - start)))
        direction = (inside - outside) * gain / (inside - outside).square().sum()
        middle = float(direction @ (inside + outside) / 2)
        head = [m for m in task.head.modules() if isinstance(m, torch.nn.Linear)][-1]  # type: ignore[union-attr]  # Classification: dropout, linear
        head.weight.copy_(torch.stack([direction, -direction]))
        head.bias.copy_(torch.tensor([-middle, middle]))
    return task


@pytest.mark.parametrize("family", ["cnn14-multiclass", "cnn14-multilabel", "sed"])
def test_chunked_prediction_equals_whole_file_prediction_for_every_head(tmp_path: Path, family: str, random_batchnorm: Any) -> None:
    """Two 2-minute files (equal length: one batch) and a 0.2 s one through trainer.predict, whole and
    in 25 s chunks (default 4 s overlap, 2 chunks per forward): every clip probability and SED frame
    equals the whole-file run's to float rounding, for a clip model whose max + mean pooling over the
    whole file comes before its head (Cnn14 + Classification, multi-class and multi-label) as for
    sound event detection (measured: max difference 0.0). Averaging the chunks' own clip outputs,
    as chunked prediction did before, is far off for the clip models (1.00 against the whole file's
    0.28 for class 0 here): their pooling sees one chunk at a time."""
    for seed, name in enumerate(("a.wav", "b.wav")):
        _write(tmp_path / "new" / name, 120.0, seed=10 + seed, tone=(30.0 + 40 * seed, 37.0 + 40 * seed))
    _write(tmp_path / "new" / "short.wav", 0.2, seed=12)  # under Cnn14's 0.31 s: one chunk, zero-padded as whole
    torch.manual_seed(0)
    if family == "sed":
        task: L.LightningModule = _aimed_at_the_tone(random_batchnorm(_sed()), tmp_path / "new" / "a.wav", (30.0, 37.0))
    else:
        encoder = Cnn14(base_channels=4, block_dropout=0.0, head_dropout=0.0)
        task = _aimed_at_the_tone(random_batchnorm(Classification(encoder, num_classes=2, multilabel=family == "cnn14-multilabel")), tmp_path / "new" / "a.wav", (30.0, 37.0))
    whole, chunked = KeepingWriter(threshold=0.5), KeepingWriter(threshold=0.5)
    whole_batches = _predict(tmp_path, task, whole, "whole", batch_size=2)
    chunked_batches = _predict(tmp_path, task, chunked, "chunked", batch_size=2, predict_chunk_seconds=25.0)
    assert [p["meta"] for p in chunked_batches] == [p["meta"] for p in whole_batches] and len(chunked_batches) == 2  # {a, b}, {short}
    assert sorted(chunked.scores) == ["a.wav", "b.wav", "short.wav"]
    spread = torch.stack(list(whole.scores.values()))
    assert spread.max() - spread.min() > 0.5  # the outputs are not all alike: the tolerance is not vacuous
    for name, expected in whole.scores.items():
        torch.testing.assert_close(chunked.scores[name], expected, atol=2e-6, rtol=0, msg=name)
    assert sorted(chunked.framewise) == (sorted(whole.scores) if family == "sed" else [])
    for name, expected in whole.framewise.items():
        assert chunked.framewise[name].shape == expected.shape
        torch.testing.assert_close(chunked.framewise[name], expected, atol=2e-6, rtol=0, msg=name)
    if family != "sed":  # the chunks' own outputs, averaged by the frames each keeps: not the whole file's
        waveform, averaged, kept = load_audio(tmp_path / "new" / "a.wav", RATE), torch.zeros(2), 0
        for span in plan_chunks(len(waveform), 25 * RATE, 400 * HOP, HOP, GRID):
            with torch.no_grad():
                logits = task(waveform[None, span.start : span.stop])[0]
            averaged += (logits.sigmoid() if family == "cnn14-multilabel" else logits.softmax(-1)) * (span.keep_to - span.keep_from)
            kept += span.keep_to - span.keep_from
        assert (averaged / kept - whole.scores["a.wav"]).abs().max() > 0.05
    rows = {folder: _rows(tmp_path / folder / "predictions" / "predictions.csv") for folder in ("whole", "chunked")}
    decision = "prediction" if family == "cnn14-multiclass" else "labels"
    assert [r[decision] for r in rows["chunked"]] == [r[decision] for r in rows["whole"]]


def test_ensemble_in_chunks_equals_the_whole_file_ensemble(tmp_path: Path) -> None:
    """Ensemble of two SED checkpoints, chunked: each member stitches its own chunks, so the
    member mean, its spread (clip columns' _std) and each event's probability_std equal the whole-file run's."""
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
    (whole_row,) = _rows(tmp_path / "whole" / "predictions" / "predictions.csv")
    (row,) = _rows(tmp_path / "chunked" / "predictions" / "predictions.csv")
    for column in ("high", "low", "high_std", "low_std"):
        assert float(row[column]) == pytest.approx(float(whole_row[column]), abs=FRAME_TOLERANCE), column
    assert float(row["high_std"]) > 0 and float(row["low_std"]) > 0


@pytest.mark.parametrize(("cls", "rate", "width"), [(Cnn6, 32000, 4), (Cnn10, 32000, 4), (Cnn14_16k, 16000, 4), (Wavegram_Logmel_Cnn14, 32000, 16)])
def test_every_family_takes_a_chunked_input(tmp_path: Path, cls: type, rate: int, width: int, random_batchnorm: Any) -> None:
    """``model(ChunkedInput)``, what a task's forward passes on in chunked prediction, gives the
    model's outputs on the whole waveform: every family's ``forward`` takes it (20 s in 12 s chunks, default overlap)."""
    from polyfm.audio.chunked import ChunkedAudioDataset, chunk_geometry

    path = _write(tmp_path / "x.wav", 20.0, rate=rate, seed=13, tone=(5.0, 9.0))
    torch.manual_seed(0)
    model = random_batchnorm(cls(base_channels=width, classes_num=3)).eval()
    geometry = chunk_geometry(model, 12.0, None)
    files = ChunkedAudioDataset([path], geometry.rate, geometry.chunk, geometry.overlap, geometry.hop, geometry.align, model.min_samples(), 2)[0]["input"]
    assert len(files.spans) == 2
    with torch.no_grad():
        whole, chunked = model(load_audio(path, rate)[None]), model(files)
    assert sorted(chunked) == sorted(whole)
    for key, expected in whole.items():
        torch.testing.assert_close(chunked[key], expected, atol=1e-5 * max(float(expected.abs().max()), 1.0), rtol=0, msg=key)


def test_a_chunked_input_is_for_inference_only(tmp_path: Path) -> None:
    """Training draws dropout and SpecAugment per clip, which a stitched file would not reproduce: refused, named."""
    from polyfm.audio.chunked import ChunkedAudioDataset

    path = _write(tmp_path / "x.wav", 2.0)
    model = Cnn14(base_channels=4)
    files = ChunkedAudioDataset([path], RATE, RATE, RATE // 2, HOP, GRID)[0]["input"]
    with pytest.raises(ValueError, match=r"Cnn14 runs files in chunks for inference only: call model.eval\(\) first"):
        model(files)
    assert model.eval()(files)["clipwise_output"].shape == (1, 527)


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
