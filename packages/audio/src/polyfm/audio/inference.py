"""Tag a file, plot its framewise output, write a fine-tuned model's predictions to files.

``tag_file`` runs any PANNs model on one file (decoded, mixed down and resampled to the
model's rate) and returns the top classes; ``plot_framewise`` draws the log-mel and the
framewise probabilities of the top classes of a sound event detection model to a PNG
(matplotlib is needed for the plot only). ``AudioPredictionWriter`` is the Lightning
callback behind ``polyfm predict``: one CSV row per input file (class probabilities by
name) and, for sound event detection, a DCASE event list.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Any

import soundfile as sf
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info

from polyfm.audio.data import CSV_ENCODING, fix_length, load_audio
from polyfm.core.errors import DataError

log = logging.getLogger(__name__)


def audioset_labels(csv_path: str | Path) -> list[str]:
    """Display names from AudioSet's ``class_labels_indices.csv`` (``index,mid,display_name``)."""
    with open(csv_path, newline="", encoding=CSV_ENCODING) as handle:
        rows = list(csv.DictReader(handle))
    if not rows or "display_name" not in rows[0]:
        raise DataError("expected columns index, mid, display_name (AudioSet's class_labels_indices.csv).", path=csv_path)
    return [row["display_name"] for row in sorted(rows, key=lambda r: int(r["index"]))]


@torch.no_grad()
def tag_file(model: torch.nn.Module, path: str | Path, class_names: list[str] | None = None, top_k: int = 10) -> dict[str, Any]:
    """Clip-level tags of one file: ``{"tags": [(name, probability)...], "output": forward dict}``.

    A file shorter than the model takes (``model.min_samples()``: Cnn14 needs 32 frames,
    0.31 s) is zero-padded at the end to that length, as the DataModules pad to
    ``clip_seconds``; PANNs' own inference script fails on such files (16% of FSDD)."""
    model.eval()
    device = next(model.parameters()).device
    waveform = load_audio(path, sample_rate=model.sample_rate)
    minimum = model.min_samples() if hasattr(model, "min_samples") else 0
    if waveform.shape[-1] < minimum:
        log.info("%s: %d samples, zero-padded to %d (the shortest clip %s takes)", path, waveform.shape[-1], minimum, type(model).__name__)
        waveform = fix_length(waveform, minimum)
    waveform = waveform[None].to(device)
    out = model(waveform)
    probabilities = out["clipwise_output"][0].float().cpu()
    names = class_names or [str(i) for i in range(len(probabilities))]
    order = torch.argsort(probabilities, descending=True)[:top_k].tolist()
    return {"tags": [(names[i], float(probabilities[i])) for i in order], "output": {k: v.cpu() for k, v in out.items()}, "waveform": waveform.cpu()}


@torch.no_grad()
def extract_embeddings(model: torch.nn.Module, loader: Any) -> dict[str, Any]:
    """Embeddings of every batch of ``loader`` (batches as the DataModules yield them), for
    linear probes outside Lightning (e.g. scikit-learn): ``{"embedding": (N, D), "target": ..., "meta": [...]}``."""
    model.eval()
    device = next(model.parameters()).device
    embeddings, targets, meta = [], [], []
    for batch in loader:
        embeddings.append(model(batch["input"].to(device))["embedding"].float().cpu())
        if "target" in batch:
            targets.append(batch["target"])
        meta.extend(batch.get("meta") or [])
    return {"embedding": torch.cat(embeddings), "target": torch.cat(targets) if targets else None, "meta": meta}


def plot_framewise(
    model: torch.nn.Module,
    path: str | Path,
    png: str | Path,
    class_names: list[str] | None = None,
    top_k: int = 10,
) -> Path:
    """Log-mel (top) and framewise probabilities of the ``top_k`` clip classes (bottom), saved to ``png``."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("plot_framewise needs matplotlib: pip install matplotlib") from exc
    result = tag_file(model, path, class_names, top_k)
    output = result["output"]
    if "framewise_output" not in output:
        raise TypeError(f"{type(model).__name__} has no framewise output; use Cnn14_DecisionLevelMax for sound event detection.")
    framewise = output["framewise_output"][0]  # (frames, classes)
    top = torch.argsort(output["clipwise_output"][0], descending=True)[:top_k].tolist()
    names = class_names or [str(i) for i in range(framewise.shape[1])]
    with torch.no_grad():
        device = next(model.parameters()).device
        log_mel = model.frontend(result["waveform"].to(device))[0, 0].cpu()
    hop_seconds = model.frontend.hop_size / model.sample_rate
    figure, (top_axis, bottom_axis) = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    top_axis.imshow(log_mel.T, origin="lower", aspect="auto", cmap="jet", extent=(0, log_mel.shape[0] * hop_seconds, 0, log_mel.shape[1]))
    top_axis.set_ylabel("mel bin")
    top_axis.set_title(f"Log-mel spectrogram: {Path(path).name}")
    bottom_axis.imshow(
        framewise[:, top].T, origin="upper", aspect="auto", cmap="jet", vmin=0, vmax=1,
        extent=(0, framewise.shape[0] * hop_seconds, len(top) - 0.5, -0.5), interpolation="nearest",
    )  # fmt: skip
    bottom_axis.set_yticks(range(len(top)), [names[i] for i in top])
    bottom_axis.set_xlabel("seconds")
    bottom_axis.set_title("Framewise output (top classes)")
    figure.tight_layout()
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(png, dpi=100)
    plt.close(figure)
    return png


def detect_events(framewise: torch.Tensor, hop_seconds: float, class_names: list[str], threshold: float = 0.5, end: float | None = None) -> list[tuple[float, float, str]]:
    """Runs of frames at or above ``threshold`` in ``(frames, classes)`` probabilities as
    ``(onset, offset, label)`` in seconds, sorted by onset: frame ``i`` starts at
    ``i * hop_seconds`` (PANNs' centred frames); offsets are cut at ``end`` (the file's length)."""
    events = []
    active = torch.nn.functional.pad((framewise >= threshold).int(), (0, 0, 1, 1))  # (frames + 2, classes)
    for cls in range(framewise.shape[1]):
        edges = torch.diff(active[:, cls]).tolist()
        starts = [i for i, step in enumerate(edges) if step == 1]
        stops = [i for i, step in enumerate(edges) if step == -1]
        for start, stop in zip(starts, stops, strict=True):
            onset, offset = start * hop_seconds, stop * hop_seconds
            if end is not None:
                onset, offset = min(onset, end), min(offset, end)
            if offset > onset:
                events.append((round(onset, 4), round(offset, 4), class_names[cls]))
    return sorted(events)


class AudioPredictionWriter(BasePredictionWriter):
    """Writes what ``predict`` returns to files a user opens with pandas or a spreadsheet.

    ``output`` (default ``<log_dir>/predictions.csv``): one row per input file, in input
    order: ``file`` (the path read), the decision (multi-class: ``prediction`` and its
    ``probability``; multi-label and sound event detection: ``labels``, the classes at or
    above ``threshold`` (default: the task's ``threshold``, else 0.5) joined by ``;``, so the file reads back as a manifest), the source
    file's ``duration_s`` and ``sample_rate``, then one probability column per class name
    (regression: one column per target). Sound event detection also writes
    ``<output stem>_events.tsv`` in DCASE's ``filename, onset, offset, event_label`` (what
    :func:`~polyfm.audio.data.read_events_csv` reads; a file without events gets a row with
    empty fields). Class names come from the task (``class_names``), else the DataModule's
    training split, else ``0 .. C-1``. Files are written at the end of the run, atomically.
    """

    def __init__(self, output: str | None = None, threshold: float | None = None) -> None:
        super().__init__(write_interval="batch")
        self.output, self.threshold = output, threshold
        self._rows: list[dict[str, Any]] = []
        self._events: list[tuple[str, float | str, float | str, str]] | None = None  # None: not an SED model

    def on_predict_start(self, trainer: Any, pl_module: Any) -> None:
        self._rows, self._events = [], None

    def _names(self, trainer: Any, pl_module: Any, count: int) -> list[str]:
        for candidate in (getattr(pl_module, "class_names", None) or getattr(pl_module, "target_names", None), getattr(trainer.datamodule, "class_names", None)):
            if candidate and len(candidate) == count:
                return [str(name) for name in candidate]
        return [str(i) for i in range(count)]

    def write_on_batch_end(self, trainer: Any, pl_module: Any, prediction: Any, batch_indices: Any, batch: Any, batch_idx: int, dataloader_idx: int) -> None:
        files = prediction.get("meta") or [f"sample-{i}" for i in (batch_indices or [])]
        if "framewise_output" in prediction:  # sound event detection
            scores, kind = prediction["clipwise_output"], "multilabel"
        elif "probabilities" in prediction:
            scores, kind = prediction["probabilities"], "multilabel" if getattr(pl_module, "multilabel", False) else "multiclass"
        elif "prediction" in prediction:
            scores, kind = prediction["prediction"].reshape(len(files), -1), "regression"
        else:
            raise TypeError(f"AudioPredictionWriter: {type(pl_module).__name__}.predict_step returned {sorted(prediction)}; expected probabilities, prediction or framewise_output.")
        scores = scores.float().cpu()
        threshold = self.threshold if self.threshold is not None else float(getattr(pl_module, "threshold", 0.5))
        names = self._names(trainer, pl_module, scores.shape[1])
        fixed = {"file", "prediction", "probability", "labels", "duration_s", "sample_rate"}
        columns = [f"p_{n}" for n in names] if fixed & set(names) else names  # a class named "file" keeps its own column
        for index, file in enumerate(files):
            row: dict[str, Any] = {"file": str(file)}
            if kind == "multiclass":
                best = int(scores[index].argmax())
                row.update(prediction=names[best], probability=round(float(scores[index, best]), 6))
            elif kind == "multilabel":
                row["labels"] = ";".join(n for n, p in zip(names, scores[index].tolist(), strict=True) if p >= threshold)
            duration, rate = _source_info(str(file))
            row.update(duration_s=duration, sample_rate=rate)
            row.update({column: round(float(value), 6) for column, value in zip(columns, scores[index].tolist(), strict=True)})
            self._rows.append(row)
            if "framewise_output" in prediction:
                base = pl_module.encoder_base()
                hop_seconds = base.frontend.hop_size / base.sample_rate
                end = duration if isinstance(duration, float) else None
                found = detect_events(prediction["framewise_output"][index].float().cpu(), hop_seconds, names, threshold, end)
                self._events = self._events if self._events is not None else []
                self._events.extend([(str(file), *event) for event in found] or [(str(file), "", "", "")])

    def path(self, trainer: Any) -> Path:
        return Path(self.output) if self.output else Path(trainer.log_dir or trainer.default_root_dir) / "predictions.csv"

    def on_predict_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.world_size > 1:  # each process sees its share of the files; no gather here
            log.warning("AudioPredictionWriter writes process 0's share only (%d processes): predict on one device.", trainer.world_size)
        if not trainer.is_global_zero or not self._rows:
            return
        path = self.path(trainer)
        columns = list(dict.fromkeys(key for row in self._rows for key in row))
        _write_table(path, columns, [[row.get(c, "") for c in columns] for row in self._rows], ",")
        message = f"predictions for {len(self._rows)} files written to {path}"
        if self._events is not None:
            events_path = path.with_name(f"{path.stem}_events.tsv")
            _write_table(events_path, ["filename", "onset", "offset", "event_label"], [list(e) for e in self._events], "\t")
            message += f", events to {events_path}"
        rank_zero_info(message)


def _source_info(file: str) -> tuple[float | str, int | str]:
    """Duration and sample rate of the file as stored (before resampling); blank when not a file."""
    try:
        info = sf.info(file)
    except (sf.LibsndfileError, RuntimeError, OSError):
        return "", ""
    return round(info.frames / info.samplerate, 4), int(info.samplerate)


def _write_table(path: Path, columns: list[str], rows: list[list[Any]], delimiter: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    with open(partial, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, delimiter=delimiter)
        writer.writerow(columns)
        writer.writerows(rows)
    partial.replace(path)
