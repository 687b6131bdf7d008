"""Chunked whole-file prediction for long recordings (``predict_chunk_seconds``).

A file is cut into chunks of ``chunk`` samples (at the model's rate) that overlap by at least
``overlap`` samples; each chunk is decoded on its own (soundfile seeks to it), resampled with a
margin that is then trimmed, so that its samples equal the whole file's resampled samples, and
run through the model. :class:`~polyfm.audio.predict.AudioPredictionWriter` puts the chunks'
framewise outputs back on one timeline at the model's frame rate, centre-cropped: each frame
comes from the chunk in which it lies furthest from an edge (where the CNN's zero padding and
the front end's reflect padding stand in for the neighbouring audio). Memory is bounded by the
chunk (and ``batch_size`` chunks), not by the file's length; what grows with the file is the
stitched ``(frames, classes)`` output the event post-processing reads (100 frames/s x classes
x 4 bytes).

The clip output of a chunked file (in the writer): for sound event detection the max over the
stitched frames, which is what the model computes whole (its clip output is the max over
segments, and its frames repeat the segments), so the two agree as the frames do; for models
without frames (Cnn14 tagging or classification, whose clip output pools max + mean over the
whole time axis before its head, which chunks cannot reproduce) the chunks' outputs averaged,
each weighted by the frames it keeps (multi-class probabilities stay a distribution).

Chunk starts are multiples of ``hop_size * pooling`` samples (Cnn14: 320 x 32 = 0.32 s), so
every chunk's frames and segments (Cnn14_DecisionLevelMax repeats one segment output over 32
frames) sit on the whole file's grid: away from chunk edges the outputs are the whole file's.
"""

from __future__ import annotations

import logging
import math
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


class ChunkedAudioDataset(Dataset[dict[str, Any]]):
    """The chunks of every file in ``paths``, in order: ``{"input": (samples,), "meta": path,
    "chunk": LongTensor [file, chunk, chunks, keep_from, keep_to, first_frame, frames]}``
    (``first_frame``: the file frame of the chunk's frame 0; ``frames``: the whole file's
    frame count). Only headers are read here; :func:`read_span` decodes each chunk when
    asked. A file shorter than ``min_samples`` is one chunk zero-padded to it, as whole-file
    prediction pads it."""

    def __init__(self, paths: list[Path], sample_rate: int, chunk: int, overlap: int, hop: int, align: int, min_samples: int = 0) -> None:
        from polyfm.audio.data import check_audio_header

        self.paths, self.sample_rate, self.hop, self.min_samples = list(paths), sample_rate, hop, min_samples
        self.chunks: list[tuple[int, int, ChunkSpan, int]] = []  # (file, chunk number, span, file frames)
        self.counts: list[int] = []
        for number, path in enumerate(self.paths):
            # missing, undecodable, truncated or empty files: a DataError naming the file (not libsndfile's own)
            info = check_audio_header(path)
            samples = resampled_length(info.frames, info.samplerate, sample_rate)
            padded = max(samples, min_samples) if samples <= chunk else samples
            spans = plan_chunks(samples, chunk, overlap, hop, align)
            if len(spans) == 1:
                spans = [ChunkSpan(0, samples, 0, file_frames(padded, hop))]
            self.counts.append(len(spans))
            self.chunks.extend((number, index, span, file_frames(padded, hop)) for index, span in enumerate(spans))

    def __len__(self) -> int:
        return len(self.chunks)

    def length_key(self, index: int) -> tuple[int]:
        """Chunks of equal length batch together (the same key :class:`~polyfm.audio.data.LengthBatchSampler` groups by)."""
        span = self.chunks[index][2]
        return (max(span.stop - span.start, self.min_samples),)

    def __getitem__(self, index: int) -> dict[str, Any]:
        number, chunk, span, frames = self.chunks[index]
        waveform = read_span(self.paths[number], span.start, span.stop, self.sample_rate)
        if waveform.shape[0] < self.min_samples:
            waveform = torch.nn.functional.pad(waveform, (0, self.min_samples - waveform.shape[0]))
        info = [number, chunk, self.counts[number], span.keep_from, span.keep_to, span.start // self.hop, frames]
        return {"input": waveform, "meta": str(self.paths[number]), "chunk": torch.tensor(info, dtype=torch.long)}


__all__ = ["ChunkGeometry", "ChunkSpan", "ChunkedAudioDataset", "chunk_geometry", "DEFAULT_OVERLAP_FRAMES", "REACH_FRAMES", "file_frames", "plan_chunks", "read_span", "resampled_length"]
