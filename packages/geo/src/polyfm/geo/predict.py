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
  probabilities are added into a strip of the scene with a centre-weighted window, and rows no
  later chip touches are written out (rasterio windowed writes into temporary files renamed when
  the scene's last chip arrived), so memory is bounded by a strip, not by the scene.

Predictions of :class:`polyfm.core.predict.Ensemble` carry the members' spread: classification
rows get ``std_<class>`` and ``score_std`` columns, segmentation a ``<stem>_uncertainty.tif``
(the std across members of the predicted class's probability).

Inputs come from a datamodule's ``predict_paths`` (files or folders of unlabelled
GeoTIFFs), else its test split.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any, ClassVar, Literal

import lightning as L
import numpy as np
import pandas as pd
import torch
from lightning.pytorch.utilities import rank_zero_info

from polyfm.core.errors import ConfigError, DataError
from polyfm.core.files import atomic_path
from polyfm.core.predict import PredictionFileWriter
from polyfm.geo.data import DEFAULT_GDAL_CACHE_MB, check_gdal_cache_mb, gdal_cache

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


class _SceneFiles:
    """The GeoTIFFs of one scene's prediction (class ids; probabilities and the ensemble spread when
    asked for), each open in a temporary file beside its final path (core's ``atomic_path``) and
    written row block by row block; renamed onto the final paths only when every row is written,
    so a failed or killed predict never leaves a partial map under the final name. Opening,
    writing and closing run under ``gdal_cache(cache_mb)`` (GDAL's block cache capped)."""

    def __init__(self, source: Path, folder: Path, name: str, profile: dict[str, Any], names: list[str], probabilities: bool,
                 uncertainty: bool, members: Any, cache_mb: int | None = DEFAULT_GDAL_CACHE_MB) -> None:
        self.cache_mb = cache_mb
        with gdal_cache(cache_mb):
            self._open(source, folder, name, profile, names, probabilities, uncertainty, members)
        self.rows_written = 0

    def _open(self, source: Path, folder: Path, name: str, profile: dict[str, Any], names: list[str], probabilities: bool,
              uncertainty: bool, members: Any) -> None:
        import rasterio

        self.source, self.height, self.width = source, int(profile["height"]), int(profile["width"])
        classes = len(names)
        self.dtype, self.nodata = ("uint8", 255) if classes < 255 else ("uint16", 65535)
        self.paths: list[Path] = []
        self._stack = ExitStack()
        try:
            def open_(path: Path, **kwargs: Any) -> Any:
                temporary = self._stack.enter_context(atomic_path(path))
                self.paths.append(path)
                return self._stack.enter_context(rasterio.open(temporary, "w", **profile, **kwargs))

            self.labels = open_(folder / f"{name}.tif", count=1, dtype=self.dtype, nodata=self.nodata)
            self.labels.set_band_description(1, "class")
            self.labels.update_tags(1, classes=",".join(names))
            self.probabilities: Any = None
            if probabilities:
                self.probabilities = open_(folder / f"{name}_probabilities.tif", count=classes, dtype="float32")
                for band, class_name in enumerate(names, start=1):
                    self.probabilities.set_band_description(band, class_name)
            self.uncertainty = open_(folder / f"{name}_uncertainty.tif", count=1, dtype="float32", nodata=math.nan) if uncertainty else None
            if self.uncertainty is not None:
                self.uncertainty.set_band_description(1, "std of the predicted class's probability across ensemble members")
                self.uncertainty.update_tags(1, members=str(int(members)) if members is not None else "")
        except BaseException:
            self.abort()
            raise

    def write(self, top: int, probabilities: torch.Tensor, std: torch.Tensor | None, valid: torch.Tensor | None,
              labels: torch.Tensor | None = None) -> None:
        """Rows ``top ..`` of the scene, as ``(C, rows, W)`` blended probabilities (float32)."""
        with gdal_cache(self.cache_mb):
            self._write(top, probabilities, std, valid, labels)

    def _write(self, top: int, probabilities: torch.Tensor, std: torch.Tensor | None, valid: torch.Tensor | None,
               labels: torch.Tensor | None) -> None:
        from rasterio.windows import Window

        if top != self.rows_written:  # rows in order, each once: a compressed block is never rewritten
            raise DataError(f"rows from {top} written after rows 0..{self.rows_written}", path=self.source)
        rows = probabilities.shape[-2]
        window = Window(0, top, self.width, rows)
        array = _class_map(probabilities, self.dtype) if labels is None else labels.numpy().astype(self.dtype)
        # an ensemble: how much its members disagree on the class it chose (read before nodata overwrites class ids)
        spread = None if std is None or self.uncertainty is None else _at_class(std, array)
        invalid = None if valid is None else ~valid.numpy().astype(bool)
        if invalid is not None:
            array[invalid] = self.nodata
        self.labels.write(array, 1, window=window)
        if self.probabilities is not None:
            self.probabilities.write(probabilities.numpy(), window=window)  # float32 already: no copy
        if spread is not None and self.uncertainty is not None:
            if invalid is not None:
                spread[invalid] = math.nan
            self.uncertainty.write(spread, 1, window=window)
        self.rows_written += rows

    def commit(self) -> list[Path]:
        """Close the files and rename them onto their final paths (all rows must be written)."""
        if self.rows_written != self.height:
            self.abort()
            raise DataError(f"only rows 0..{self.rows_written} of {self.height} were predicted, so the map was not written", path=self.source)
        with gdal_cache(self.cache_mb):  # closing flushes what GDAL still holds
            self._stack.close()  # in reverse: each dataset is closed before its temporary file is flushed and renamed
        return self.paths

    def abort(self) -> None:
        """Close and delete the temporary files; nothing appears at the final paths."""
        stop = _Aborted()
        with gdal_cache(self.cache_mb):
            self._stack.__exit__(type(stop), stop, None)  # atomic_path removes its temporary file when the block fails


class _Aborted(Exception):
    """Passed to the open files' context managers so that they discard, not commit."""


#: rows of a scene's output written at once while its chips stream in: the output's block height,
#: so every compressed block is written once, whole
_BLOCK_ROWS = 256


class _StreamedScene:
    """One scene's blended class probabilities while its chips arrive, held for a strip of rows only.

    Chips come row of chips after row of chips (:class:`polyfm.geo.data.GeoTiffChips`): when a
    chip starts at row ``top``, no later chip touches the rows above it, so those rows are final.
    The buffer holds ``chip rows + one block`` rows of the full width; whole blocks of final rows
    are divided by their weights and written (:class:`_SceneFiles`), and the rest moves up.
    Memory: ``4 x (classes + 1) x (chip + 256) x width`` bytes instead of the scene's
    ``4 x (classes + 1) x height x width``; sums and the division are the same as for a scene
    held whole, in the same order, so the output is the same to the bit."""

    def __init__(self, source: Path, height: int, width: int, classes: int, chips: int, with_std: bool, chip_rows: int,
                 files: _SceneFiles, block_rows: int = _BLOCK_ROWS) -> None:
        self.source, self.height, self.width, self.chips, self.files = source, height, width, chips, files
        self.block_rows = block_rows
        self.capacity = min(height, chip_rows + block_rows)
        self.top = 0  # the scene row held in the buffer's first row
        self.probabilities = torch.zeros(classes, self.capacity, width)
        self.std = torch.zeros(classes, self.capacity, width) if with_std else None
        self.weight = torch.zeros(self.capacity, width)
        self.valid: torch.Tensor | None = None
        self.received = 0

    def add(self, top: int, left: int, probabilities: torch.Tensor, std: torch.Tensor | None, valid: torch.Tensor | None,
            weights: torch.Tensor) -> None:
        if top < self.top:
            raise DataError(f"a chip at row {top} arrived after rows 0..{self.top} were written: the predict loader must give each file's chips "
                            "row of chips after row of chips (GeoTiffChips in order, no shuffling)", path=self.source)
        # an edge chip overhangs the raster (padded by the reader): keep only its part inside
        h, w = min(probabilities.shape[-2], self.height - top), min(probabilities.shape[-1], self.width - left)
        if top + h > self.top + self.capacity:  # rows above this chip are final: write whole blocks of them
            self._flush((top - self.top) // self.block_rows * self.block_rows)
        if top + h > self.top + self.capacity:
            raise DataError(f"a chip of {h} rows does not fit the {self.capacity}-row strip sized by the scene's first chip: all chips of a "
                            "scene must have one size", path=self.source)
        rows, cols, weight = slice(top - self.top, top - self.top + h), slice(left, left + w), weights[:h, :w]
        self.probabilities[:, rows, cols] += probabilities[:, :h, :w] * weight
        if self.std is not None:
            if std is None:
                raise DataError("some chips of this scene carry an ensemble std and others do not", path=self.source)
            self.std[:, rows, cols] += std[:, :h, :w] * weight
        self.weight[rows, cols] += weight
        if valid is not None:
            if self.valid is None:
                self.valid = torch.zeros(self.capacity, self.width, dtype=torch.bool)
            self.valid[rows, cols] |= valid[:h, :w].bool()
        self.received += 1

    def _flush(self, rows: int) -> None:
        """Write the buffer's first ``rows`` rows (final) and move the others up."""
        if rows <= 0:
            return
        weight = self.weight[:rows]
        if not bool((weight > 0).all()):
            raise DataError(f"{int((weight == 0).sum())} pixels were covered by no chip; predict with a stride <= chip size", path=self.source)
        self.files.write(self.top, self.probabilities[:, :rows] / weight, None if self.std is None else self.std[:, :rows] / weight,
                         None if self.valid is None else self.valid[:rows])
        keep = self.capacity - rows
        for buffer in (self.probabilities, self.std, self.weight, self.valid):
            if buffer is not None:
                buffer[..., :keep, :] = buffer[..., rows:, :].clone()
                buffer[..., keep:, :] = 0
        self.top += rows

    def finish(self) -> list[Path]:
        """Write the remaining rows and commit the files (after the scene's last chip)."""
        self._flush(self.height - self.top)
        return self.files.commit()


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
    averaged (:func:`blending_weights`). ``gdal_cache_mb``: GDAL's block cache while the maps
    are written (:func:`polyfm.geo.data.gdal_cache`; ``None``: GDAL's default, 5 % of RAM). One
    process only: rows of one table and the chips of one scene must all reach the same writer."""

    one_process: ClassVar[bool] = True

    def __init__(
        self,
        output: str | None = None,
        threshold: float = 0.5,
        write_probabilities: bool = False,
        blending: Literal["gaussian", "uniform"] = "gaussian",
        gdal_cache_mb: int | None = DEFAULT_GDAL_CACHE_MB,
    ) -> None:
        super().__init__(output=output, write_interval="batch")
        if blending not in BLENDINGS:
            raise ConfigError(f"blending must be one of {BLENDINGS}, got {blending!r}")
        check_gdal_cache_mb(gdal_cache_mb)
        self.threshold, self.write_probabilities, self.blending = threshold, write_probabilities, blending
        self.gdal_cache_mb = gdal_cache_mb
        self.reset()

    def reset(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self._used_names: set[str] = set()
        self._scene: _StreamedScene | None = None
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
            scene.files.abort()
            raise DataError(f"predict ended after {scene.received} of the {scene.chips} chips of this scene, so its map was not written; "
                            "predict every chip (no limit_predict_batches)", path=scene.source)
        if not self.rows:
            return
        frame = pd.DataFrame(self.rows)
        geo = [f for f in FIELDS_GEO if f in frame.columns]
        frame = frame[[c for c in frame.columns if c not in geo] + geo]
        self.write_table(self.table(trainer), frame)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        # a predict that fails mid-scene (or is interrupted) deletes the scene's temporary files: no partial map anywhere
        if self._scene is not None:
            scene, self._scene = self._scene, None
            scene.files.abort()

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
            files = self._open_files(trainer, module, source, probabilities.shape[0], std is not None, members)
            scene = self._scene = _StreamedScene(source, height, width, probabilities.shape[0], count, std is not None, probabilities.shape[-2], files)
        key = (probabilities.shape[-2], probabilities.shape[-1])
        if key not in self._weights:
            self._weights[key] = blending_weights(*key, self.blending)
        try:
            scene.add(top, left, probabilities, std, valid, self._weights[key])
            if scene.received == scene.chips:
                self._scene = None
                self.written += scene.finish()
        except BaseException:
            self._scene = None
            scene.files.abort()
            raise

    def _name(self, source: Path) -> str:
        """``<stem>``, or ``<parent>_<stem>`` when two inputs share a stem (class folders)."""
        name = source.stem
        if name in self._used_names:
            name = f"{source.parent.name}_{source.stem}"
        while name in self._used_names:
            name += "_"
        self._used_names.add(name)
        return name

    def _open_files(self, trainer: L.Trainer, module: L.LightningModule, source: Path, classes: int, with_std: bool, members: Any) -> _SceneFiles:
        """The scene's output files, open for windowed writes on the input's grid (CRS, transform, size)."""
        crs, transform, height, width = self._raster(source)
        names = self.class_names(trainer, module, classes, default=_class_default)
        profile: dict[str, Any] = {"driver": "GTiff", "height": height, "width": width, "crs": crs, "transform": transform, "compress": "deflate",
                                   "BIGTIFF": "IF_SAFER"}  # a scene's probabilities pass 4 GB from ~9 classes at 10980 x 10980
        if min(height, width) >= 256:  # internal tiles: GIS tools read a window without decoding whole strips
            profile.update(tiled=True, blockxsize=256, blockysize=256)
        return _SceneFiles(source, self.folder(trainer), self._name(source), profile, names, self.write_probabilities, with_std, members,
                           self.gdal_cache_mb)

    def _write_scene(
        self, trainer: L.Trainer, module: L.LightningModule, source: Path, probabilities: torch.Tensor, std: torch.Tensor | None,
        valid: torch.Tensor | None, labels: torch.Tensor | None, members: Any,
    ) -> None:
        """A whole file's prediction (the model saw the whole file), written in one go."""
        _, _, height, width = self._raster(source)
        if tuple(probabilities.shape[-2:]) != (height, width):
            raise DataError(f"the prediction is {tuple(probabilities.shape[-2:])} but the input is {(height, width)}; predict on whole files "
                            "or on chips (predict_chip_size) so the output lies on the input's grid", path=source)
        files = self._open_files(trainer, module, source, probabilities.shape[0], std is not None, members)
        try:
            files.write(0, probabilities, std, valid, labels)
        except BaseException:
            files.abort()
            raise
        self.written += files.commit()


def raster_files(paths: str | Path | Sequence[str | Path]) -> list[Path]:
    """The GeoTIFFs named by ``paths``: files as given, folders searched recursively (sorted)."""
    from polyfm.core.data import expand_paths
    from polyfm.geo.data import RASTER_SUFFIXES

    return expand_paths(paths, RASTER_SUFFIXES, "predict_paths lists GeoTIFF files or folders of them")
