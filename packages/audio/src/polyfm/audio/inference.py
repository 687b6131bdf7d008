"""Tag a file, plot its framewise output.

``tag_file`` runs any PANNs model on one file (decoded, mixed down and resampled to the
model's rate) and returns the top classes; ``plot_framewise`` draws the log-mel and the
framewise probabilities of the top classes of a sound event detection model to a PNG
(matplotlib is needed for the plot only). What ``polyfm predict`` writes (a CSV per run,
DCASE event lists) is :mod:`polyfm.audio.predict`.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Any

import torch

from polyfm.audio.data import CSV_ENCODING, check_audio_header, fix_length, load_audio
from polyfm.audio.models.base import PannsModel
from polyfm.core.errors import ConfigError, DataError

log = logging.getLogger(__name__)


def audioset_labels(csv_path: str | Path) -> list[str]:
    """Display names from AudioSet's ``class_labels_indices.csv`` (``index,mid,display_name``)."""
    with open(csv_path, newline="", encoding=CSV_ENCODING) as handle:
        rows = list(csv.DictReader(handle))
    if not rows or "display_name" not in rows[0]:
        raise DataError("expected columns index, mid, display_name (AudioSet's class_labels_indices.csv).", path=csv_path)
    return [row["display_name"] for row in sorted(rows, key=lambda r: int(r["index"]))]


@torch.no_grad()
def tag_file(
    model: PannsModel,
    path: str | Path,
    class_names: list[str] | None = None,
    top_k: int = 10,
    chunk_seconds: float | None = None,
    chunk_overlap_seconds: float | None = None,
) -> dict[str, Any]:
    """Clip-level tags of one file: ``{"tags": [(name, probability)...], "output": forward dict, "waveform": (1, samples)}``.

    A file shorter than the model takes (``model.min_samples()``: Cnn14 needs 32 frames,
    0.31 s) is zero-padded at the end to that length, as the DataModules pad to
    ``clip_seconds``; PANNs' own inference script fails on such files (16% of FSDD).

    ``chunk_seconds`` (as ``predict_chunk_seconds``, :mod:`polyfm.audio.chunked`) decodes and runs
    the file chunk by chunk, overlapping by ``chunk_overlap_seconds`` (default 4 s), so memory
    is bounded by the chunk: the trunk's time map (:meth:`~PannsModel.time_map`, one step per
    ``pooling`` frames: 0.32 s for the Cnn14 family) is stitched on the file's grid (centre-cropped overlaps) and the model's head
    runs once on it, so every output (clip, embedding, framewise) is the whole file's. The
    result then has no ``"waveform"``."""
    model.eval()
    output, waveform, _ = _run(model, path, chunk_seconds, chunk_overlap_seconds, log_mel=False)
    probabilities = output["clipwise_output"][0].float()
    names = class_names or [str(i) for i in range(len(probabilities))]
    order = torch.argsort(probabilities, descending=True)[:top_k].tolist()
    result: dict[str, Any] = {"tags": [(names[i], float(probabilities[i])) for i in order], "output": output}
    if waveform is not None:
        result["waveform"] = waveform
    return result


def _run(model: PannsModel, path: str | Path, chunk_seconds: float | None, chunk_overlap_seconds: float | None,
         log_mel: bool) -> tuple[dict[str, torch.Tensor], torch.Tensor | None, torch.Tensor | None]:
    """The model's outputs on a whole file (on the CPU), with the waveform (whole) or the front
    end's log-mel ``(frames, mel_bins)`` (chunked, when ``log_mel``)."""
    device = next(model.parameters()).device
    minimum = model.min_samples() if hasattr(model, "min_samples") else 0
    if chunk_seconds is None:
        if chunk_overlap_seconds is not None:
            raise ConfigError(f"chunk_overlap_seconds={chunk_overlap_seconds} is given without chunk_seconds: give chunk_seconds "
                              "(e.g. 60) to run the file in chunks, or drop the overlap")
        check_audio_header(path)  # missing, truncated or empty: named as the data modules name them
        waveform = load_audio(path, sample_rate=model.sample_rate)
        if waveform.shape[-1] < minimum:
            log.info("%s: %d samples, zero-padded to %d (the shortest clip %s takes)", path, waveform.shape[-1], minimum, type(model).__name__)
            waveform = fix_length(waveform, minimum)
        waveform = waveform[None].to(device)
        out = model(waveform)
        return {k: v.cpu() for k, v in out.items()}, waveform.cpu(), None
    from polyfm.audio.chunked import ChunkedAudioDataset, chunk_geometry, stitch_time_map

    rate, chunk, overlap, hop, align = chunk_geometry(model, chunk_seconds, chunk_overlap_seconds, ("chunk_seconds", "chunk_overlap_seconds"))
    files = ChunkedAudioDataset([Path(path)], rate, chunk, overlap, hop, align, minimum)[0]["input"]
    stitched, mels = stitch_time_map(model, files, log_mel)  # what model(files) runs, with the log-mel for the plot
    out = model.head_from_map(stitched, files.frames)
    return {k: v.cpu() for k, v in out.items()}, None, mels[0] if mels is not None else None


@torch.no_grad()
def extract_embeddings(model: torch.nn.Module, loader: Any) -> dict[str, Any]:
    """Embeddings of every batch of ``loader`` (batches as the DataModules yield them), for
    linear probes outside Lightning (e.g. scikit-learn): ``{"embedding": (N, D), "target": ..., "meta": [...]}``."""
    model.eval()
    device = next(model.parameters()).device
    embeddings: list[torch.Tensor] = []
    targets: list[torch.Tensor] = []
    meta: list[Any] = []
    for batch in loader:
        embeddings.append(model(batch["input"].to(device))["embedding"].float().cpu())
        if "target" in batch:
            targets.append(batch["target"])
        meta.extend(batch.get("meta") or [])
    return {"embedding": torch.cat(embeddings), "target": torch.cat(targets) if targets else None, "meta": meta}


def plot_framewise(
    model: PannsModel,
    path: str | Path,
    png: str | Path,
    class_names: list[str] | None = None,
    top_k: int = 10,
    chunk_seconds: float | None = None,
    chunk_overlap_seconds: float | None = None,
) -> Path:
    """Log-mel (top) and framewise probabilities of the ``top_k`` clip classes (bottom), saved to ``png``.
    ``chunk_seconds`` / ``chunk_overlap_seconds`` as :func:`tag_file`: the file is run (and its
    log-mel computed) chunk by chunk, with the same picture as whole."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("plot_framewise needs matplotlib: pip install matplotlib") from exc
    model.eval()
    with torch.no_grad():
        output, waveform, log_mel = _run(model, path, chunk_seconds, chunk_overlap_seconds, log_mel=True)
        if "framewise_output" not in output:
            raise TypeError(f"{type(model).__name__} has no framewise output; use Cnn14_DecisionLevelMax for sound event detection.")
        if log_mel is None:
            assert waveform is not None
            log_mel = model.frontend(waveform.to(next(model.parameters()).device))[0, 0].cpu()
    framewise = output["framewise_output"][0]  # (frames, classes)
    top = torch.argsort(output["clipwise_output"][0], descending=True)[:top_k].tolist()
    names = class_names or [str(i) for i in range(framewise.shape[1])]
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
