"""Readers and bad input: every problem file gets an error naming it, or counted handling."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from polyfm.audio.data import (
    AudioClipDataset,
    AudioClipsDataModule,
    UnlabelledAudioDataModule,
    fix_length,
    load_audio,
    read_audioset_csv,
    read_fold_csv,
    read_manifest_csv,
)
from polyfm.core.errors import DataError


def tone(seconds: float, rate: int, freq: float = 440.0, channels: int = 1) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    y = 0.5 * np.sin(2 * np.pi * freq * t)
    return np.stack([y * (c + 1) / channels for c in range(channels)], axis=1).astype(np.float32)


def test_decode_resample_mono_and_24bit(tmp_path: Path) -> None:
    stereo = tmp_path / "stereo_24bit_44k.wav"
    data = tone(0.5, 44100, channels=2)
    sf.write(stereo, data, 44100, subtype="PCM_24")
    wav = load_audio(stereo, sample_rate=32000)
    assert wav.dtype == torch.float32 and wav.dim() == 1
    assert abs(len(wav) - 16000) <= 1  # 0.5 s at 32 kHz
    # mono mixdown is the channel mean; 24-bit decodes to the written values (1/2^23 steps)
    direct = load_audio(stereo, sample_rate=44100)
    np.testing.assert_allclose(direct.numpy(), data.mean(axis=1), atol=2e-6)
    # the resampled tone keeps its frequency: the spectrum peaks at 440 Hz
    spectrum = torch.fft.rfft(wav).abs()
    assert abs(int(spectrum.argmax()) * 32000 / len(wav) - 440) < 5


def test_fix_length_pads_crops_random_crops() -> None:
    x = torch.arange(10.0)
    assert torch.equal(fix_length(x, 4), torch.arange(4.0))
    assert torch.equal(fix_length(x, 12)[10:], torch.zeros(2))
    starts = {int(fix_length(x, 4, random_crop=True, generator=torch.Generator().manual_seed(s))[0]) for s in range(30)}
    assert len(starts) > 3 and max(starts) <= 6


def _bad_files(tmp_path: Path) -> dict[str, Path]:
    good = tmp_path / "good.wav"
    sf.write(good, tone(0.3, 8000), 8000, subtype="PCM_16")
    raw = good.read_bytes()
    files = {"good": good}
    files["truncated"] = tmp_path / "truncated.wav"
    files["truncated"].write_bytes(raw[: len(raw) // 2])
    files["garbage"] = tmp_path / "garbage.wav"
    files["garbage"].write_bytes(b"this is not audio" * 20)
    files["empty"] = tmp_path / "empty.wav"
    sf.write(files["empty"], np.zeros((0, 1), np.float32), 8000)
    files["nan"] = tmp_path / "nan.wav"
    nan = tone(0.3, 8000)
    nan[100, 0] = np.nan
    sf.write(files["nan"], nan, 8000, subtype="FLOAT")
    files["silent"] = tmp_path / "silent.wav"
    sf.write(files["silent"], np.zeros((2400, 1), np.float32), 8000, subtype="PCM_16")
    return files


@pytest.mark.parametrize(
    "name, message",
    [("truncated", "truncated WAV"), ("garbage", "cannot decode"), ("empty", "zero-length"), ("nan", "NaN/Inf samples .first at frame 100")],
)
def test_bad_file_errors_name_the_file(tmp_path: Path, name: str, message: str) -> None:
    files = _bad_files(tmp_path)
    with pytest.raises(DataError, match=message) as info:
        AudioClipDataset([files["good"], files[name]], [0, 1], check="full")[1]
    assert str(files[name]) in str(info.value)


def test_nan_file_raises_at_load_time_with_header_check(tmp_path: Path) -> None:
    files = _bad_files(tmp_path)
    dataset = AudioClipDataset([files["nan"]], [0], check="header")  # the header is fine
    with pytest.raises(DataError, match=str(files["nan"])):
        dataset[0]


def test_skip_counts_bad_files_and_keeps_silence(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    files = _bad_files(tmp_path)
    with caplog.at_level(logging.WARNING):
        dataset = AudioClipDataset(list(files.values()), [0] * len(files), check="full", on_error="skip", clip_seconds=0.5)
    assert len(dataset) == 2  # good + silent
    assert dict(dataset.skipped) == {"truncated": 1, "cannot decode": 1, "zero-length": 1, "NaN": 1}
    assert dataset.silent == [str(files["silent"])]
    assert "skipped 4 bad audio files" in caplog.text
    assert dataset[1]["input"].abs().max() == 0 and dataset[1]["input"].shape == (16000,)
    assert dataset.source_rates == {8000: 2}


def test_unexpected_sample_rate(tmp_path: Path) -> None:
    path = tmp_path / "a.wav"
    sf.write(path, tone(0.3, 22050), 22050)
    with pytest.raises(DataError, match=r"sample rate 22050 Hz, expected 32000"):
        AudioClipDataset([path], [0], expected_sample_rate=32000)
    dataset = AudioClipDataset([path], [0], clip_seconds=0.3)  # default: resampled, counted
    assert dataset.source_rates == {22050: 1} and dataset[0]["input"].shape == (9600,)


def test_manifest_csv_multiclass_and_multilabel(tmp_path: Path) -> None:
    for name in ("a", "b", "c"):
        sf.write(tmp_path / f"{name}.wav", tone(0.2, 16000), 16000)
    (tmp_path / "mc.csv").write_text("file,labels\na.wav,dog\nb.wav,cat\nc.wav,dog\n")
    paths, labels, classes = read_manifest_csv(tmp_path / "mc.csv")
    assert classes == ["cat", "dog"] and labels == [1, 0, 1] and paths[0] == tmp_path / "a.wav"
    (tmp_path / "ml.csv").write_text("file,labels\na.wav,dog;bark\nb.wav,cat\nc.wav,\n")
    with pytest.raises(DataError, match=r"ml.csv, row 4: empty 'labels'"):
        read_manifest_csv(tmp_path / "ml.csv")
    (tmp_path / "ml.csv").write_text("file,labels\na.wav,dog;bark\nb.wav,cat\n")
    dm = AudioClipsDataModule(train=str(tmp_path / "ml.csv"), val=str(tmp_path / "ml.csv"), clip_seconds=0.25, batch_size=2)
    dm.setup()
    assert dm.multilabel and dm.class_names == ["bark", "cat", "dog"]
    batch = next(iter(dm.val_dataloader()))
    assert batch["input"].shape == (2, 8000)
    assert torch.equal(batch["target"], torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]))
    (tmp_path / "nocol.csv").write_text("path,labels\na.wav,dog\n")
    with pytest.raises(DataError, match=r"nocol.csv: missing column\(s\) \['file'\]"):
        read_manifest_csv(tmp_path / "nocol.csv")
    (tmp_path / "missing.csv").write_text("file,labels\nnope.wav,dog\n")
    with pytest.raises(DataError, match=r"missing.csv, row 2: 'file' names '.*nope.wav': audio file not found"):
        AudioClipsDataModule(train=str(tmp_path / "missing.csv")).setup()


def test_audioset_segments_and_balanced_sampling(tmp_path: Path) -> None:
    for ytid in ("abc", "def", "ghi", "jkl"):
        sf.write(tmp_path / f"Y{ytid}.wav", tone(0.2, 32000), 32000)
    (tmp_path / "class_labels_indices.csv").write_text('index,mid,display_name\n0,/m/09x0r,"Speech"\n1,/m/04rlf,"Music"\n2,/m/0bt9lr,"Dog"\n')
    (tmp_path / "segments.csv").write_text(
        "# Segments csv created Sun Mar  5 10:54:31 2017\n# num_ytids=4\n# YTID, start_seconds, end_seconds, positive_labels\n"
        'abc, 30.000, 40.000, "/m/09x0r,/m/04rlf"\ndef, 0.000, 10.000, "/m/09x0r"\nghi, 0.000, 10.000, "/m/09x0r"\njkl, 5.000, 15.000, "/m/0bt9lr"\n'
    )
    paths, labels, classes = read_audioset_csv(tmp_path / "segments.csv", tmp_path, tmp_path / "class_labels_indices.csv")
    assert classes == ["Speech", "Music", "Dog"] and labels == [[0, 1], [0], [0], [2]] and paths[0].name == "Yabc.wav"
    dm = AudioClipsDataModule(
        train=str(tmp_path / "segments.csv"), format="audioset", audio_root=str(tmp_path),
        class_labels_csv=str(tmp_path / "class_labels_indices.csv"), balanced=True, clip_seconds=0.2, batch_size=4,
    )  # fmt: skip
    dm.setup()
    weights = dm.balanced_weights()
    assert weights[3] == pytest.approx(1.0) and weights[1] == pytest.approx(1 / 3)  # the rare Dog clip is drawn 3x as often
    batch = next(iter(dm.train_dataloader()))
    assert batch["target"].shape == (4, 3)


def test_fold_csv_esc50_layout(tmp_path: Path) -> None:
    (tmp_path / "audio").mkdir()
    (tmp_path / "meta").mkdir()
    rows = ["filename,fold,target,category,esc10,src_file,take"]
    for i in range(10):
        name = f"{i % 5 + 1}-{i}-A-{i % 2}.wav"
        sf.write(tmp_path / "audio" / name, tone(0.2, 44100, 200 + 100 * i), 44100)
        rows.append(f"{name},{i % 5 + 1},{i % 2},{'dog' if i % 2 == 0 else 'rain'},True,{i},A")
    (tmp_path / "meta" / "esc50.csv").write_text("\n".join(rows) + "\n")
    paths, labels, classes = read_fold_csv(tmp_path / "meta" / "esc50.csv", folds=[5])
    assert classes == ["dog", "rain"] and len(paths) == 2 and paths[0].parent == tmp_path / "audio"
    dm = AudioClipsDataModule(train=str(tmp_path / "meta" / "esc50.csv"), format="folds", val_folds=[4], test_folds=[5], clip_seconds=0.2)
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (6, 2, 2)


def test_unlabelled_folder_two_views(tmp_path: Path) -> None:
    for i in range(4):
        sf.write(tmp_path / f"{i}.flac", tone(1.0, 16000, 300 + 50 * i), 16000)
    dm = UnlabelledAudioDataModule(str(tmp_path), sample_rate=32000, clip_seconds=0.5, val_fraction=0.25, batch_size=2)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert batch["view1"].shape == batch["view2"].shape == (2, 16000)
    assert not torch.allclose(batch["view1"], batch["view2"])


def test_folder_splits_share_the_training_class_ids(tmp_path: Path) -> None:
    for split, classes in (("train", ("bird", "car", "dog")), ("val", ("car", "dog"))):
        for name in classes:
            (tmp_path / split / name).mkdir(parents=True)
            sf.write(tmp_path / split / name / "x.wav", tone(0.2, 16000), 16000)
    dm = AudioClipsDataModule(train=str(tmp_path / "train"), val=str(tmp_path / "val"), format="folder", clip_seconds=0.2)
    dm.setup()
    assert dm.class_names == ["bird", "car", "dog"] and dm.val_set.labels == [1, 2]  # not [0, 1]
    (tmp_path / "val" / "cat").mkdir()
    sf.write(tmp_path / "val" / "cat" / "x.wav", tone(0.2, 16000), 16000)
    with pytest.raises(DataError, match=r"sub-folder\(s\) \['cat'\] are not among the classes"):
        AudioClipsDataModule(train=str(tmp_path / "train"), val=str(tmp_path / "val"), format="folder").setup()


def test_missing_file_errors_name_the_manifest_row(tmp_path: Path) -> None:
    """A manifest naming a file that is not there fails when the DataModule is set up,
    naming the manifest, the row and where relative paths were looked up."""
    sf.write(tmp_path / "a.wav", tone(0.2, 16000), 16000)
    (tmp_path / "labels.csv").write_text("file,labels\na.wav,dog\nclips/b.wav,cat\n")
    with pytest.raises(DataError, match=r"labels.csv, row 3: 'file' names '.*clips/b.wav': audio file not found \(relative paths are read from"):
        AudioClipsDataModule(train=str(tmp_path / "labels.csv"), format="csv").setup()
    (tmp_path / "esc50.csv").write_text("filename,fold,target,category\na.wav,1,0,dog\nmissing.wav,2,1,cat\n")
    with pytest.raises(DataError, match=r"esc50.csv, row 3: 'filename' names .*missing.wav"):
        AudioClipsDataModule(train=str(tmp_path / "esc50.csv"), format="folds", test_folds=[2]).setup()
    (tmp_path / "segments.csv").write_text("# YTID, start_seconds, end_seconds, positive_labels\nabc, 0.0, 10.0, \"/m/a\"\n")
    with pytest.raises(DataError, match=r"segments.csv, row 2: 'YTID' names .*Yabc.wav"):
        AudioClipsDataModule(train=str(tmp_path / "segments.csv"), format="audioset", audio_root=str(tmp_path)).setup()
    from polyfm.audio.data import SoundEventDataModule

    (tmp_path / "events.tsv").write_text("filename\tonset\toffset\tevent_label\na.wav\t0.1\t0.2\tdog\ngone.wav\t0.1\t0.2\tdog\n")
    with pytest.raises(DataError, match=r"events.tsv, row 3: 'filename' names .*gone.wav"):
        SoundEventDataModule(str(tmp_path / "events.tsv"), clip_seconds=0.2).setup()
    # on_error="skip" leaves it out and counts it instead
    dm = AudioClipsDataModule(train=str(tmp_path / "labels.csv"), format="csv", on_error="skip", clip_seconds=0.2)
    dm.setup()
    assert len(dm.train_set) == 1 and dict(dm.train_set.skipped) == {"not found": 1}


def test_excel_manifests_with_byte_order_mark_and_crlf(tmp_path: Path) -> None:
    """Excel's "CSV UTF-8" starts with a BOM (and Windows tools end lines with CRLF): the
    first column is still 'file' / 'filename', not '\\ufefffile'."""
    from polyfm.audio.data import read_events_csv
    from polyfm.audio.inference import audioset_labels

    sf.write(tmp_path / "a.wav", tone(0.2, 16000), 16000)
    (tmp_path / "labels.csv").write_bytes(b"\xef\xbb\xbffile,labels\r\na.wav,dog\r\n")
    assert read_manifest_csv(tmp_path / "labels.csv", check_files=True)[1:] == ([0], ["dog"])
    (tmp_path / "events.tsv").write_bytes(b"\xef\xbb\xbffilename\tonset\toffset\tevent_label\r\na.wav\t0.1\t0.2\tdog\r\n")
    assert read_events_csv(tmp_path / "events.tsv")[1:] == ([[(0.1, 0.2, 0)]], ["dog"])
    (tmp_path / "esc50.csv").write_bytes(b"\xef\xbb\xbffilename,fold,target,category\r\na.wav,1,0,dog\r\n")
    assert read_fold_csv(tmp_path / "esc50.csv", [1])[1:] == ([0], ["dog"])
    (tmp_path / "class_labels_indices.csv").write_bytes(b"\xef\xbb\xbfindex,mid,display_name\r\n0,/m/a,Speech\r\n")
    assert audioset_labels(tmp_path / "class_labels_indices.csv") == ["Speech"]


# ----------------------------------------------------------------------------- odd files, every reader


def _odd_files(tmp_path: Path) -> dict[str, tuple[Path, int]]:
    """Files as they come: (path, source rate)."""
    rng = np.random.default_rng(0)
    written = {}
    for name, rate, channels, subtype, seconds in [
        ("stereo.wav", 32000, 2, "PCM_16", 2.0), ("u8.wav", 32000, 1, "PCM_U8", 2.0), ("pcm24.wav", 16000, 1, "PCM_24", 2.0),
        ("stereo44.flac", 44100, 2, "PCM_16", 2.0), ("short44.flac", 44100, 1, "PCM_16", 0.1),
    ]:  # fmt: skip
        path = tmp_path / name
        sf.write(path, (0.3 * rng.standard_normal((int(seconds * rate) + 7, channels))).clip(-1, 1), rate, subtype=subtype)
        written[name] = (path, rate)
    return written


def test_odd_files_decode_the_same_whole_and_in_chunks(tmp_path: Path) -> None:
    """Stereo, 8-bit, 24-bit, 44.1 kHz stereo FLAC and a 0.1 s FLAC: the dataset's whole-file
    sample is ``load_audio``'s (mixed down, resampled to 32 kHz, the 8-bit file on its 1/128
    steps), a chunk read anywhere equals the whole file's samples, and ``tag_file`` runs each
    whole and in (short, seamed) chunks to the same frame count (the short file: one chunk
    zero-padded to the model's minimum, as whole)."""
    from polyfm.audio.chunked import ChunkedAudioDataset, read_span, resampled_length
    from polyfm.audio.inference import tag_file
    from polyfm.audio.models import Cnn14_DecisionLevelMax

    torch.manual_seed(0)
    model = Cnn14_DecisionLevelMax(base_channels=4, classes_num=3).eval()
    for name, (path, rate) in _odd_files(tmp_path).items():
        whole = load_audio(path, 32000)
        assert len(whole) == resampled_length(sf.info(str(path)).frames, rate, 32000), name
        item = AudioClipDataset([path], None, clip_seconds=None, check="full")[0]["input"]
        torch.testing.assert_close(item, whole, atol=0, rtol=0)
        for start, stop in ((0, 999), (len(whole) // 2 - 500, len(whole) // 2 + 777), (len(whole) - 1234, len(whole))):
            start = max(start, 0)
            torch.testing.assert_close(read_span(path, start, stop, 32000), whole[start:stop], atol=1e-6, rtol=0, msg=name)
        chunks = ChunkedAudioDataset([path], 32000, 32000, 8000, 320, 10240, model.min_samples())
        assert all(torch.isfinite(waveforms).all() for _, waveforms in chunks[0]["input"].batches())
        a, b = tag_file(model, path)["output"], tag_file(model, path, chunk_seconds=1.0, chunk_overlap_seconds=0.5)["output"]
        assert a["framewise_output"].shape == b["framewise_output"].shape == (1, 1 + max(len(whole), model.min_samples()) // 320, 3)
    native = load_audio(tmp_path / "u8.wav", 32000).numpy() * 128
    np.testing.assert_allclose(native, np.round(native), atol=1e-4)  # 8-bit: 256 levels


def test_silence_and_empty_files_in_every_reader(tmp_path: Path) -> None:
    """Silence (all zeros, no NaN) is kept, flagged by check="full", and gives finite outputs;
    a zero-length, missing or undecodable file is a DataError naming it in every reader,
    the chunked one included (it raised libsndfile's own error for missing / undecodable files)."""
    from polyfm.audio.chunked import ChunkedAudioDataset
    from polyfm.audio.inference import tag_file
    from polyfm.audio.models import Cnn14_DecisionLevelMax

    torch.manual_seed(0)
    model = Cnn14_DecisionLevelMax(base_channels=4, classes_num=3).eval()
    silence = tmp_path / "silence.wav"
    sf.write(silence, np.zeros(64000, np.float32), 32000)
    dataset = AudioClipDataset([silence], None, clip_seconds=None, check="full")
    assert dataset.silent == [str(silence)] and dataset[0]["input"].abs().max() == 0
    for options in ({}, {"chunk_seconds": 1.0, "chunk_overlap_seconds": 0.5}):
        out = tag_file(model, silence, **options)["output"]
        assert all(torch.isfinite(value).all() for value in out.values())
    files = _bad_files(tmp_path)
    missing = tmp_path / "missing.wav"
    for path, message in ((files["empty"], "zero-length"), (missing, "not found"), (files["garbage"], "cannot decode"), (files["truncated"], "truncated WAV")):
        readers = {
            "dataset": lambda p=path: AudioClipDataset([p], None, clip_seconds=None)[0],
            "chunks": lambda p=path: ChunkedAudioDataset([p], 32000, 32000, 8000, 320, 10240, 9920),
            "tag_file": lambda p=path: tag_file(model, p),
            "tag_file in chunks": lambda p=path: tag_file(model, p, chunk_seconds=1.0, chunk_overlap_seconds=0.5),
        }
        if path != files["truncated"]:  # load_audio decodes what is there; the header checks name truncation
            readers["load_audio"] = lambda p=path: load_audio(p)
        for reader, read in readers.items():
            with pytest.raises(DataError, match=message) as info:
                read()
            assert str(path) in str(info.value), (reader, path)
