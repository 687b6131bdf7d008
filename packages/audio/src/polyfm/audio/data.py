"""Audio readers and DataModules: decode with soundfile, mix down to mono, resample with
torchaudio, pad / crop / random-crop to a fixed duration, all on the fly.

Sources: CSV manifests (``file,labels``), AudioSet segment CSVs
(``YTID, start_seconds, end_seconds, positive_labels``), fold CSVs like ESC-50
(``filename,fold,target,category``), a folder of clips (one sub-folder per class, or
flat and unlabelled), and the Free Spoken Digit Dataset.

Bad input (see docs/audio.md):

* unreadable, truncated (WAV data chunk shorter than its header says) or zero-length
  files: a :class:`DataError` naming the file when the dataset is built; with
  ``on_error="skip"`` they are left out, counted by reason in ``dataset.skipped`` and
  the counts are logged;
* NaN/Inf samples: a :class:`DataError` naming the file and the first bad frame when
  the file is read (at build time too with ``check="full"``, where ``skip`` applies);
* silence: valid audio, kept; counted in ``dataset.silent`` (``check="full"``) and
  logged once per file when read;
* stereo / multichannel: averaged to mono; 8/16/24/32-bit PCM and float: decoded to
  float32 in [-1, 1] by libsndfile;
* other sample rates: resampled to ``sample_rate`` (windowed sinc, resampy's
  ``kaiser_best`` filter, see :class:`SincResampler`),
  counted per source rate in ``dataset.source_rates``; ``expected_sample_rate`` turns
  a different rate into an error instead.
"""

from __future__ import annotations

import csv
import logging
import math
import re
import struct
from collections import Counter
from collections.abc import Sequence, Sized
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, cast

import numpy as np
import soundfile as sf
import torch
import torchaudio
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler, SequentialSampler, Subset, default_collate

from polyfm.core.data import DictDataModule, EpochSeededSampler, data_dir, fold_indices
from polyfm.core.errors import ConfigError, DataError

if TYPE_CHECKING:
    from polyfm.audio.chunked import ChunkedAudioDataset

log = logging.getLogger(__name__)

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".aiff", ".aif", ".mp3")
#: manifests saved by Excel ("CSV UTF-8") start with a byte-order mark, which would
#: otherwise become part of the first column's name ('\ufefffile')
CSV_ENCODING = "utf-8-sig"
OnError = Literal["raise", "skip"]
Label = int | list[int] | None

# ----------------------------------------------------------------------------- decoding


class SincResampler:
    """torchaudio's windowed-sinc resampling (the same kernel, same defaults), applied as
    a blocked matrix product instead of torchaudio's strided ``conv1d``.

    torchaudio computes ``out[n * new + p] = sum_k kernel[p, k] * padded[n * orig + k]``
    with a convolution that unfolds the input into a ``(K, frames)`` copy, then
    transposes and copies the result. Here ``B`` output frames at a time form one row:
    the padded input is viewed (no copy) as rows of ``B * orig`` samples, and each block
    of ``B * new`` outputs is ``row_r @ H_0 + row_{r+1}[:overlap] @ H_1`` with ``H`` the
    kernel laid out once per rate pair. The output comes out interleaved, in order; it
    equals torchaudio's up to float rounding (summation order).

    ``quality="best"`` (the default) is resampy's ``kaiser_best`` filter in torchaudio's
    terms (Kaiser window, beta 14.77, 64 zero crossings, roll-off 0.9476): what librosa
    used when PANNs packed AudioSet; an 8 kHz file upsampled for a 32 kHz model comes within
    0.2 dB (median) of today's ``librosa.load`` (soxr) in the upper mel bins. ``"fast"`` is
    torchaudio's default (Hann, 6 zero crossings, roll-off 0.99): 9x fewer taps (at 8 to
    32 kHz), but its wide transition band lets images through above 4 kHz, 13-18 dB too
    loud in those bins. With the blocked product both cost about the same.
    """

    #: torchaudio ``Resample`` arguments per quality
    QUALITIES: dict[str, dict[str, Any]] = {
        "best": {"resampling_method": "sinc_interp_kaiser", "lowpass_filter_width": 64, "rolloff": 0.9475937167399596, "beta": 14.769656459379492},
        "fast": {"resampling_method": "sinc_interp_hann", "lowpass_filter_width": 6, "rolloff": 0.99},
    }

    def __init__(self, source: int, target: int, quality: Literal["best", "fast"] = "best") -> None:
        if quality not in self.QUALITIES:
            raise ConfigError(f"resampling quality must be one of {sorted(self.QUALITIES)}, got {quality!r}")
        self.source, self.target, self.options = source, target, self.QUALITIES[quality]
        self._parts: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
        if source == target:
            return
        reference = torchaudio.transforms.Resample(source, target, **self.options)
        self.orig, self.new = reference.orig_freq // reference.gcd, reference.new_freq // reference.gcd
        self.width, self.taps = int(reference.width), int(reference.kernel.shape[-1])
        # frames per block: enough that a block's window spans at most two rows, and 32+ columns
        self.block = max(1, math.ceil((self.taps - self.orig) / self.orig), math.ceil(32 / self.new))
        self.row = self.block * self.orig

    def parts(self, device: torch.device, dtype: torch.dtype) -> list[torch.Tensor]:
        """``H`` split into row-sized parts, built once per device and dtype from
        torchaudio's kernel for that dtype (torchaudio computes it in the input's dtype)."""
        key = (device, dtype)
        if key not in self._parts:
            kernel = torchaudio.transforms.Resample(self.source, self.target, dtype=dtype, **self.options).kernel[:, 0, :]  # (new, K)
            window = (self.block - 1) * self.orig + self.taps
            matrix = torch.zeros(window, self.block, self.new, dtype=dtype)
            for j in range(self.block):
                matrix[j * self.orig : j * self.orig + self.taps, j] = kernel.T
            matrix = matrix.reshape(window, self.block * self.new).to(device)
            self._parts[key] = [matrix[start : start + self.row] for start in range(0, window, self.row)]
        return self._parts[key]

    def __call__(self, waveform: torch.Tensor) -> torch.Tensor:
        """Resample ``(..., time)`` floating-point waveforms (1-D: the fast path, few ops)."""
        if self.source == self.target:
            return waveform
        length = waveform.shape[-1]
        if waveform.dim() != 1:
            resampled = [self(signal) for signal in waveform.reshape(-1, length)]
            return torch.stack(resampled).reshape(*waveform.shape[:-1], -1)
        parts = self.parts(waveform.device, waveform.dtype)
        frames = (length + 2 * self.width + self.orig - self.taps) // self.orig + 1  # torchaudio's conv1d output length
        blocks = -(-frames // self.block)
        rows = blocks + len(parts) - 1
        padded = torch.nn.functional.pad(waveform, (self.width, rows * self.row - length - self.width)).view(rows, self.row)
        out = padded[:blocks] @ parts[0]
        for r, part in enumerate(parts[1:], start=1):
            out.addmm_(padded[r : r + blocks, : part.shape[0]], part)
        return out.view(-1)[: math.ceil(self.new * length / self.orig)]


_RESAMPLERS: dict[tuple[int, int], SincResampler] = {}


def _resampler(source: int, target: int) -> SincResampler:
    """One cached resampler (kernel laid out as a matrix) per rate pair."""
    key = (source, target)
    if key not in _RESAMPLERS:
        _RESAMPLERS[key] = SincResampler(source, target)
    return _RESAMPLERS[key]


def wav_truncation(path: Path) -> tuple[int, int] | None:
    """For a RIFF/WAVE file whose data chunk is shorter than its header declares,
    ``(declared_bytes, present_bytes)``; else None. libsndfile reads such files
    without complaint (it just returns fewer frames), so we check ourselves."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(12)
            if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
                return None
            size = path.stat().st_size
            offset = 12
            while offset + 8 <= size:
                handle.seek(offset)
                chunk_id, chunk_size = struct.unpack("<4sI", handle.read(8))
                if chunk_id == b"data":
                    present = size - offset - 8
                    # 0 and 0xFFFFFFFF mark streamed files whose size was never written back
                    if chunk_size not in (0, 0xFFFFFFFF) and chunk_size > present:
                        return chunk_size, present
                    return None
                offset += 8 + chunk_size + (chunk_size & 1)
    except OSError:
        return None
    return None


def check_audio_header(path: str | Path, expected_sample_rate: int | None = None) -> sf._SoundFileInfo:
    """Header-level checks: readable, not truncated, not empty, expected rate."""
    path = Path(path)
    if not path.is_file():
        raise DataError("audio file not found; check the manifest's path column and audio_root.", path=path)
    try:
        info = sf.info(str(path))
    except (sf.LibsndfileError, RuntimeError, OSError) as exc:
        raise DataError(f"cannot decode ({exc}). Re-encode it as WAV/FLAC or remove it from the manifest.", path=path) from exc
    truncated = wav_truncation(path)
    if truncated is not None:
        raise DataError(
            f"truncated WAV: the header declares {truncated[0]} data bytes but only {truncated[1]} are present. "
            "Re-download or re-export the file.",
            path=path,
        )
    if info.frames == 0:
        raise DataError("zero-length audio (0 frames). Remove it from the manifest.", path=path)
    if expected_sample_rate is not None and info.samplerate != expected_sample_rate:
        raise DataError(
            f"sample rate {info.samplerate} Hz, expected {expected_sample_rate} Hz. Leave expected_sample_rate unset to resample on the fly.",
            path=path,
        )
    return info


def load_audio(
    path: str | Path,
    sample_rate: int = 32000,
    clip_samples: int | None = None,
    random_crop: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Decode ``path`` to a mono float32 waveform at ``sample_rate``.

    With ``clip_samples``: longer clips are cropped (from the start, or at a random
    offset with ``random_crop``), shorter ones zero-padded at the end (as PANNs).
    """
    path = Path(path)
    if not path.is_file():  # libsndfile says "System error"
        raise DataError("audio file not found; check the path (and the manifest's audio_root).", path=path)
    try:
        data, source_rate = sf.read(str(path), dtype="float32")  # (frames,) for mono, (frames, channels) else
    except (sf.LibsndfileError, RuntimeError, OSError) as exc:
        raise DataError(f"cannot decode ({exc}). Re-encode it as WAV/FLAC or remove it from the manifest.", path=path) from exc
    if data.shape[0] == 0:
        raise DataError("zero-length audio (0 frames). Remove it from the manifest.", path=path)
    if not np.isfinite(data).all():
        finite = np.isfinite(data.reshape(len(data), -1))
        frame, channel = np.argwhere(~finite)[0]
        raise DataError(
            f"{int((~finite).sum())} NaN/Inf samples (first at frame {frame}, channel {channel}). Fix or remove the file.", path=path
        )
    waveform = torch.from_numpy(data if data.ndim == 1 else data.mean(axis=1))  # mono mixdown
    if source_rate != sample_rate:
        waveform = _resampler(source_rate, sample_rate)(waveform)
    if clip_samples is not None:
        waveform = fix_length(waveform, clip_samples, random_crop, generator)
    return waveform


def fix_length(waveform: torch.Tensor, samples: int, random_crop: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
    """Crop (start or random offset) or zero-pad at the end to exactly ``samples``."""
    length = waveform.shape[-1]
    if length > samples:
        start = int(torch.randint(0, length - samples + 1, (1,), generator=generator)) if random_crop else 0
        return waveform[..., start : start + samples]
    if length < samples:
        return torch.nn.functional.pad(waveform, (0, samples - length))
    return waveform


# ----------------------------------------------------------------------------- dataset


class AudioClipDataset(Dataset[dict[str, Any]]):
    """Clips decoded on the fly: ``{"input": (samples,), "target": ..., "meta": path}``.

    ``labels`` per clip: a class index (multi-class, target ``long``), a list of class
    indices (multi-label, target float ``(num_classes,)``), or None (unlabelled: no
    ``target`` key). Files are checked when the dataset is built (``check``), see the
    module docstring for what happens to bad ones. ``cache`` keeps decoded, resampled
    clips in memory (small datasets, several epochs; per worker process).

    ``clip_seconds=None`` yields each file whole (prediction over full recordings): files of
    different lengths cannot share a batch, see :class:`LengthBatchSampler`; a file shorter
    than ``min_samples`` (the model's shortest input) is zero-padded to it, as ``tag_file`` does.
    """

    def __init__(
        self,
        paths: Sequence[str | Path],
        labels: Sequence[Label] | None = None,
        num_classes: int | None = None,
        multilabel: bool = False,
        sample_rate: int = 32000,
        clip_seconds: float | None = 10.0,
        random_crop: bool = False,
        on_error: OnError = "raise",
        check: Literal["none", "header", "full"] = "header",
        expected_sample_rate: int | None = None,
        cache: bool = False,
        min_samples: int = 0,
    ) -> None:
        if labels is not None and len(labels) != len(paths):
            raise ConfigError(f"{len(paths)} files but {len(labels)} labels.")
        if on_error not in ("raise", "skip"):
            raise ConfigError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        self.sample_rate = sample_rate
        self.clip_samples = None if clip_seconds is None else int(round(sample_rate * clip_seconds))
        self.min_samples = min_samples
        self.random_crop, self.multilabel, self.num_classes = random_crop, multilabel, num_classes
        self.expected_sample_rate, self.cache = expected_sample_rate, cache
        self._decoded: dict[int, torch.Tensor] = {}
        self.skipped: Counter[str] = Counter()
        self.silent: list[str] = []
        self.source_rates: Counter[int] = Counter()
        self._warned_silent: set[str] = set()
        kept_paths: list[Path] = []
        kept_labels: list[Label] = []
        for index, path in enumerate(paths):
            path = Path(path)
            if check != "none":
                try:
                    info = check_audio_header(path, expected_sample_rate)
                    if check == "full" and float(load_audio(path, info.samplerate).abs().max()) == 0.0:
                        self.silent.append(str(path))
                    self.source_rates[info.samplerate] += 1
                except DataError as exc:
                    if on_error == "raise":
                        raise
                    self.skipped[_reason(str(exc))] += 1
                    log.debug("skipping %s", exc)
                    continue
            kept_paths.append(path)
            kept_labels.append(None if labels is None else labels[index])
        if self.skipped:
            log.warning("skipped %d bad audio files: %s", sum(self.skipped.values()), dict(self.skipped))
        if self.silent:
            log.warning("%d clips are all zeros (silence); they are kept", len(self.silent))
        self.paths = kept_paths
        self.labels = kept_labels if labels is not None else None
        if multilabel and num_classes is None:
            raise ConfigError("multi-label targets need num_classes.")

    def __len__(self) -> int:
        return len(self.paths)

    def length_key(self, index: int) -> tuple[Any, ...]:
        """Files with equal keys decode to equal lengths (same frame count at the same source
        rate); an unreadable header gets a key of its own (the read names the file)."""
        if self.clip_samples is not None:
            return (self.clip_samples,)
        try:
            info = sf.info(str(self.paths[index]))
        except (sf.LibsndfileError, RuntimeError, OSError):
            return ("unreadable", index)
        return (info.frames, info.samplerate)

    def target(self, label: Label) -> torch.Tensor:
        if self.multilabel:
            vector = torch.zeros(self.num_classes or 0)
            vector[list(label if isinstance(label, list) else [label])] = 1.0
            return vector
        return torch.tensor(label, dtype=torch.long)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path = self.paths[index]
        if self.cache:  # decode + resample once, crop every time
            if index not in self._decoded:
                self._decoded[index] = load_audio(path, self.sample_rate)
            waveform = self._decoded[index]
            waveform = waveform if self.clip_samples is None else fix_length(waveform, self.clip_samples, self.random_crop)
        else:
            waveform = load_audio(path, self.sample_rate, self.clip_samples, self.random_crop)
        if self.clip_samples is None and waveform.shape[-1] < self.min_samples:
            log.info("%s: %d samples, zero-padded to %d (the model's shortest input)", path, waveform.shape[-1], self.min_samples)
            waveform = fix_length(waveform, self.min_samples)
        if not waveform.abs().amax() > 0 and str(path) not in self._warned_silent:
            self._warned_silent.add(str(path))
            log.warning("%s is silent (all zeros); kept as is", path)
        item: dict[str, Any] = {"input": waveform, "meta": str(path)}
        if self.labels is not None:
            item["target"] = self.target(self.labels[index])
        return item


class LengthKeyed(Protocol):
    """What :class:`LengthBatchSampler` reads from its dataset: a key that equal-length items share."""

    def length_key(self, index: int) -> tuple[Any, ...]: ...


class LengthBatchSampler(BatchSampler):
    """Batches of files that decode to the same length, for whole-file prediction.

    PANNs' clip output pools over the whole time axis (max + mean), so zero-padding a file
    to its batch's longest would change its tags and add silent frames to its event list;
    files of equal length (ESC-50's 5 s, AudioSet's 10 s clips) batch together, any other
    file is a batch of its own. Batches come in the order of their first file; a
    prediction writer puts rows back in input order by the indices Lightning passes.
    ``sampler`` is the order of the dataset indices (Lightning re-creates this sampler for
    predict with its own, so it is an argument)."""

    def __init__(self, sampler: Sampler[int], batch_size: int, drop_last: bool = False, dataset: LengthKeyed | None = None) -> None:
        super().__init__(sampler, batch_size, drop_last)
        if dataset is None:
            raise ConfigError("LengthBatchSampler needs the dataset whose file lengths it groups.")
        self.dataset = dataset

    def batches(self) -> list[list[int]]:
        buckets: dict[tuple[Any, ...], list[list[int]]] = {}
        for index in self.sampler:
            bucket = buckets.setdefault(self.dataset.length_key(index), [[]])
            if len(bucket[-1]) == self.batch_size:
                bucket.append([])
            bucket[-1].append(index)
        return sorted((batch for bucket in buckets.values() for batch in bucket), key=lambda batch: batch[0])

    def __iter__(self) -> Any:
        return iter(self.batches())

    def __len__(self) -> int:
        return len(self.batches())


def _reason(message: str) -> str:
    for reason in ("not found", "cannot decode", "truncated", "zero-length", "NaN", "sample rate"):
        if reason in message:
            return reason
    return "other"


class TwoViewAudioDataset(Dataset[dict[str, Any]]):
    """Two augmented views of one clip for contrastive pretraining on unlabelled audio:
    independent random crops of ``clip_seconds`` and random gains in ±``gain_db``."""

    def __init__(self, clips: AudioClipDataset, gain_db: float = 6.0) -> None:
        if clips.clip_samples is None:
            raise ConfigError("two-view pretraining crops views of clip_seconds: give the clips a clip_seconds, not None")
        self.clips, self.gain_db, self.view_samples = clips, gain_db, clips.clip_samples

    def __len__(self) -> int:
        return len(self.clips)

    def _view(self, waveform: torch.Tensor) -> torch.Tensor:
        view = fix_length(waveform, self.view_samples, random_crop=True)
        gain = 10 ** ((torch.rand(()) * 2 - 1) * self.gain_db / 20)
        return view * gain

    def __getitem__(self, index: int) -> dict[str, Any]:
        path = self.clips.paths[index]
        waveform = load_audio(path, self.clips.sample_rate)
        return {"view1": self._view(waveform), "view2": self._view(waveform), "meta": str(path)}


# ----------------------------------------------------------------------------- readers
# Each returns (paths, labels, class_names); labels are class indices (or lists of them).


def _resolve(audio_root: Path, name: str) -> Path:
    path = Path(name).expanduser()
    return path if path.is_absolute() else audio_root / path


def _check_listed(listed: Sequence[tuple[int, Path]], csv_path: Path, column: str, root: Path) -> None:
    """Fail on the first listed file that does not exist, naming the list, its row and the
    folder relative paths are read from (the dataset's own check names only the file)."""
    for number, path in listed:
        if not path.is_file():
            raise DataError(
                f"{column!r} names {str(path)!r}: audio file not found (relative paths are read from {root}); "
                "fix the path or audio_root, or pass on_error='skip' to leave missing files out.",
                path=csv_path,
                row=number,
            )


def _read_rows(csv_path: Path, required: Sequence[str]) -> list[dict[str, str]]:
    if not csv_path.is_file():
        raise DataError("manifest not found.", path=csv_path)
    with open(csv_path, newline="", encoding=CSV_ENCODING) as handle:
        reader = csv.DictReader(handle)
        columns = reader.fieldnames or []
        missing = [c for c in required if c not in columns]
        if missing:
            raise DataError(f"missing column(s) {missing}; the header has {columns}.", path=csv_path)
        return list(reader)


def read_manifest_csv(
    csv_path: str | Path,
    audio_root: str | Path | None = None,
    file_column: str = "file",
    label_column: str | None = "labels",
    label_separator: str = ";",
    class_names: Sequence[str] | None = None,
    check_files: bool = False,
) -> tuple[list[Path], list[Label] | None, list[str]]:
    """A CSV manifest: one row per clip, ``file`` (relative to ``audio_root``, default
    the CSV's folder) and ``labels`` (class names joined by ``label_separator``; one
    name per row for multi-class). Classes are ``class_names`` or the sorted names seen.
    ``check_files``: a row naming a file that does not exist is an error naming the row."""
    csv_path = Path(csv_path)
    root = Path(audio_root) if audio_root is not None else csv_path.parent
    rows = _read_rows(csv_path, [file_column] + ([label_column] if label_column else []))
    paths = [_resolve(root, row[file_column]) for row in rows]
    if check_files:
        _check_listed(list(enumerate(paths, start=2)), csv_path, file_column, root)
    if not label_column:
        return paths, None, []
    names_per_row = [[n.strip() for n in (row[label_column] or "").split(label_separator) if n.strip()] for row in rows]
    for number, names in enumerate(names_per_row, start=2):
        if not names:
            raise DataError(f"empty {label_column!r}; give at least one label or drop the row.", path=csv_path, row=number)
    classes = list(class_names) if class_names is not None else sorted({n for names in names_per_row for n in names})
    index = {name: i for i, name in enumerate(classes)}
    labels: list[Label] = []
    multilabel = any(len(names) > 1 for names in names_per_row)
    for number, names in enumerate(names_per_row, start=2):
        unknown = [n for n in names if n not in index]
        if unknown:
            raise DataError(f"unknown label(s) {unknown}; known classes: {classes[:20]}...", path=csv_path, row=number)
        ids = [index[n] for n in names]
        labels.append(ids if multilabel else ids[0])
    return paths, labels, classes


def read_manifest_groups(csv_path: str | Path, group_column: str = "group") -> list[str] | None:
    """The ``group_column`` of a manifest (a speaker, a recording session, a source
    recording cut into clips), one value per row, for group-aware cross-validation; None
    when the manifest has no such column. An empty value is an error naming its row."""
    csv_path = Path(csv_path)
    rows = _read_rows(csv_path, [])
    if not rows or group_column not in rows[0]:
        return None
    groups = [(row[group_column] or "").strip() for row in rows]
    for number, group in enumerate(groups, start=2):
        if not group:
            raise DataError(f"empty {group_column!r}; every row needs a group for grouped cross-validation "
                            f"(or drop the column to split clips one by one).", path=csv_path, row=number)
    return groups


def fold_numbers(csv_path: str | Path, fold_column: str = "fold") -> list[int]:
    """The sorted fold numbers a fold CSV (ESC-50's ``meta/esc50.csv``: 1 .. 5) uses."""
    csv_path = Path(csv_path)
    numbers = set()
    for number, row in enumerate(_read_rows(csv_path, [fold_column]), start=2):
        try:
            numbers.add(int(row[fold_column]))
        except ValueError as exc:
            raise DataError(f"{fold_column!r} must be an integer ({exc}).", path=csv_path, row=number) from exc
    if not numbers:
        raise DataError("no rows.", path=csv_path)
    return sorted(numbers)


def read_audioset_csv(
    csv_path: str | Path,
    audio_root: str | Path,
    class_labels_csv: str | Path | None = None,
    file_template: str = "Y{ytid}.wav",
    class_mids: Sequence[str] | None = None,
    check_files: bool = False,
) -> tuple[list[Path], list[Label], list[str]]:
    """An AudioSet segment CSV (``balanced_train_segments.csv`` ...): ``#`` comment lines,
    then ``YTID, start_seconds, end_seconds, "mid1,mid2"``. Files are found as
    ``audio_root / file_template.format(ytid=..., start=..., end=...)`` (PANNs' downloader
    names them ``Y<YTID>.wav``). Classes come from ``class_labels_indices.csv``
    (``index,mid,display_name``) when given, else ``class_mids`` (e.g. the training
    split's), else the sorted MIDs seen. Labels are lists. ``check_files``: a segment whose
    file is missing is an error naming the row (AudioSet downloads always miss some clips:
    leave it off and use ``on_error="skip"`` to count them instead)."""
    csv_path, root = Path(csv_path), Path(audio_root)
    if not csv_path.is_file():
        raise DataError("AudioSet segment CSV not found.", path=csv_path)
    records: list[tuple[int, str, str, str, list[str]]] = []
    with open(csv_path, newline="", encoding=CSV_ENCODING) as handle:
        for number, row in enumerate(csv.reader(handle, skipinitialspace=True), start=1):
            if not row or row[0].startswith("#"):
                continue
            if len(row) < 4:
                raise DataError(f"expected YTID, start_seconds, end_seconds, positive_labels; got {row}", path=csv_path, row=number)
            mids = [m.strip() for m in row[3].split(",") if m.strip()]
            records.append((number, row[0].strip(), row[1].strip(), row[2].strip(), mids))
    if class_labels_csv is not None:
        rows = _read_rows(Path(class_labels_csv), ["index", "mid", "display_name"])
        mids_in_order = [r["mid"] for r in sorted(rows, key=lambda r: int(r["index"]))]
        classes = [r["display_name"] for r in sorted(rows, key=lambda r: int(r["index"]))]
    else:
        mids_in_order = list(class_mids) if class_mids is not None else sorted({m for *_, mids in records for m in mids})
        classes = list(mids_in_order)
    index = {mid: i for i, mid in enumerate(mids_in_order)}
    paths: list[Path] = []
    labels: list[Label] = []
    for number, ytid, start, end, mids in records:
        unknown = [m for m in mids if m not in index]
        if unknown:
            raise DataError(f"label MID(s) {unknown} are not among the classes ({class_labels_csv or 'the training split'})", path=csv_path, row=number)
        paths.append(root / file_template.format(ytid=ytid, start=start, end=end))
        labels.append([index[m] for m in mids])
    if check_files:
        _check_listed([(r[0], p) for r, p in zip(records, paths, strict=True)], csv_path, "YTID", root)
    return paths, labels, classes


def read_fold_csv(
    csv_path: str | Path,
    folds: Sequence[int],
    audio_root: str | Path | None = None,
    file_column: str = "filename",
    fold_column: str = "fold",
    target_column: str = "target",
    class_column: str | None = "category",
    check_files: bool = False,
) -> tuple[list[Path], list[Label], list[str]]:
    """A fold CSV like ESC-50's ``meta/esc50.csv`` (``filename,fold,target,category``):
    the rows whose fold is in ``folds``. ``audio_root`` defaults to ``<csv>/../../audio``
    (ESC-50's layout) when that exists, else the CSV's folder. Classes are named from
    ``class_column`` over all rows (so every split agrees on the ids). ``check_files``: a
    chosen row naming a missing file is an error naming the row."""
    csv_path = Path(csv_path)
    default_root = csv_path.parent.parent / "audio"
    root = Path(audio_root) if audio_root is not None else (default_root if default_root.is_dir() else csv_path.parent)
    rows = _read_rows(csv_path, [file_column, fold_column, target_column])
    names: dict[int, str] = {}
    for number, row in enumerate(rows, start=2):
        try:
            target = int(row[target_column])
            int(row[fold_column])
        except ValueError as exc:
            raise DataError(f"{fold_column!r} and {target_column!r} must be integers ({exc}).", path=csv_path, row=number) from exc
        names[target] = row.get(class_column, str(target)) if class_column else str(target)
    classes = [names.get(i, str(i)) for i in range(max(names) + 1)] if names else []
    chosen = [(number, row) for number, row in enumerate(rows, start=2) if int(row[fold_column]) in set(folds)]
    if not chosen:
        raise DataError(f"no rows in folds {list(folds)}.", path=csv_path)
    paths = [_resolve(root, row[file_column]) for _, row in chosen]
    if check_files:
        _check_listed([(number, path) for (number, _), path in zip(chosen, paths, strict=True)], csv_path, file_column, root)
    return paths, [int(row[target_column]) for _, row in chosen], classes


def read_folder(
    root: str | Path, extensions: Sequence[str] = AUDIO_EXTENSIONS, class_names: Sequence[str] | None = None
) -> tuple[list[Path], list[Label] | None, list[str]]:
    """A folder of clips: ``root/<class>/*.wav`` gives labelled clips (class = sub-folder
    name, sorted, or the index in ``class_names`` such as the training split's); audio
    directly under ``root`` and no sub-folders gives unlabelled clips."""
    root = Path(root)
    if not root.is_dir():
        raise DataError("folder not found.", path=root)
    subfolders = sorted(p for p in root.iterdir() if p.is_dir())
    if subfolders:
        classes = list(class_names) if class_names is not None else [p.name for p in subfolders]
        unknown = [p.name for p in subfolders if p.name not in classes]
        if unknown:
            raise DataError(f"sub-folder(s) {unknown} are not among the classes {classes}.", path=root)
        paths: list[Path] = []
        labels: list[Label] = []
        for folder in subfolders:
            label = classes.index(folder.name)
            for path in sorted(folder.rglob("*")):
                if path.suffix.lower() in extensions:
                    paths.append(path)
                    labels.append(label)
        if not paths:
            raise DataError(f"no audio files ({', '.join(extensions)}) in its sub-folders.", path=root)
        return paths, labels, classes
    paths = sorted(p for p in root.iterdir() if p.suffix.lower() in extensions)
    if not paths:
        raise DataError(f"no audio files ({', '.join(extensions)}).", path=root)
    return paths, None, []


def read_predict_source(source: str | Path, audio_root: str | Path | None = None, file_column: str = "file") -> list[Path]:
    """The files to predict on, unlabelled: one audio file, a folder (every audio file
    under it, sub-folders included, sorted), or a CSV manifest with a ``file_column``
    (other columns, labels included, are ignored)."""
    source = Path(source)
    if source.is_file() and source.suffix.lower() in AUDIO_EXTENSIONS:
        return [source]
    if source.is_dir():
        paths = sorted(p for p in source.rglob("*") if p.is_file() and p.suffix.lower() in AUDIO_EXTENSIONS)
        if not paths:
            raise DataError(f"no audio files ({', '.join(AUDIO_EXTENSIONS)}) in it or its sub-folders.", path=source)
        return paths
    if source.suffix.lower() in (".csv", ".tsv") or source.is_file():
        return read_manifest_csv(source, audio_root, file_column=file_column, label_column=None, check_files=True)[0]
    raise DataError(f"not found: give an audio file, a folder of them or a CSV manifest with a {file_column!r} column.", path=source)


FSDD_NAME = re.compile(r"^(\d)_([A-Za-z]+)_(\d+)\.wav$")


def fsdd_speakers(paths: Sequence[str | Path]) -> list[str]:
    """The speaker of each FSDD recording, from its name ``{digit}_{speaker}_{index}.wav``."""
    speakers = []
    for path in paths:
        match = FSDD_NAME.match(Path(path).name)
        if not match:
            raise DataError("not named {digit}_{speaker}_{index}.wav as FSDD recordings are.", path=path)
        speakers.append(match.group(2))
    return speakers


def read_fsdd(root: str | Path, split: Literal["train", "test", "all"], indices: Sequence[int] | None = None) -> tuple[list[Path], list[Label], list[str]]:
    """Free Spoken Digit Dataset ``recordings/{digit}_{speaker}_{index}.wav`` (8 kHz).
    The dataset's own split: index 0-4 test, 5-49 train. ``indices`` narrows further."""
    root = Path(root)
    folder = root / "recordings" if (root / "recordings").is_dir() else root
    paths: list[Path] = []
    labels: list[Label] = []
    for path in sorted(folder.glob("*.wav")):
        match = FSDD_NAME.match(path.name)
        if not match:
            raise DataError("not named {digit}_{speaker}_{index}.wav as FSDD recordings are.", path=path)
        digit, index = int(match.group(1)), int(match.group(3))
        in_split = split == "all" or (split == "test") == (index < 5)
        if in_split and (indices is None or index in indices):
            paths.append(path)
            labels.append(digit)
    if not paths:
        raise DataError(f"no FSDD recordings for split {split!r}.", path=folder)
    return paths, labels, [str(d) for d in range(10)]


# ----------------------------------------------------------------------------- DataModules


class OptionalValidation:
    """No validation split (``val: null``, ``val_fraction: 0``): no validation loop, instead of
    DictDataModule's "has no evaluation split" error at the first epoch's end."""

    val_set: Dataset[Any] | None

    def val_dataloader(self) -> Any:
        return super().val_dataloader() if self.val_set is not None else []  # type: ignore[misc]


class AudioDataModule(OptionalValidation, DictDataModule):
    """Shared by the audio DataModules: class-balanced sampling of the training split
    (PANNs' balanced sampler: each clip drawn with probability inversely proportional
    to its classes' frequencies, with replacement) and a few properties tasks need."""

    def __init__(
        self,
        balanced: bool = False,
        batch_size: int = 32,
        num_workers: int = 0,
        label_fraction: float = 1.0,
        seed: int = 0,
        predict: str | None = None,
        predict_clip_seconds: float | None = None,
        predict_chunk_seconds: float | None = None,
        predict_chunk_overlap_seconds: float | None = None,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, label_fraction=label_fraction, seed=seed)
        if predict_clip_seconds is not None and predict_clip_seconds <= 0:
            raise ConfigError(f"predict_clip_seconds must be positive, or null for whole files; got {predict_clip_seconds}")
        check_chunk_options(predict_chunk_seconds, predict_chunk_overlap_seconds, predict_clip_seconds)
        self.balanced, self.predict, self.predict_clip_seconds = balanced, predict, predict_clip_seconds
        self.predict_chunk_seconds, self.predict_chunk_overlap_seconds = predict_chunk_seconds, predict_chunk_overlap_seconds
        self.class_names: list[str] = []
        self._pending_train: Dataset[Any] | None = None
        self.predict_set: AudioClipDataset | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def _train_clips(self) -> AudioClipDataset:
        dataset = self.train_set
        return dataset.dataset if isinstance(dataset, Subset) else dataset  # type: ignore[return-value]

    def train_labels(self) -> list[Any] | None:
        clips = self._train_clips() if self.train_set is not None else self._pending_train
        labels = getattr(clips, "labels", None)
        if labels is None or any(isinstance(label, list) for label in labels):
            return None  # multi-label: plain random fraction
        return list(labels)

    def setup(self, stage: str | None = None) -> None:
        if self.predict is not None and self.predict_set is None:
            # whole files by default (PANNs' inference); with predict_clip_seconds cropped from the start, never at random
            sample_rate, root = getattr(self, "sample_rate", 32000), getattr(self, "audio_root", None)
            self.predict_set = AudioClipDataset(read_predict_source(self.predict, root), None, sample_rate=sample_rate, clip_seconds=self.predict_clip_seconds)
        if self.train_set is not None:
            return
        train, self.val_set, self.test_set = self.build()
        self._pending_train = train
        if self.label_fraction < 1.0:
            from polyfm.core.data import label_fraction_indices

            labels = self.train_labels()
            # cast: torch's Dataset declares no __len__; every dataset build() returns here has one
            indices = label_fraction_indices(labels if labels is not None else len(cast(Sized, train)), self.label_fraction, self.seed)
            train = Subset(train, indices.tolist())
        self.train_set = train

    def balanced_weights(self) -> list[float]:
        dataset = self.train_set
        clips = self._train_clips()
        indices = dataset.indices if isinstance(dataset, Subset) else range(len(clips))
        labels = [clips.labels[i] for i in indices] if clips.labels is not None else None
        if labels is None:
            raise ConfigError("balanced sampling needs labels.")
        as_lists = [label if isinstance(label, list) else [label] for label in labels]
        counts = Counter(c for label in as_lists for c in label)
        return [float(np.mean([1.0 / counts[c] for c in label])) if label else 0.0 for label in as_lists]

    def predict_dataloader(self) -> DataLoader[Any]:
        """``predict`` (files without labels) when given, else the test split (else validation).
        Whole files go in batches of equal length (:class:`LengthBatchSampler`), padded to the
        model's shortest input when shorter."""
        if self.predict_set is None:
            if self.predict_chunk_seconds is not None:
                log.warning("predict_chunk_seconds=%g applies to the predict files, and predict is not set: predicting the evaluation "
                            "split's clips of clip_seconds instead", self.predict_chunk_seconds)
            return super().predict_dataloader()
        if self.predict_set.clip_samples is not None:
            return self._loader(self.predict_set, False)
        self.predict_set.min_samples = _model_min_samples(getattr(self, "trainer", None))
        if self.predict_chunk_seconds is not None:
            from polyfm.audio.chunked import collate_chunked

            # batches of files of one length (one chunk plan); the model runs their chunks batch_size at a time
            files = self.chunked_predict_set()
            file_batches = LengthBatchSampler(SequentialSampler(files), self.batch_size, False, files)
            return DataLoader(files, batch_sampler=file_batches, collate_fn=collate_chunked, num_workers=self.num_workers)
        batches = LengthBatchSampler(SequentialSampler(self.predict_set), self.batch_size, False, self.predict_set)
        return DataLoader(self.predict_set, batch_sampler=batches, num_workers=self.num_workers, pin_memory=self.pin_memory)

    def chunked_predict_set(self, model: Any = None) -> ChunkedAudioDataset:
        """The ``predict`` files, each to be run in chunks of ``predict_chunk_seconds`` (see :mod:`polyfm.audio.chunked`),
        on the grid of ``model`` (default: the trainer's): starts on multiples of its hop x pooling;
        ``batch_size`` chunks at a time."""
        from polyfm.audio.chunked import ChunkedAudioDataset, chunk_geometry

        assert self.predict_set is not None and self.predict_chunk_seconds is not None
        base = model if model is not None else _model_base(getattr(self, "trainer", None))
        if base is None or not hasattr(base, "frontend"):
            raise ConfigError("predict_chunk_seconds cuts files on the model's frame grid: run predict through a Trainer with a PANNs model "
                              f"(got {type(base).__name__ if base is not None else 'no model'}), or leave predict_chunk_seconds unset")
        rate, chunk, overlap, hop, align = chunk_geometry(base, self.predict_chunk_seconds, self.predict_chunk_overlap_seconds)
        sample_rate = getattr(self, "sample_rate", rate)
        if sample_rate != rate:
            raise ConfigError(f"the data module reads audio at {sample_rate} Hz but {type(base).__name__} runs at {rate} Hz: set sample_rate={rate}")
        return ChunkedAudioDataset(self.predict_set.paths, rate, chunk, overlap, hop, align, self.predict_set.min_samples, self.batch_size)

    def train_dataloader(self) -> DataLoader[Any]:
        if not self.balanced:
            return super().train_dataloader()
        assert self.train_set is not None
        sampler = EpochSeededSampler(len(self.train_set), self.seed, weights=self.balanced_weights())  # type: ignore[arg-type]
        return DataLoader(
            self.train_set,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
        )


def check_chunk_options(chunk_seconds: float | None, overlap_seconds: float | None, clip_seconds: float | None) -> None:
    """``predict_chunk_seconds`` / ``predict_chunk_overlap_seconds`` as a data module takes them."""
    if chunk_seconds is None:
        if overlap_seconds is not None:
            raise ConfigError(f"predict_chunk_overlap_seconds={overlap_seconds} is given without predict_chunk_seconds: "
                              "give predict_chunk_seconds (e.g. 60) to predict long files in chunks, or drop the overlap")
        return
    if not chunk_seconds > 0:
        raise ConfigError(f"predict_chunk_seconds must be positive seconds (or null for whole files at once); got {chunk_seconds}")
    if clip_seconds is not None:
        raise ConfigError(f"predict_chunk_seconds={chunk_seconds} runs whole files in chunks, predict_clip_seconds={clip_seconds} crops them: "
                          "give one of the two")
    if overlap_seconds is not None and not overlap_seconds >= 0:
        raise ConfigError(f"predict_chunk_overlap_seconds must be 0 or more seconds; got {overlap_seconds}")
    if overlap_seconds is not None and overlap_seconds >= chunk_seconds:
        raise ConfigError(f"predict_chunk_overlap_seconds ({overlap_seconds}) must be less than predict_chunk_seconds ({chunk_seconds}): "
                          "chunks have to advance")


def _model_base(trainer: Any) -> Any:
    """The PANNs model the trainer runs (under PEFT's wrapper with LoRA, and an ensemble's first member), or None."""
    module = getattr(trainer, "lightning_module", None) if trainer is not None else None
    members = getattr(module, "members", None)
    if members is not None and len(members):
        module = members[0]
    encoder = getattr(module, "encoder", None)
    return getattr(encoder, "base_model", encoder)


def _model_min_samples(trainer: Any) -> int:
    """The shortest waveform the model being run takes (0 when there is none or it does not say):
    whole files shorter than that are padded, as ``tag_file`` pads them."""
    base = _model_base(trainer)
    minimum = getattr(base, "min_samples", None)
    return int(minimum()) if callable(minimum) else 0


class AudioClipsDataModule(AudioDataModule):
    """Clip classification / tagging from your own files.

    ``format``:
      * ``csv``: ``train``/``val``/``test`` are manifests with ``file`` and ``labels`` columns;
      * ``audioset``: AudioSet segment CSVs, files under ``audio_root`` (multi-label);
      * ``folds``: ``train`` is one fold CSV (ESC-50 style); ``val_folds``/``test_folds``
        pick the evaluation folds and the rest train;
      * ``folder``: ``train``/``val``/``test`` are folders with one sub-folder per class.

    Multi-label when any clip has several labels (or ``format="audioset"``). Without ``val``
    there is no validation loop. ``predict`` (every audio DataModule): the files ``predict``
    runs on, without labels (one file, a folder, or a manifest's ``file`` column, see
    :func:`read_predict_source`); else it runs on the test split, else validation.
    ``predict_clip_seconds`` (every audio DataModule): ``None`` (the default) runs each
    ``predict`` file at its full length, as PANNs' inference does (the CNNs pool over the
    whole time axis; SED gets frames for the whole recording), in batches of files of equal
    length; a number crops / pads every file to that many seconds from its start.
    ``predict_chunk_seconds`` (every audio DataModule; with ``predict_clip_seconds`` unset):
    whole files decoded and run in chunks of that many seconds overlapping by
    ``predict_chunk_overlap_seconds`` (default 400 frames, 4 s at PANNs' 10 ms hop, at most half
    the chunk), ``batch_size`` chunks at a time, stitched by the model before its head (see
    :mod:`polyfm.audio.chunked`): the whole file's outputs in memory bounded by the chunk, for
    hour-long recordings.

    Cross-validation (``fold``): with ``format="folds"`` the CSV's own folds (ESC-50's 1 .. 5):
    fold ``k`` is held out as both the validation and the test split and the other folds
    train, as ESC-50 papers report it (train on four, score the fifth; average the five).
    With ``csv`` / ``folder`` / ``audioset`` the ``train`` source is dealt into ``num_folds``
    (default 5) folds by :func:`polyfm.core.data.fold_indices` (``fold`` 0 .. num_folds - 1,
    seeded by ``fold_seed``): a manifest's ``group_column`` keeps each group (a speaker, a
    source recording) on one side; fold ``k`` is the validation split, and the test split
    too unless ``test`` is given.
    """

    def __init__(
        self,
        train: str,
        val: str | None = None,
        test: str | None = None,
        predict: str | None = None,
        predict_clip_seconds: float | None = None,
        predict_chunk_seconds: float | None = None,
        predict_chunk_overlap_seconds: float | None = None,
        format: Literal["csv", "audioset", "folds", "folder"] = "csv",
        audio_root: str | None = None,
        class_labels_csv: str | None = None,
        val_folds: list[int] | None = None,
        test_folds: list[int] | None = None,
        fold: int | None = None,
        num_folds: int | None = None,
        group_column: str = "group",
        fold_seed: int = 0,
        label_separator: str = ";",
        sample_rate: int = 32000,
        clip_seconds: float = 10.0,
        random_crop: bool = True,
        balanced: bool = False,
        on_error: OnError = "raise",
        check: Literal["none", "header", "full"] = "header",
        batch_size: int = 32,
        num_workers: int = 0,
        label_fraction: float = 1.0,
        seed: int = 0,
    ) -> None:
        super().__init__(balanced, batch_size, num_workers, label_fraction, seed, predict, predict_clip_seconds,
                         predict_chunk_seconds, predict_chunk_overlap_seconds)
        self.train, self.val, self.test, self.format = train, val, test, format
        self.audio_root, self.class_labels_csv = audio_root, class_labels_csv
        self.val_folds, self.test_folds, self.label_separator = val_folds, test_folds, label_separator
        self.fold, self.num_folds, self.group_column, self.fold_seed = fold, num_folds, group_column, fold_seed
        self.sample_rate, self.clip_seconds, self.random_crop = sample_rate, clip_seconds, random_crop
        self.on_error, self.check = on_error, check
        self.multilabel = format == "audioset"
        self._mids: list[str] | None = None

    def _read(self, source: str, folds: list[int] | None = None) -> tuple[list[Path], list[Label] | None, list[str]]:
        rows = self.on_error == "raise" and self.check != "none"  # missing files: name the manifest row
        if self.format == "csv":
            names = self.class_names or None
            return read_manifest_csv(source, self.audio_root, label_separator=self.label_separator, class_names=names, check_files=rows)
        known = self.class_names or None  # evaluation splits use the training split's class ids
        if self.format == "audioset":
            if self.audio_root is None:
                raise ConfigError("format='audioset' needs audio_root (the folder holding Y<YTID>.wav files).")
            return read_audioset_csv(source, self.audio_root, self.class_labels_csv, class_mids=self._mids, check_files=rows)
        if self.format == "folds":
            return read_fold_csv(source, folds or [], self.audio_root, check_files=rows)
        if self.format == "folder":
            return read_folder(source, class_names=known)
        raise ConfigError(f"unknown format {self.format!r}: csv, audioset, folds or folder.")

    def _dataset(self, paths: list[Path], labels: list[Label] | None, train: bool) -> AudioClipDataset:
        return AudioClipDataset(
            paths, labels, num_classes=len(self.class_names), multilabel=self.multilabel, sample_rate=self.sample_rate,
            clip_seconds=self.clip_seconds, random_crop=self.random_crop and train, on_error=self.on_error, check=self.check,
        )  # fmt: skip

    def build(self) -> tuple[AudioClipDataset, AudioClipDataset | None, AudioClipDataset | None]:
        if self.fold is not None:
            return self._build_fold(self.fold)
        if self.format == "folds":
            all_folds = set(fold_numbers(self.train))
            held_out = set(self.val_folds or []) | set(self.test_folds or [])
            if not self.test_folds:
                raise ConfigError("format='folds' needs test_folds (e.g. [5]; ESC-50 reports 5-fold cross-validation).")
            train_folds = sorted(all_folds - held_out)
            paths, labels, self.class_names = self._read(self.train, train_folds)
            splits = [self._read(self.train, f) if f else None for f in (self.val_folds, self.test_folds)]
        else:
            paths, labels, self.class_names = self._read(self.train)
            if self.format == "audioset" and self.class_labels_csv is None:
                self._mids = list(self.class_names)  # without the labels file, classes are the training split's MIDs
            splits = [self._read(s) if s else None for s in (self.val, self.test)]
        self.multilabel = self.multilabel or any(isinstance(label, list) for label in labels or [])
        if labels is None:
            raise ConfigError(f"{self.train} has no labels; use UnlabelledAudioDataModule for self-supervised pretraining.")
        train = self._dataset(paths, labels, train=True)
        val, test = (self._dataset(s[0], s[1], train=False) if s else None for s in splits)
        return train, val, test

    def _build_fold(self, fold: int) -> tuple[AudioClipDataset, AudioClipDataset, AudioClipDataset]:
        """Cross-validation fold ``fold``: (train, held-out fold as validation, test)."""
        if self.format == "folds":
            if self.val_folds or self.test_folds:
                raise ConfigError(f"fold={fold} holds out that fold of {self.train} as validation and test: leave val_folds / test_folds unset "
                                  f"(got val_folds={self.val_folds}, test_folds={self.test_folds})")
            folds = fold_numbers(self.train)
            if self.num_folds is not None and self.num_folds != len(folds):
                raise ConfigError(f"num_folds={self.num_folds}, but {self.train} has {len(folds)} folds {folds}: leave num_folds unset for a fold CSV")
            if fold not in folds:
                raise ConfigError(f"fold={fold} is not a fold of {self.train}; its folds are {folds} (ESC-50: 1 .. 5)")
            paths, labels, self.class_names = self._read(self.train, [f for f in folds if f != fold])
            held_paths, held_labels, _ = self._read(self.train, [fold])
            train = self._dataset(paths, labels, train=True)
            held_out = self._dataset(held_paths, held_labels, train=False)
            log.info("fold %d of %s: %d clips train (folds %s), %d held out for validation and test", fold, self.train, len(paths),
                     [f for f in folds if f != fold], len(held_paths))
            return train, held_out, held_out
        if self.val is not None:
            raise ConfigError(f"fold={fold}: the held-out fold is the validation split, so leave val unset (got val={self.val!r})")
        paths, labels, self.class_names = self._read(self.train)
        if labels is None:
            raise ConfigError(f"{self.train} has no labels; use UnlabelledAudioDataModule for self-supervised pretraining.")
        if self.format == "audioset" and self.class_labels_csv is None:
            self._mids = list(self.class_names)
        self.multilabel = self.multilabel or any(isinstance(label, list) for label in labels)
        groups = read_manifest_groups(self.train, self.group_column) if self.format == "csv" else None
        if groups is None:
            log.info("fold %d: %s has no %r column, clips are dealt into folds one by one", fold, self.train, self.group_column)
        train_idx, held_idx = fold_indices(len(paths), self.num_folds or 5, fold, groups, seed=self.fold_seed)
        train = self._dataset([paths[i] for i in train_idx], [labels[i] for i in train_idx], train=True)
        held_out = self._dataset([paths[i] for i in held_idx], [labels[i] for i in held_idx], train=False)
        test = held_out
        if self.test is not None:
            test_paths, test_labels, _ = self._read(self.test)
            test = self._dataset(test_paths, test_labels, train=False)
        log.info("fold %d of %d: %d clips train, %d held out for validation%s", fold, self.num_folds or 5, len(train_idx), len(held_idx),
                 "" if self.test is not None else " and test")
        return train, held_out, test


class FSDDDataModule(AudioDataModule):
    """Free Spoken Digit Dataset (``$POLYFM_DATA_DIR/audio/fsdd``): 10 digits, 8 kHz,
    resampled to ``sample_rate`` on the fly and padded/cropped to ``clip_seconds``.
    The dataset's own split: index 0-4 test, 5-49 train; validation takes indices
    ``val_indices`` out of the train split. ``max_train_clips`` keeps a stratified,
    seeded subset of the train split (for quick runs).

    ``fold`` (0 .. ``num_folds`` - 1): speaker-grouped cross-validation over all recordings
    instead (:func:`polyfm.core.data.fold_indices` with the speaker as group, seeded by
    ``fold_seed``): no speaker is on both sides, and the held-out fold is the validation and
    the test split (digits from voices the model never heard; the dataset's own index split
    shares its speakers between train and test). With 5 speakers and 5 folds this is
    leave-one-speaker-out."""

    def __init__(
        self,
        root: str | None = None,
        sample_rate: int = 32000,
        clip_seconds: float = 1.0,
        val_indices: list[int] | None = None,
        fold: int | None = None,
        num_folds: int = 5,
        fold_seed: int = 0,
        predict: str | None = None,
        predict_clip_seconds: float | None = None,
        predict_chunk_seconds: float | None = None,
        predict_chunk_overlap_seconds: float | None = None,
        max_train_clips: int | None = None,
        random_crop: bool = True,
        cache: bool = False,
        balanced: bool = False,
        batch_size: int = 32,
        num_workers: int = 0,
        label_fraction: float = 1.0,
        seed: int = 0,
    ) -> None:
        super().__init__(balanced, batch_size, num_workers, label_fraction, seed, predict, predict_clip_seconds,
                         predict_chunk_seconds, predict_chunk_overlap_seconds)
        self.root, self.sample_rate, self.clip_seconds = root, sample_rate, clip_seconds
        if fold is not None and val_indices is not None:
            raise ConfigError(f"FSDDDataModule: fold={fold} holds out speakers as the validation split; leave val_indices unset (got {val_indices})")
        self.val_indices = list(range(5, 10)) if val_indices is None else val_indices
        self.fold, self.num_folds, self.fold_seed = fold, num_folds, fold_seed
        self.max_train_clips, self.random_crop, self.cache = max_train_clips, random_crop, cache
        self.class_names = [str(d) for d in range(10)]
        self.multilabel = False

    def folder(self) -> Path:
        if self.root is not None:
            return Path(self.root)
        base = data_dir()
        if base is None:
            raise ConfigError("FSDDDataModule needs root= or POLYFM_DATA_DIR (holding audio/fsdd/recordings).")
        return base / "audio" / "fsdd"

    def build(self) -> tuple[AudioClipDataset, AudioClipDataset, AudioClipDataset]:
        root = self.folder()
        if self.fold is not None:
            every, every_label, _ = read_fsdd(root, "all")
            train_idx, held_idx = fold_indices(len(every), self.num_folds, self.fold, fsdd_speakers(every), seed=self.fold_seed)
            paths, labels = [every[i] for i in train_idx], [every_label[i] for i in train_idx]
            val_paths, val_labels = [every[i] for i in held_idx], [every_label[i] for i in held_idx]
            test_paths, test_labels = val_paths, val_labels
            log.info("FSDD fold %d of %d: speakers %s held out (%d recordings), %d train", self.fold, self.num_folds,
                     sorted(set(fsdd_speakers(val_paths))), len(val_paths), len(paths))
        else:
            train_indices = [i for i in range(5, 50) if i not in set(self.val_indices)]
            paths, labels, _ = read_fsdd(root, "train", train_indices)
            val_paths, val_labels, _ = read_fsdd(root, "train", self.val_indices) if self.val_indices else read_fsdd(root, "test")
            test_paths, test_labels, _ = read_fsdd(root, "test")
        if self.max_train_clips is not None and self.max_train_clips < len(paths):
            from polyfm.core.data import label_fraction_indices

            keep = label_fraction_indices(labels, self.max_train_clips / len(paths), self.seed)
            paths, labels = [paths[i] for i in keep], [labels[i] for i in keep]

        def make(p: list[Path], y: list[Label], train: bool) -> AudioClipDataset:
            return AudioClipDataset(
                p, y, 10, False, self.sample_rate, self.clip_seconds, self.random_crop and train, cache=self.cache
            )

        return make(paths, labels, True), make(val_paths, val_labels, False), make(test_paths, test_labels, False)


class UnlabelledAudioDataModule(OptionalValidation, DictDataModule):
    """Self-supervised pretraining on a folder (or CSV manifest) of unlabelled clips:
    batches of two views (``view1``, ``view2``) for :class:`~polyfm.audio.objectives.ContrastiveAudio`.
    Labels, if the source has them, are ignored. ``val_fraction`` of the clips (seeded)
    are held out for the validation loss."""

    def __init__(
        self,
        source: str,
        sample_rate: int = 32000,
        clip_seconds: float = 2.0,
        gain_db: float = 6.0,
        val_fraction: float = 0.1,
        on_error: OnError = "raise",
        batch_size: int = 32,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed)
        self.source, self.sample_rate, self.clip_seconds = source, sample_rate, clip_seconds
        self.gain_db, self.val_fraction, self.on_error = gain_db, val_fraction, on_error

    def build(self) -> tuple[TwoViewAudioDataset, TwoViewAudioDataset | None, None]:
        source = Path(self.source)
        rows = self.on_error == "raise"
        paths = read_manifest_csv(source, label_column=None, check_files=rows)[0] if source.suffix == ".csv" else read_folder(source)[0]
        order = np.random.default_rng(self.seed).permutation(len(paths))
        n_val = int(round(self.val_fraction * len(paths)))
        val_paths = [paths[i] for i in order[:n_val]]
        train_paths = [paths[i] for i in order[n_val:]]

        def make(p: list[Path]) -> TwoViewAudioDataset:
            clips = AudioClipDataset(p, None, sample_rate=self.sample_rate, clip_seconds=self.clip_seconds, on_error=self.on_error)
            return TwoViewAudioDataset(clips, self.gain_db)

        return make(train_paths), (make(val_paths) if val_paths else None), None


# ----------------------------------------------------------------------------- sound event detection

Event = tuple[float, float, int]  # onset seconds, offset seconds, class index


def read_events_csv(
    csv_path: str | Path, audio_root: str | Path | None = None, class_names: Sequence[str] | None = None, check_files: bool = False
) -> tuple[list[Path], list[list[Event]], list[str]]:
    """Strong labels in DCASE's format: ``filename, onset, offset, event_label`` (tab or
    comma separated, with a header). A file with no events can be listed with empty
    onset/offset/label. Returns one list of ``(onset, offset, class)`` per file.
    ``check_files``: a missing file is an error naming its first row."""
    csv_path = Path(csv_path)
    root = Path(audio_root) if audio_root is not None else csv_path.parent
    if not csv_path.is_file():
        raise DataError("event list not found.", path=csv_path)
    text = csv_path.read_text(encoding=CSV_ENCODING)
    delimiter = "\t" if "\t" in text.splitlines()[0] else ","
    rows = list(csv.DictReader(text.splitlines(), delimiter=delimiter))
    required = ["filename", "onset", "offset", "event_label"]
    if not rows or any(c not in rows[0] for c in required):
        raise DataError(f"expected columns {required}.", path=csv_path)
    labels = [r["event_label"] for r in rows if r["event_label"]]
    classes = list(class_names) if class_names is not None else sorted(set(labels))
    index = {name: i for i, name in enumerate(classes)}
    per_file: dict[str, list[Event]] = {}
    first_row: dict[str, int] = {}
    for number, row in enumerate(rows, start=2):
        first_row.setdefault(row["filename"], number)
        events = per_file.setdefault(row["filename"], [])
        if not row["event_label"]:
            continue
        try:
            onset, offset = float(row["onset"]), float(row["offset"])
        except ValueError as exc:
            raise DataError(f"onset/offset must be numbers ({exc}).", path=csv_path, row=number) from exc
        if offset < onset or row["event_label"] not in index:
            raise DataError(f"bad event ({onset}, {offset}, {row['event_label']!r}); offsets follow onsets, labels in {classes}.", path=csv_path, row=number)
        events.append((onset, offset, index[row["event_label"]]))
    paths = [_resolve(root, name) for name in per_file]
    if check_files:
        _check_listed([(first_row[name], path) for name, path in zip(per_file, paths, strict=True)], csv_path, "filename", root)
    return paths, list(per_file.values()), classes


class SoundEventDataset(AudioClipDataset):
    """Clips with frame targets ``(frames, classes)`` at the model's frame rate
    (``1 + samples // hop_size`` frames, PANNs' centred STFT). Clips are cropped from the
    start (no random crop: events are placed in time) and zero-padded."""

    def __init__(
        self,
        paths: Sequence[str | Path],
        events: Sequence[list[Event]],
        num_classes: int,
        sample_rate: int = 32000,
        hop_size: int = 320,
        clip_seconds: float = 10.0,
        on_error: OnError = "raise",
    ) -> None:
        super().__init__(paths, list(range(len(paths))), num_classes, False, sample_rate, clip_seconds, False, on_error)
        self.events_by_index = list(events)
        self.hop_size = hop_size

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = super().__getitem__(index)
        frames = 1 + item["input"].shape[-1] // self.hop_size  # the clip, cropped / padded to clip_seconds
        target = torch.zeros(frames, self.num_classes or 0)
        frame_rate = self.sample_rate / self.hop_size
        end = item["input"].shape[-1] / self.sample_rate
        events = self.events_by_index[self.labels[index]]  # type: ignore[index]
        for onset, offset, cls in events:
            target[int(round(onset * frame_rate)) : int(round(offset * frame_rate)) + 1, cls] = 1.0
        item["target"] = target
        # the reference events inside the clip, for the event-based test metrics (frames quantise offsets)
        item["events"] = [(onset, min(offset, end), cls) for onset, offset, cls in events if onset < end]
        return item


def collate_events(items: list[dict[str, Any]]) -> dict[str, Any]:
    """``default_collate`` with each clip's ``events`` kept as a list (their counts differ)."""
    events = [item.pop("events") for item in items] if items and "events" in items[0] else None
    batch: dict[str, Any] = default_collate(items)
    if events is not None:
        batch["events"] = events
    return batch


class SoundEventDataModule(AudioDataModule):
    """Sound event detection from DCASE-style event lists (``filename, onset, offset,
    event_label``) for :class:`~polyfm.audio.tasks.SoundEventDetection`. Batches carry each
    clip's reference ``events`` (for the test split's event-based metrics) beside the frame
    ``target``.

    ``fold`` (0 .. ``num_folds`` - 1): cross-validation over the ``train`` list's files
    (:func:`polyfm.core.data.fold_indices` grouped by file, seeded by ``fold_seed``): all of a
    file's events stay on one side; the held-out fold is the validation split, and the test
    split too unless ``test`` is given."""

    def __init__(
        self,
        train: str,
        val: str | None = None,
        test: str | None = None,
        predict: str | None = None,
        predict_clip_seconds: float | None = None,
        predict_chunk_seconds: float | None = None,
        predict_chunk_overlap_seconds: float | None = None,
        audio_root: str | None = None,
        sample_rate: int = 32000,
        hop_size: int = 320,
        clip_seconds: float = 10.0,
        fold: int | None = None,
        num_folds: int = 5,
        fold_seed: int = 0,
        on_error: OnError = "raise",
        batch_size: int = 16,
        num_workers: int = 0,
        label_fraction: float = 1.0,
        seed: int = 0,
    ) -> None:
        super().__init__(False, batch_size, num_workers, label_fraction, seed, predict, predict_clip_seconds,
                         predict_chunk_seconds, predict_chunk_overlap_seconds)
        if fold is not None and val is not None:
            raise ConfigError(f"SoundEventDataModule: fold={fold} holds out files of {train} as the validation split; leave val unset (got val={val!r})")
        self.train, self.val, self.test, self.audio_root = train, val, test, audio_root
        self.sample_rate, self.hop_size, self.clip_seconds, self.on_error = sample_rate, hop_size, clip_seconds, on_error
        self.fold, self.num_folds, self.fold_seed = fold, num_folds, fold_seed
        self.collate_fn = collate_events

    def build(self) -> tuple[SoundEventDataset, SoundEventDataset | None, SoundEventDataset | None]:
        rows = self.on_error == "raise"
        paths, events, self.class_names = read_events_csv(self.train, self.audio_root, check_files=rows)

        def make(p: list[Path], e: list[list[Event]]) -> SoundEventDataset:
            return SoundEventDataset(p, e, len(self.class_names), self.sample_rate, self.hop_size, self.clip_seconds, self.on_error)

        if self.fold is not None:
            # one group per file (resolved, so "a.wav" and "./a.wav" are one file): its events never straddle the split
            groups = [str(p.resolve()) for p in paths]
            train_idx, held_idx = fold_indices(len(paths), self.num_folds, self.fold, groups, seed=self.fold_seed)
            held_out = make([paths[i] for i in held_idx], [events[i] for i in held_idx])
            test = make(*read_events_csv(self.test, self.audio_root, self.class_names, check_files=rows)[:2]) if self.test else held_out
            log.info("SED fold %d of %d: %d files train, %d held out for validation%s", self.fold, self.num_folds, len(train_idx), len(held_idx),
                     "" if self.test else " and test")
            return make([paths[i] for i in train_idx], [events[i] for i in train_idx]), held_out, test

        splits = [read_events_csv(s, self.audio_root, self.class_names, check_files=rows) if s else None for s in (self.val, self.test)]
        return make(paths, events), *(make(s[0], s[1]) if s else None for s in splits)  # type: ignore[return-value]

    def train_labels(self) -> list[Any] | None:
        return None
