"""Predictions to files: label maps, probability maps and ensemble uncertainty as NIfTI on the input's grid.

* :func:`predict_to_nifti` segments one volume and writes its label map; :class:`NiftiPredictionWriter`
  does the same for every case of ``polyfm predict`` (a Lightning callback in the recipes).
* Everything is written on the input's own grid and affine: the preprocessing (orientation,
  spacing) is inverted with MONAI's ``Invertd`` (nearest for labels, linear for probabilities).
* Optional post-processing on that grid, as nnU-Net does after export: hole filling (MONAI
  ``FillHoles``), keeping the largest connected component of chosen labels and removing small
  components (connected components from ``scipy.ndimage``: MONAI's own
  ``KeepLargestConnectedComponent`` / ``RemoveSmallObjects`` need scikit-image, which is not a
  dependency).
* With ``write_probabilities`` the softmax goes to one 4D file ``<case>_prob.nii.gz`` (X, Y, Z, class),
  float32 or uint8 (``p * 255``, with the NIfTI scale slope ``1/255`` so readers get probabilities
  back); with :class:`polyfm.core.predict.Ensemble` over fold checkpoints, the members' spread
  (``probabilities_std``) goes to ``<case>_std.nii.gz`` in the same layout.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from monai.data.meta_tensor import MetaTensor
from monai.transforms.compose import Compose
from monai.transforms.post.array import FillHoles
from monai.transforms.post.dictionary import Invertd
from numpy.typing import NDArray

from polyfm.core.errors import ConfigError, DataError
from polyfm.core.files import atomic_path
from polyfm.core.predict import PredictionFileWriter
from polyfm.medseg.data import NIFTI_SUFFIXES, _data_errors_as_themselves, preprocessing
from polyfm.medseg.tasks import MirroredSoftmax, check_flip_axes

ProbabilityDtype = Literal["float32", "uint8"]


# ----------------------------------------------------------------------------- post-processing


def postprocess_labels(
    labels: NDArray[Any],
    keep_largest: Sequence[int] | None = None,
    fill_holes: Sequence[int] | None = None,
    min_component_size: int = 0,
    connectivity: int = 1,
) -> NDArray[Any]:
    """Clean a label map ``(*S)`` of class ids; removed voxels become background (0).

    ``fill_holes``: labels whose enclosed background holes are filled (MONAI ``FillHoles``);
    ``keep_largest``: labels of which only the largest connected component stays (one organ, one
    piece: nnU-Net's usual post-processing); ``min_component_size``: components of any foreground
    label smaller than this many voxels are removed. ``connectivity`` is the number of orthogonal
    hops that make voxels neighbours (1: faces, up to ``labels.ndim``: corners too)."""
    from scipy import ndimage

    if not 1 <= connectivity <= labels.ndim:
        raise ConfigError(f"connectivity={connectivity} must be between 1 (faces) and {labels.ndim} (corners) for a {labels.ndim}D label map")
    out = np.array(labels, copy=True)
    if fill_holes:
        filled = FillHoles(applied_labels=[int(v) for v in fill_holes], connectivity=connectivity)(torch.as_tensor(out[None].astype(np.int64)))
        out = np.asarray(filled[0]).astype(labels.dtype)
    structure = ndimage.generate_binary_structure(labels.ndim, connectivity)
    for value in [int(v) for v in np.unique(out) if v != 0]:
        if value not in (keep_largest or ()) and min_component_size <= 0:
            continue
        components, count = ndimage.label(out == value, structure=structure)
        if count == 0:
            continue
        sizes = np.bincount(components.ravel())[1:]  # voxels per component, label 0 is the rest
        keep = sizes >= min_component_size
        if value in (keep_largest or ()):
            keep &= np.arange(count) == int(sizes.argmax())
        out[(components > 0) & ~keep[np.maximum(components - 1, 0)]] = 0
    return out


@dataclass(frozen=True)
class PostProcessing:
    """The label-map clean-up of :func:`postprocess_labels`, checked once; shared by :func:`predict_to_nifti`
    and :class:`NiftiPredictionWriter` (``owner`` names the caller in the errors)."""

    keep_largest: tuple[int, ...] = ()
    fill_holes: tuple[int, ...] = ()
    min_component_size: int = 0
    connectivity: int = 1

    @classmethod
    def checked(
        cls, owner: str, keep_largest: Sequence[int] | None, fill_holes: Sequence[int] | None, min_component_size: int, connectivity: int
    ) -> PostProcessing:
        if min_component_size < 0:
            raise ConfigError(f"{owner}(min_component_size={min_component_size}): a number of voxels, 0 to keep every component")
        if not 1 <= connectivity <= 3:
            raise ConfigError(f"{owner}(connectivity={connectivity}): 1 (faces), 2 (edges) or 3 (corners)")
        for key, values in (("keep_largest", keep_largest), ("fill_holes", fill_holes)):
            if values and any(int(v) <= 0 for v in values):
                raise ConfigError(f"{owner}({key}={list(values)}): foreground label ids (1, 2, ...); 0 is background")
        return cls(tuple(int(v) for v in keep_largest or ()), tuple(int(v) for v in fill_holes or ()), int(min_component_size), int(connectivity))

    @property
    def active(self) -> bool:
        return bool(self.keep_largest or self.fill_holes or self.min_component_size)

    def __call__(self, labels: NDArray[Any]) -> NDArray[Any]:
        return postprocess_labels(labels, self.keep_largest, self.fill_holes, self.min_component_size, self.connectivity)

    def record(self) -> dict[str, Any]:
        """What the sidecar JSON says was done (nothing when nothing was)."""
        if not self.active:
            return {}
        settings = {"keep_largest": list(self.keep_largest), "fill_holes": list(self.fill_holes), "min_component_size": self.min_component_size}
        return {"postprocessing": settings | {"connectivity": self.connectivity}}


# ----------------------------------------------------------------------------- back onto the input grid


def _invert_to_input_grid(values: torch.Tensor, data: dict[Hashable, Any], pre: Compose, image_path: str | Path, nearest: bool) -> tuple[NDArray[Any], Any]:
    """``values`` ``(C, *S)`` on the preprocessed grid of ``data["image"]`` -> ``(C, *S_input)`` on the
    input's grid (``Invertd``: nearest for labels, linear for probabilities), and the inverted MetaTensor."""
    image = data["image"]
    if tuple(values.shape[1:]) != tuple(image.shape[1:]):
        raise DataError(
            f"the prediction's grid {tuple(values.shape[1:])} is not the preprocessed image's {tuple(image.shape[1:])}: the "
            "prediction was made with other preprocessing (pixdim, orientation) than the one used to write it.",
            path=image_path,
        )
    data = dict(data)
    data["pred"] = MetaTensor(values.detach().cpu().to(torch.float32), meta=dict(image.meta), applied_operations=list(image.applied_operations))
    inverted = Invertd(keys="pred", transform=pre, orig_keys="image", nearest_interp=nearest)(data)["pred"]
    return np.asarray(inverted), inverted


def _nifti_on_input_grid(array: NDArray[Any], inverted: Any, image_path: str | Path) -> Any:
    """A NIfTI image of ``array`` (``(*S)`` or ``(*S, C)``) with the input's header, qform and sform
    (a NIfTI input), or the input's world affine (a DICOM series, from MONAI's reader, in RAS)."""
    import nibabel as nib

    # nibabel leaves Nifti1Image's constructor, q/sform accessors and header copy unannotated: the
    # no-untyped-call ignores below are for that, nothing else
    if str(image_path).lower().endswith(NIFTI_SUFFIXES):
        source = nib.load(str(image_path))
        if not isinstance(source, nib.Nifti1Image):  # NIfTI-2 is a subclass; the reader already read it as NIfTI
            raise DataError(f"is named as NIfTI but nibabel reads it as {type(source).__name__}: save it as NIfTI-1 or NIfTI-2.", path=image_path)
        if array.shape[:3] != source.shape[:3]:
            raise DataError(f"internal: inverted prediction {array.shape[:3]} does not match the input grid {source.shape[:3]}.", path=image_path)
        header = source.header.copy()  # type: ignore[no-untyped-call]
        header.set_data_dtype(array.dtype)
        out = nib.Nifti1Image(array, source.affine, header)  # type: ignore[no-untyped-call]
        out.set_qform(source.get_qform(), int(source.header["qform_code"]))  # type: ignore[no-untyped-call]
        out.set_sform(source.get_sform(), int(source.header["sform_code"]))  # type: ignore[no-untyped-call]
    else:
        out = nib.Nifti1Image(array, np.asarray(inverted.affine, dtype=np.float64))  # type: ignore[no-untyped-call]
        out.set_qform(out.affine, 1)  # type: ignore[no-untyped-call]
        out.set_sform(out.affine, 1)  # type: ignore[no-untyped-call]
    return out


def _save_nifti(image: Any, output_path: Path, write: Callable[[Path, Callable[[Path], Any]], Any] | None) -> Path:
    import nibabel as nib

    if write is not None:  # the writer's atomic write, recorded in its list of files
        write(output_path, lambda temporary: nib.save(image, str(temporary)))
    else:
        with atomic_path(output_path) as temporary:
            nib.save(image, str(temporary))
    return output_path


def _sidecar_path(output_path: Path) -> Path:
    return output_path.with_name(output_path.name.removesuffix(".gz").removesuffix(".nii") + ".json")


def _save_label_map(
    labels: torch.Tensor,
    data: dict[Hashable, Any],
    pre: Compose,
    image_path: str | Path,
    output_path: str | Path,
    names: list[str],
    postprocess: Callable[[NDArray[Any]], NDArray[Any]] | None = None,
    extra: dict[str, Any] | None = None,
    write: Callable[[Path, Callable[[Path], Any]], Any] | None = None,
) -> Path:
    """``labels`` ``(1, *S)`` on the preprocessed grid -> ``uint8`` (``uint16`` past 255 classes) NIfTI on
    the input's grid, label names in the header's description and in ``<name>.json`` beside it."""
    values, inverted = _invert_to_input_grid(labels, data, pre, image_path, nearest=True)
    labels_np = values[0].round().astype(np.uint8 if len(names) < 256 else np.uint16)
    if postprocess is not None:
        labels_np = postprocess(labels_np)
    out = _nifti_on_input_grid(labels_np, inverted, image_path)
    out.header.set_intent("label", name="labels")
    out.header["descrip"] = ("labels: " + ",".join(names))[:79].encode()
    output_path = Path(output_path)
    _save_nifti(out, output_path, write)
    sidecar = {"labels": dict(enumerate(names)), "source": str(image_path), **(extra or {})}
    text = json.dumps(sidecar, indent=2)
    if write is not None:
        write(_sidecar_path(output_path), lambda temporary: temporary.write_text(text))
    else:
        with atomic_path(_sidecar_path(output_path)) as temporary:
            temporary.write_text(text)
    return output_path


def _save_class_maps(
    maps: torch.Tensor,
    data: dict[Hashable, Any],
    pre: Compose,
    image_path: str | Path,
    output_path: Path,
    dtype: ProbabilityDtype,
    write: Callable[[Path, Callable[[Path], Any]], Any] | None = None,
) -> Path:
    """Per-class values in [0, 1] (softmax, or its spread over ensemble members) ``(C, *S)`` on the
    preprocessed grid -> one 4D NIfTI ``(X, Y, Z, C)`` on the input's grid, resampled linearly."""
    values, inverted = _invert_to_input_grid(maps, data, pre, image_path, nearest=False)
    volume = np.ascontiguousarray(np.moveaxis(values, 0, -1).clip(0.0, 1.0))  # channels last: NIfTI's 4th axis
    if dtype == "uint8":  # a quarter of the size; the scale slope gives readers the probability back
        out = _nifti_on_input_grid(np.round(volume * 255).astype(np.uint8), inverted, image_path)
        out.header.set_slope_inter(1 / 255, 0.0)
    elif dtype == "float32":
        out = _nifti_on_input_grid(volume.astype(np.float32), inverted, image_path)
        out.header.set_slope_inter(1.0, 0.0)
    else:
        raise ConfigError(f"probability_dtype={dtype!r}: use 'float32' or 'uint8'")
    out.header["descrip"] = b"class axis 4 (X, Y, Z, class)"
    return _save_nifti(out, output_path, write)


# ----------------------------------------------------------------------------- one volume


def predict_to_nifti(
    model: torch.nn.Module,
    image_path: str | Path,
    output_path: str | Path,
    inferer: Callable[[torch.Tensor, torch.nn.Module], torch.Tensor] | None = None,
    class_names: Sequence[str] | None = None,
    modality: str = "CT",
    a_min: float = -175.0,
    a_max: float = 250.0,
    pixdim: Sequence[float] | None = None,
    orientation: str | None = "RAS",
    in_channels: int = 1,
    device: str | torch.device = "cpu",
    tta_flip_axes: Sequence[int] | None = None,
    write_probabilities: bool = False,
    probability_dtype: ProbabilityDtype = "float32",
    keep_largest: Sequence[int] | None = None,
    fill_holes: Sequence[int] | None = None,
    min_component_size: int = 0,
    connectivity: int = 1,
) -> Path:
    """Segment ``image_path`` and write the label map as NIfTI on the input's own grid and affine.

    The preprocessing (orientation, spacing) is inverted with MONAI's ``Invertd`` before
    writing, so the output overlays the input voxel for voxel in any viewer. Label names
    go to ``<output>.json`` (``{"labels": {"0": "background", ...}}``) and to the header's
    description field.

    The options are ``polyfm predict``'s, run by the same code: ``tta_flip_axes`` mirrors every window
    (``VolumeSegmentation(tta_flip_axes=...)``: spatial axes of the network's input, so 0..1 under a
    slice-by-slice ``SliceInferer``); ``write_probabilities`` adds the softmax as ``<case>_prob.nii.gz``
    beside the output (``ct_seg.nii.gz`` -> ``ct_prob.nii.gz``; ``probability_dtype`` float32 or uint8);
    ``keep_largest`` / ``fill_holes`` / ``min_component_size`` / ``connectivity`` post-process the label
    map on the input grid (:func:`postprocess_labels`), as :class:`NiftiPredictionWriter` does."""
    postprocessing = PostProcessing.checked("predict_to_nifti", keep_largest, fill_holes, min_component_size, connectivity)
    if probability_dtype not in ("float32", "uint8"):
        raise ConfigError(f"predict_to_nifti(probability_dtype={probability_dtype!r}): use 'float32' or 'uint8'")
    pre = Compose(preprocessing(["image"], in_channels, None, modality, a_min, a_max, pixdim, orientation, None))
    with _data_errors_as_themselves():
        data = pre({"image": str(image_path)})
    model = model.to(device).eval()
    x = torch.as_tensor(data["image"]).unsqueeze(0).float().to(device)
    # the axes are the network input's: a slice inferer feeds it 2D slices of the volume
    window = getattr(inferer, "roi_size", None)
    axes = check_flip_axes(list(tta_flip_axes) if tta_flip_axes is not None else None, len(window) if window else x.ndim - 2)
    network = MirroredSoftmax(model, axes) if axes else model
    with torch.no_grad():
        logits = inferer(x, network) if inferer is not None else network(x)
        logits = logits[0] if isinstance(logits, list | tuple) else logits
    names = list(class_names) if class_names else [str(i) for i in range(int(logits.shape[1]))]
    if len(names) != int(logits.shape[1]):
        raise ConfigError(f"predict_to_nifti got {len(names)} class_names {names} for a network with {int(logits.shape[1])} output channels: give one name per class, background first.")
    return write_case(
        logits.argmax(1).cpu(), data, pre, image_path, Path(output_path), names,
        probabilities=logits.softmax(1)[0].cpu() if write_probabilities else None, probability_dtype=probability_dtype,
        postprocessing=postprocessing, extra={"tta_flip_axes": axes} if axes else {},
    )  # fmt: skip


def write_case(
    labels: torch.Tensor,
    case: dict[Hashable, Any],
    preprocess: Compose,
    reference: str | Path,
    output: Path,
    names: list[str],
    probabilities: torch.Tensor | None = None,
    spread: torch.Tensor | None = None,
    probability_dtype: ProbabilityDtype = "float32",
    postprocessing: PostProcessing | None = None,
    postfix: str = "seg",
    extra: dict[str, Any] | None = None,
    write: Callable[[Path, Callable[[Path], Any]], Any] | None = None,
) -> Path:
    """One case's files, for :func:`predict_to_nifti` and :class:`NiftiPredictionWriter` alike: the label map
    ``output`` (post-processed), the softmax ``probabilities`` ``(C, *S)`` as ``<case>_prob`` and an ensemble's
    ``spread`` as ``<case>_std`` beside it, all on the input grid of ``reference``; the sidecar names them."""
    files = {}
    if probabilities is not None:
        files["probabilities"] = _save_class_maps(probabilities, case, preprocess, reference, _class_map_path(output, postfix, "prob"), probability_dtype, write).name
    if spread is not None:  # an ensemble's uncertainty: the members' std of each class probability
        files["uncertainty"] = _save_class_maps(spread, case, preprocess, reference, _class_map_path(output, postfix, "std"), probability_dtype, write).name
    labels = labels.reshape(1, *labels.shape[-(case["image"].ndim - 1) :])
    postprocessing = postprocessing or PostProcessing()
    post = postprocessing if postprocessing.active else None
    return _save_label_map(labels, case, preprocess, reference, output, names, post, (extra or {}) | postprocessing.record() | files, write)


def _class_map_path(output: Path, postfix: str, kind: str) -> Path:
    """``ct_seg.nii.gz`` -> ``ct_prob.nii.gz`` (the label map's ``_<postfix>`` replaced by ``_<kind>``), else ``<name>_<kind>``."""
    stem = output.name.removesuffix(".gz").removesuffix(".nii")
    suffix = output.name[len(stem) :] or ".nii.gz"
    base = stem.removesuffix(f"_{postfix}") if postfix else stem
    return output.with_name(f"{base}_{kind}{suffix}")


def write_label_map(labels: torch.Tensor, image: str | Path | list[str], output_path: str | Path, preprocess: Compose, class_names: Sequence[str]) -> Path:
    """Write ``labels`` (``(1, *S)`` or ``(*S)`` class ids on the grid ``preprocess`` made of
    ``image``: a file, a DICOM series, or one file per channel) as NIfTI on the input's own grid, as
    :func:`predict_to_nifti` does; the preprocessing is run again on the input to know what to invert."""
    data = _preprocessed(image, preprocess)
    reference = image[0] if isinstance(image, list) else image  # channel files share one grid
    return _save_label_map(labels.reshape(1, *labels.shape[-(data["image"].ndim - 1) :]), data, preprocess, reference, output_path, list(class_names))


def _preprocessed(image: str | Path | list[str], preprocess: Compose) -> dict[Hashable, Any]:
    with _data_errors_as_themselves():
        case: dict[Hashable, Any] = preprocess({"image": [str(f) for f in image] if isinstance(image, list) else str(image)})
    return case


def prediction_name(image_path: str | Path, postfix: str = "seg") -> str:
    """``case_7.nii.gz`` -> ``case_7_seg.nii.gz`` (``.nii`` stays ``.nii``; a DICOM series folder ``CT1`` -> ``CT1_seg.nii.gz``)."""
    name = Path(str(image_path)).name
    suffix = ".nii" if name.lower().endswith(".nii") else ".nii.gz"
    for ending in NIFTI_SUFFIXES:
        if name.lower().endswith(ending):
            name = name[: -len(ending)]
    return f"{name}_{postfix}{suffix}" if postfix else f"{name}{suffix}"


# ----------------------------------------------------------------------------- polyfm predict


class NiftiPredictionWriter(PredictionFileWriter):
    """Writes ``polyfm predict``'s label maps as NIfTI files named by their input (``<case>_seg.nii.gz``,
    MONAI's ``SaveImage`` naming), on the input's own grid and header, with the label-name sidecar.

    ``output`` is the folder (default ``<default_root_dir>/predictions``). The datamodule must say how
    it preprocessed the inputs (``SegmentationDataModule.predict_preprocessing``), so that it can be
    inverted. ``write_probabilities`` adds ``<case>_prob.nii.gz`` (needs the task's
    ``predict_probabilities``); an :class:`~polyfm.core.predict.Ensemble` with probabilities adds the
    members' spread as ``<case>_std.nii.gz``. ``keep_largest`` / ``fill_holes`` / ``min_component_size``
    clean the label map on the input grid (:func:`postprocess_labels`); probabilities stay as predicted."""

    def __init__(
        self,
        output: str | None = None,
        postfix: str = "seg",
        write_probabilities: bool = False,
        probability_dtype: ProbabilityDtype = "float32",
        keep_largest: list[int] | None = None,
        fill_holes: list[int] | None = None,
        min_component_size: int = 0,
        connectivity: int = 1,
    ) -> None:
        super().__init__(output=output, write_interval="batch")
        if probability_dtype not in ("float32", "uint8"):
            raise ConfigError(f"NiftiPredictionWriter(probability_dtype={probability_dtype!r}): use 'float32' or 'uint8'")
        self.postprocessing = PostProcessing.checked("NiftiPredictionWriter", keep_largest, fill_holes, min_component_size, connectivity)
        self.postfix, self.write_probabilities, self.probability_dtype = postfix, write_probabilities, probability_dtype
        self._sources: dict[Path, str] = {}

    def reset(self) -> None:
        self._sources = {}

    def on_predict_start(self, trainer: Any, pl_module: Any) -> None:
        super().on_predict_start(trainer, pl_module)
        if self.write_probabilities and getattr(pl_module, "predict_probabilities", True) is False:
            raise ConfigError("NiftiPredictionWriter(write_probabilities=True) needs the task's probabilities: set --model.predict_probabilities=true")

    def write_on_batch_end(self, trainer: Any, pl_module: Any, prediction: Any, batch_indices: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        data = trainer.datamodule
        if not hasattr(data, "predict_preprocessing"):
            raise ConfigError(f"NiftiPredictionWriter needs a polyfm.medseg datamodule (SegmentationDataModule), not {type(data).__name__}: it inverts that module's preprocessing.")
        if self.write_probabilities and prediction.get("probabilities") is None:
            raise ConfigError("NiftiPredictionWriter(write_probabilities=True) got no probabilities from the model: set --model.predict_probabilities=true")
        folder = self.predictions_folder(trainer)
        names = self.class_names(trainer, pl_module, int(pl_module.num_classes))
        sources = prediction["meta"] if isinstance(prediction["meta"], list | tuple) else [prediction["meta"]]
        probabilities, spread = prediction.get("probabilities"), prediction.get("probabilities_std")
        extra: dict[str, Any] = {"members": int(prediction["members"])} if "members" in prediction else {}
        if getattr(pl_module, "tta_flip_axes", None):  # an Ensemble answers with its first member's
            extra["tta_flip_axes"] = list(pl_module.tta_flip_axes)
        preprocess = data.predict_preprocessing()
        for index, source in enumerate(sources):
            output = folder / prediction_name(source, self.postfix)
            if output in self._sources:  # two inputs with one name (case.nii.gz in two folders) must not overwrite each other
                raise DataError(f"{source} and {self._sources[output]} both give the prediction file {output}: rename one input, or predict them in separate runs.", path=source)
            self._sources[output] = str(source)
            image = getattr(data, "predict_images", {}).get(str(source), source)  # all channel files, not only the first
            reference = image[0] if isinstance(image, list) else image
            case = _preprocessed(image, preprocess)  # what to invert: the preprocessing is run again on the input
            write_case(
                prediction["labels"][index], case, preprocess, reference, output, names,
                probabilities=probabilities[index] if self.write_probabilities and probabilities is not None else None,
                spread=spread[index] if spread is not None else None, probability_dtype=self.probability_dtype,
                postprocessing=self.postprocessing, postfix=self.postfix, extra=extra, write=self.write_file,
            )  # fmt: skip


__all__ = ["NiftiPredictionWriter", "PostProcessing", "postprocess_labels", "predict_to_nifti", "prediction_name", "write_case", "write_label_map"]
