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
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from polyfm.core.data import DictDataModule
from polyfm.core.errors import ConfigError, DataError
from polyfm.geo.bands import Normalization, canonical_band, resolve_normalization

RASTER_SUFFIXES = (".tif", ".tiff")


# ----------------------------------------------------------------------------- reading


def read_raster(path: str | Path, expected_bands: int | None = None) -> tuple[np.ndarray, list[str | None]]:
    """``(C, H, W)`` array and the band descriptions of a GeoTIFF; clear errors on bad files."""
    import rasterio
    from rasterio.errors import RasterioIOError

    path = Path(path)
    if not path.exists():
        raise DataError("file does not exist", path=path)
    try:
        with rasterio.open(path) as src:
            array = src.read()
            descriptions = list(src.descriptions)
    except RasterioIOError as exc:
        raise DataError(f"not a readable raster (truncated or not a GeoTIFF?): {exc}", path=path) from exc
    if expected_bands is not None and array.shape[0] != expected_bands:
        raise DataError(
            f"has {array.shape[0]} bands but {expected_bands} band names were declared; "
            "give the file's band names in its own order (bands=[...])",
            path=path,
        )
    return array, descriptions


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


def _select(array: np.ndarray, band_indices: Sequence[int] | None) -> np.ndarray:
    return array if band_indices is None else array[list(band_indices)]


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
        raw = [r[label_column] for r in rows]  # type: ignore[index]
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
        value = (row[label_column] or "").strip()  # type: ignore[index]
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

    ``bands`` names the file's bands in file order; ``band_indices`` keeps a subset (in
    that order); ``normalization`` applies to the kept bands.
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
    ) -> None:
        self.items, self.bands = list(items), [canonical_band(b) for b in bands]
        self.normalization, self.chip_size, self.band_indices = normalization, chip_size, band_indices
        self.multilabel, self.augment = multilabel, augment

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path, label = self.items[index]
        array, _ = read_raster(path, expected_bands=len(self.bands))
        x = torch.from_numpy(_select(array, self.band_indices).astype(np.float32))
        if not torch.isfinite(x).all():
            raise DataError("holds NaN or Inf values", path=path)
        if self.normalization is not None:
            x = self.normalization(x)
        x = _fit_size(x, self.chip_size)
        if self.augment:
            if torch.rand(()) < 0.5:
                x = x.flip(-1)
            x = torch.rot90(x, int(torch.randint(0, 4, ())), dims=(-2, -1))
        target = torch.tensor(label, dtype=torch.float32) if self.multilabel else torch.tensor(label, dtype=torch.long)
        return {"input": x.contiguous(), "target": target, "meta": str(path)}


class GeoTiffSegmentation(Dataset[dict[str, Any]]):
    """Semantic segmentation from ``(image.tif, mask.tif)`` pairs (mask: one band of class ids)."""

    def __init__(
        self,
        pairs: Sequence[tuple[Path, Path]],
        bands: Sequence[str],
        normalization: Normalization | None = None,
        band_indices: Sequence[int] | None = None,
        num_classes: int | None = None,
    ) -> None:
        self.pairs, self.bands = list(pairs), [canonical_band(b) for b in bands]
        self.normalization, self.band_indices, self.num_classes = normalization, band_indices, num_classes

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image_path, mask_path = self.pairs[index]
        array, _ = read_raster(image_path, expected_bands=len(self.bands))
        mask, _ = read_raster(mask_path, expected_bands=1)
        if mask.shape[-2:] != array.shape[-2:]:
            raise DataError(f"mask is {mask.shape[-2:]} but its image {image_path.name} is {array.shape[-2:]}", path=mask_path)
        if self.num_classes is not None and (mask.max() >= self.num_classes or mask.min() < 0):
            raise DataError(f"mask holds class ids {int(mask.min())}..{int(mask.max())}, outside 0..{self.num_classes - 1}", path=mask_path)
        x = torch.from_numpy(_select(array, self.band_indices).astype(np.float32))
        if self.normalization is not None:
            x = self.normalization(x)
        return {"input": x, "target": torch.from_numpy(mask.astype(np.int64)), "meta": str(image_path)}


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


class GeoTiffDataModule(DictDataModule):
    """Scene classification from a GeoTIFF folder (``root/<class>/*.tif``) or a label CSV.

    ``bands`` names the files' bands; ``normalization`` is the weights' normalisation
    for those bands: a registered weight name (its statistics are picked by band name),
    or ``model.input_normalization()`` after ``model.adapt_bands(bands)``.
    Train/val/test come from ``val_csv``/``test_csv`` when given, else from a seeded,
    stratified split of the one source.
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
        augment: bool = False,
        batch_size: int = 32,
        num_workers: int = 0,
        label_fraction: float = 1.0,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, label_fraction=label_fraction, seed=seed)
        if (root is None) == (csv_path is None):
            raise ConfigError("give exactly one of root (class-per-folder) or csv_path")
        self.bands, self.root, self.csv_path, self.val_csv, self.test_csv = bands, root, csv_path, val_csv, test_csv
        self.csv_options = {"path_column": path_column, "label_column": label_column, "label_columns": label_columns, "multilabel": multilabel}
        self.multilabel = multilabel
        kept = bands if band_indices is None else [bands[i] for i in band_indices]
        self.normalization = resolve_normalization(normalization, kept)
        self.chip_size, self.band_indices, self.augment = chip_size, band_indices, augment
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.class_names: list[str] = []
        self._train_labels: list[Any] | None = None

    def _dataset(self, items: Sequence[tuple[Path, Any]], augment: bool) -> GeoTiffClassification:
        return GeoTiffClassification(items, self.bands, self.normalization, self.chip_size, self.band_indices, self.multilabel, augment)

    def build(self) -> tuple[Dataset[Any], Dataset[Any] | None, Dataset[Any] | None]:
        if self.root is not None:
            items, self.class_names = scan_class_folders(self.root)
        else:
            items, self.class_names = read_label_csv(self.csv_path, **self.csv_options)  # type: ignore[arg-type]
        if self.val_csv or self.test_csv:
            read = lambda p: read_label_csv(p, class_names=self.class_names, **{k: v for k, v in self.csv_options.items()})[0]  # noqa: E731
            train_items = items
            val_items = read(self.val_csv) if self.val_csv else []
            test_items = read(self.test_csv) if self.test_csv else []
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

    def train_labels(self) -> Sequence[Any] | None:
        return None if self.multilabel else self._train_labels

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


class GeoTiffSegmentationDataModule(DictDataModule):
    """Segmentation from a CSV with ``image`` and ``mask`` columns (paths relative to the CSV)."""

    def __init__(
        self,
        csv_path: str,
        bands: list[str],
        num_classes: int,
        normalization: str | dict[str, Any] | Normalization | None = None,
        band_indices: list[int] | None = None,
        val_fraction: float = 0.2,
        test_fraction: float = 0.2,
        batch_size: int = 8,
        num_workers: int = 0,
        label_fraction: float = 1.0,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, label_fraction=label_fraction, seed=seed)
        self.csv_path, self.bands, self.num_classes = Path(csv_path), bands, num_classes
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
        tr, va, te = _split(len(pairs), self.val_fraction, self.test_fraction, self.seed)

        def make(ix: list[int]) -> GeoTiffSegmentation:
            return GeoTiffSegmentation([pairs[i] for i in ix], self.bands, self.normalization, self.band_indices, self.num_classes)

        return make(tr), make(va) if va else None, make(te) if te else None


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
        return {"input": _fit_size(x, self.chip_size), "target": target, "meta": index}


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
        return cls(paths=paths, **kwargs)
    except Exception as exc:  # DatasetNotFoundError when nothing matches
        raise DataError(f"no raster matching {filename_glob!r} / {filename_regex!r} could be indexed: {exc}", path=paths) from exc


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
) -> DataLoader[Any]:
    """Chips from a torchgeo GeoDataset with ``RandomGeoSampler`` or ``GridGeoSampler``,
    batched as ``{"input": (B, C, size, size), "meta": [bounds]}``. Reading and
    normalising run in ``num_workers`` processes (pinned batches on CUDA), so a GPU
    pretraining run is not fed by one core."""
    from torchgeo.datasets import stack_samples
    from torchgeo.samplers import GridGeoSampler, RandomGeoSampler

    if sampler == "random":
        geo_sampler: Any = RandomGeoSampler(dataset, size=size, length=length, generator=torch.Generator().manual_seed(seed))
    elif sampler == "grid":
        geo_sampler = GridGeoSampler(dataset, size=size, stride=stride or size)
    else:
        raise ConfigError(f"sampler must be 'random' or 'grid', got {sampler!r}")

    def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = stack_samples(samples)
        x = batch["image"].float()
        if normalization is not None:
            x = normalization(x)
        return {"input": x, "meta": [str(b) for b in batch["bounds"]]}

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
    ) -> None:
        super().__init__()
        self.num_workers = num_workers
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
        return chip_loader(self.dataset, self.size, "random", self.length, None, self.batch_size, self.normalization, self.seed, self.num_workers)

    def val_dataloader(self) -> DataLoader[Any]:
        return chip_loader(self.dataset, self.size, "grid", None, self.size, self.batch_size, self.normalization, self.seed, self.num_workers)
