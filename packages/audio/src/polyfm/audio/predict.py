"""What ``polyfm predict`` writes for audio: a table of clip predictions and, for sound event
detection, a DCASE event list post-processed as the DCASE baselines do.

:class:`AudioPredictionWriter` is the Lightning callback of the fine-tuning recipes.
:func:`detect_events` turns ``(frames, classes)`` probabilities into ``(onset, offset, label)``
events: per-class median filtering (window in seconds), a threshold with optional hysteresis
(an event starts at ``threshold`` and lasts while the probability stays at or above
``offset_threshold``), merging of events closer than a minimum gap, then removal of events
shorter than a minimum duration (dcase_util's ``process_events`` order: merge, then drop).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import lightning as L
import pandas as pd
import soundfile as sf
import torch
import torch.nn.functional as F

from polyfm.core.errors import ConfigError
from polyfm.core.predict import PredictionFileWriter

#: seconds compared with this tolerance, so that 3 frames of 10 ms count as 0.03 s
TIME_TOLERANCE = 1e-9
#: the median filter unfolds at most this many values at once (frames x window x classes)
MEDIAN_CHUNK_ELEMENTS = 32_000_000


class EventRun(NamedTuple):
    """One detected event: frames ``[start, stop)`` of class ``cls``, times in seconds."""

    cls: int
    start: int
    stop: int
    onset: float
    offset: float


def median_window_frames(seconds: float, hop_seconds: float) -> int:
    """A median window of ``seconds`` in frames: rounded to the nearest odd count (a median
    centred on its frame), at least 1 (no filtering)."""
    frames = max(1, int(round(seconds / hop_seconds)))
    return frames if frames % 2 else frames + 1


def median_filter(framewise: torch.Tensor, windows: Sequence[int]) -> torch.Tensor:
    """Median over time of each class of ``(frames, classes)`` probabilities, class ``c`` over
    ``windows[c]`` frames (odd; 1 leaves the class as is). Edges repeat the first / last frame
    (scipy.ndimage's ``mode="nearest"``), so an event at the file's start or end keeps its edge."""
    if len(windows) != framewise.shape[1]:
        raise ConfigError(f"median_filter: {len(windows)} windows for {framewise.shape[1]} classes")
    filtered = framewise.clone()
    by_window: dict[int, list[int]] = {}
    for cls, window in enumerate(windows):
        if window % 2 == 0:
            raise ConfigError(f"median_filter: class {cls} has an even window of {window} frames; give an odd count")
        if window > 1:
            by_window.setdefault(window, []).append(cls)
    frames = framewise.shape[0]
    for window, classes in by_window.items():
        half, chunk = window // 2, max(1, MEDIAN_CHUNK_ELEMENTS // max(1, frames * window))  # bounded memory for long files
        for first in range(0, len(classes), chunk):
            columns = classes[first : first + chunk]
            padded = F.pad(framewise[:, columns].T[None], (half, half), mode="replicate")[0]  # (classes, frames + window - 1)
            filtered[:, columns] = padded.unfold(1, window, 1).median(dim=-1).values.T
    return filtered


def filtered_at_or_above(framewise: torch.Tensor, threshold: float, windows: Sequence[int]) -> torch.Tensor:
    """``median_filter(framewise, windows) >= threshold``, without sorting: a median of an odd
    window is at or above ``threshold`` exactly when more than half of the window is, so each
    class is a moving count of the thresholded frames (the same edges as :func:`median_filter`):
    linear in the frames, where sorting every window of a 10-minute, 527-class output took 16 s."""
    above = framewise >= threshold
    by_window: dict[int, list[int]] = {}
    for cls, window in enumerate(windows):
        if window % 2 == 0:
            raise ConfigError(f"median filter: class {cls} has an even window of {window} frames; give an odd count")
        if window > 1:
            by_window.setdefault(window, []).append(cls)
    everything = len(by_window) == 1 and sum(map(len, by_window.values())) == above.shape[1]
    for window, classes in by_window.items():
        half = window // 2
        counted = (above if everything else above[:, classes]).to(torch.int32)  # (frames, classes), time contiguous
        padded = torch.cat([counted[:1].expand(half, -1), counted, counted[-1:].expand(half, -1)])  # edges repeat
        cumulative = F.pad(torch.cumsum(padded, dim=0, dtype=torch.int32), (0, 0, 1, 0))
        majority = (cumulative[window:] - cumulative[:-window]) > half
        if everything:
            above = majority
        else:
            above[:, classes] = majority
    return above


def event_runs(
    framewise: torch.Tensor,
    hop_seconds: float,
    threshold: float = 0.5,
    end: float | None = None,
    offset_threshold: float | None = None,
    median_frames: Sequence[int] | None = None,
    min_event_seconds: float = 0.0,
    min_gap_seconds: float = 0.0,
) -> list[EventRun]:
    """The events of ``(frames, classes)`` probabilities, sorted by onset then class (see
    :func:`detect_events` for the steps). Frame ``i`` starts at ``i * hop_seconds`` (PANNs'
    centred frames); onsets and offsets are cut at ``end`` (the file's length)."""
    windows = list(median_frames) if median_frames is not None else [1] * framewise.shape[1]
    if len(windows) != framewise.shape[1]:
        raise ConfigError(f"event_runs: {len(windows)} median windows for {framewise.shape[1]} classes")
    low = offset_threshold if offset_threshold is not None else threshold
    # a class with no frame at the offset threshold has no event, filtered or not: skip it (most of AudioSet's 527)
    active = torch.nonzero((framewise >= low).any(dim=0)).flatten().tolist()
    if not active:
        return []
    probabilities, windows = framewise[:, active].float(), [windows[c] for c in active]
    # runs of frames at or above the offset threshold that reach the onset threshold somewhere
    above_low = filtered_at_or_above(probabilities, low, windows).T.to(torch.int8)  # (classes, frames)
    edges = torch.diff(above_low, dim=1, prepend=torch.zeros_like(above_low[:, :1]), append=torch.zeros_like(above_low[:, :1]))
    starts, stops = (edges == 1).nonzero(), (edges == -1).nonzero()  # (runs, [class, frame]), row-major: they pair up
    above_high = filtered_at_or_above(probabilities, threshold, windows).to(torch.int32)
    high = F.pad(torch.cumsum(above_high, dim=0, dtype=torch.int32), (0, 0, 1, 0))  # high[i] = count of frames < i
    classes, first, last = starts[:, 0], starts[:, 1], stops[:, 1]
    reaches_onset = high[last, classes] > high[first, classes]
    by_class: dict[int, list[list[float]]] = {}
    for column, start, stop in zip(classes[reaches_onset].tolist(), first[reaches_onset].tolist(), last[reaches_onset].tolist(), strict=True):
        cls, onset, offset = active[column], start * hop_seconds, stop * hop_seconds
        if end is not None:
            onset, offset = min(onset, end), min(offset, end)
        events = by_class.setdefault(cls, [])
        if events and onset - events[-1][3] < min_gap_seconds - TIME_TOLERANCE:
            events[-1][1], events[-1][3] = stop, offset  # merge across a short gap
        else:
            events.append([start, stop, onset, offset])
    found = [
        EventRun(cls, int(start), int(stop), round(onset, 6), round(offset, 6))
        for cls, events in by_class.items()
        for start, stop, onset, offset in events
        if offset > onset and offset - onset >= min_event_seconds - TIME_TOLERANCE
    ]
    return sorted(found, key=lambda e: (e.onset, e.cls, e.offset))


def detect_events(
    framewise: torch.Tensor,
    hop_seconds: float,
    class_names: Sequence[str],
    threshold: float = 0.5,
    end: float | None = None,
    offset_threshold: float | None = None,
    median_filter_seconds: float | Sequence[float] = 0.0,
    min_event_seconds: float = 0.0,
    min_gap_seconds: float = 0.0,
) -> list[tuple[float, float, str]]:
    """``(onset, offset, label)`` events in seconds from ``(frames, classes)`` probabilities:

    1. per-class median filter over ``median_filter_seconds`` (one number, or one per class;
       0 = none), see :func:`median_window_frames`;
    2. frames at or above ``threshold`` start an event, which lasts while the filtered
       probability stays at or above ``offset_threshold`` (hysteresis; default: ``threshold``);
    3. events of a class less than ``min_gap_seconds`` apart are merged;
    4. events shorter than ``min_event_seconds`` are dropped.

    Sorted by onset. Thresholding a median-filtered signal equals median-filtering the
    thresholded one (a median commutes with a monotone step), so without hysteresis this is
    the DCASE baselines' "binarise, then median filter"."""
    classes = framewise.shape[1]
    if len(class_names) != classes:
        raise ConfigError(f"detect_events: {len(class_names)} class names for {classes} classes")
    seconds = [float(median_filter_seconds)] * classes if isinstance(median_filter_seconds, int | float) else list(median_filter_seconds)
    if len(seconds) != classes:
        raise ConfigError(f"median_filter_seconds has {len(seconds)} windows for {classes} classes {list(class_names)[:8]}")
    frames = [median_window_frames(s, hop_seconds) for s in seconds]
    runs = event_runs(framewise, hop_seconds, threshold, end, offset_threshold, frames, min_event_seconds, min_gap_seconds)
    return [(round(e.onset, 4), round(e.offset, 4), str(class_names[e.cls])) for e in runs]


class AudioPredictionWriter(PredictionFileWriter):
    """Writes what ``predict`` returns to files a user opens with pandas or a spreadsheet.

    ``output`` (default ``<default_root_dir>/predictions/predictions.csv``): one row per input
    file, in input order: ``file`` (the path read), the decision (multi-class: ``prediction``
    and its ``probability``; multi-label and sound event detection: ``labels``, the classes at
    or above ``threshold`` (default: the task's ``threshold``, else 0.5) joined by ``;``, so the
    file reads back as a manifest), the source file's ``duration_s`` and ``sample_rate``, then
    one probability column per class name (regression: one column per target). From an
    :class:`~polyfm.core.predict.Ensemble` each of those columns gets a ``<column>_std``
    beside it (the members' spread), and multi-class a ``probability_std``.

    Sound event detection also writes ``<output stem>_events.tsv`` in DCASE's ``filename,
    onset, offset, event_label`` (what :func:`~polyfm.audio.data.read_events_csv` reads; a
    file without events gets a row with empty fields), post-processed by
    :func:`detect_events` with ``median_filter_seconds`` (one window for every class, or a
    mapping class name -> seconds; classes not named are not filtered), ``offset_threshold``
    (hysteresis), ``min_gap_seconds`` and ``min_event_seconds``; from an ensemble with a
    ``probability_std`` column, the members' spread averaged over the event's frames.

    Files predicted in chunks (the data module's ``predict_chunk_seconds``, :mod:`polyfm.audio.chunked`)
    arrive as whole files: the model stitches each file's chunks before its head, so the writer
    sees (and writes) the whole file's outputs, as without chunks.

    Class names come from the task (``class_names``), else the DataModule, else ``0 .. C-1``.
    Files are written once, at the end of the run, atomically; a multi-process run is
    refused (each process would hold only its share of the rows).
    """

    one_process: ClassVar[bool] = True

    def __init__(
        self,
        output: str | None = None,
        threshold: float | None = None,
        offset_threshold: float | None = None,
        median_filter_seconds: float | dict[str, float] = 0.0,
        min_event_seconds: float = 0.0,
        min_gap_seconds: float = 0.0,
    ) -> None:
        super().__init__(output, write_interval="batch")
        for key, value in (("threshold", threshold), ("offset_threshold", offset_threshold)):
            if value is not None and not 0.0 <= value <= 1.0:
                raise ConfigError(f"AudioPredictionWriter.{key} is a probability in [0, 1], got {value}")
        if threshold is not None and offset_threshold is not None and offset_threshold > threshold:
            raise ConfigError(f"AudioPredictionWriter.offset_threshold ({offset_threshold}) is above threshold ({threshold}): "
                              "events start at threshold and end below offset_threshold, so give offset_threshold <= threshold")
        windows = median_filter_seconds.values() if isinstance(median_filter_seconds, Mapping) else [median_filter_seconds]
        for key, value in (("min_event_seconds", min_event_seconds), ("min_gap_seconds", min_gap_seconds), *(("median_filter_seconds", w) for w in windows)):
            if value < 0:
                raise ConfigError(f"AudioPredictionWriter.{key} must be 0 or more seconds, got {value}")
        self.threshold, self.offset_threshold = threshold, offset_threshold
        self.median_filter_seconds, self.min_event_seconds, self.min_gap_seconds = median_filter_seconds, min_event_seconds, min_gap_seconds
        self.reset()

    def reset(self) -> None:
        self._rows: list[tuple[int, dict[str, Any]]] = []  # (dataset index, row): batches may come out of input order
        self._events: list[tuple[int, list[dict[str, Any]]]] | None = None  # None: not an SED model
        self._arrived = 0

    def median_seconds(self, names: Sequence[str]) -> list[float]:
        """One median window per class, from a number or a mapping of class names."""
        if not isinstance(self.median_filter_seconds, Mapping):
            return [float(self.median_filter_seconds)] * len(names)
        unknown = sorted(set(self.median_filter_seconds) - set(names))
        if unknown:
            raise ConfigError(f"AudioPredictionWriter.median_filter_seconds names {unknown}, which are not classes of the model "
                              f"{list(names)[:20]}: use the class names of predictions.csv")
        return [float(self.median_filter_seconds.get(name, 0.0)) for name in names]

    def write_on_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, prediction: Any, batch_indices: Sequence[int] | None,
                           batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        count = _batch_size(prediction)
        indices = list(batch_indices) if batch_indices is not None and len(batch_indices) == count else list(range(self._arrived, self._arrived + count))
        self._arrived += count
        files = prediction.get("meta") or [f"sample-{i}" for i in indices]
        if "framewise_output" in prediction:  # sound event detection
            key, kind = "clipwise_output", "multilabel"
        elif "probabilities" in prediction:
            key, kind = "probabilities", "multilabel" if getattr(pl_module, "multilabel", False) else "multiclass"
        elif "prediction" in prediction:
            key, kind = "prediction", "regression"
        else:
            raise TypeError(f"AudioPredictionWriter: {type(pl_module).__name__}.predict_step returned {sorted(prediction)}; expected probabilities, prediction or framewise_output.")
        scores = prediction[key].float().cpu().reshape(len(files), -1)
        spread = prediction[f"{key}_std"].float().cpu().reshape(len(files), -1) if f"{key}_std" in prediction else None
        framewise, framewise_spread = prediction.get("framewise_output"), prediction.get("framewise_output_std")
        for position, (index, file) in enumerate(zip(indices, files, strict=True)):
            frames = framewise[position].float().cpu() if framewise is not None else None
            frames_spread = framewise_spread[position].float().cpu() if framewise_spread is not None else None
            row_spread = spread[position] if spread is not None else None
            self.add_file(trainer, pl_module, kind, index, str(file), scores[position], row_spread, frames, frames_spread)

    def add_file(self, trainer: L.Trainer, pl_module: L.LightningModule, kind: str, index: int, file: str, scores: torch.Tensor,
                 spread: torch.Tensor | None, framewise: torch.Tensor | None, framewise_spread: torch.Tensor | None) -> None:
        """One file's outputs (whole, or run in chunks and stitched by the model): ``scores`` its clip output
        ``(classes,)``, ``framewise`` its ``(frames, classes)`` output (sound event detection),
        each with the ensemble's spread or None. Adds the file's row and events; a subclass
        that wants the stitched frames (to plot or save them) extends this."""
        threshold = self.threshold_for(pl_module)
        names = self.class_names(trainer, pl_module, scores.shape[0])
        fixed = {"file", "prediction", "probability", "probability_std", "labels", "duration_s", "sample_rate"}
        columns = [f"p_{n}" for n in names] if fixed & ({*names} | {f"{n}_std" for n in names}) else names  # a class named "file" keeps its own column
        row: dict[str, Any] = {"file": file}
        if kind == "multiclass":
            best = int(scores.argmax())
            row.update(prediction=names[best], probability=round(float(scores[best]), 6))
            if spread is not None:
                row["probability_std"] = round(float(spread[best]), 6)
        elif kind == "multilabel":
            row["labels"] = ";".join(n for n, p in zip(names, scores.tolist(), strict=True) if p >= threshold)
        duration, rate = _source_info(file)
        row.update(duration_s=duration, sample_rate=rate)
        for column, value, deviation in zip(columns, scores.tolist(), (spread.tolist() if spread is not None else [None] * len(columns)), strict=True):
            row[column] = round(float(value), 6)
            if deviation is not None:
                row[f"{column}_std"] = round(float(deviation), 6)
        self._rows.append((index, row))
        if framewise is not None:
            self._add_events(pl_module, framewise, framewise_spread, index, file, names, threshold, duration)

    def threshold_for(self, pl_module: Any) -> float:
        """The onset threshold in use: this writer's, else the task's ``threshold``, else 0.5."""
        return self.threshold if self.threshold is not None else float(getattr(pl_module, "threshold", 0.5))

    def post_process(self, pl_module: Any, framewise: torch.Tensor, names: Sequence[str], threshold: float, end: float | None) -> list[EventRun]:
        """The events of one file's ``(frames, classes)`` probabilities after this writer's
        post-processing: what the event list holds, and what ``SoundEventDetection`` scores in
        ``test`` (so the test metrics describe the events ``predict`` writes)."""
        base = pl_module.encoder_base()
        hop_seconds = base.frontend.hop_size / base.sample_rate
        frames = [median_window_frames(s, hop_seconds) for s in self.median_seconds(names)]
        offset_threshold = self.offset_threshold
        if offset_threshold is not None and offset_threshold > threshold:
            raise ConfigError(f"AudioPredictionWriter.offset_threshold ({offset_threshold}) is above the threshold in use ({threshold}, "
                              "the task's): give offset_threshold <= threshold")
        return event_runs(framewise.float().cpu(), hop_seconds, threshold, end, offset_threshold, frames, self.min_event_seconds, self.min_gap_seconds)

    def _add_events(self, pl_module: Any, framewise: torch.Tensor, spread: torch.Tensor | None, index: int, file: str, names: list[str],
                    threshold: float, duration: Any) -> None:
        end = duration if isinstance(duration, float) else None
        runs = self.post_process(pl_module, framewise, names, threshold, end)
        rows = []
        for run in runs:
            row: dict[str, Any] = {"filename": file, "onset": round(run.onset, 4), "offset": round(run.offset, 4), "event_label": names[run.cls]}
            if spread is not None:  # the members' disagreement over the event's frames
                row["probability_std"] = round(float(spread[run.start : run.stop, run.cls].float().mean()), 6)
            rows.append(row)
        self._events = self._events if self._events is not None else []
        self._events.append((index, rows or [{"filename": file, "onset": "", "offset": "", "event_label": ""}]))

    def finish(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._rows:
            return
        path = self.output_file(trainer, "predictions.csv")
        rows = [row for _, row in sorted(self._rows, key=lambda item: item[0])]
        columns = list(dict.fromkeys(key for row in rows for key in row))
        self.write_table(path, pd.DataFrame(rows, columns=columns).fillna(""))
        if self._events is not None:
            events = [row for _, group in sorted(self._events, key=lambda item: item[0]) for row in group]
            header = list(dict.fromkeys(["filename", "onset", "offset", "event_label", *(key for row in events for key in row)]))
            self.write_table(path.with_name(f"{path.stem}_events.tsv"), pd.DataFrame(events, columns=header).fillna(""), sep="\t")


def _batch_size(prediction: dict[str, Any]) -> int:
    for key in ("clipwise_output", "probabilities", "prediction"):
        if isinstance(prediction.get(key), torch.Tensor):
            return int(prediction[key].shape[0])
    return len(prediction.get("meta") or [])


def _source_info(file: str) -> tuple[float | str, int | str]:
    """Duration and sample rate of the file as stored (before resampling); blank when not a file."""
    if not Path(file).is_file():
        return "", ""
    try:
        info = sf.info(file)
    except (sf.LibsndfileError, RuntimeError, OSError):
        return "", ""
    return round(info.frames / info.samplerate, 4), int(info.samplerate)


__all__ = ["AudioPredictionWriter", "detect_events", "event_runs", "median_filter", "median_window_frames", "EventRun"]
