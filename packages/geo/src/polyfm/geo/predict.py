"""Predictions to files a GIS user can open, named by input, georeference kept.

:class:`GeoPredictionWriter` is a Lightning callback (add it to a recipe's
``trainer.callbacks`` or to ``L.Trainer(callbacks=[...])``); during ``predict`` it writes

* scene classification (``Classification``/``GeoClassification``): ``predictions.csv``, one
  row per input file: ``path``, ``prediction`` (class name; multi-label: the names at or above
  ``threshold`` joined by ``;``), ``score``, one ``p_<class>`` column per class, and the
  file's ``crs``, ``left``/``bottom``/``right``/``top`` bounds, ``width``/``height``; inputs cut
  into chips (``predict_chip_size``) give one row per chip, with the chip's ``row``/``col``
  offset and bounds;
* segmentation (``Segmentation``/``GeoSegmentation``): one single-band GeoTIFF of class ids
  per input, ``<input stem>.tif``, on the input's grid (CRS and transform copied), nodata
  pixels of the input (``valid`` false) written as the file's nodata value; optionally the
  class probabilities beside it (``<stem>_probabilities.tif``, one band per class). Inputs cut
  into overlapping chips (:class:`polyfm.geo.data.GeoTiffChips`) are stitched back: each chip's
  probabilities are added into the scene's accumulator with a centre-weighted window, and the
  scene is written as soon as its last chip arrived (one scene in memory at a time).

Predictions of :class:`polyfm.core.predict.Ensemble` carry the members' spread: classification
rows get ``std_<class>`` and ``score_std`` columns, segmentation a ``<stem>_uncertainty.tif``
(the std across members of the predicted class's probability).

Inputs come from a datamodule's ``predict_paths`` (files or folders of unlabelled
GeoTIFFs), else its test split.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import lightning as L
import numpy as np
import pandas as pd
import torch
from lightning.pytorch.utilities import rank_zero_info

from polyfm.core.errors import ConfigError, DataError
from polyfm.core.predict import PredictionFileWriter

FIELDS_GEO = ["crs", "left", "bottom", "right", "top", "width", "height"]
BLENDINGS = ("gaussian", "uniform")


def _class_default(i: int) -> str:
    return f"class_{i}"


def blending_weights(height: int, width: int, blending: str = "gaussian") -> torch.Tensor:
    """``(height, width)`` weights of one chip's pixels when overlapping chips are averaged.

    ``"gaussian"``: a centred gaussian with sigma 1/8 of the chip (nnU-Net's importance map),
    so a pixel is decided by the chip that sees it nearest its centre, with the most context;
    scaled to 1 at the centre and never 0, so a pixel seen only by a chip corner still counts.
    ``"uniform"``: every chip pixel counts the same (a plain mean of the overlaps)."""
    if blending == "uniform":
        return torch.ones(height, width)

    def axis(n: int) -> torch.Tensor:
        centre, sigma = (n - 1) / 2, max(n / 8, 1e-6)
        return torch.exp(-((torch.arange(n, dtype=torch.float64) - centre) ** 2) / (2 * sigma**2))

    weights = axis(height)[:, None] * axis(width)[None, :]
    weights = weights / weights.max()
    return weights.clamp_min(float(weights[weights > 0].min())).float()


class _SceneAccumulator:
    """One scene's blended class probabilities while its chips arrive."""

    def __init__(self, source: Path, height: int, width: int, classes: int, chips: int, with_std: bool) -> None:
        self.source, self.height, self.width, self.chips = source, height, width, chips
        self.probabilities = torch.zeros(classes, height, width)
        self.std = torch.zeros(classes, height, width) if with_std else None
        self.weight = torch.zeros(height, width)
        self.valid: torch.Tensor | None = None
        self.received = 0

    def add(self, top: int, left: int, probabilities: torch.Tensor, std: torch.Tensor | None, valid: torch.Tensor | None,
            weights: torch.Tensor) -> None:
        # an edge chip overhangs the raster (padded by the reader): keep only its part inside
        h, w = min(probabilities.shape[-2], self.height - top), min(probabilities.shape[-1], self.width - left)
        rows, cols, weight = slice(top, top + h), slice(left, left + w), weights[:h, :w]
        self.probabilities[:, rows, cols] += probabilities[:, :h, :w] * weight
        if self.std is not None:
            if std is None:
                raise DataError("some chips of this scene carry an ensemble std and others do not", path=self.source)
            self.std[:, rows, cols] += std[:, :h, :w] * weight
        self.weight[rows, cols] += weight
        if valid is not None:
            if self.valid is None:
                self.valid = torch.zeros(self.height, self.width, dtype=torch.bool)
            self.valid[rows, cols] |= valid[:h, :w].bool()
        self.received += 1

    def result(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not bool((self.weight > 0).all()):
            raise DataError(f"{int((self.weight == 0).sum())} pixels were covered by no chip; predict with a stride <= chip size", path=self.source)
        # in place: a Sentinel-2 scene's accumulator is gigabytes, a copy would double it
        self.probabilities.div_(self.weight)
        if self.std is not None:
            self.std.div_(self.weight)
        return self.probabilities, self.std


#: rows per block when a scene-sized map is reduced (argmax, gather): no scene-sized int64 temporaries
_ROWS_PER_BLOCK = 512


def _class_map(probabilities: torch.Tensor, dtype: str) -> np.ndarray[Any, Any]:
    """Argmax over classes of ``(C, H, W)``, as ``dtype``, computed block by block."""
    out = np.empty(tuple(probabilities.shape[1:]), dtype=dtype)
    for top in range(0, out.shape[0], _ROWS_PER_BLOCK):
        out[top : top + _ROWS_PER_BLOCK] = probabilities[:, top : top + _ROWS_PER_BLOCK].argmax(0).numpy()
    return out


def _at_class(values: torch.Tensor, classes: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """``values[classes[y, x], y, x]`` for ``(C, H, W)`` values, block by block, float32."""
    out = np.empty(classes.shape, dtype=np.float32)
    for top in range(0, out.shape[0], _ROWS_PER_BLOCK):
        index = torch.from_numpy(classes[top : top + _ROWS_PER_BLOCK].astype(np.int64))[None]
        out[top : top + _ROWS_PER_BLOCK] = values[:, top : top + _ROWS_PER_BLOCK].gather(0, index)[0].numpy()
    return out


class GeoPredictionWriter(PredictionFileWriter):
    """Write ``predict`` outputs: ``predictions.csv`` for classification, one GeoTIFF per input
    for segmentation (whole files, or chips stitched back into their file's grid).

    ``output``: the folder to write into (default ``<default_root_dir>/predictions``); for
    classification it may name the CSV file itself (``out/scenes.csv``). ``threshold``: the
    multi-label cut-off for the ``prediction`` column. ``write_probabilities``: add
    ``<stem>_probabilities.tif`` (segmentation). ``blending``: how overlapping chips are
    averaged (:func:`blending_weights`). One process only: rows of one table and the chips
    of one scene must all reach the same writer."""

    one_process: ClassVar[bool] = True

    def __init__(
        self,
        output: str | None = None,
        threshold: float = 0.5,
        write_probabilities: bool = False,
        blending: Literal["gaussian", "uniform"] = "gaussian",
    ) -> None:
        super().__init__(output=output, write_interval="batch")
        if blending not in BLENDINGS:
            raise ConfigError(f"blending must be one of {BLENDINGS}, got {blending!r}")
        self.threshold, self.write_probabilities, self.blending = threshold, write_probabilities, blending
        self.reset()

    def reset(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self._used_names: set[str] = set()
        self._scene: _SceneAccumulator | None = None
        self._weights: dict[tuple[int, int], torch.Tensor] = {}
        self._rasters: dict[str, tuple[Any, Any, int, int]] = {}

    # -- where ---------------------------------------------------------------------------------
    def _output_is_table(self) -> bool:
        return bool(self.output) and Path(str(self.output)).suffix.lower() in (".csv", ".tsv")

    def folder(self, trainer: L.Trainer) -> Path:
        """The folder the GeoTIFFs go to."""
        if self._output_is_table():
            raise ConfigError(f"GeoPredictionWriter output={self.output!r} names a table, but segmentation writes one GeoTIFF per input: "
                              "give a folder as output")
        return self.predictions_folder(trainer)

    def table(self, trainer: L.Trainer) -> Path:
        """The classification CSV: ``output`` when it names one, else ``<folder>/predictions.csv``."""
        return Path(str(self.output)) if self._output_is_table() else self.predictions_folder(trainer) / "predictions.csv"

    # -- batches ---------------------------------------------------------------------------------
    def write_on_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, prediction: Any, batch_indices: Sequence[int] | None, batch: Any,
        batch_idx: int, dataloader_idx: int = 0,
    ) -> None:
        if not isinstance(prediction, dict) or "probabilities" not in prediction:
            raise ConfigError(f"GeoPredictionWriter needs predict_step to return a dict with 'probabilities'; {type(pl_module).__name__} returned "
                              f"{type(prediction).__name__}" + (f" with keys {sorted(prediction)}" if isinstance(prediction, dict) else ""))
        probabilities = prediction["probabilities"].detach().float().cpu()
        std = prediction.get("probabilities_std")
        std = None if std is None else std.detach().float().cpu()
        meta = prediction.get("meta")
        if isinstance(meta, torch.Tensor):  # e.g. a torchgeo dataset's sample indices
            meta = meta.tolist()
        metas = list(meta) if isinstance(meta, list | tuple) else [meta] * len(probabilities)
        chips = batch.get("chip") if isinstance(batch, dict) else None
        valid = batch.get("valid") if isinstance(batch, dict) else None
        if "labels" in prediction and chips is not None and trainer.predict_loop.return_predictions:
            # Lightning would keep every chip's maps until predict returns (~10 GB for one Sentinel-2
            # scene at 10 classes): the stitched files are the result, so predict returns None
            trainer.predict_loop.return_predictions = False
            rank_zero_info("GeoPredictionWriter: tiled segmentation keeps no chip outputs in memory; trainer.predict returns None, "
                           "the predictions are the files written")
        if "labels" in prediction:  # dense: (B, C, H, W) probabilities
            for i, m in enumerate(metas):
                one_std, one_valid = None if std is None else std[i], None if valid is None else valid[i].cpu()
                if chips is not None:
                    self._add_chip(trainer, pl_module, m, chips[i].tolist(), probabilities[i], one_std, one_valid, prediction.get("members"))
                else:
                    self._write_scene(trainer, pl_module, self._raster_path(m), probabilities[i], one_std, one_valid,
                                      labels=prediction["labels"][i, 0].cpu(), members=prediction.get("members"))
            return
        chip_size = int(batch["input"].shape[-1]) if chips is not None else 0
        self._add_rows(trainer, pl_module, metas, probabilities, std, None if chips is None else chips.tolist(), chip_size)

    def _add_rows(self, trainer: L.Trainer, module: L.LightningModule, metas: list[Any], probabilities: torch.Tensor, std: torch.Tensor | None,
                  chips: list[list[int]] | None, chip_size: int) -> None:
        names = self.class_names(trainer, module, probabilities.shape[1], default=_class_default)
        multilabel = bool(getattr(module, "multilabel", False))
        for i, (m, p) in enumerate(zip(metas, probabilities.tolist(), strict=True)):
            best = int(np.argmax(p))
            if multilabel:
                label = ";".join(n for n, v in zip(names, p, strict=True) if v >= self.threshold)
            else:
                label = names[best]
            row: dict[str, Any] = {"path": "" if m is None else str(m)}
            if chips is not None:
                row.update(row=chips[i][0], col=chips[i][1])
            row.update(prediction=label, score=p[best])
            if std is not None:
                row["score_std"] = float(std[i, best])
            row.update({f"p_{n}": v for n, v in zip(names, p, strict=True)})
            if std is not None:
                row.update({f"std_{n}": v for n, v in zip(names, std[i].tolist(), strict=True)})
            if m is not None:
                row.update(self._georeference(m, None if chips is None else chips[i], chip_size))
            self.rows.append(row)

    def _georeference(self, meta: Any, chip: list[int] | None, chip_size: int = 0) -> dict[str, Any]:
        """The file's CRS, bounds and size, or a chip's (``[top, left, ...]``); empty for a meta
        that is not a raster path."""
        from rasterio.transform import array_bounds
        from rasterio.windows import Window
        from rasterio.windows import transform as window_transform

        path = Path(str(meta))
        if not path.is_file():
            return {}
        crs, transform, height, width = self._raster(path)
        if chip is not None:  # the part of the chip inside the raster (an edge chip was padded beyond it)
            top, left, size = chip[0], chip[1], chip_size
            height, width = min(size, height - top), min(size, width - left)
            transform = window_transform(Window(left, top, width, height), transform)
        west, south, east, north = array_bounds(height, width, transform)
        return {"crs": crs.to_string() if crs else "", "left": west, "bottom": south, "right": east, "top": north, "width": width, "height": height}

    def _raster(self, path: Path) -> tuple[Any, Any, int, int]:
        """CRS, transform, height, width of a file (headers read once per run)."""
        import rasterio

        key = str(path)
        if key not in self._rasters:
            with rasterio.open(path) as src:
                self._rasters[key] = (src.crs, src.transform, src.height, src.width)
        return self._rasters[key]

    def finish(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._scene is not None:
            scene, self._scene = self._scene, None
            raise DataError(f"predict ended after {scene.received} of the {scene.chips} chips of this scene, so its map was not written; "
                            "predict every chip (no limit_predict_batches)", path=scene.source)
        if not self.rows:
            return
        frame = pd.DataFrame(self.rows)
        geo = [f for f in FIELDS_GEO if f in frame.columns]
        frame = frame[[c for c in frame.columns if c not in geo] + geo]
        self.write_table(self.table(trainer), frame)

    # -- dense outputs -----------------------------------------------------------------------------
    @staticmethod
    def _raster_path(meta: Any) -> Path:
        source = Path(str(meta))
        if not source.is_file():
            raise DataError(f"segmentation predictions are written on the input's grid, but the sample's meta {meta!r} is not a GeoTIFF path; "
                            "predict from GeoTiffSegmentationDataModule (predict_paths=[...])")
        return source

    def _add_chip(self, trainer: L.Trainer, module: L.LightningModule, meta: Any, chip: list[int], probabilities: torch.Tensor,
                  std: torch.Tensor | None, valid: torch.Tensor | None, members: Any) -> None:
        top, left, height, width, _number, count = (int(v) for v in chip)
        source = self._raster_path(meta)
        scene = self._scene
        if scene is not None and scene.source != source:
            raise DataError(f"chips of {source.name} arrived after {scene.received} of the {scene.chips} chips of this scene: the predict "
                            "loader must keep each file's chips together (GeoTiffChips in order, no shuffling)", path=scene.source)
        if scene is None:
            scene = self._scene = _SceneAccumulator(source, height, width, probabilities.shape[0], count, std is not None)
        key = (probabilities.shape[-2], probabilities.shape[-1])
        if key not in self._weights:
            self._weights[key] = blending_weights(*key, self.blending)
        scene.add(top, left, probabilities, std, valid, self._weights[key])
        if scene.received == scene.chips:
            self._scene = None
            mean, mean_std = scene.result()
            self._write_scene(trainer, module, source, mean, mean_std, scene.valid, labels=None, members=members)

    def _name(self, source: Path) -> str:
        """``<stem>``, or ``<parent>_<stem>`` when two inputs share a stem (class folders)."""
        name = source.stem
        if name in self._used_names:
            name = f"{source.parent.name}_{source.stem}"
        while name in self._used_names:
            name += "_"
        self._used_names.add(name)
        return name

    def _write_scene(
        self, trainer: L.Trainer, module: L.LightningModule, source: Path, probabilities: torch.Tensor, std: torch.Tensor | None,
        valid: torch.Tensor | None, labels: torch.Tensor | None, members: Any,
    ) -> None:
        import rasterio

        crs, transform, height, width = self._raster(source)
        if tuple(probabilities.shape[-2:]) != (height, width):
            raise DataError(f"the prediction is {tuple(probabilities.shape[-2:])} but the input is {(height, width)}; predict on whole files "
                            "or on chips (predict_chip_size) so the output lies on the input's grid", path=source)
        classes = probabilities.shape[0]
        names = self.class_names(trainer, module, classes, default=_class_default)
        dtype, nodata = ("uint8", 255) if classes < 255 else ("uint16", 65535)
        array = _class_map(probabilities, dtype) if labels is None else labels.numpy().astype(dtype)
        # an ensemble: how much its members disagree on the class it chose (read before nodata overwrites class ids)
        spread = None if std is None else _at_class(std, array)
        invalid = None if valid is None else ~valid.numpy().astype(bool)
        if invalid is not None:
            array[invalid] = nodata
        folder, name = self.folder(trainer), self._name(source)
        profile: dict[str, Any] = {"driver": "GTiff", "height": height, "width": width, "crs": crs, "transform": transform, "compress": "deflate",
                                   "BIGTIFF": "IF_SAFER"}  # a scene's probabilities pass 4 GB from ~9 classes at 10980 x 10980
        if min(height, width) >= 256:  # internal tiles: GIS tools read a window without decoding whole strips
            profile.update(tiled=True, blockxsize=256, blockysize=256)

        def write_labels(path: Path) -> None:
            with rasterio.open(path, "w", count=1, dtype=dtype, nodata=nodata, **profile) as out:
                out.write(array, 1)
                out.set_band_description(1, "class")
                out.update_tags(1, classes=",".join(names))

        self.write_file(folder / f"{name}.tif", write_labels)
        if self.write_probabilities:

            def write_probabilities(path: Path) -> None:
                with rasterio.open(path, "w", count=classes, dtype="float32", **profile) as out:
                    out.write(probabilities.numpy())  # float32 already: no scene-sized copy
                    for band, class_name in enumerate(names, start=1):
                        out.set_band_description(band, class_name)

            self.write_file(folder / f"{name}_probabilities.tif", write_probabilities)
        if spread is not None:
            if invalid is not None:
                spread[invalid] = math.nan

            def write_uncertainty(path: Path) -> None:
                with rasterio.open(path, "w", count=1, dtype="float32", nodata=math.nan, **profile) as out:
                    out.write(spread, 1)
                    out.set_band_description(1, "std of the predicted class's probability across ensemble members")
                    out.update_tags(1, members=str(int(members)) if members is not None else "")

            self.write_file(folder / f"{name}_uncertainty.tif", write_uncertainty)


def raster_files(paths: str | Path | Sequence[str | Path]) -> list[Path]:
    """The GeoTIFFs named by ``paths``: files as given, folders searched recursively (sorted)."""
    from polyfm.core.data import expand_paths
    from polyfm.geo.data import RASTER_SUFFIXES

    return expand_paths(paths, RASTER_SUFFIXES, "predict_paths lists GeoTIFF files or folders of them")
