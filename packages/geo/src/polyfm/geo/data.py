"""Readers and DataModules for Earth-observation data.

* plain GeoTIFF folders through rasterio: class-per-folder (``root/<class>/*.tif``) or a
  CSV of paths and labels (multi-label: ``a;b`` in one column, or one 0/1 column per
  class), and image/mask pairs for segmentation;
* torchgeo datasets by path (EuroSAT, BigEarthNet, SSL4EO-S12 ... anything
  ``torchgeo.datasets`` reads with ``root=``);
* random and grid chips from large scenes with torchgeo's samplers over a
  ``RasterDataset`` (``RandomGeoSampler``, ``GridGeoSampler``).

Every sample is a dict: ``input`` (float ``(C, H, W)``, normalised with the weights'
normalisation for the data's bands), ``target``, ``meta`` (the file or the chip bounds).
Bad files raise :class:`polyfm.core.errors.DataError` naming the file (and the CSV row).
Real-world files: declared nodata is refused, filled (with a ``valid`` mask) or kept by an
explicit ``nodata`` policy; float reflectance in 0-1 needs ``scale=10000``; band
descriptions, when they name bands, decide the band order; band files of one stack must
share a grid; tiles smaller than a chip are refused and grid chips stay inside their tile.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from polyfm.core.data import DictDataModule, check_fold, fold_indices
from polyfm.core.errors import ConfigError, DataError
from polyfm.geo.bands import Normalization, canonical_band, resolve_normalization

RASTER_SUFFIXES = (".tif", ".tiff")
log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- reading


NodataPolicy = Literal["error", "fill", "keep"]
NODATA_POLICIES = ("error", "fill", "keep")


def check_nodata_policy(nodata: str) -> None:
    if nodata not in NODATA_POLICIES:
        raise ConfigError(f"nodata must be one of {NODATA_POLICIES}, got {nodata!r}")


#: GDAL's raster block cache (MB) while scenes are streamed through tiled prediction (reads of
#: each chip row, windowed writes of the maps). Unset, GDAL may take 5 % of the machine's RAM
#: (1.2 GB on 24 GB, 6.4 GB on a 128 GB node); the streaming decodes each strip's blocks once,
#: so 64 MB costs it nothing (measured in docs/geo.md).
DEFAULT_GDAL_CACHE_MB = 64


def check_gdal_cache_mb(value: int | None, name: str = "gdal_cache_mb") -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ConfigError(f"{name} is GDAL's block cache in MB: an integer >= 1, or None for GDAL's default (5 % of RAM); got {value!r}")


def gdal_cache(cache_mb: int | None) -> contextlib.AbstractContextManager[Any]:
    """A ``rasterio.Env`` capping GDAL's block cache at ``cache_mb`` MB for the reads and writes
    inside it (``None``: GDAL's default, left alone). The cap is GDAL's process-wide maximum,
    restored when the block ends. rasterio hands an integer ``GDAL_CACHEMAX`` to
    ``GDALSetCacheMax64`` as *bytes* (GDAL's own "below 100000 means MB" rule does not apply
    there: ``Env(GDAL_CACHEMAX=64)`` is a 64-byte cache), so the MB are converted here."""
    check_gdal_cache_mb(cache_mb)
    if cache_mb is None:
        return contextlib.nullcontext()
    import rasterio

    env: contextlib.AbstractContextManager[Any] = rasterio.Env(GDAL_CACHEMAX=int(cache_mb) * 1024 * 1024)
    return env


def read_raster(path: str | Path, expected_bands: int | None = None) -> tuple[np.ndarray[Any, Any], list[str | None]]:
    """``(C, H, W)`` array and the band descriptions of a GeoTIFF; clear errors on bad files."""
    array, descriptions, _ = read_raster_nodata(path, expected_bands)
    return array, descriptions


def read_raster_nodata(
    path: str | Path, expected_bands: int | None = None, window: Any = None,
) -> tuple[np.ndarray[Any, Any], list[str | None], list[float | None]]:
    """As :func:`read_raster`, plus each band's declared nodata value (``None``: none declared).
    ``window`` (a ``rasterio.windows.Window`` inside the raster) reads only that part."""
    import rasterio
    from rasterio.errors import RasterioIOError

    path = Path(path)
    if not path.exists():
        raise DataError("file does not exist", path=path)
    try:
        with rasterio.open(path) as src:
            array = src.read(window=window)
            descriptions = list(src.descriptions)
            nodata = [None if v is None else float(v) for v in src.nodatavals]
    except RasterioIOError as exc:
        raise DataError(f"not a readable raster (truncated or not a GeoTIFF?): {exc}", path=path) from exc
    if expected_bands is not None and array.shape[0] != expected_bands:
        raise DataError(
            f"has {array.shape[0]} bands but {expected_bands} band names were declared; "
            "give the file's band names in its own order (bands=[...])",
            path=path,
        )
    return array, descriptions, nodata


def order_by_descriptions(descriptions: Sequence[str | None], bands: Sequence[str], path: str | Path) -> list[int] | None:
    """File channel for each declared band when the file's band descriptions name its bands.

    ``None`` when the descriptions do not all name known bands (then ``bands`` is trusted);
    a permutation when they name the declared bands in another order; a :class:`DataError`
    when they name other bands than the declared ones."""
    from polyfm.geo.bands import SENTINEL1_BANDS, SENTINEL2_BANDS

    declared = [canonical_band(b) for b in bands]
    if any(d is None or not str(d).strip() for d in descriptions):
        return None
    named = [canonical_band(str(d)) for d in descriptions]
    known = set(SENTINEL2_BANDS) | set(SENTINEL1_BANDS) | set(declared)
    if len(set(named)) != len(named) or not set(named) <= known:
        return None
    if sorted(named) != sorted(declared):
        raise DataError(
            f"its band descriptions name the bands {named} but bands={declared} was declared; "
            "declare the file's bands (or fix the descriptions)",
            path=path,
        )
    return [named.index(b) for b in declared]


def nodata_mask(x: torch.Tensor, nodata: Sequence[float | None]) -> torch.Tensor | None:
    """``x``'s shape, True where a pixel holds its channel's nodata value (NaN nodata: NaN pixels)."""
    if all(v is None for v in nodata):
        return None
    if len(nodata) != x.shape[-3]:
        raise DataError(f"{len(nodata)} nodata values for {x.shape[-3]} channels")
    mask = torch.zeros(x.shape, dtype=torch.bool)
    for c, value in enumerate(nodata):
        if value is None:
            continue
        mask[..., c, :, :] = x[..., c, :, :].isnan() if math.isnan(value) else x[..., c, :, :] == value
    return mask


def handle_nodata(
    x: torch.Tensor, invalid: torch.Tensor | None, nodata: Sequence[float | None], policy: NodataPolicy, bands: Sequence[str],
    normalization: Normalization | None, where: str | Path,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Apply a nodata policy to raw values ``x`` (``(C, H, W)`` or ``(B, C, H, W)``).

    ``"error"`` raises naming the file and band; ``"fill"`` sets those pixels to the band's
    training mean (so they normalise to the mean level, as a missing band is treated) and
    returns the valid-pixel mask ``(…, H, W)``; ``"keep"`` uses the values as they are."""
    check_nodata_policy(policy)
    if policy == "keep":
        return x, None
    if invalid is None or not invalid.any():
        return x, (None if policy == "error" else torch.ones((*x.shape[:-3], *x.shape[-2:]), dtype=torch.bool))
    if policy == "error":
        counts = invalid.transpose(0, -3).reshape(invalid.shape[-3], -1).sum(1) if invalid.ndim == 4 else invalid.flatten(1).sum(1)
        band = int(counts.argmax())
        raise DataError(
            f"band {bands[band]!r} has {int(counts[band])} pixels at the declared nodata value {nodata[band]} "
            f"(bands with nodata: {[b for b, n in zip(bands, counts.tolist(), strict=True) if n]}). Nodata is never read as "
            "reflectance: pass nodata='fill' (pixels set to the band's training mean, a 'valid' mask in the sample) "
            "or nodata='keep' if that value is real data",
            path=where,
        )
    means = list(normalization.mean) if normalization is not None and normalization.kind != "scale" else [0.0] * x.shape[-3]
    fill = torch.tensor(means, dtype=x.dtype).view(-1, 1, 1).expand(x.shape[-3:])
    x = torch.where(invalid, fill, x)
    return x, ~invalid.any(dim=-3)


def check_value_scale(x: torch.Tensor, valid: torch.Tensor | None, normalization: Normalization | None, where: str | Path) -> None:
    """Refuse float reflectance in 0-1 fed to weights whose statistics are reflectance x 10,000."""
    if normalization is None or normalization.kind == "scale" or not normalization.mean or max(normalization.mean) < 50:
        return
    values = x if valid is None else x.movedim(-3, 0)[:, valid]
    values = values[torch.isfinite(values)]
    if values.numel() and float(values.max()) <= 1.5:
        raise DataError(
            f"values span {float(values.min()):.4g}..{float(values.max()):.4g}, like reflectance in 0-1, but the normalisation's "
            f"band means ({', '.join(f'{m:.0f}' for m in normalization.mean[:4])}, ...) are reflectance x 10,000. Pass scale=10000 "
            "to multiply the file's values first",
            path=where,
        )


def load_image(
    path: Path,
    bands: Sequence[str],
    band_indices: Sequence[int] | None,
    normalization: Normalization | None,
    scale: float = 1.0,
    nodata: NodataPolicy = "error",
    window: Any = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Read, order (by band descriptions), scale, check and normalise one GeoTIFF (or the
    ``window`` of it that a tiled prediction reads).

    Returns the normalised ``(C, H, W)`` and, with ``nodata="fill"``, the valid-pixel mask."""
    array, descriptions, nodata_values = read_raster_nodata(path, expected_bands=len(bands), window=window)
    return prepare_image(array, descriptions, nodata_values, path, bands, band_indices, normalization, scale, nodata)


def prepare_image(
    array: np.ndarray[Any, Any],
    descriptions: Sequence[str | None],
    nodata_values: Sequence[float | None],
    path: Path,
    bands: Sequence[str],
    band_indices: Sequence[int] | None,
    normalization: Normalization | None,
    scale: float = 1.0,
    nodata: NodataPolicy = "error",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What :func:`load_image` does after reading: the file's raw ``(C, H, W)`` values (as read,
    e.g. a chip cut from a row strip read once) ordered, scaled, checked and normalised."""
    order = order_by_descriptions(descriptions, bands, path)
    if order is not None and order != list(range(len(order))):
        array, nodata_values = array[order], [nodata_values[i] for i in order]
    floating = np.issubdtype(array.dtype, np.floating)
    keep = list(range(len(bands))) if band_indices is None else list(band_indices)
    x = torch.from_numpy(np.ascontiguousarray(array[keep]).astype(np.float32))
    kept_nodata, kept_bands = [nodata_values[i] for i in keep], [canonical_band(bands[i]) for i in keep]
    invalid = nodata_mask(x, kept_nodata)  # on the file's own values
    if scale != 1.0:
        x = x * scale
    x, valid = handle_nodata(x, invalid, kept_nodata, nodata, kept_bands, normalization, path)
    if not torch.isfinite(x).all():
        raise DataError("holds NaN or Inf values", path=path)
    if floating and scale == 1.0:
        check_value_scale(x, valid, normalization, path)
    if normalization is not None:
        x = normalization(x)
    return x, valid


def band_names_of(path: str | Path) -> list[str]:
    """Band names from a GeoTIFF's band descriptions (``B2``, ``red``...)."""
    _, descriptions = read_raster(path)
    if any(d is None or not str(d).strip() for d in descriptions):
        raise DataError(
            f"has unnamed bands (descriptions {descriptions}); pass bands=[...] naming each band in file order",
            path=path,
        )
    return [canonical_band(str(d)) for d in descriptions]


def _fit_size(x: torch.Tensor, size: int | None) -> torch.Tensor:
    """Centre-crop (when larger) or bilinearly resize (when smaller) to ``size`` x ``size``."""
    if size is None or tuple(x.shape[-2:]) == (size, size):
        return x
    h, w = x.shape[-2:]
    if h >= size and w >= size:
        top, left = (h - size) // 2, (w - size) // 2
        return x[..., top : top + size, left : left + size]
    return F.interpolate(x[None], size=(size, size), mode="bilinear", align_corners=False)[0]


# ----------------------------------------------------------------------------- labels


def scan_class_folders(root: str | Path) -> tuple[list[tuple[Path, int]], list[str]]:
    """``root/<class>/*.tif`` -> ``[(path, class_index)]`` and the sorted class names."""
    root = Path(root)
    if not root.is_dir():
        raise DataError("is not a folder", path=root)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise DataError("has no class sub-folders (expected root/<class>/*.tif)", path=root)
    items = [(f, i) for i, c in enumerate(classes) for f in sorted((root / c).iterdir()) if f.suffix.lower() in RASTER_SUFFIXES]
    empty = [c for c in classes if not any(label == classes.index(c) for _, label in items)]
    if empty:
        raise DataError(f"class folders without any .tif file: {empty}", path=root)
    return items, classes


def read_label_csv(
    csv_path: str | Path,
    path_column: str = "path",
    label_column: str | None = "label",
    label_columns: Sequence[str] | None = None,
    class_names: Sequence[str] | None = None,
    multilabel: bool = False,
    separator: str = ";",
) -> tuple[list[tuple[Path, Any]], list[str]]:
    """Read ``path,label`` rows (paths relative to the CSV's folder).

    Multi-label: ``label`` holds names joined by ``separator``, or ``label_columns`` name
    one column per class holding 0/1 or a soft label in [0, 1] (e.g. a land-cover fraction,
    as SoftCon pretraining uses); empty = missing. Returns items and the class names.
    """
    csv_path = Path(csv_path)
    if not csv_path.exists():
        raise DataError("label CSV does not exist", path=csv_path)
    with open(csv_path, newline="") as handle:
        reader = csv.DictReader(handle)
        header = reader.fieldnames or []
        wanted = [path_column, *(label_columns or ([label_column] if label_column else []))]
        absent = [c for c in wanted if c not in header]
        if absent:
            raise DataError(f"missing column(s) {absent}; the header is {header}", path=csv_path)
        rows = list(reader)
    if not rows:
        raise DataError("has no rows", path=csv_path)
    if label_columns:
        names = list(label_columns)
    elif class_names is not None:
        names = list(class_names)
    else:
        raw = [r[label_column] for r in rows]
        names = sorted({n.strip() for v in raw for n in (v.split(separator) if multilabel else [v]) if n.strip()})
    items: list[tuple[Path, Any]] = []
    for number, row in enumerate(rows, start=2):  # row 1 is the header
        path = Path(row[path_column])
        path = path if path.is_absolute() else csv_path.parent / path
        if not path.exists():
            raise DataError(f"image {row[path_column]!r} does not exist", path=csv_path, row=number)
        if label_columns:
            vector = []
            for c in label_columns:
                value = (row[c] or "").strip()
                if value == "":
                    vector.append(float("nan"))
                    continue
                try:
                    number_value = float(value)
                except ValueError:
                    number_value = float("nan")
                if not 0.0 <= number_value <= 1.0:  # 0/1 tags, or soft labels such as land-cover fractions
                    raise DataError(f"column {c!r} holds {value!r}; expected a value in [0, 1] or empty", path=csv_path, row=number)
                vector.append(number_value)
            items.append((path, vector))
            continue
        value = (row[label_column] or "").strip()
        parts = [p.strip() for p in value.split(separator) if p.strip()] if multilabel else [value]
        unknown = [p for p in parts if p not in names]
        if unknown or not parts or parts == [""]:
            raise DataError(f"label {value!r} is not one of the classes {names}", path=csv_path, row=number)
        if multilabel:
            items.append((path, [1.0 if n in parts else 0.0 for n in names]))
        else:
            items.append((path, names.index(parts[0])))
    return items, names


# ----------------------------------------------------------------------------- datasets


class GeoTiffClassification(Dataset[dict[str, Any]]):
    """Scene classification from GeoTIFF files: ``items`` of ``(path, label)``.

    ``bands`` names the file's bands in file order (a file whose band descriptions name
    them in another order is reordered by name); ``band_indices`` keeps a subset (in
    that order); ``scale`` multiplies the file's values first (10000 for reflectance in
    0-1); ``normalization`` applies to the kept bands; ``nodata`` is the policy for pixels
    at the file's declared nodata value (see :func:`handle_nodata`; ``"fill"`` adds a
    ``valid`` mask to every sample).
    """

    def __init__(
        self,
        items: Sequence[tuple[Path, Any]],
        bands: Sequence[str],
        normalization: Normalization | None = None,
        chip_size: int | None = None,
        band_indices: Sequence[int] | None = None,
        multilabel: bool = False,
        augment: bool = False,
        scale: float = 1.0,
        nodata: NodataPolicy = "error",
    ) -> None:
        check_nodata_policy(nodata)
        self.items, self.bands = list(items), [canonical_band(b) for b in bands]
        self.normalization, self.chip_size, self.band_indices = normalization, chip_size, band_indices
        self.multilabel, self.augment, self.scale, self.nodata = multilabel, augment, scale, nodata

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path, label = self.items[index]
        x, valid = load_image(path, self.bands, self.band_indices, self.normalization, self.scale, self.nodata)
        if valid is not None:  # the mask rides along through cropping, resizing and augmentation
            x = torch.cat([x, valid[None].float()])
        x = _fit_size(x, self.chip_size)
        if self.augment:
            if torch.rand(()) < 0.5:
                x = x.flip(-1)
            x = torch.rot90(x, int(torch.randint(0, 4, ())), dims=(-2, -1))
        sample: dict[str, Any] = {"input": x.contiguous(), "meta": str(path)}
        if label is not None:  # None: an unlabelled file to predict on
            sample["target"] = torch.tensor(label, dtype=torch.float32) if self.multilabel else torch.tensor(label, dtype=torch.long)
        if valid is not None:
            sample["input"], sample["valid"] = x[:-1].contiguous(), x[-1] > 0.999
        return sample


class GeoTiffSegmentation(Dataset[dict[str, Any]]):
    """Semantic segmentation from ``(image.tif, mask.tif)`` pairs (mask: one band of class ids)."""

    def __init__(
        self,
        pairs: Sequence[tuple[Path, Path | None]],
        bands: Sequence[str],
        normalization: Normalization | None = None,
        band_indices: Sequence[int] | None = None,
        num_classes: int | None = None,
        scale: float = 1.0,
        nodata: NodataPolicy = "error",
    ) -> None:
        check_nodata_policy(nodata)
        self.pairs, self.bands = list(pairs), [canonical_band(b) for b in bands]
        self.normalization, self.band_indices, self.num_classes = normalization, band_indices, num_classes
        self.scale, self.nodata = scale, nodata

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image_path, mask_path = self.pairs[index]
        x, valid = load_image(image_path, self.bands, self.band_indices, self.normalization, self.scale, self.nodata)
        sample: dict[str, Any] = {"input": x, "meta": str(image_path)}
        if mask_path is not None:  # None: an unlabelled image to predict on
            mask, _ = read_raster(mask_path, expected_bands=1)
            if self.num_classes is not None and (mask.max() >= self.num_classes or mask.min() < 0):
                raise DataError(f"mask holds class ids {int(mask.min())}..{int(mask.max())}, outside 0..{self.num_classes - 1}", path=mask_path)
            if mask.shape[-2:] != tuple(x.shape[-2:]):
                raise DataError(f"mask is {mask.shape[-2:]} but its image {image_path.name} is {tuple(x.shape[-2:])}", path=mask_path)
            sample["target"] = torch.from_numpy(mask.astype(np.int64))
        if valid is not None:
            sample["valid"] = valid
        return sample


def chip_starts(length: int, size: int, stride: int) -> list[int]:
    """Chip origins along one axis, as torchgeo's ``GridGeoSampler`` places them:
    ``ceil((length - size) / stride) + 1`` chips from 0, the last one overhanging the raster
    when ``length - size`` is not a multiple of ``stride`` (one chip when the raster is smaller)."""
    return [i * stride for i in range(max(math.ceil((length - size) / stride), 0) + 1)]


def _pad_to(x: torch.Tensor, size: int) -> torch.Tensor:
    """Pad ``(C, h, w)`` at the bottom and right to ``size`` x ``size``: mirrored where the chip
    is wide enough (so the model sees plausible texture at the edge), else repeated."""
    bottom, right = size - x.shape[-2], size - x.shape[-1]
    if not bottom and not right:
        return x
    mode = "reflect" if bottom < x.shape[-2] and right < x.shape[-1] else "replicate"
    return F.pad(x[None], (0, right, 0, bottom), mode=mode)[0]


class GeoTiffChips(Dataset[dict[str, Any]]):
    """Overlapping chips of whole GeoTIFFs, for predicting scenes too large for one pass.

    Each file is cut on a grid of ``chip_size`` chips every ``stride`` pixels
    (:func:`chip_starts`, torchgeo's ``GridGeoSampler`` rule); the file is read one row of chips
    at a time (a rasterio window of ``chip_size`` rows by the full width, kept while that row's
    chips are cut from it), so a 10980 x 10980 Sentinel-2 scene is never loaded whole. Chips that
    overhang the raster are padded (mirrored) to the full size; the prediction writer crops them
    back. Samples: ``input`` ``(C, chip_size, chip_size)``, ``meta`` (the file), ``chip``
    (``[top, left, scene_height, scene_width, chip_number, chips_in_scene]``, what
    :class:`polyfm.geo.predict.GeoPredictionWriter` needs to stitch the scene), and with
    ``nodata="fill"`` a ``valid`` mask (false on padding too). Chips of one file come together, row
    of chips after row of chips (the order in which the writer streams the scene to its file).
    ``gdal_cache_mb`` caps GDAL's block cache during each strip read (:func:`gdal_cache`; ``None``:
    GDAL's default, 5 % of RAM)."""

    def __init__(
        self,
        files: Sequence[Path],
        bands: Sequence[str],
        chip_size: int,
        stride: int | None = None,
        normalization: Normalization | None = None,
        band_indices: Sequence[int] | None = None,
        scale: float = 1.0,
        nodata: NodataPolicy = "error",
        gdal_cache_mb: int | None = DEFAULT_GDAL_CACHE_MB,
    ) -> None:
        import rasterio
        from rasterio.errors import RasterioIOError

        check_nodata_policy(nodata)
        check_gdal_cache_mb(gdal_cache_mb)
        self.gdal_cache_mb = gdal_cache_mb
        stride = chip_size - chip_size // 4 if stride is None else stride
        if chip_size < 1 or not 1 <= stride <= chip_size:
            raise ConfigError(f"predict chips need chip_size >= 1 and 1 <= stride <= chip_size (a larger stride leaves pixels unpredicted), "
                              f"got chip_size={chip_size}, stride={stride}")
        self.files, self.bands = [Path(f) for f in files], [canonical_band(b) for b in bands]
        self.chip_size, self.stride = chip_size, stride
        self.normalization, self.band_indices, self.scale, self.nodata = normalization, band_indices, scale, nodata
        self.shapes: list[tuple[int, int]] = []
        self.chips: list[tuple[int, int, int, int, int]] = []  # file index, top, left, number in its scene, chips in it
        for index, path in enumerate(self.files):
            try:
                with rasterio.open(path) as src:  # header only
                    height, width = src.height, src.width
            except RasterioIOError as exc:
                raise DataError(f"not a readable raster (truncated or not a GeoTIFF?): {exc}", path=path) from exc
            self.shapes.append((height, width))
            corners = [(top, left) for top in chip_starts(height, chip_size, stride) for left in chip_starts(width, chip_size, stride)]
            self.chips += [(index, top, left, number, len(corners)) for number, (top, left) in enumerate(corners)]
        self._strip: tuple[tuple[int, int], np.ndarray[Any, Any], list[str | None], list[float | None]] | None = None

    def __len__(self) -> int:
        return len(self.chips)

    def __getitem__(self, index: int) -> dict[str, Any]:
        from rasterio.windows import Window

        file_index, top, left, number, count = self.chips[index]
        path, (height, width) = self.files[file_index], self.shapes[file_index]
        window = Window(left, top, min(self.chip_size, width - left), min(self.chip_size, height - top))
        try:
            strip = self._strip
            if strip is None or strip[0] != (file_index, top):
                # one read per row of chips (the full width, chip_size rows: the stride plus the overlap), not one per chip:
                # memory is bounded by a strip, and compressed blocks are decoded once rather than once per overlapping chip
                self._strip = strip = None  # never keep the previous strip alive beside the new one
                with gdal_cache(self.gdal_cache_mb):  # entered here, so it holds in DataLoader worker processes too
                    strip = self._strip = ((file_index, top), *read_raster_nodata(path, len(self.bands), Window(0, top, width, window.height)))
            _, raw, descriptions, nodata_values = strip
            x, valid = prepare_image(raw[:, :, left : left + window.width], descriptions, nodata_values, path, self.bands, self.band_indices,
                                     self.normalization, self.scale, self.nodata)
        except DataError as exc:  # say where in the scene, not only which scene
            raise DataError(f"{exc} (in the chip at rows {top}..{top + window.height}, columns {left}..{left + window.width})") from exc
        sample: dict[str, Any] = {"input": _pad_to(x, self.chip_size).contiguous(), "meta": str(path),
                                  "chip": torch.tensor([top, left, height, width, number, count])}
        if valid is not None:
            padded = torch.zeros(self.chip_size, self.chip_size, dtype=torch.bool)
            padded[: valid.shape[0], : valid.shape[1]] = valid
            sample["valid"] = padded
        return sample


def _split(n: int, val_fraction: float, test_fraction: float, seed: int, labels: Sequence[Any] | None = None) -> tuple[list[int], list[int], list[int]]:
    """A seeded split, stratified by class for single-label data."""
    rng = np.random.default_rng(seed)
    groups: dict[Any, list[int]] = {}
    for i in range(n):
        key = labels[i] if labels is not None and isinstance(labels[i], int | np.integer) else 0
        groups.setdefault(key, []).append(i)
    train, val, test = [], [], []
    for members in groups.values():
        members = [members[j] for j in rng.permutation(len(members))]
        n_test = int(round(test_fraction * len(members)))
        n_val = int(round(val_fraction * len(members)))
        test += members[:n_test]
        val += members[n_test : n_test + n_val]
        train += members[n_test + n_val :]
    return sorted(train), sorted(val), sorted(test)


def spatial_blocks(paths: Sequence[Path], block_size: float) -> tuple[list[tuple[int, int]], str]:
    """For each file, the block ``(floor(x / block_size), floor(y / block_size))`` its centre
    falls in (CRS units, from the file's transform: the centre of its bounds), and the files' one CRS. A file without a
    CRS, or in another CRS than the first file, is an error naming both."""
    import rasterio
    from rasterio.errors import RasterioIOError

    blocks: list[tuple[int, int]] = []
    first: tuple[Path, Any] | None = None
    for path in paths:
        try:
            with rasterio.open(path) as src:  # header only
                crs, bounds = src.crs, src.bounds
        except RasterioIOError as exc:
            raise DataError(f"not a readable raster (truncated or not a GeoTIFF?): {exc}", path=path) from exc
        if crs is None:
            raise DataError(f"has no CRS, so block_size={block_size} cannot place it in a spatial block; georeference it "
                            "(e.g. gdal_edit.py -a_srs) or leave block_size unset", path=path)
        if first is None:
            first = (path, crs)
        elif crs != first[1]:
            raise DataError(f"is in {crs.to_string()} but {first[0]} is in {first[1].to_string()}: block_size is in one CRS's units, "
                            "so spatial blocks need every file in one CRS; reproject them onto one first (e.g. gdalwarp -t_srs)", path=path)
        x, y = (bounds.left + bounds.right) / 2, (bounds.bottom + bounds.top) / 2  # the footprint's centre
        blocks.append((math.floor(x / block_size), math.floor(y / block_size)))
    return blocks, "" if first is None else first[1].to_string()


def check_fold_options(owner: str, fold: int | None, num_folds: int, block_size: float | None) -> None:
    """Fold options that are wrong whatever the data: refused when the module is built."""
    if block_size is not None:
        if fold is None:
            raise ConfigError(f"{owner}(block_size={block_size}) needs fold (0 .. num_folds - 1): block_size groups the files into "
                              "spatial blocks for cross-validation folds")
        if not block_size > 0:
            raise ConfigError(f"{owner}(block_size={block_size}): a block size is a positive length in the files' CRS units")
    if fold is None:
        return
    check_fold(fold, num_folds, owner)


def spatial_fold(
    paths: Sequence[Path], fold: int, num_folds: int, block_size: float | None, seed: int, source: str | Path,
) -> tuple[list[int], list[int]]:
    """``(train, held_out)`` indices of ``fold``: files dealt into ``num_folds`` folds by
    :func:`polyfm.core.data.fold_indices`, whole spatial blocks at a time with ``block_size`` (so
    no block, and no autocorrelated neighbourhood inside it, is on both sides), else one by one."""
    groups: list[tuple[int, int]] | None = None
    if block_size is not None:
        groups, crs = spatial_blocks(paths, block_size)
        count = len(set(groups))
        if count < num_folds:
            raise ConfigError(
                f"the {len(paths)} files of {source} have their centres in {count} spatial block(s) of {block_size} {crs} units, "
                f"fewer than the {num_folds} folds: use a smaller block_size or num_folds <= {count}"
            )
    train, held_out = fold_indices(len(paths), num_folds, fold, groups=groups, seed=seed)
    log.info("fold %d of %d (%s): %d files train, %d held out%s", fold, num_folds, source, len(train), len(held_out),
             "" if groups is None else f" ({len({groups[i] for i in held_out})} of {len(set(groups))} blocks of {block_size})")
    return train.tolist(), held_out.tolist()


class GeoTiffDataModule(DictDataModule):
    """Scene classification from a GeoTIFF folder (``root/<class>/*.tif``) or a label CSV.

    ``bands`` names the files' bands; ``normalization`` is the weights' normalisation
    for those bands: a registered weight name (its statistics are picked by band name),
    or ``model.input_normalization()`` after ``model.adapt_bands(bands)``.
    Train/val/test come from ``val_csv``/``test_csv`` when given, else from a seeded,
    stratified split of the one source. ``predict_paths`` (GeoTIFF files or folders of them,
    unlabelled) are what ``predict`` reads; without them it reads the test split. With
    ``predict_chip_size`` each of them is cut into chips (every ``predict_stride`` pixels,
    :class:`GeoTiffChips`) and every chip is classified (one CSV row per chip, with its bounds);
    ``predict_gdal_cache_mb`` caps GDAL's block cache while the chips are read (:func:`gdal_cache`).

    Cross-validation (``fold`` 0 .. ``num_folds`` - 1, ``polyfm cv``): the source's files are dealt
    into folds by :func:`polyfm.core.data.fold_indices` (``seed``); fold ``k`` is the validation
    split, and the test split too unless ``test_csv`` is given (``val_fraction``/``test_fraction``
    are not used). Chips of one area are spatially autocorrelated, so a random deal puts near
    copies of validation chips into training; ``block_size`` (in the files' CRS units) deals whole
    blocks ``(floor(x / block_size), floor(y / block_size))`` of each file's centre instead.
    """

    def __init__(
        self,
        bands: list[str],
        root: str | None = None,
        csv_path: str | None = None,
        val_csv: str | None = None,
        test_csv: str | None = None,
        path_column: str = "path",
        label_column: str | None = "label",
        label_columns: list[str] | None = None,
        multilabel: bool = False,
        normalization: str | dict[str, Any] | Normalization | None = None,
        chip_size: int | None = None,
        band_indices: list[int] | None = None,
        val_fraction: float = 0.2,
        test_fraction: float = 0.2,
        fold: int | None = None,
        num_folds: int = 5,
        block_size: float | None = None,
        augment: bool = False,
        scale: float = 1.0,
        nodata: NodataPolicy = "error",
        predict_paths: list[str] | None = None,
        predict_chip_size: int | None = None,
        predict_stride: int | None = None,
        predict_gdal_cache_mb: int | None = DEFAULT_GDAL_CACHE_MB,
        batch_size: int = 32,
        num_workers: int = 0,
        label_fraction: float = 1.0,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, label_fraction=label_fraction, seed=seed)
        check_nodata_policy(nodata)
        self.scale, self.nodata, self.predict_paths = scale, nodata, predict_paths
        self.predict_chip_size, self.predict_stride = predict_chip_size, predict_stride
        check_gdal_cache_mb(predict_gdal_cache_mb, "predict_gdal_cache_mb")
        self.predict_gdal_cache_mb = predict_gdal_cache_mb
        if (root is None) == (csv_path is None):
            raise ConfigError("give exactly one of root (class-per-folder) or csv_path")
        check_fold_options("GeoTiffDataModule", fold, num_folds, block_size)
        if fold is not None and val_csv is not None:
            raise ConfigError(f"GeoTiffDataModule(fold={fold}) holds out that fold as the validation split: leave val_csv unset "
                              f"(got val_csv={val_csv!r})")
        self.fold, self.num_folds, self.block_size = fold, num_folds, block_size
        self.bands, self.root, self.csv_path, self.val_csv, self.test_csv = bands, root, csv_path, val_csv, test_csv
        self.path_column, self.label_column, self.label_columns = path_column, label_column, label_columns
        self.multilabel = multilabel
        kept = bands if band_indices is None else [bands[i] for i in band_indices]
        self.normalization = resolve_normalization(normalization, kept)
        self.chip_size, self.band_indices, self.augment = chip_size, band_indices, augment
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.class_names: list[str] = []
        self._train_labels: list[Any] | None = None

    def _dataset(self, items: Sequence[tuple[Path, Any]], augment: bool) -> GeoTiffClassification:
        return GeoTiffClassification(items, self.bands, self.normalization, self.chip_size, self.band_indices, self.multilabel, augment,
                                     self.scale, self.nodata)

    def build(self) -> tuple[Dataset[Any], Dataset[Any] | None, Dataset[Any] | None]:
        if self.root is not None:
            items, self.class_names = scan_class_folders(self.root)
        else:
            assert self.csv_path is not None  # __init__ requires exactly one of root and csv_path
            items, self.class_names = self._read_csv(self.csv_path)
        if self.fold is not None:
            source = self.root if self.root is not None else self.csv_path
            assert source is not None
            tr, held = spatial_fold([p for p, _ in items], self.fold, self.num_folds, self.block_size, self.seed, source)
            train_items, val_items = [items[i] for i in tr], [items[i] for i in held]
            test_items = val_items
            if self.test_csv:
                test_items = self._read_csv(self.test_csv, self.class_names)[0]
        elif self.val_csv or self.test_csv:
            train_items = items
            val_items = self._read_csv(self.val_csv, self.class_names)[0] if self.val_csv else []
            test_items = self._read_csv(self.test_csv, self.class_names)[0] if self.test_csv else []
        else:
            labels = [label for _, label in items]
            tr, va, te = _split(len(items), self.val_fraction, self.test_fraction, self.seed, None if self.multilabel else labels)
            train_items, val_items, test_items = [items[i] for i in tr], [items[i] for i in va], [items[i] for i in te]
        self._train_labels = [label for _, label in train_items]
        return (
            self._dataset(train_items, self.augment),
            self._dataset(val_items, False) if val_items else None,
            self._dataset(test_items, False) if test_items else None,
        )

    def _read_csv(self, path: str | Path, class_names: Sequence[str] | None = None) -> tuple[list[tuple[Path, Any]], list[str]]:
        return read_label_csv(path, path_column=self.path_column, label_column=self.label_column, label_columns=self.label_columns,
                              class_names=class_names, multilabel=self.multilabel)

    def train_labels(self) -> Sequence[Any] | None:
        return None if self.multilabel else self._train_labels

    def predict_dataloader(self) -> DataLoader[Any]:
        """Unlabelled GeoTIFFs from ``predict_paths`` (files or folders), else the test split."""
        if not self.predict_paths:
            return super().predict_dataloader()
        from polyfm.geo.predict import raster_files

        files = raster_files(self.predict_paths)
        if self.predict_chip_size:
            return self._loader(GeoTiffChips(files, self.bands, self.predict_chip_size, self.predict_stride, self.normalization,
                                             self.band_indices, self.scale, self.nodata, self.predict_gdal_cache_mb), False)
        return self._loader(self._dataset([(p, None) for p in files], False), False)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


class GeoTiffSegmentationDataModule(DictDataModule):
    """Segmentation from a CSV with ``image`` and ``mask`` columns (paths relative to the CSV);
    ``predict_paths`` (files or folders) are the unlabelled images ``predict`` reads: whole, or,
    with ``predict_chip_size``, as overlapping chips every ``predict_stride`` pixels (default:
    a quarter of the chip overlaps) that :class:`polyfm.geo.predict.GeoPredictionWriter`
    stitches back into one class map per file (:class:`GeoTiffChips`); ``predict_gdal_cache_mb``
    caps GDAL's block cache while the chips are read (:func:`gdal_cache`; the writer has its own).

    Cross-validation (``fold`` 0 .. ``num_folds`` - 1): the pairs are dealt into folds by
    :func:`polyfm.core.data.fold_indices`; fold ``k`` is the validation and the test split.
    ``block_size`` (CRS units) keeps each spatial block of image centres on one side, as in
    :class:`GeoTiffDataModule`."""

    def __init__(
        self,
        csv_path: str,
        bands: list[str],
        num_classes: int,
        normalization: str | dict[str, Any] | Normalization | None = None,
        band_indices: list[int] | None = None,
        val_fraction: float = 0.2,
        test_fraction: float = 0.2,
        fold: int | None = None,
        num_folds: int = 5,
        block_size: float | None = None,
        scale: float = 1.0,
        nodata: NodataPolicy = "error",
        predict_paths: list[str] | None = None,
        predict_chip_size: int | None = None,
        predict_stride: int | None = None,
        predict_gdal_cache_mb: int | None = DEFAULT_GDAL_CACHE_MB,
        class_names: list[str] | None = None,
        batch_size: int = 8,
        num_workers: int = 0,
        label_fraction: float = 1.0,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, label_fraction=label_fraction, seed=seed)
        check_nodata_policy(nodata)
        self.scale, self.nodata, self.predict_paths = scale, nodata, predict_paths
        self.predict_chip_size, self.predict_stride = predict_chip_size, predict_stride
        check_gdal_cache_mb(predict_gdal_cache_mb, "predict_gdal_cache_mb")
        self.predict_gdal_cache_mb = predict_gdal_cache_mb
        self.csv_path, self.bands, self.num_classes = Path(csv_path), bands, num_classes
        check_fold_options("GeoTiffSegmentationDataModule", fold, num_folds, block_size)
        self.fold, self.num_folds, self.block_size = fold, num_folds, block_size
        if class_names is not None and len(class_names) != num_classes:
            raise ConfigError(f"class_names has {len(class_names)} names {class_names} for num_classes={num_classes}")
        self.class_names = list(class_names or [])  # written into prediction GeoTIFFs' tags
        self.normalization = resolve_normalization(normalization, bands if band_indices is None else [bands[i] for i in band_indices])
        self.band_indices, self.val_fraction, self.test_fraction = band_indices, val_fraction, test_fraction

    def build(self) -> tuple[Dataset[Any], Dataset[Any] | None, Dataset[Any] | None]:
        pairs: list[tuple[Path, Path]] = []
        with open(self.csv_path, newline="") as handle:
            reader = csv.DictReader(handle)
            if not {"image", "mask"} <= set(reader.fieldnames or []):
                raise DataError(f"needs columns image and mask; the header is {reader.fieldnames}", path=self.csv_path)
            for number, row in enumerate(reader, start=2):
                image, mask = (self.csv_path.parent / row["image"]), (self.csv_path.parent / row["mask"])
                for p in (image, mask):
                    if not p.exists():
                        raise DataError(f"{p.name} does not exist", path=self.csv_path, row=number)
                pairs.append((image, mask))
        if not pairs:
            raise DataError("has no rows", path=self.csv_path)
        if self.fold is not None:  # the held-out fold is the validation and the test split
            tr, va = spatial_fold([image for image, _ in pairs], self.fold, self.num_folds, self.block_size, self.seed, self.csv_path)
            te = va
        else:
            tr, va, te = _split(len(pairs), self.val_fraction, self.test_fraction, self.seed)
        train, val, test = ([pairs[i] for i in ix] for ix in (tr, va, te))
        return self._dataset(train), self._dataset(val) if val else None, self._dataset(test) if test else None

    def _dataset(self, pairs: Sequence[tuple[Path, Path | None]]) -> GeoTiffSegmentation:
        return GeoTiffSegmentation(pairs, self.bands, self.normalization, self.band_indices, self.num_classes, self.scale, self.nodata)

    def predict_dataloader(self) -> DataLoader[Any]:
        """Unlabelled images from ``predict_paths`` (files or folders; whole files or chips, one
        class-id GeoTIFF each with :class:`polyfm.geo.predict.GeoPredictionWriter`), else the
        test split."""
        if not self.predict_paths:
            return super().predict_dataloader()
        import rasterio

        from polyfm.geo.predict import raster_files

        files = raster_files(self.predict_paths)
        if self.predict_chip_size:  # chips of one size batch together, whatever the scenes' sizes
            return self._loader(GeoTiffChips(files, self.bands, self.predict_chip_size, self.predict_stride, self.normalization,
                                             self.band_indices, self.scale, self.nodata, self.predict_gdal_cache_mb), False)
        dataset = self._dataset([(p, None) for p in files])
        sizes = set()
        for path in files:
            with rasterio.open(path) as src:  # header only
                sizes.add((src.height, src.width))
        if len(sizes) > 1:  # whole files of different sizes cannot share a batch
            return DataLoader(dataset, batch_size=1, num_workers=self.num_workers, pin_memory=self.pin_memory)
        return self._loader(dataset, False)


# ----------------------------------------------------------------------------- torchgeo datasets


class TorchGeoClassification(Dataset[dict[str, Any]]):
    """A torchgeo classification dataset (``image``/``label`` samples) as polyfm dicts."""

    def __init__(self, dataset: Any, normalization: Normalization | None = None, chip_size: int | None = None, multilabel: bool = False) -> None:
        self.dataset, self.normalization, self.chip_size, self.multilabel = dataset, normalization, chip_size, multilabel

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.dataset[index]
        x = sample["image"].float()
        if self.normalization is not None:
            x = self.normalization(x)
        label = sample["label"]
        target = label.float() if self.multilabel else label.long()
        samples = getattr(self.dataset, "samples", None)  # ImageFolder-based datasets (EuroSAT) know each file
        meta = str(samples[index][0]) if isinstance(samples, list) and index < len(samples) else index
        return {"input": _fit_size(x, self.chip_size), "target": target, "meta": meta}


def torchgeo_bands(dataset: Any) -> list[str]:
    """Band names of a torchgeo dataset instance (``bands`` attribute), canonicalised."""
    bands = getattr(dataset, "bands", None) or getattr(dataset, "all_band_names", None)
    if not bands:
        raise ConfigError(f"{type(dataset).__name__} does not say which bands it returns; pass bands explicitly")
    return [canonical_band(b) for b in bands]


class TorchGeoDataModule(DictDataModule):
    """Any ``torchgeo.datasets`` classification dataset by name and path (no download).

    ``dataset="EuroSAT"``, ``root="/data/eurosat"``; ``dataset_args`` go to its
    constructor (e.g. ``{"bands": [...]}``). Splits are ``train``/``val``/``test``.
    """

    def __init__(
        self,
        dataset: str,
        root: str,
        dataset_args: dict[str, Any] | None = None,
        normalization: str | dict[str, Any] | Normalization | None = None,
        multilabel: bool = False,
        chip_size: int | None = None,
        batch_size: int = 32,
        num_workers: int = 0,
        label_fraction: float = 1.0,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, label_fraction=label_fraction, seed=seed)
        self.dataset_name, self.root, self.dataset_args = dataset, root, dict(dataset_args or {})
        self.normalization_spec = normalization
        self.normalization: Normalization | None = None
        self.multilabel, self.chip_size = multilabel, chip_size
        self.bands: list[str] = []

    def make_split(self, split: str) -> Any:
        import torchgeo.datasets as tgd

        cls = getattr(tgd, self.dataset_name, None)
        if cls is None:
            raise ConfigError(f"torchgeo.datasets has no dataset {self.dataset_name!r}")
        try:
            return cls(root=self.root, split=split, download=False, **self.dataset_args)
        except Exception as exc:  # torchgeo raises DatasetNotFoundError and others
            raise DataError(f"torchgeo {self.dataset_name} ({split}) cannot be read: {exc}", path=self.root) from exc

    def build(self) -> tuple[Dataset[Any], Dataset[Any] | None, Dataset[Any] | None]:
        splits = {s: self.make_split(s) for s in ("train", "val", "test")}
        self.bands = torchgeo_bands(splits["train"])  # the dataset's own order (EuroSAT puts B8A last)
        self.normalization = resolve_normalization(self.normalization_spec, self.bands)
        self.class_names = list(getattr(splits["train"], "classes", []))
        return tuple(TorchGeoClassification(splits[s], self.normalization, self.chip_size, self.multilabel) for s in ("train", "val", "test"))  # type: ignore[return-value]


# ----------------------------------------------------------------------------- chips from scenes


def raster_dataset(
    paths: str | Path | Sequence[str | Path],
    bands: Sequence[str] | None = None,
    separate_files: bool = False,
    filename_glob: str = "*.tif",
    filename_regex: str = ".*",
    res: float | None = None,
) -> Any:
    """A torchgeo ``RasterDataset`` over GeoTIFFs without writing a subclass.

    One file per band (``separate_files``): ``filename_regex`` has a ``(?P<band>...)``
    group and ``filename_glob`` matches the first band's file, as torchgeo expects.
    """
    from torchgeo.datasets import RasterDataset

    attrs: dict[str, Any] = {"filename_glob": filename_glob, "filename_regex": filename_regex, "separate_files": separate_files}
    if bands is not None:
        attrs["all_bands"] = tuple(bands)
    cls = type("PolyfmRasterDataset", (RasterDataset,), attrs)
    kwargs: dict[str, Any] = {"bands": list(bands) if bands is not None else None}
    if res is not None:
        kwargs["res"] = res
    try:
        dataset = cls(paths=paths, **kwargs)
    except Exception as exc:  # DatasetNotFoundError when nothing matches
        raise DataError(f"no raster matching {filename_glob!r} / {filename_regex!r} could be indexed: {exc}", path=paths) from exc
    if separate_files:
        check_band_stack(dataset)
    return dataset


def _scene_files(dataset: Any) -> list[list[str]]:
    """For each indexed scene of a RasterDataset, the file each channel is read from."""
    files = [str(f) for f in dataset.index.filepath]
    if getattr(dataset, "separate_files", False):
        return [[dataset._update_filepath(band, f) for band in dataset.bands] for f in files]  # torchgeo's own rule
    return [[f] for f in files]


def check_band_stack(dataset: Any) -> None:
    """One file per band: every band file must exist and share the first one's CRS and
    resolution. torchgeo would otherwise reproject/resample the odd one silently."""
    import rasterio

    for files in _scene_files(dataset):
        reference: tuple[str, Any, tuple[float, ...]] | None = None
        for band, path in zip(dataset.bands, files, strict=True):
            if not Path(path).exists():
                raise DataError(f"band {band!r} file does not exist (derived from {files[0]} with filename_regex's 'band' group)", path=path)
            with rasterio.open(path) as src:
                crs, res = src.crs, tuple(float(r) for r in src.res)
            if reference is None:
                reference = (path, crs, res)
                continue
            first, first_crs, first_res = reference
            if crs != first_crs or not np.allclose(res, first_res, rtol=1e-6, atol=0):
                raise DataError(
                    f"band {band!r} is on another grid than {first}: CRS {crs} vs {first_crs}, resolution {res} vs {first_res}. "
                    "A band stack needs one grid; reproject or resample the band files onto it first (e.g. gdalwarp -t_srs/-tr)",
                    path=path,
                )


def dataset_nodata(dataset: Any) -> list[tuple[float | None, str]] | None:
    """Each channel's declared nodata value and the file it comes from, for a RasterDataset
    (or an intersection of them), read from its first scene's files; ``None`` when the
    dataset type is not understood."""
    import rasterio
    from torchgeo.datasets import IntersectionDataset, RasterDataset

    if isinstance(dataset, IntersectionDataset):
        parts = [dataset_nodata(d) for d in dataset.datasets]
        return None if any(p is None for p in parts) else [v for p in parts for v in p]  # type: ignore[union-attr]
    if not isinstance(dataset, RasterDataset) or not dataset.is_image or len(dataset.index) == 0:
        return None
    values: list[tuple[float | None, str]] = []
    for path in _scene_files(dataset)[0]:
        with rasterio.open(path) as src:
            declared = [None if v is None else float(v) for v in src.nodatavals]
        indexes = [1] if getattr(dataset, "separate_files", False) else (dataset.band_indexes or range(1, len(declared) + 1))
        values.extend((declared[i - 1], Path(path).name) for i in indexes)
    return values


def _tile_files(index: Any, row: int) -> list[str]:
    return [str(index[c].iloc[row]) for c in index.columns if str(c).startswith("filepath")]


def check_tiles_fit(dataset: Any, size: int) -> None:
    """torchgeo's samplers skip tiles smaller than the chip without a word: refuse them instead."""
    res = dataset.res
    for row, geometry in enumerate(dataset.index.geometry):
        xmin, ymin, xmax, ymax = geometry.bounds
        width, height = round((xmax - xmin) / res[0]), round((ymax - ymin) / res[1])
        if width < size or height < size:
            raise DataError(
                f"covers {width} x {height} px, smaller than the {size} px chips; the samplers would skip it silently. "
                "Use a smaller chip size, or leave the file out",
                path=", ".join(_tile_files(dataset.index, row)),
            )


def _edge_aligned_grid_sampler(dataset: Any, size: int, stride: int) -> Any:
    """torchgeo's ``GridGeoSampler`` with its last row and column of chips moved inside the
    tile (ending at its edge) instead of running past it, where the merge would fill the chip
    with nodata or zeros; same chip count, same order."""
    from torchgeo.samplers import GridGeoSampler
    from torchgeo.samplers.utils import tile_to_chips

    class EdgeAlignedGridGeoSampler(GridGeoSampler):
        def __iter__(self):  # type: ignore[no-untyped-def]
            for i in range(len(self.index)):
                xmin, ymin, xmax, ymax = self.index.geometry.iloc[i].bounds
                if xmax - xmin < self.size[1] or ymax - ymin < self.size[0]:
                    continue
                times = self.index.index[i]
                rows, cols = tile_to_chips((xmin, ymin, xmax, ymax), self.size, self.stride)
                for r in range(rows):
                    top = min(ymin + r * self.stride[0], ymax - self.size[0])
                    for c in range(cols):
                        left = min(xmin + c * self.stride[1], xmax - self.size[1])
                        yield slice(left, left + self.size[1]), slice(top, top + self.size[0]), slice(times.left, times.right)

    return EdgeAlignedGridGeoSampler(dataset, size=size, stride=stride)


def chip_loader(
    dataset: Any,
    size: int,
    sampler: str = "random",
    length: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
    normalization: Normalization | None = None,
    seed: int = 0,
    num_workers: int = 0,
    nodata: NodataPolicy = "error",
) -> DataLoader[Any]:
    """Chips from a torchgeo GeoDataset with ``RandomGeoSampler`` or ``GridGeoSampler``,
    batched as ``{"input": (B, C, size, size), "meta": [bounds]}``. Reading and
    normalising run in ``num_workers`` processes (pinned batches on CUDA), so a GPU
    pretraining run is not fed by one core.

    Tiles smaller than ``size`` are refused (torchgeo would skip them); grid chips stay
    inside their tile; pixels at the files' declared nodata value follow ``nodata``
    (``"error"``, ``"fill"`` with a ``valid`` mask ``(B, H, W)`` in the batch, ``"keep"``)."""
    from torchgeo.datasets import stack_samples
    from torchgeo.samplers import RandomGeoSampler

    check_nodata_policy(nodata)
    if sampler not in ("random", "grid"):
        raise ConfigError(f"sampler must be 'random' or 'grid', got {sampler!r}")
    check_tiles_fit(dataset, size)
    if sampler == "random":
        geo_sampler: Any = RandomGeoSampler(dataset, size=size, length=length, generator=torch.Generator().manual_seed(seed))
    else:
        geo_sampler = _edge_aligned_grid_sampler(dataset, size, stride or size)
    declared = dataset_nodata(dataset) if nodata != "keep" else None
    nodata_values = None if declared is None else [v for v, _ in declared]
    names = [canonical_band(b) for b in getattr(dataset, "bands", None) or []]
    if declared is not None:  # name each channel's band and file in errors
        names = [f"{names[c] if len(names) == len(declared) else f'channel {c}'} of {file}" for c, (_, file) in enumerate(declared)]

    def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = stack_samples(samples)
        x = batch["image"].float()
        out: dict[str, Any] = {"meta": [str(b) for b in batch["bounds"]]}
        if nodata_values is not None:
            first = batch["bounds"][0]
            where = f"chip x {first[0].start:.6g}..{first[0].stop:.6g}, y {first[1].start:.6g}..{first[1].stop:.6g}"
            x, valid = handle_nodata(x, nodata_mask(x, nodata_values), nodata_values, nodata, names, normalization,
                                     where + (f" (and {len(samples) - 1} more in the batch)" if len(samples) > 1 else ""))
            if valid is not None:
                out["valid"] = valid
        if normalization is not None:
            x = normalization(x)
        out["input"] = x
        return out

    return DataLoader(
        dataset, sampler=geo_sampler, batch_size=batch_size, collate_fn=collate, num_workers=num_workers,
        pin_memory=torch.cuda.is_available(), persistent_workers=num_workers > 0,
    )  # fmt: skip


class ChipDataModule(L.LightningDataModule):
    """Unlabelled chips from large scenes for pretraining (``{"input", "meta"}``): random chips
    (``RandomGeoSampler``) to train, a regular grid (``GridGeoSampler``) to validate."""

    def __init__(
        self,
        paths: list[str],
        bands: list[str] | None = None,
        separate_files: bool = False,
        filename_glob: str = "*.tif",
        filename_regex: str = ".*",
        size: int = 32,
        length: int = 64,
        batch_size: int = 8,
        normalization: str | dict[str, Any] | Normalization | None = None,
        seed: int = 0,
        num_workers: int = 0,
        nodata: NodataPolicy = "error",
    ) -> None:
        super().__init__()
        check_nodata_policy(nodata)
        self.num_workers, self.nodata = num_workers, nodata
        self.paths, self.bands, self.separate_files = paths, bands, separate_files
        self.filename_glob, self.filename_regex = filename_glob, filename_regex
        self.size, self.length, self.batch_size, self.seed = size, length, batch_size, seed
        self.normalization_spec = normalization
        self.normalization: Normalization | None = None
        self.dataset: Any = None

    def setup(self, stage: str | None = None) -> None:
        if self.dataset is None:
            self.dataset = raster_dataset(self.paths, self.bands, self.separate_files, self.filename_glob, self.filename_regex)
            self.normalization = resolve_normalization(self.normalization_spec, self.dataset.bands)

    def train_dataloader(self) -> DataLoader[Any]:
        return chip_loader(self.dataset, self.size, "random", self.length, None, self.batch_size, self.normalization, self.seed, self.num_workers,
                           self.nodata)

    def val_dataloader(self) -> DataLoader[Any]:
        return chip_loader(self.dataset, self.size, "grid", None, self.size, self.batch_size, self.normalization, self.seed, self.num_workers,
                           self.nodata)
