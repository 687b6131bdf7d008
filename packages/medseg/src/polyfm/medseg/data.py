"""Reading medical volumes: Decathlon ``dataset.json``, NIfTI/DICOM folders, MONAI transforms.

* :func:`read_decathlon` reads a Medical Segmentation Decathlon / nnU-Net style
  ``dataset.json`` (``training``/``validation``/``test`` lists of ``image``/``label``
  paths, ``labels`` as ``{"0": "background", ...}`` or ``{"background": 0, ...}``) and
  checks that every listed file exists.
* :class:`CheckCase` runs right after loading and refuses, naming the case and the fix:
  NaN/Inf voxels, an image whose channel count is not the model's (4D volumes), 4D label
  maps, image/label grids that differ in shape or affine, non-integer labels and labels
  outside ``[0, num_classes)``.
* :func:`segmentation_transforms` builds the MONAI pipeline: orientation, spacing, CT
  window or MR z-score, positive/negative crops; :class:`SegmentationDataModule` caches
  the deterministic part (``CacheDataset`` in memory or ``PersistentDataset`` on disk)
  and yields ``{"input", "target", "meta"}`` batches for polyfm's ``Segmentation`` task.
  With ``fold`` it trains on one cross-validation fold: nnU-Net's ``splits_final.json``
  (:func:`read_nnunet_splits`, case ids by :func:`case_id`) or core's ``fold_indices`` (patient groups by regex).
* :class:`VolumeFolderDataModule` reads unlabelled NIfTI files and DICOM series for
  self-supervised pretraining (random crops, ``{"input", "meta"}`` batches).
* Predictions to NIfTI on the input's grid (``predict_to_nifti``, ``NiftiPredictionWriter``) are
  in :mod:`polyfm.medseg.predict`; :func:`save_overlay_png` draws slices with masks over them.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from monai.data.dataset import CacheDataset, Dataset, PersistentDataset
from monai.data.meta_tensor import MetaTensor
from monai.data.utils import list_data_collate
from monai.transforms.compose import Compose
from monai.transforms.croppad.dictionary import (
    RandCropByLabelClassesd,
    RandCropByPosNegLabeld,
    RandSpatialCropSamplesd,
    SpatialPadd,
)
from monai.transforms.intensity.dictionary import NormalizeIntensityd, RandShiftIntensityd, ScaleIntensityRanged
from monai.transforms.io.dictionary import LoadImaged
from monai.transforms.spatial.array import Orientation
from monai.transforms.spatial.dictionary import Orientationd, RandFlipd, Spacingd
from monai.transforms.transform import MapTransform, Transform
from monai.transforms.utility.dictionary import EnsureTyped, SqueezeDimd

from polyfm.core.data import DictDataModule, EpochSeededSampler, fold_indices
from polyfm.core.errors import ConfigError, DataError

log = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii", ".nii.gz")
#: how far a float label value may sit from an integer and still be that class (rounding noise)
LABEL_TOLERANCE = 1e-3
DICOM_SUFFIXES = (".dcm", ".ima")

#: TotalSegmentator v2 ids of the large abdominal organs (the example CT's label map uses these).
TOTALSEGMENTATOR_ABDOMEN = {
    "spleen": 1, "kidney_right": 2, "kidney_left": 3, "gallbladder": 4, "liver": 5, "stomach": 6,
    "pancreas": 7, "adrenal_gland_right": 8, "adrenal_gland_left": 9, "esophagus": 15, "small_bowel": 18,
    "duodenum": 19, "colon": 20, "urinary_bladder": 21,
}  # fmt: skip


# ----------------------------------------------------------------------------- dataset.json


def read_decathlon(dataset_json: str | Path, section: str = "training") -> tuple[list[dict[str, Any]], list[str]]:
    """Cases of one section of a Decathlon ``dataset.json`` with absolute paths, and the label names.

    An nnU-Net v2 ``dataset.json`` (``channel_names``, ``file_ending``, no ``training`` list) lists
    its training cases through ``labelsTr/`` (or its ``dataset`` key); multi-channel images are
    lists of files, one per channel. Every listed file must exist; a missing one raises a
    DataError naming the entry."""
    path = Path(dataset_json)
    if not path.exists():
        raise DataError("dataset.json not found: pass the path of the Decathlon-style dataset description.", path=path)
    try:
        description = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"not valid JSON ({exc}).", path=path) from exc
    if not isinstance(description, dict):
        raise DataError(f"the top level must be an object with a {section!r} list, not a {type(description).__name__}.", path=path)
    if section in description and not isinstance(description[section], list):
        raise DataError(f"{section!r} must be a list of cases, not a {type(description[section]).__name__}.", path=path)
    root = path.parent
    if section not in description and section == "training" and "file_ending" in description:
        entries = _nnunet_v2_training(description, root, path)  # nnU-Net v2: no list, the folders are the list
    elif section not in description:
        raise DataError(f"has no {section!r} list (sections present: {sorted(k for k, v in description.items() if isinstance(v, list))}).", path=path)
    else:
        entries = description[section]
    cases: list[dict[str, Any]] = []
    missing: list[str] = []
    for index, entry in enumerate(entries):
        if not isinstance(entry, str | dict):
            raise DataError(f"{section} entry {index} is a {type(entry).__name__} ({entry!r:.60}); expected {{'image': ..., 'label': ...}}.", path=path)
        entry = {"image": entry} if isinstance(entry, str) else dict(entry)  # MSD "test" lists bare paths
        if "image" not in entry:
            raise DataError(f"{section} entry {index} has no 'image' key: {entry}.", path=path)
        case: dict[str, Any] = {}
        for key in ("image", "label"):
            if key not in entry:
                continue
            # an image may be one file per channel (nnU-Net v2's case_0000, case_0001, ...): MONAI stacks them
            names = entry[key] if key == "image" and isinstance(entry[key], list) and entry[key] else [entry[key]]
            files = []
            for name in names:
                if not isinstance(name, str) or not name:
                    raise DataError(f"{section}[{index}].{key} must be a file path, got {entry[key]!r:.60}.", path=path)
                file = (root / name).resolve() if not Path(name).is_absolute() else Path(name)
                if not file.exists():
                    missing.append(f"{section}[{index}].{key} = {name} (looked for {file})")
                files.append(str(file))
            case[key] = files if len(names) > 1 else files[0]
        cases.append(case)
    if missing:
        shown = "\n  ".join(missing[:20]) + (f"\n  ... and {len(missing) - 20} more" if len(missing) > 20 else "")
        raise DataError(
            f"{len(missing)} file(s) listed in the dataset do not exist:\n  {shown}\n"
            "Fix the paths (they are relative to the folder of dataset.json) or remove those entries.",
            path=path,
        )
    try:
        names = label_names(description.get("labels", {}))
    except ValueError as exc:
        raise DataError(f"{exc}.", path=path) from exc
    return cases, names


def _nnunet_v2_training(description: Mapping[str, Any], root: Path, path: Path) -> list[dict[str, Any]]:
    """nnU-Net v2's raw layout as MSD-style entries: ``imagesTr/{case}_{channel:04d}{ending}``, ``labelsTr/{case}{ending}``."""
    ending = str(description["file_ending"])
    channels = description.get("channel_names") or description.get("modality") or {"0": "image"}
    if isinstance(description.get("dataset"), Mapping):  # nnU-Net v2's explicit list of files, relative to the json
        listed = []
        for case, files in description["dataset"].items():
            if not isinstance(files, Mapping) or not isinstance(files.get("images"), list) or not files["images"] or "label" not in files:
                raise DataError(f"dataset[{case!r}] must have 'images' (a list) and 'label', got {files!r:.80}.", path=path)
            listed.append({"image": list(files["images"]) if len(files["images"]) > 1 else files["images"][0], "label": files["label"]})
        return listed
    labels_dir = root / "labelsTr"
    if not labels_dir.is_dir():
        raise DataError(f"an nnU-Net v2 dataset.json (file_ending {ending!r}, no 'training' list) needs labelsTr/ beside it; {labels_dir} does not exist.", path=path)
    names = sorted(f.name[: -len(ending)] for f in labels_dir.iterdir() if f.name.endswith(ending) and not f.name.startswith("._"))
    expected = description.get("numTraining")
    if isinstance(expected, int) and expected != len(names):
        raise DataError(f"numTraining is {expected} but labelsTr/ holds {len(names)} '*{ending}' label files: add the missing labels or fix numTraining.", path=path)
    entries = []
    for case in names:
        images = [f"imagesTr/{case}_{int(channel):04d}{ending}" for channel in sorted(channels, key=int)]
        entries.append({"image": images if len(images) > 1 else images[0], "label": f"labelsTr/{case}{ending}"})
    return entries


def label_names(labels: Mapping[str, Any]) -> list[str]:
    """``{"0": "background", "1": "liver"}`` (MSD) or ``{"background": 0, "liver": 1}`` (nnU-Net v2) -> names by id."""
    if not labels:
        return []
    if not isinstance(labels, Mapping):
        raise ValueError(f"'labels' must map ids to names (or names to ids), got a {type(labels).__name__}: {labels!r:.60}")
    if all(str(k).isdigit() for k in labels):
        by_id = {int(k): str(v) for k, v in labels.items()}
    else:  # region-based lists are not ids
        by_id = {int(v): str(k) for k, v in labels.items() if isinstance(v, int) and not isinstance(v, bool)}
    by_id = {i: name for i, name in by_id.items() if i >= 0}
    if not by_id:
        return []
    if max(by_id) > 100_000:
        raise ValueError(f"label id {max(by_id)} is implausibly large for a label map; check 'labels'")
    return [by_id.get(i, f"label_{i}") for i in range(max(by_id) + 1)]


#: nnU-Net's channel suffix on image files (case_0000.nii.gz is channel 0 of case)
_CHANNEL_SUFFIX = re.compile(r"_\d{4}$")


def case_id(image_path: str | Path) -> str:
    """nnU-Net's case identifier of an image file: its name without the ending and the channel suffix
    (``imagesTr/la_003_0000.nii.gz`` -> ``la_003``; ``spleen_2.nii.gz`` -> ``spleen_2``)."""
    name = Path(str(image_path)).name
    lowered = name.lower()
    ending = next((e for e in (".nii.gz", ".nii", ".nrrd", ".mha", ".nhdr", ".mhd", ".tif", ".tiff", ".png") if lowered.endswith(e)), "")
    return _CHANNEL_SUFFIX.sub("", name[: len(name) - len(ending)])


def read_nnunet_splits(path: str | Path) -> list[dict[str, list[str]]]:
    """nnU-Net v2's ``splits_final.json``: a list, one entry per fold, of ``{"train": [case ids], "val": [case ids]}``.
    A malformed file, or a fold with a case in both lists, raises a DataError naming the file and the fold."""
    path = Path(path)
    if not path.exists():
        raise DataError("splits file not found: pass nnU-Net's splits_final.json (nnUNet_preprocessed/<dataset>/splits_final.json).", path=path)
    try:
        folds = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"not valid JSON ({exc}).", path=path) from exc
    if not isinstance(folds, list) or not folds:
        raise DataError(f"expected a non-empty list of folds ({{'train': [...], 'val': [...]}} each), got {type(folds).__name__}.", path=path)
    out = []
    for index, entry in enumerate(folds):
        if not isinstance(entry, dict) or not all(isinstance(entry.get(k), list) for k in ("train", "val")):
            raise DataError(f"fold {index} must be an object with 'train' and 'val' lists of case ids, got {entry!r:.80}.", path=path)
        train, val = [str(c) for c in entry["train"]], [str(c) for c in entry["val"]]
        both = sorted(set(train) & set(val))
        if both:
            raise DataError(f"fold {index} has case(s) in both 'train' and 'val': {both[:10]}; a case is trained on or held out, not both.", path=path)
        if not val:
            raise DataError(f"fold {index} has an empty 'val' list: nothing to validate on.", path=path)
        out.append({"train": train, "val": val})
    return out


# ----------------------------------------------------------------------------- checks


def _case_name(data: Mapping[Hashable, Any], key: str = "image") -> str:
    value = data.get(key)
    meta = getattr(value, "meta", {}) if value is not None else {}
    return str(meta.get("filename_or_obj", data.get(f"{key}_path", "?")))


class CheckCase(MapTransform):
    """Refuse a loaded case that would silently train on garbage; the error names it and says what to do.

    Runs after :class:`LoadVolumed` (channel first) on MetaTensors."""

    def __init__(self, in_channels: int = 1, num_classes: int | None = None, label_map: Mapping[int, int] | None = None, label_key: str = "label") -> None:
        super().__init__(keys=["image"], allow_missing_keys=True)
        self.in_channels, self.num_classes, self.label_map, self.label_key = in_channels, num_classes, label_map, label_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        image, name = d["image"], _case_name(d)
        if image.shape[0] != self.in_channels:
            raise DataError(
                f"the image has {image.shape[0]} channels (a 4D volume or one file per channel: spatial shape {tuple(image.shape[1:])}) but the "
                f"model takes in_channels={self.in_channels}. Split the 4D file into 3D volumes (one per time point or "
                f"modality), or set in_channels={image.shape[0]} if they are co-registered modalities.",
                path=name,
            )
        if not _all_finite(_plain(image)):
            finite = torch.isfinite(_plain(image))
            raise DataError(
                f"{int((~finite).sum())} voxels are NaN or Inf. Fix the file (e.g. fill with the background intensity, "
                "-1024 HU for CT) before training.",
                path=name,
            )
        if self.label_key in d:
            self._check_label(d, name)
        return d

    def _check_label(self, d: dict[Hashable, Any], name: str) -> None:
        image, label = d["image"], d[self.label_key]
        label_name = _case_name(d, self.label_key)
        if label.shape[0] != 1:
            raise DataError(
                f"the label map has {label.shape[0]} channels (4D); polyfm expects one integer label map per case "
                "(one-hot labels: take the argmax over channels and save that).",
                path=label_name,
            )
        if not _same_grid(image, label):
            # a label written in another axis order / direction (a tool saving RAS beside an LPS scan) on
            # the same voxels is reoriented onto the image's grid; any other difference is refused below
            reoriented = _reoriented_onto(image, label)
            if reoriented is not None:
                log.info("%s: stored in another orientation than its image %s; reoriented onto the image's grid.", label_name, name)
                d[self.label_key] = label = reoriented
        if tuple(image.shape[1:]) != tuple(label.shape[1:]):
            raise DataError(
                f"image and label grids differ: image {name} has spatial shape {tuple(image.shape[1:])}, label "
                f"{tuple(label.shape[1:])}. Resample the label onto the image grid (nearest neighbour) or pair the right files.",
                path=label_name,
            )
        image_affine, label_affine = np.asarray(image.affine), np.asarray(label.affine)
        if not _same_grid(image, label):
            raise DataError(
                f"image and label affines differ (image {name}:\n{image_affine.round(4)}\nlabel:\n{label_affine.round(4)}). "
                "The label is not on the image's grid: resample it with the image as reference, or fix the header.",
                path=label_name,
            )
        values = _plain(label)  # a MetaTensor would copy its metadata on every operation below
        rounded = values.round()
        if not torch.equal(values, rounded):  # NaN too: NaN != NaN
            off = ~((values - rounded).abs() <= LABEL_TOLERANCE)  # ~(<=) is True for NaN
            if bool(off.any()):
                bad = torch.unique(values[off])[:5].tolist()
                raise DataError(
                    f"label values must be integers; found {bad} (more than {LABEL_TOLERANCE} from one). "
                    "Was the label map resampled with linear interpolation?",
                    path=label_name,
                )
            # float label maps written with rounding noise (1.0000001, 0.9999999): snap them, or the
            # integer cast later would truncate 0.9999999 to background
            values.copy_(rounded)
        low, high = torch.aminmax(values) if values.numel() else (values.new_zeros(()), None)  # one pass for both
        if bool(low < 0):
            raise DataError(f"negative label values {torch.unique(values[values < 0])[:5].tolist()}; labels are class ids 0..K-1.", path=label_name)
        if self.num_classes is not None and self.label_map is None and int(values.max() if high is None else high) >= self.num_classes:
            present = [int(v) for v in torch.unique(values) if v >= self.num_classes][:10]
            raise DataError(
                f"label values {present} are outside 0..{self.num_classes - 1} ({self.num_classes} classes: dataset.json's 'labels', or "
                "class_names). Name every class there (background first), or pass label_map to keep only some structures "
                "(every unmapped id becomes background).",
                path=label_name,
            )


class LoadVolumed(LoadImaged):
    """MONAI's ``LoadImaged`` (``image_only``, channel first) whose read errors name the file: a
    DataError instead of MONAI's "applying transform" RuntimeError around nibabel's message."""

    def __init__(self, keys: Sequence[str]) -> None:
        super().__init__(keys=list(keys), ensure_channel_first=True, image_only=True)

    def __call__(self, data: Mapping[Hashable, Any], reader: Any = None) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            try:
                d[key] = self._loader(d[key], reader)
            except Exception as exc:  # nibabel, pydicom and MONAI's reader choice raise many types
                reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                if isinstance(d[key], list | tuple) and "for channel-wise concatenation" in str(exc):  # MONAI stacking the channel files
                    raise DataError(
                        f"the {len(d[key])} channel files of this case cannot be stacked as one {key} ({reason}). Every channel "
                        "must be on one grid (shape and affine): resample the other channels onto the first one's.",
                        path=", ".join(str(f) for f in d[key]),
                    ) from exc
                hint = " Files named '._*' are macOS metadata, not images: delete them." if Path(str(d[key])).name.startswith("._") else ""
                raise DataError(
                    f"cannot be read as the {key} ({reason}). "
                    f"Expected a NIfTI file (.nii, .nii.gz) or a DICOM series folder; is it truncated?{hint}",
                    path=d[key],
                ) from exc
        return d


class RemapLabels(MapTransform):
    """Keep some structures and renumber them (``{5: 1, 1: 2}``: liver -> 1, spleen -> 2); every other id -> 0."""

    def __init__(self, label_map: Mapping[int, int], key: str = "label") -> None:
        super().__init__(keys=[key])
        self.label_map = {int(k): int(v) for k, v in label_map.items()}
        if any(v < 0 for v in (*self.label_map, *self.label_map.values())):
            raise ConfigError(f"label_map={label_map}: map label ids (0, 1, ...) to classes (0, 1, ...); negative ids are not labels.")

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            label = d[key]
            # one slot per mapped id and a last one, 0, for every larger id: a stray huge value (a corrupt
            # uint32 map) must not size the table; CheckCase has refused negative ids already
            last = max(self.label_map) + 1
            table = torch.zeros(last + 1, dtype=label.dtype)
            for source, target in self.label_map.items():
                table[source] = target
            remapped = table[torch.as_tensor(label).long().clamp(0, last)]
            d[key] = MetaTensor(remapped, meta=label.meta, applied_operations=label.applied_operations) if isinstance(label, MetaTensor) else remapped
        return d


class ToBatchKeys(MapTransform):
    """MONAI's ``image``/``label`` -> the engine's ``input``/``target``/``meta`` (plain tensors)."""

    def __init__(self) -> None:
        super().__init__(keys=["image"])

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {"input": _plain(data["image"]).float().contiguous(), "meta": _case_name(data)}
        if "label" in data:
            out["target"] = _plain(data["label"]).long().contiguous()
        return out


class ToDevice:
    """Moves a cached case onto ``device`` (MONAI's ``EnsureTyped(device=..., track_meta=False)``) so the
    random transforms after it run there (MONAI's fast-training recipe).

    Deliberately not a MONAI ``Transform``: ``CacheDataset`` caches everything up to the first random
    transform *or the first plain callable*, so the cache stays on the host and each fetched case is
    copied to the device. The file name is kept under ``image_path`` (``track_meta=False`` drops it)."""

    def __init__(self, device: str | torch.device, keys: Sequence[str] = ("image", "label")) -> None:
        self.device = torch.device(device)
        self.ensure = EnsureTyped(keys=list(keys), device=self.device, track_meta=False, allow_missing_keys=True)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        d.setdefault("image_path", _case_name(d))
        return dict(self.ensure(d))


def _same_grid(image: MetaTensor, label: MetaTensor) -> bool:
    """One spatial shape and one affine (within header rounding)."""
    same_shape = tuple(image.shape[1:]) == tuple(label.shape[1:])
    return same_shape and bool(np.allclose(np.asarray(image.affine), np.asarray(label.affine), atol=1e-3, rtol=1e-4))


def _reoriented_onto(image: MetaTensor, label: MetaTensor) -> MetaTensor | None:
    """``label`` reoriented to ``image``'s axis codes when that puts it exactly on the image's grid (the same
    voxels stored in another axis order or direction), else None."""
    import nibabel as nib

    # nibabel leaves aff2axcodes unannotated
    codes = "".join(nib.orientations.aff2axcodes(np.asarray(image.affine)))  # type: ignore[no-untyped-call]
    if codes == "".join(nib.orientations.aff2axcodes(np.asarray(label.affine))):  # type: ignore[no-untyped-call]
        return None  # same orientation: a grid that truly differs
    reoriented = Orientation(axcodes=codes)(label)
    return reoriented if isinstance(reoriented, MetaTensor) and _same_grid(image, reoriented) else None


def _plain(x: Any) -> torch.Tensor:
    return x.as_tensor() if isinstance(x, MetaTensor) else torch.as_tensor(x)


def _all_finite(x: torch.Tensor) -> bool:
    """``isfinite(x).all()`` in one pass without a mask: NaN propagates into both extremes, an Inf is one of them."""
    if not x.is_floating_point() or not x.numel():
        return True
    low, high = torch.aminmax(x)
    return bool(torch.isfinite(low) & torch.isfinite(high))


# ----------------------------------------------------------------------------- transforms


def intensity_transform(modality: str, a_min: float, a_max: float, keys: Sequence[str] = ("image",)) -> MapTransform:
    """CT: clip the HU window [a_min, a_max] to [0, 1] (MONAI's CT recipes); MR: z-score over non-zero voxels per channel."""
    if modality.upper() == "CT":
        return ScaleIntensityRanged(keys=list(keys), a_min=a_min, a_max=a_max, b_min=0.0, b_max=1.0, clip=True)
    if modality.upper() in ("MR", "MRI"):
        return NormalizeIntensityd(keys=list(keys), nonzero=True, channel_wise=True)
    raise DataError(f"Unknown modality {modality!r}: use 'CT' (HU window) or 'MR' (z-score normalisation).")


def preprocessing(
    keys: Sequence[str],
    in_channels: int,
    num_classes: int | None,
    modality: str,
    a_min: float,
    a_max: float,
    pixdim: Sequence[float] | None,
    orientation: str | None,
    label_map: Mapping[int, int] | None,
) -> list[Transform]:
    """The deterministic, invertible part: load, check, remap, orient, resample, scale intensities."""
    steps: list[Transform] = [
        LoadVolumed(keys),
        CheckCase(in_channels=in_channels, num_classes=num_classes, label_map=label_map),
    ]
    if label_map and "label" in keys:
        steps.append(RemapLabels(label_map))
    if orientation:
        steps.append(Orientationd(keys=list(keys), axcodes=orientation))
    if pixdim:
        modes = ["bilinear" if k == "image" else "nearest" for k in keys]
        steps.append(Spacingd(keys=list(keys), pixdim=tuple(pixdim), mode=modes))
    steps.append(intensity_transform(modality, a_min, a_max))
    return steps


def segmentation_transforms(
    train: bool,
    roi_size: Sequence[int],
    in_channels: int = 1,
    num_classes: int | None = None,
    modality: str = "CT",
    a_min: float = -175.0,
    a_max: float = 250.0,
    pixdim: Sequence[float] | None = (1.5, 1.5, 2.0),
    orientation: str | None = "RAS",
    label_map: Mapping[int, int] | None = None,
    pos: float = 1.0,
    neg: float = 1.0,
    num_samples: int = 2,
    augment: bool = True,
    class_ratios: Sequence[float] | None = None,
    transform_device: str | None = None,
) -> Compose:
    """MONAI's supervised 3D pipeline (as in the BTCV / spleen bundles); training adds padding to
    the patch size, positive/negative patch sampling around the labels (or, with ``class_ratios``,
    patches centred on each class in those proportions) and light augmentation.

    Training inserts :class:`ToDevice` after the padding: the cached deterministic part stays on
    the host as MetaTensors; the random crops and augmentation run on plain tensors, on
    ``transform_device`` when it is set (else on the host)."""
    keys = ["image", "label"]
    steps: list[Callable[..., Any]] = [*preprocessing(keys, in_channels, num_classes, modality, a_min, a_max, pixdim, orientation, label_map)]
    if train:
        # a 2D roi trains a 2D network on axial slices of the volumes (nnU-Net's 2D configuration);
        # evaluation then runs it slice by slice over whole volumes (VolumeSegmentation's SliceInferer)
        crop = [*roi_size, 1] if len(roi_size) == 2 else list(roi_size)
        steps += [SpatialPadd(keys=keys, spatial_size=crop)]
        # the cache boundary: metadata-tracking MetaTensors above, plain tensors (on transform_device,
        # if set) below; MetaTensor bookkeeping was ~2/3 of each random crop's time
        steps.append(ToDevice(transform_device or "cpu", keys))  # a plain callable: Compose takes any
        if class_ratios is not None:  # balanced over classes: small organs get as many patches as the liver
            steps.append(RandCropByLabelClassesd(keys=keys, label_key="label", spatial_size=crop, ratios=list(class_ratios), num_classes=len(class_ratios), num_samples=num_samples, image_key="image"))
        else:
            steps.append(RandCropByPosNegLabeld(keys=keys, label_key="label", spatial_size=crop, pos=pos, neg=neg, num_samples=num_samples, image_key="image"))
        if len(roi_size) == 2:
            steps.append(SqueezeDimd(keys=keys, dim=3))
        if augment:
            steps += [RandFlipd(keys=keys, prob=0.1, spatial_axis=axis) for axis in range(len(roi_size))]
            steps.append(RandShiftIntensityd(keys=["image"], offsets=0.1, prob=0.5))
    steps.append(ToBatchKeys())
    return Compose(steps)


# ----------------------------------------------------------------------------- datamodules


@contextmanager
def _data_errors_as_themselves() -> Iterator[None]:
    """MONAI wraps errors raised inside transforms ("applying transform ..."); re-raise ours as themselves."""
    try:
        yield
    except RuntimeError as exc:
        seen: BaseException | None = exc
        while seen is not None and not isinstance(seen, DataError):
            seen = seen.__cause__ or seen.__context__
        if seen is None:
            raise
        raise seen from None


class CheckedDataset(torch.utils.data.Dataset[Any]):
    """A MONAI dataset whose DataErrors reach the user as themselves, not as MONAI's RuntimeError."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        with _data_errors_as_themselves():
            return self.dataset[index]


def _make_dataset(cases: list[dict[str, Any]], transform: Callable[..., Any], cache: str, cache_dir: str | None) -> CheckedDataset:
    if cache == "memory":
        with _data_errors_as_themselves():
            return CheckedDataset(CacheDataset(cases, transform, cache_rate=1.0, num_workers=0, progress=False))
    if cache == "disk":
        if not cache_dir:
            raise DataError("cache='disk' needs cache_dir (a folder for MONAI's PersistentDataset).")
        return CheckedDataset(PersistentDataset(cases, transform, cache_dir=cache_dir))
    return CheckedDataset(Dataset(cases, transform))


class SegmentationDataModule(DictDataModule):
    """A Decathlon-style labelled dataset for 3D segmentation fine-tuning.

    ``training`` cases are split into train/validation by ``val_fraction`` (or the file's own
    ``validation`` list when it has one); ``test`` uses the file's ``test`` cases when they
    have labels, else the validation cases. Validation and test run on whole volumes
    (batch size 1; the task's sliding-window inferer tiles them).

    Cross-validation (nnU-Net's 5 folds): with ``fold`` the validation cases are that fold's held-out
    cases instead (``val_fraction`` is not used). ``splits_file`` reads nnU-Net v2's
    ``splits_final.json`` (its folds, its number of folds); without it the training cases are dealt
    into ``num_folds`` folds by :func:`polyfm.core.data.fold_indices` (``seed``), and ``group_pattern``
    (a regex searched in the case id; its first group, or the whole match, is the group) keeps one
    patient's scans in one fold. The ``test`` list is never part of a fold."""

    def __init__(
        self,
        dataset_json: str,
        roi_size: list[int] = [96, 96, 96],  # noqa: B006 - LightningCLI needs a plain default
        modality: Literal["CT", "MR"] = "CT",
        a_min: float = -175.0,
        a_max: float = 250.0,
        pixdim: list[float] | None = None,
        orientation: str | None = "RAS",
        in_channels: int = 1,
        label_map: dict[int, int] | None = None,
        class_names: list[str] | None = None,
        val_fraction: float = 0.2,
        pos: float = 1.0,
        neg: float = 1.0,
        num_samples: int = 2,
        augment: bool = True,
        class_ratios: list[float] | None = None,
        cache: Literal["memory", "disk", "none"] = "memory",
        cache_dir: str | None = None,
        repeats: int = 1,
        batch_size: int = 2,
        num_workers: int = 0,
        label_fraction: float = 1.0,
        seed: int = 0,
        transform_device: str | None = None,
        predict_files: list[str] | None = None,
        fold: int | None = None,
        num_folds: int = 5,
        splits_file: str | None = None,
        group_pattern: str | None = None,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, label_fraction=label_fraction, seed=seed, collate_fn=list_data_collate)
        self.transform_device = _check_transform_device(transform_device, cache)
        self.dataset_json, self.roi_size, self.modality, self.a_min, self.a_max = dataset_json, list(roi_size), modality, a_min, a_max
        self.pixdim, self.orientation, self.in_channels = pixdim, orientation, in_channels
        self.label_map = {int(k): int(v) for k, v in label_map.items()} if label_map else None
        self.val_fraction, self.pos, self.neg, self.num_samples, self.augment = val_fraction, pos, neg, num_samples, augment
        self.class_ratios = class_ratios
        self.cache, self.cache_dir, self.repeats = cache, cache_dir, repeats
        self.predict_files = list(predict_files) if predict_files else None
        self.predict_images: dict[str, Any] = {}
        cases, names = read_decathlon(dataset_json, "training")
        self.cases = cases
        self.fold, self.num_folds, self.splits_file, self.group_pattern = fold, num_folds, splits_file, group_pattern
        self._check_fold_options()
        self.class_names = class_names or self._class_names(names)
        self.num_classes = len(self.class_names)
        if self.label_map:
            self._check_label_map(self.label_map)

    def _check_label_map(self, label_map: dict[int, int]) -> None:
        """label_map's ids and classes must be ids, and its classes must have names: else MONAI's one-hot fails
        mid-training ("index 2 is out of bounds") or, worse, a negative id indexes the lookup table from its end."""
        if min(*label_map, *label_map.values()) < 0:
            raise ConfigError(f"SegmentationDataModule(label_map={label_map}): map label ids (0, 1, ...) to classes (0, 1, ...); negative ids are not labels.")
        beyond = {k: v for k, v in label_map.items() if v >= self.num_classes}
        if beyond:
            raise ConfigError(
                f"SegmentationDataModule(label_map={label_map}) sends {beyond} to classes past the {self.num_classes} of "
                f"class_names={self.class_names}: give one name per class (background first), or renumber label_map to 1..{self.num_classes - 1}."
            )

    def _class_names(self, names: list[str]) -> list[str]:
        if self.label_map:
            by_target = {target: names[source] if source < len(names) else f"label_{source}" for source, target in self.label_map.items()}
            return ["background", *[by_target.get(i, f"class_{i}") for i in range(1, max(self.label_map.values()) + 1)]]
        if not names:
            raise DataError("dataset.json has no 'labels'; pass class_names (background first).", path=self.dataset_json)
        if "ignore" in names:  # nnU-Net v2's label for unannotated voxels (sparse annotations)
            raise DataError(
                f"'labels' declares nnU-Net's 'ignore' label (id {names.index('ignore')}: voxels left unannotated). polyfm's "
                "loss has no ignore index and would learn it as a class; pass label_map to keep the real classes "
                "(unmapped ids become background), or complete the annotations.",
                path=self.dataset_json,
            )
        return names

    def transforms(self, train: bool) -> Compose:
        return segmentation_transforms(
            train, self.roi_size, self.in_channels, self.num_classes, self.modality, self.a_min, self.a_max, self.pixdim,
            self.orientation, self.label_map, self.pos, self.neg, self.num_samples, self.augment, self.class_ratios,
            self.transform_device if train else None,
        )  # fmt: skip

    def predict_preprocessing(self) -> Compose:
        """The deterministic preprocessing of the images to predict (no label); the prediction
        writer inverts it to put each label map back on its input's grid."""
        return Compose(preprocessing(["image"], self.in_channels, None, self.modality, self.a_min, self.a_max, self.pixdim, self.orientation, None))

    def predict_cases(self) -> list[dict[str, Any]]:
        """What ``polyfm predict`` segments: ``predict_files`` (files, DICOM series or folders of them),
        else every image of dataset.json's ``test`` list (MSD's unlabelled ``imagesTs``), else the
        validation split."""
        if self.predict_files:
            return [{"image": volume} for entry in self.predict_files for volume in find_volumes(entry)]
        description = json.loads(Path(self.dataset_json).read_text())
        if description.get("test"):
            return [{"image": case["image"]} for case in read_decathlon(self.dataset_json, "test")[0]]
        return [{"image": case["image"]} for case in self.split()[1]]

    def predict_dataloader(self) -> Any:
        cases = self.predict_cases()
        # a batch names its case by the first file (MONAI's filename_or_obj); the writer needs every channel file
        self.predict_images = {str(c["image"][0] if isinstance(c["image"], list) else c["image"]): c["image"] for c in cases}
        steps = [*self.predict_preprocessing().transforms, ToBatchKeys()]
        return self._loader(_make_dataset(cases, Compose(steps), "none", None), False)

    def split(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
        description = json.loads(Path(self.dataset_json).read_text())
        if self.fold is not None:
            if description.get("validation"):
                raise ConfigError(
                    f"{self.dataset_json} has its own 'validation' list and fold={self.fold} asks for a cross-validation "
                    "fold of the training cases: use one or the other (remove the list, or leave fold unset)."
                )
            train, val = self.fold_split()
        elif description.get("validation"):
            train, val = self.cases, read_decathlon(self.dataset_json, "validation")[0]
        else:
            order = np.random.default_rng(self.seed).permutation(len(self.cases))
            n_val = max(1, round(self.val_fraction * len(self.cases))) if len(self.cases) > 1 and self.val_fraction > 0 else 0
            val = [self.cases[i] for i in sorted(order[:n_val])]
            train = [self.cases[i] for i in sorted(order[n_val:])]
        test_cases = [c for c in read_decathlon(self.dataset_json, "test")[0] if "label" in c] if description.get("test") else []
        return train, val or test_cases, test_cases or val  # val_fraction=0: validate on the labelled test cases

    def _check_fold_options(self) -> None:
        if self.fold is None:
            for key, value in (("splits_file", self.splits_file), ("group_pattern", self.group_pattern)):
                if value is not None:
                    raise ConfigError(f"SegmentationDataModule({key}={value!r}) needs fold (0, 1, ...): it defines cross-validation folds.")
            return
        if self.splits_file is not None and self.group_pattern is not None:
            raise ConfigError(
                f"SegmentationDataModule(splits_file={self.splits_file!r}, group_pattern={self.group_pattern!r}): the splits file "
                "already fixes every fold; group_pattern only applies to folds polyfm makes. Pass one of them."
            )
        if self.fold < 0:
            raise ConfigError(f"SegmentationDataModule(fold={self.fold}): folds are numbered 0, 1, ...")
        if self.group_pattern is not None:
            try:
                re.compile(self.group_pattern)
            except re.error as exc:
                raise ConfigError(f"SegmentationDataModule(group_pattern={self.group_pattern!r}) is not a regular expression: {exc}.") from exc

    def case_ids(self) -> list[str]:
        """nnU-Net's case identifiers of the training cases: the (first channel's) image file name without
        its ending and channel suffix (``la_003_0000.nii.gz`` -> ``la_003``). Two cases with one id are an error."""
        ids = [case_id(c["image"][0] if isinstance(c["image"], list) else c["image"]) for c in self.cases]
        seen: dict[str, int] = {}
        for index, name in enumerate(ids):
            if name in seen:
                raise DataError(
                    f"training cases {seen[name]} and {index} have the same case id {name!r} ({self.cases[seen[name]]['image']} and "
                    f"{self.cases[index]['image']}): folds name cases by id; rename one of the files.",
                    path=self.dataset_json,
                )
            seen[name] = index
        return ids

    def fold_split(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """(train, validation) cases of ``fold``: from ``splits_file``, else from ``fold_indices``."""
        assert self.fold is not None
        ids = self.case_ids()
        if self.splits_file is not None:
            folds = read_nnunet_splits(self._splits_path())
            if self.fold >= len(folds):
                raise ConfigError(f"fold={self.fold} but {self.splits_file} has {len(folds)} folds (0 .. {len(folds) - 1}).")
            by_id = dict(zip(ids, self.cases, strict=True))
            train_ids, val_ids = folds[self.fold]["train"], folds[self.fold]["val"]
            unknown = [c for c in [*train_ids, *val_ids] if c not in by_id]
            if unknown:
                shown = ", ".join(unknown[:10]) + (f" ... and {len(unknown) - 10} more" if len(unknown) > 10 else "")
                raise DataError(
                    f"fold {self.fold} names {len(unknown)} case id(s) that are not training cases of {self.dataset_json}: {shown}. "
                    f"Case ids are image file names without _0000.nii.gz / .nii.gz (this dataset has e.g. {ids[:3]}); use the "
                    "splits file made for this dataset.",
                    path=self._splits_path(),
                )
            unused = sorted(set(ids) - set(train_ids) - set(val_ids))
            if unused:  # nnU-Net allows it (a split made for a subset); said, not skipped silently
                log.warning("fold %d of %s leaves %d training case(s) out of both train and val: %s", self.fold, self.splits_file, len(unused), unused[:20])
            return [by_id[c] for c in train_ids], [by_id[c] for c in val_ids]
        groups = self._groups(ids) if self.group_pattern is not None else None
        train_idx, val_idx = fold_indices(len(self.cases), self.num_folds, self.fold, groups=groups, seed=self.seed)
        return [self.cases[i] for i in train_idx], [self.cases[i] for i in val_idx]

    def _splits_path(self) -> Path:
        """``splits_file`` as given, or beside dataset.json when it is relative and not found as given."""
        assert self.splits_file is not None
        path = Path(self.splits_file)
        if not path.is_absolute() and not path.exists() and (Path(self.dataset_json).parent / path).exists():
            return Path(self.dataset_json).parent / path
        return path

    def _groups(self, ids: list[str]) -> list[str]:
        assert self.group_pattern is not None
        pattern = re.compile(self.group_pattern)
        groups = []
        for name in ids:
            match = pattern.search(name)
            if match is None:
                raise DataError(
                    f"case {name!r} does not match group_pattern={self.group_pattern!r}: every case needs a group (e.g. "
                    r"'^(patient\d+)_' for patient12_scan2); fix the pattern or the file name.",
                    path=self.dataset_json,
                )
            groups.append(match.group(1) if pattern.groups else match.group(0))
        return groups

    def build(self) -> tuple[CheckedDataset, CheckedDataset | None, CheckedDataset | None]:
        train, val, test = self.split()
        if not train:
            raise DataError("no training cases left after the validation split; lower val_fraction.", path=self.dataset_json)
        evaluate = self.transforms(False)
        return (
            _make_dataset(train, self.transforms(True), self.cache, self.cache_dir),
            _make_dataset(val, evaluate, self.cache, self.cache_dir) if val else None,
            _make_dataset(test, evaluate, self.cache, self.cache_dir) if test else None,
        )

    def setup(self, stage: str | None = None) -> None:
        fresh = self.train_set is None
        super().setup(stage)  # builds, then keeps label_fraction of the training cases
        if fresh and self.repeats > 1:
            self.train_set = RepeatedDataset(self.train_set, self.repeats)  # several crop draws per case per epoch

    def val_dataloader(self) -> Any:
        if self.val_set is None:  # e.g. one labelled case with val_fraction=0 and no labelled test list
            log.info("%s: no validation cases (val_fraction=0, no labelled 'test' list): training without validation.", self.dataset_json)
            return []
        return super().val_dataloader()

    def _loader(self, dataset: Any, train: bool) -> Any:
        if dataset is None:
            raise DataError(
                "has no labelled cases to evaluate on: keep val_fraction > 0 with two or more training cases, or add a "
                "'test' list with labels to dataset.json (to segment unlabelled images, use predict).",
                path=self.dataset_json,
            )
        if train and self.transform_device is not None:
            from monai.data.thread_buffer import ThreadDataLoader

            if self.num_workers:
                log.info("transform_device=%s: the training loader runs in threads (num_workers=0, not %d).", self.transform_device, self.num_workers)
            # CUDA must not run in worker processes; a thread prefetches instead. Batches arrive on the device.
            return ThreadDataLoader(
                dataset, batch_size=self.batch_size, sampler=EpochSeededSampler(len(dataset), self.seed), num_workers=0,
                collate_fn=list_data_collate, drop_last=False,
            )  # fmt: skip
        if train:
            return super()._loader(dataset, True)
        from torch.utils.data import DataLoader

        return DataLoader(dataset, batch_size=1, num_workers=self.num_workers, collate_fn=list_data_collate)  # whole volumes differ in size


def _check_transform_device(device: str | None, cache: str) -> str | None:
    if device is None:
        return None
    try:
        torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"transform_device={device!r} is not a torch device: use e.g. 'cuda', 'cuda:0' or 'cpu' (or leave it unset).") from exc
    if cache != "memory":
        raise ConfigError(
            f"transform_device={device!r} needs cache='memory' (got cache={cache!r}): the deterministic preprocessing is "
            "cached in host memory and only the random crops and augmentation run on the device. Set cache: memory, "
            "or leave transform_device unset."
        )
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"transform_device={device!r} but CUDA is not available here: leave transform_device unset.")
    return device


class RepeatedDataset(torch.utils.data.Dataset[Any]):
    """Several passes over a few cached volumes per epoch (each pass draws fresh random crops)."""

    def __init__(self, dataset: Any, repeats: int) -> None:
        self.dataset, self.repeats = dataset, repeats

    def __len__(self) -> int:
        return len(self.dataset) * self.repeats

    def __getitem__(self, index: int) -> Any:
        return self.dataset[index % len(self.dataset)]


def find_volumes(folder: str | Path) -> list[str]:
    """NIfTI files and DICOM series (one per folder holding .dcm files, or DICOM files without an
    extension) under ``folder``, sorted; macOS ``._*`` metadata files are skipped (logged)."""
    root = Path(folder)
    if root.is_file():
        return [str(root)]
    if not root.is_dir():
        raise DataError("is not a folder or a file: point it at your unlabelled NIfTI files / DICOM series.", path=root)
    files = [p for p in root.rglob("*") if p.is_file()]
    apple_double = [p for p in files if p.name.startswith("._")]  # macOS metadata (MSD tarballs carry them)
    if apple_double:
        log.info("%s: skipped %d macOS '._*' metadata files (e.g. %s): they are not volumes.", root, len(apple_double), apple_double[0].name)
    files = [p for p in files if not p.name.startswith("._")]
    nifti = [p for p in files if p.name.lower().endswith(NIFTI_SUFFIXES)]
    # PACS exports often name slices IM0001, 1.2.840..., without an extension: tell them by DICOM's preamble
    dicom_dirs = {p.parent for p in files if p.suffix.lower() in DICOM_SUFFIXES or (not p.name.lower().endswith(NIFTI_SUFFIXES) and _is_dicom_file(p))}
    volumes = sorted(str(p) for p in [*nifti, *dicom_dirs])
    if not volumes:
        raise DataError("holds no NIfTI (.nii, .nii.gz) files and no DICOM series (.dcm).", path=root)
    return volumes


def _is_dicom_file(path: Path) -> bool:
    """DICOM Part 10: a 128-byte preamble, then ``DICM``. Only extensionless or numbered names are read."""
    if path.suffix and not path.suffix[1:].isdigit():  # '.txt', '.json', '.png' are not DICOM; '.1', '.0001' may be
        return False
    try:
        with path.open("rb") as handle:
            return handle.read(132)[128:] == b"DICM"
    except OSError:
        return False


class VolumeFolderDataModule(DictDataModule):
    """Unlabelled volumes (NIfTI files, DICOM series folders) for self-supervised pretraining:
    ``num_samples`` random ``roi_size`` crops per volume per epoch, batches ``{"input", "meta"}``."""

    def __init__(
        self,
        folder: str | None = None,
        files: list[str] | None = None,
        roi_size: list[int] = [96, 96, 96],  # noqa: B006 - LightningCLI needs a plain default
        num_samples: int = 4,
        repeats: int = 1,
        modality: Literal["CT", "MR"] = "CT",
        a_min: float = -1000.0,
        a_max: float = 1000.0,
        pixdim: list[float] | None = None,
        orientation: str | None = "RAS",
        in_channels: int = 1,
        cache: Literal["memory", "disk", "none"] = "memory",
        cache_dir: str | None = None,
        batch_size: int = 2,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed, collate_fn=list_data_collate)
        if not folder and not files:
            raise DataError("VolumeFolderDataModule needs a folder or a list of files.")
        self.volumes = list(files or []) + (find_volumes(folder) if folder else [])
        missing = [f for f in self.volumes if not Path(f).exists()]
        if missing:
            raise DataError(f"{len(missing)} listed volume(s) do not exist: {missing[:5]}. Fix the paths.")
        self.roi_size, self.num_samples, self.repeats = list(roi_size), num_samples, repeats
        self.modality, self.a_min, self.a_max, self.pixdim, self.orientation = modality, a_min, a_max, pixdim, orientation
        self.in_channels, self.cache, self.cache_dir = in_channels, cache, cache_dir

    def build(self) -> tuple[torch.utils.data.Dataset[Any], None, None]:
        steps = preprocessing(["image"], self.in_channels, None, self.modality, self.a_min, self.a_max, self.pixdim, self.orientation, None)
        crop = [*self.roi_size, 1] if len(self.roi_size) == 2 else self.roi_size  # 2D roi: axial slices for 2D networks
        steps += [
            SpatialPadd(keys=["image"], spatial_size=crop),
            RandSpatialCropSamplesd(keys=["image"], roi_size=crop, num_samples=self.num_samples, random_size=False),
        ]
        if len(self.roi_size) == 2:
            steps.append(SqueezeDimd(keys=["image"], dim=3))
        steps.append(ToBatchKeys())
        dataset = _make_dataset([{"image": v} for v in self.volumes], Compose(steps), self.cache, self.cache_dir)
        return (RepeatedDataset(dataset, self.repeats) if self.repeats > 1 else dataset), None, None

    def val_dataloader(self) -> Any:
        return []  # self-supervised: the training loss is the signal; no held-out split by default


# ----------------------------------------------------------------------------- pictures


def save_overlay_png(
    image_path: str | Path,
    label_paths: Mapping[str, str | Path],
    output_png: str | Path,
    slices: Sequence[int] | None = None,
    a_min: float = -175.0,
    a_max: float = 250.0,
    class_names: Sequence[str] | None = None,
) -> Path:
    """Axial slices of a volume with label maps overlaid (one row per map: e.g. truth and prediction)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import nibabel as nib
    from matplotlib.patches import Rectangle

    # nibabel leaves as_closest_canonical, and numpy np.ma.masked_equal, unannotated
    image = nib.as_closest_canonical(nib.load(str(image_path)))  # type: ignore[no-untyped-call]
    volume = np.clip((np.asarray(image.dataobj, dtype=np.float32) - a_min) / (a_max - a_min), 0, 1)
    maps = {name: np.asarray(nib.as_closest_canonical(nib.load(str(p))).dataobj) for name, p in label_paths.items()}  # type: ignore[no-untyped-call]
    slices = list(slices) if slices is not None else np.linspace(0, volume.shape[2] - 1, 4).round().astype(int).tolist()
    figure, axes = plt.subplots(len(maps), len(slices), figsize=(3 * len(slices), 3 * len(maps)), squeeze=False)
    n_classes = max(int(m.max()) for m in maps.values()) + 1
    colours = plt.get_cmap("tab10", max(n_classes, 2))
    for row, (name, labels) in enumerate(maps.items()):
        for col, z in enumerate(slices):
            ax = axes[row][col]
            ax.imshow(np.rot90(volume[:, :, z]), cmap="gray")
            masked = np.ma.masked_equal(np.rot90(labels[:, :, z]), 0)  # type: ignore[no-untyped-call]
            ax.imshow(masked, cmap=colours, vmin=0, vmax=max(n_classes - 1, 1), alpha=0.5, interpolation="nearest")
            ax.set_title(f"{name}, slice {z}", fontsize=9)
            ax.axis("off")
    if class_names:
        handles = [Rectangle((0, 0), 1, 1, color=colours(i), alpha=0.6) for i in range(1, len(class_names))]
        figure.legend(handles, class_names[1:], loc="lower center", ncol=len(class_names) - 1, fontsize=9)
    figure.tight_layout(rect=(0, 0.05, 1, 1))
    output_png = Path(output_png)
    output_png.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output_png, dpi=80)
    plt.close(figure)
    return output_png
