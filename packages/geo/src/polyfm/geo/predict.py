"""Predictions to files a GIS user can open, named by input, georeference kept.

:class:`GeoPredictionWriter` is a Lightning callback (add it to a recipe's
``trainer.callbacks`` or to ``L.Trainer(callbacks=[...])``); during ``predict`` it writes

* scene classification (``Classification``/``GeoClassification``): one CSV row per input
  file: ``path``, ``prediction`` (class name; multi-label: the names at or above
  ``threshold`` joined by ``;``), ``score``, one ``p_<class>`` column per class, and the
  file's ``crs``, ``left``/``bottom``/``right``/``top`` bounds, ``width``/``height``;
* segmentation (``Segmentation``/``GeoSegmentation``): one single-band GeoTIFF of class ids
  per input, ``<input stem>.tif``, on the input's grid (CRS and transform copied), nodata
  pixels of the input (``valid`` false) written as the file's nodata value; optionally the
  class probabilities beside it (``<stem>_probabilities.tif``, one band per class).

Inputs come from a datamodule's ``predict_paths`` (files or folders of unlabelled
GeoTIFFs), else its test split.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from polyfm.core.errors import ConfigError, DataError

FIELDS_GEO = ["crs", "left", "bottom", "right", "top", "width", "height"]


def _georeference(meta: Any) -> dict[str, Any]:
    """The input file's CRS, bounds and size; empty for a meta that is not a raster path."""
    import rasterio

    path = Path(str(meta))
    if not path.is_file():
        return {}
    with rasterio.open(path) as src:
        left, bottom, right, top = src.bounds
        return {"crs": src.crs.to_string() if src.crs else "", "left": left, "bottom": bottom, "right": right, "top": top,
                "width": src.width, "height": src.height}


def _names(trainer: L.Trainer, module: L.LightningModule, count: int) -> list[str]:
    """Class names: the model's own (saved in the checkpoint), else the datamodule's, else ``class_<i>``."""
    for source in (module, getattr(trainer, "datamodule", None)):
        names = list(getattr(source, "class_names", None) or [])
        if names:
            if len(names) != count:
                raise ConfigError(f"{type(source).__name__} has {len(names)} class names {names} but the model predicts {count} classes")
            return [str(n) for n in names]
    return [f"class_{i}" for i in range(count)]


class GeoPredictionWriter(BasePredictionWriter):
    """Write ``predict`` outputs under ``output_dir`` (default ``<default_root_dir>/predictions``):
    ``predictions.csv`` for classification, one GeoTIFF per input for segmentation."""

    def __init__(self, output_dir: str | None = None, threshold: float = 0.5, write_probabilities: bool = False) -> None:
        super().__init__(write_interval="batch")
        self.output_dir, self.threshold, self.write_probabilities = output_dir, threshold, write_probabilities
        self.rows: list[dict[str, Any]] = []
        self.written: list[Path] = []
        self._used_names: set[str] = set()

    def folder(self, trainer: L.Trainer) -> Path:
        folder = Path(self.output_dir) if self.output_dir else Path(trainer.default_root_dir) / "predictions"
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.rows, self.written, self._used_names = [], [], set()

    def write_on_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, prediction: Any, batch_indices: Sequence[int] | None, batch: Any,
        batch_idx: int, dataloader_idx: int = 0,
    ) -> None:
        if not isinstance(prediction, dict) or "probabilities" not in prediction:
            raise ConfigError(f"GeoPredictionWriter needs predict_step to return a dict with 'probabilities'; {type(pl_module).__name__} returned {type(prediction).__name__}")
        probabilities = prediction["probabilities"].detach().float().cpu()
        meta = prediction.get("meta")
        if isinstance(meta, torch.Tensor):  # e.g. a torchgeo dataset's sample indices
            meta = meta.tolist()
        metas = list(meta) if isinstance(meta, list | tuple) else [meta] * len(probabilities)
        if "labels" in prediction:  # dense: (B, 1, H, W) class ids
            valid = batch.get("valid") if isinstance(batch, dict) else None
            for i, m in enumerate(metas):
                self._write_raster(trainer, pl_module, m, prediction["labels"][i, 0].cpu(), probabilities[i],
                                   None if valid is None else valid[i].cpu())
            return
        names = _names(trainer, pl_module, probabilities.shape[1])
        multilabel = bool(getattr(pl_module, "multilabel", False))
        for m, p in zip(metas, probabilities.tolist(), strict=True):
            if multilabel:
                label = ";".join(n for n, v in zip(names, p, strict=True) if v >= self.threshold)
                score = max(p)
            else:
                best = int(np.argmax(p))
                label, score = names[best], p[best]
            row = {"path": "" if m is None else str(m), "prediction": label, "score": score}
            row.update({f"p_{n}": v for n, v in zip(names, p, strict=True)})
            row.update(_georeference(m) if m is not None else {})
            self.rows.append(row)

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.rows:
            return
        suffix = f".rank{trainer.global_rank}" if trainer.world_size > 1 else ""
        target = self.folder(trainer) / f"predictions{suffix}.csv"
        fields = list(self.rows[0])
        fields += [f for f in FIELDS_GEO if f not in fields and any(f in r for r in self.rows)]
        tmp = target.with_suffix(".csv.part")
        with open(tmp, "w", newline="") as handle:  # temp file + rename: never a half-written CSV
            writer = csv.DictWriter(handle, fieldnames=fields, restval="")
            writer.writeheader()
            writer.writerows(self.rows)
        os.replace(tmp, target)
        self.written.append(target)

    def _name(self, source: Path) -> str:
        """``<stem>``, or ``<parent>_<stem>`` when two inputs share a stem (class folders)."""
        name = source.stem
        if name in self._used_names:
            name = f"{source.parent.name}_{source.stem}"
        while name in self._used_names:
            name += "_"
        self._used_names.add(name)
        return name

    def _write_raster(
        self, trainer: L.Trainer, module: L.LightningModule, meta: Any, labels: torch.Tensor, probabilities: torch.Tensor,
        valid: torch.Tensor | None,
    ) -> None:
        import rasterio

        source = Path(str(meta))
        if not source.is_file():
            raise DataError(f"segmentation predictions are written on the input's grid, but the sample's meta {meta!r} is not a GeoTIFF path; "
                            "predict from GeoTiffSegmentationDataModule (predict_paths=[...])")
        with rasterio.open(source) as src:
            crs, transform, height, width = src.crs, src.transform, src.height, src.width
        if tuple(labels.shape) != (height, width):
            raise DataError(f"the prediction is {tuple(labels.shape)} but the input is {(height, width)}; predict on whole files "
                            "(no chip_size) so the output lies on the input's grid", path=source)
        classes = probabilities.shape[0]
        dtype, nodata = ("uint8", 255) if classes < 255 else ("uint16", 65535)
        array = labels.numpy().astype(dtype)
        if valid is not None:
            array[~valid.numpy().astype(bool)] = nodata
        folder = self.folder(trainer)
        name = self._name(source)
        profile = {"driver": "GTiff", "height": height, "width": width, "crs": crs, "transform": transform, "compress": "deflate"}
        target = folder / f"{name}.tif"
        with rasterio.open(target, "w", count=1, dtype=dtype, nodata=nodata, **profile) as out:
            out.write(array, 1)
            out.set_band_description(1, "class")
            out.update_tags(1, classes=",".join(_names(trainer, module, classes)))
        self.written.append(target)
        if self.write_probabilities:
            target = folder / f"{name}_probabilities.tif"
            with rasterio.open(target, "w", count=classes, dtype="float32", **profile) as out:
                out.write(probabilities.numpy().astype(np.float32))
                for band, class_name in enumerate(_names(trainer, module, classes), start=1):
                    out.set_band_description(band, class_name)
            self.written.append(target)


def raster_files(paths: str | Path | Sequence[str | Path]) -> list[Path]:
    """The GeoTIFFs named by ``paths``: files as given, folders searched recursively (sorted)."""
    from polyfm.core.data import expand_paths
    from polyfm.geo.data import RASTER_SUFFIXES

    return expand_paths(paths, RASTER_SUFFIXES, "predict_paths lists GeoTIFF files or folders of them")
