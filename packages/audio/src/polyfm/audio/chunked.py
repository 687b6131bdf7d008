"""Chunked whole-file prediction for long recordings (``predict_chunk_seconds``).

A file is cut into chunks of ``chunk`` samples (at the model's rate) that overlap by at least
``overlap`` samples; each chunk is decoded on its own (soundfile seeks to it), resampled with a
margin that is then trimmed, so that its samples equal the whole file's resampled samples, and
run through the model's trunk (:meth:`~polyfm.audio.models.base.PannsModel.time_map`). The
chunks' time maps (one step per ``pooling`` frames) are joined on the file's grid, centre-cropped:
each step comes from the chunk in which it lies furthest from an edge (where the CNN's zero
padding and the front end's reflect padding stand in for the neighbouring audio), and the
model's head runs once on the joined map (:func:`stitch_time_map`, then ``head_from_map``). So
the clip pooling (max + mean over time) and the SED model's segment smoothing see the whole
file: every output (clip, logits, embedding, framewise, segments) is the whole file's, for every
family. A task's own head (a fine-tuned classifier, the SED task's segment head) then runs on
those outputs as on a whole file's: a data module's chunked batches hold a :class:`ChunkedInput`
in place of waveforms, which the PANNs model's ``forward`` takes.

Memory is bounded by the chunk (``batch_size`` chunks at a time), not by the file's length;
what grows with the file is the stitched map (Cnn14: 2048 x 4 bytes per 0.32 s, 92 MB an hour)
and the ``(frames, classes)`` output the event post-processing reads (100 frames/s x classes x 4 bytes).

Chunk starts are multiples of ``hop_size * pooling`` samples (Cnn14: 320 x 32 = 0.32 s), so
every chunk's frames and segments (Cnn14_DecisionLevelMax repeats one segment output over 32
frames) sit on the whole file's grid: away from chunk edges the outputs are the whole file's.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import soundfile as sf
import torch
from torch.utils.data import Dataset

from polyfm.core.errors import ConfigError, DataError

log = logging.getLogger(__name__)

#: how far (in frames) a Cnn14_DecisionLevelMax frame output sees to either side: beyond 192
#: frames of a chunk's edge its outputs equal the whole file's to float rounding (measured:
#: 2e-5 at 128 frames, 6e-8 from 192 on, random weights and BatchNorm statistics)
REACH_FRAMES = 192
#: chunk overlap when ``predict_chunk_overlap_seconds`` is not given (4 s at PANNs' 10 ms hop):
#: the centre cut leaves every kept frame at least 200 frames from a chunk edge
DEFAULT_OVERLAP_FRAMES = 400


class ChunkSpan(NamedTuple):
    """One chunk: samples ``[start, stop)`` at the model's rate; it writes its local frames
    ``[keep_from, keep_to)`` to the file's frames ``start // hop + keep_from ...``."""

    start: int
    stop: int
    keep_from: int
    keep_to: int


class ChunkGeometry(NamedTuple):
    """How a model's input is cut: ``chunk`` samples overlapping by ``overlap``, starts on multiples
    of ``align`` (``hop`` x the model's pooling), all at ``rate``."""

    rate: int
    chunk: int
    overlap: int
    hop: int
    align: int


def chunk_geometry(model: Any, chunk_seconds: float, overlap_seconds: float | None,
                   names: tuple[str, str] = ("predict_chunk_seconds", "predict_chunk_overlap_seconds")) -> ChunkGeometry:
    """Chunks of ``chunk_seconds`` overlapping by ``overlap_seconds`` (None: the default 400 frames,
    at most half a chunk) on the grid of the PANNs ``model``; ``names`` are the options as the
    caller takes them, for the errors. Refuses chunks shorter than the model takes or that do
    not advance by its grid; warns when the overlap is under twice the model's reach."""
    if not hasattr(model, "frontend"):
        raise ConfigError(f"{names[0]} cuts files on the model's frame grid: it needs a PANNs model "
                          f"(got {type(model).__name__ if model is not None else 'no model'}), or leave {names[0]} unset")
    if not chunk_seconds > 0:
        raise ConfigError(f"{names[0]} must be positive seconds; got {chunk_seconds}")
    if overlap_seconds is not None and not 0 <= overlap_seconds < chunk_seconds:
        raise ConfigError(f"{names[1]} must be 0 or more seconds and less than {names[0]} ({chunk_seconds}): chunks have to advance; "
                          f"got {overlap_seconds}")
    rate, hop = int(model.sample_rate), int(model.frontend.hop_size)
    align = hop * int(getattr(model, "pooling", 1))
    chunk = int(round(chunk_seconds * rate))
    if overlap_seconds is None:  # the default, unless the chunk is too short for it
        overlap = min(DEFAULT_OVERLAP_FRAMES * hop, chunk // 2)
    else:
        overlap = int(round(overlap_seconds * rate))
    overlap_seconds = overlap / rate
    minimum = max(int(model.min_samples()) if hasattr(model, "min_samples") else 0, 0) + align
    if chunk < minimum or chunk - overlap < align:
        raise ConfigError(
            f"{names[0]}={chunk_seconds} with {names[1]}={overlap_seconds}: {type(model).__name__} "
            f"needs chunks of at least {minimum / rate:.2f} s that advance by at least its {align / rate:.2f} s grid "
            f"(hop_size x {align // hop}); give a longer chunk or a smaller overlap")
    if overlap < 2 * REACH_FRAMES * hop:
        log.warning("%s=%g is under %g s (twice the %d frames %s sees to either side): outputs within %g s "
                    "of the chunk boundaries differ from whole-file ones", names[1], overlap_seconds, 2 * REACH_FRAMES * hop / rate,
                    REACH_FRAMES, type(model).__name__, REACH_FRAMES * hop / rate)
    return ChunkGeometry(rate, chunk, overlap, hop, align)


def file_frames(samples: int, hop: int) -> int:
    """PANNs' centred frames of ``samples``: ``1 + samples // hop``."""
    return 1 + samples // hop


def plan_chunks(samples: int, chunk: int, overlap: int, hop: int, align: int) -> list[ChunkSpan]:
    """The chunks of a file of ``samples`` samples: starts every ``step`` samples (``chunk -
    overlap`` rounded down to a multiple of ``align``), the last chunk moved back so that it
    ends at the file's end (starting on the grid too, so it is ``chunk - align`` to ``chunk``
    long); a file no longer than ``chunk`` is one chunk. Each pair of neighbours splits their
    overlap in the middle (the frame boundary both write up to / from)."""
    if align % hop:
        raise ConfigError(f"chunk alignment {align} is not a multiple of the hop {hop}")
    if samples <= chunk:
        return [ChunkSpan(0, samples, 0, file_frames(samples, hop))]
    step = (chunk - overlap) // align * align
    if step <= 0:
        raise ConfigError(f"chunks of {chunk} samples overlapping by {overlap} leave a step under the model's {align}-sample grid")
    starts = list(range(0, samples - chunk, step))  # chunks that end before the file does
    starts.append(math.ceil((samples - chunk) / align) * align)
    stops = [min(start + chunk, samples) for start in starts]
    boundaries = [0] + [(starts[i + 1] + stops[i]) // 2 // hop for i in range(len(starts) - 1)] + [file_frames(samples, hop)]
    return [ChunkSpan(start, stop, boundaries[i] - start // hop, boundaries[i + 1] - start // hop)
            for i, (start, stop) in enumerate(zip(starts, stops, strict=True))]


def resampled_length(frames: int, source_rate: int, target_rate: int) -> int:
    """How many samples the whole file has after resampling (what :func:`~polyfm.audio.data.load_audio` returns)."""
    if source_rate == target_rate:
        return frames
    gcd = math.gcd(source_rate, target_rate)
    return math.ceil(target_rate // gcd * frames / (source_rate // gcd))


def read_span(path: str | Path, start: int, stop: int, sample_rate: int) -> torch.Tensor:
    """Samples ``[start, stop)`` of ``path`` decoded, mixed down to mono and resampled to
    ``sample_rate``, equal to ``load_audio(path, sample_rate)[start:stop]`` without decoding
    the rest of the file: the source frames around the span are read (soundfile seeks), with
    a margin of the resampling filter's reach on both sides, starting on a multiple of the
    rate ratio's source step (so the resampled samples fall on the whole file's grid), and the
    margin is cut off after resampling."""
    from polyfm.audio.data import _resampler

    path = Path(path)
    try:
        with sf.SoundFile(str(path)) as handle:
            source_rate, total = handle.samplerate, handle.frames
            if source_rate == sample_rate:
                first, last, offset = start, min(stop, total), 0
            else:
                resampler = _resampler(source_rate, sample_rate)
                orig, new = resampler.orig, resampler.new
                margin = resampler.width + 2 * orig  # the kernel reaches width + orig source samples
                first = max(0, (start * orig // new - margin) // orig * orig)
                last = min(total, -(-stop * orig // new) + margin)
                offset = start - first * new // orig  # first // orig * new: where the read's first output sits
            if not handle.seekable():
                raise DataError("cannot seek in this file, so it cannot be read in chunks; convert it to WAV or FLAC, "
                                "or leave predict_chunk_seconds unset", path=path)
            handle.seek(first)
            data = handle.read(last - first, dtype="float32", always_2d=True)  # (frames, channels)
    except (sf.LibsndfileError, RuntimeError, OSError) as exc:
        raise DataError(f"cannot decode ({exc}). Re-encode it as WAV/FLAC or remove it from the manifest.", path=path) from exc
    if not np.isfinite(data).all():
        bad = np.argwhere(~np.isfinite(data))
        raise DataError(f"NaN/Inf samples (first at frame {first + int(bad[0, 0])}, channel {int(bad[0, 1])}). Fix or remove the file.", path=path)
    waveform = torch.from_numpy(data.mean(axis=1) if data.shape[1] > 1 else data[:, 0].copy())
    if source_rate != sample_rate:
        waveform = _resampler(source_rate, sample_rate)(waveform)
    span = waveform[offset : offset + stop - start]
    if span.shape[0] != stop - start:  # the header promised more frames than the file holds
        raise DataError(f"decoded {span.shape[0]} samples for samples {start}..{stop} at {sample_rate} Hz; "
                        "the file is shorter than its header says. Re-export it.", path=path)
    return span


class ChunkedInput:
    """Whole files of one decoded length, to be run chunk by chunk: what a PANNs model's ``forward``
    takes in place of a ``(batch, samples)`` waveform (chunked prediction's batches, ``tag_file``
    with ``chunk_seconds``); the model stitches the chunks' time maps (:func:`stitch_time_map`)
    and returns each file's whole-file outputs. Every file shares the chunk plan ``spans``;
    ``frames`` is each file's log-mel frame count as whole (after padding to ``min_samples``).
    Chunks run ``batch_size`` at a time, so memory is bounded by the chunk, not the file.

    A plain class, not a tensor, dataclass or tuple: Lightning's batch transfer and collation
    leave it as it is (the model reads and moves each chunk itself)."""

    def __init__(self, paths: Sequence[Path], spans: Sequence[ChunkSpan], frames: int, rate: int, hop: int,
                 min_samples: int = 0, batch_size: int = 1) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch_size must be 1 or more chunks, got {batch_size}")
        self.paths, self.spans, self.frames = list(paths), list(spans), frames
        self.rate, self.hop, self.min_samples, self.batch_size = rate, hop, min_samples, batch_size

    def __len__(self) -> int:
        return len(self.paths)

    def __repr__(self) -> str:
        return f"ChunkedInput({len(self.paths)} files, {len(self.spans)} chunks each, {self.frames} frames)"

    @staticmethod
    def join(parts: Sequence[ChunkedInput]) -> ChunkedInput:
        """One input of several files' (a batch of files of one length, which share a chunk plan)."""
        first = parts[0]
        for part in parts[1:]:
            if (part.spans, part.frames, part.rate, part.hop) != (first.spans, first.frames, first.rate, first.hop):
                raise ValueError(f"cannot batch {part.paths} with {first.paths}: their chunk plans differ (batch files of equal length only)")
        return ChunkedInput([p for part in parts for p in part.paths], first.spans, first.frames, first.rate, first.hop,
                            first.min_samples, first.batch_size)

    def batches(self) -> Iterator[tuple[list[tuple[int, ChunkSpan]], torch.Tensor]]:
        """``([(file, span)...], waveforms (n, samples))``: every chunk of every file, chunk by chunk
        (so the last, shorter chunks batch together), at most ``batch_size`` of one length at a time,
        decoded by :func:`read_span` (a file shorter than ``min_samples`` zero-padded to it)."""
        jobs = [(number, span) for span in self.spans for number in range(len(self.paths))]
        group: list[tuple[int, ChunkSpan]] = []
        for job in jobs:
            if group and (len(group) == self.batch_size or self._length(job[1]) != self._length(group[-1][1])):
                yield group, self._read(group)
                group = []
            group.append(job)
        if group:
            yield group, self._read(group)

    def _length(self, span: ChunkSpan) -> int:
        return max(span.stop - span.start, self.min_samples)

    def _read(self, group: list[tuple[int, ChunkSpan]]) -> torch.Tensor:
        waveforms = []
        for number, span in group:
            waveform = read_span(self.paths[number], span.start, span.stop, self.rate)
            if waveform.shape[0] < self.min_samples:
                waveform = torch.nn.functional.pad(waveform, (0, self.min_samples - waveform.shape[0]))
            waveforms.append(waveform)
        return torch.stack(waveforms)


def stitch_time_map(model: Any, files: ChunkedInput, log_mel: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The time maps of ``files`` as whole, ``(files, channels, frames // pooling)``, from their
    chunks: each chunk runs through ``model.time_map`` (the trunk, averaged over mel bins: one step
    per ``pooling`` frames, 0.32 s for the Cnn14 family), and the steps whose first frame the chunk
    keeps (the centre cut of the overlaps; chunks start on the hop x pooling grid, so the steps
    partition the file's) are joined in order. ``model.head_from_map(map, files.frames)`` then gives
    every whole-file output: the clip pooling (max + mean over time) and the SED model's segment
    smoothing see the whole file. With ``log_mel`` also the front end's log-mel of the kept frames,
    ``(files, frames, mel_bins)``. The single implementation behind chunked ``tag_file`` /
    ``plot_framewise`` and a PANNs model's ``forward`` on a :class:`ChunkedInput` (chunked ``predict``)."""
    device = next(model.parameters()).device
    hop, pooling = files.hop, int(getattr(model, "pooling", 1))
    maps: list[list[torch.Tensor]] = [[] for _ in files.paths]
    mels: list[list[torch.Tensor]] = [[] for _ in files.paths]
    for group, waveforms in files.batches():
        waveforms = waveforms.to(device)
        local = model.time_map(waveforms)  # (n, C, steps), step i at file step start // hop // pooling + i
        spectra = model.frontend(waveforms) if log_mel else None
        for row, (number, span) in enumerate(group):
            first_frame = span.start // hop
            first = first_frame // pooling
            maps[number].append(local[row, :, (first_frame + span.keep_from) // pooling - first : (first_frame + span.keep_to) // pooling - first])
            if spectra is not None:
                mels[number].append(spectra[row, 0, span.keep_from : span.keep_to].cpu())
    stitched = torch.stack([torch.cat(pieces, dim=1) for pieces in maps])
    return stitched, torch.stack([torch.cat(pieces) for pieces in mels]) if log_mel else None


class ChunkedAudioDataset(Dataset[dict[str, Any]]):
    """Every file in ``paths`` as a :class:`ChunkedInput` of one file: ``{"input": ChunkedInput,
    "meta": path}``; :func:`collate_chunked` joins files of one length into a batch (as
    :class:`~polyfm.audio.data.LengthBatchSampler` groups them). Only headers are read here; the
    model decodes each chunk when it runs (:meth:`ChunkedInput.batches`). A file no longer than a
    chunk is one chunk; shorter than ``min_samples``, zero-padded to it, as whole-file prediction
    pads it. ``batch_size``: chunks per forward."""

    def __init__(self, paths: list[Path], sample_rate: int, chunk: int, overlap: int, hop: int, align: int, min_samples: int = 0,
                 batch_size: int = 1) -> None:
        from polyfm.audio.data import check_audio_header

        self.paths, self.sample_rate, self.hop, self.min_samples = list(paths), sample_rate, hop, min_samples
        self.files: list[ChunkedInput] = []
        self.samples: list[int] = []
        for path in self.paths:
            # missing, undecodable, truncated or empty files: a DataError naming the file (not libsndfile's own)
            info = check_audio_header(path)
            samples = resampled_length(info.frames, info.samplerate, sample_rate)
            padded = max(samples, min_samples) if samples <= chunk else samples
            spans = plan_chunks(samples, chunk, overlap, hop, align)
            if len(spans) == 1:
                spans = [ChunkSpan(0, samples, 0, file_frames(padded, hop))]
            self.samples.append(samples)
            self.files.append(ChunkedInput([path], spans, file_frames(padded, hop), sample_rate, hop, min_samples, batch_size))

    def __len__(self) -> int:
        return len(self.files)

    def length_key(self, index: int) -> tuple[int]:
        """Files of one decoded length have one chunk plan, so they batch together."""
        return (self.samples[index],)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"input": self.files[index], "meta": str(self.paths[index])}


def collate_chunked(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """A batch of :class:`ChunkedAudioDataset` items: one :class:`ChunkedInput` and the paths."""
    return {"input": ChunkedInput.join([item["input"] for item in items]), "meta": [item["meta"] for item in items]}


__all__ = ["ChunkGeometry", "ChunkSpan", "ChunkedAudioDataset", "ChunkedInput", "chunk_geometry", "collate_chunked", "stitch_time_map", "DEFAULT_OVERLAP_FRAMES", "REACH_FRAMES", "file_frames", "plan_chunks", "read_span", "resampled_length"]
