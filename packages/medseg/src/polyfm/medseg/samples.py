"""Sample data for the demo and the tests, and the domain kit.

* :func:`write_synthetic_dataset`: CT-like phantoms (soft-tissue body, fat, a bright
  "liver" and a "spleen" ellipsoid at random positions and sizes, noise, HU values)
  written as NIfTI with a Decathlon ``dataset.json``, plus unlabelled phantoms for
  pretraining. Generated, so the demo needs no files.
* :func:`write_slab_dataset`: the real TotalSegmentator example CT cut into axial slabs
  (each a NIfTI with its own affine), the label map remapped to a few large organs, as a
  Decathlon dataset: training slabs and held-out slabs.
* :func:`demo_kit`: Volume-Fusion pretraining of a small 2D UNet on axial slices of unlabelled
  volumes, then fine-tuning with DiceCE, evaluated slice by slice over whole held-out volumes
  (``test/dice``).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from polyfm.core.errors import ConfigError, DataError

if TYPE_CHECKING:
    from polyfm.core.kit import DomainKit

#: the organs the real-data examples segment (TotalSegmentator ids -> our classes); both kidneys are one class
ORGANS = {"liver": (5,), "spleen": (1,), "kidneys": (2, 3)}
SLABS = {"slab_a": (0, 10), "slab_b": (10, 20), "slab_c": (20, 30)}  # the example CT has 30 axial slices
HELD_OUT = ("slab_b",)

AFFINE = np.diag([3.0, 3.0, 3.0, 1.0])


def organ_label_map(organs: dict[str, tuple[int, ...]] = ORGANS) -> dict[int, int]:
    return {source: index for index, ids in enumerate(organs.values(), start=1) for source in ids}


def _phantom(rng: np.random.Generator, shape: Sequence[int]) -> tuple[NDArray[Any], NDArray[Any]]:
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    image = np.full(shape, -1000.0, np.float32)  # air
    body = ((grid[0] / 0.9) ** 2 + (grid[1] / 0.8) ** 2) < 1.0
    image[body] = -80.0  # fat
    image[((grid[0] / 0.75) ** 2 + (grid[1] / 0.65) ** 2) < 1.0] = 40.0  # soft tissue
    label = np.zeros(shape, np.uint8)
    for value, hu, centre_x in ((1, 110.0, -0.35), (2, 70.0, 0.4)):  # liver (left of the array), spleen (right)
        centre = np.array([centre_x + rng.uniform(-0.1, 0.1), rng.uniform(-0.2, 0.2), rng.uniform(-0.3, 0.3)])
        radii = np.array([rng.uniform(0.2, 0.3), rng.uniform(0.2, 0.3), rng.uniform(0.4, 0.6)]) * (1.3 if value == 1 else 0.8)
        inside = (((grid - centre[:, None, None, None]) / radii[:, None, None, None]) ** 2).sum(0) < 1.0
        image[inside] = hu
        label[inside] = value
    image += rng.normal(0.0, 25.0, shape).astype(np.float32)
    return image, label


def write_synthetic_dataset(folder: str | Path, n_labelled: int = 8, n_unlabelled: int = 4, shape: Sequence[int] = (48, 48, 24), seed: int = 0) -> Path:
    """Phantom CTs: ``imagesTr``/``labelsTr`` (+ ``dataset.json``, 2 held-out test cases) and ``unlabelled/``."""
    import nibabel as nib

    root = Path(folder)
    rng = np.random.default_rng(seed)
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs", "unlabelled"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    entries: dict[str, list[dict[str, str]]] = {"training": [], "test": []}
    for i in range(n_labelled + 2):
        image, label = _phantom(rng, shape)
        split, images, labels = ("training", "imagesTr", "labelsTr") if i < n_labelled else ("test", "imagesTs", "labelsTs")
        # nibabel leaves Nifti1Image's constructor unannotated
        nib.save(nib.Nifti1Image(image.astype(np.int16), AFFINE), str(root / images / f"phantom_{i:03d}.nii.gz"))  # type: ignore[no-untyped-call]
        nib.save(nib.Nifti1Image(label, AFFINE), str(root / labels / f"phantom_{i:03d}.nii.gz"))  # type: ignore[no-untyped-call]
        entries[split].append({"image": f"./{images}/phantom_{i:03d}.nii.gz", "label": f"./{labels}/phantom_{i:03d}.nii.gz"})
    for i in range(n_unlabelled):
        image, _ = _phantom(rng, shape)
        nib.save(nib.Nifti1Image(image.astype(np.int16), AFFINE), str(root / "unlabelled" / f"scan_{i:03d}.nii.gz"))  # type: ignore[no-untyped-call]
    description = {"name": "phantoms", "modality": {"0": "CT"}, "labels": {"0": "background", "1": "liver", "2": "spleen"}, **entries}
    (root / "dataset.json").write_text(json.dumps(description, indent=1))
    return root / "dataset.json"


def write_slab_dataset(data_dir: str | Path, folder: str | Path, slabs: dict[str, tuple[int, int]] = SLABS, held_out: Sequence[str] = HELD_OUT) -> Path:
    """The real example CT and its TotalSegmentator labels as a Decathlon dataset of axial slabs.

    Each slab keeps the CT's voxels and TotalSegmentator ids; its affine is the CT's shifted
    to the slab's first slice, so every slab is a valid volume on its own. Held-out slabs go
    to ``test`` (labelled)."""
    import nibabel as nib
    from nibabel.spatialimages import SpatialImage

    source = Path(data_dir) / "medseg"
    image_file, label_file = source / "example_ct_sm.nii.gz", source / "example_seg.nii.gz"
    for file in (image_file, label_file):
        if not file.exists():
            raise DataError("is missing: POLYFM_DATA_DIR must hold medseg/example_ct_sm.nii.gz and medseg/example_seg.nii.gz.", path=file)

    def load(file: Path) -> SpatialImage:
        loaded = nib.load(str(file))
        if not isinstance(loaded, SpatialImage):
            raise DataError(f"is a {type(loaded).__name__}, not a volume with an affine: it must be a NIfTI file.", path=file)
        return loaded

    image, label = load(image_file), load(label_file)
    image_data, label_data = np.asarray(image.dataobj), np.asarray(label.dataobj)
    root = Path(folder)
    entries: dict[str, list[dict[str, str]]] = {"training": [], "test": []}
    for name, (z0, z1) in slabs.items():
        affine = image.affine.copy()
        affine[:3, 3] = image.affine[:3, :3] @ np.array([0.0, 0.0, z0]) + image.affine[:3, 3]
        split = "test" if name in held_out else "training"
        for sub, data in (("images", image_data), ("labels", label_data)):
            (root / sub).mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(data[..., z0:z1], affine), str(root / sub / f"{name}.nii.gz"))  # type: ignore[no-untyped-call]
        entries[split].append({"image": f"./images/{name}.nii.gz", "label": f"./labels/{name}.nii.gz"})
    names = {"0": "background", "1": "spleen", "2": "kidney_right", "3": "kidney_left", "4": "gallbladder", "5": "liver", "6": "stomach"}
    description = {"name": "totalsegmentator-example-slabs", "modality": {"0": "CT"}, "labels": names, **entries}
    (root / "dataset.json").write_text(json.dumps(description, indent=1))
    return root / "dataset.json"


def demo_kit(data_dir: Path | None, quick: bool = False) -> DomainKit:
    """Pretrain a small 3D UNet with Volume Fusion, fine-tune on liver/spleen(/kidneys/stomach)."""
    from polyfm.core.adaptation import Adaptation
    from polyfm.core.encoder import Encoder
    from polyfm.core.kit import DomainKit
    from polyfm.core.pretrain import Pretraining
    from polyfm.core.tasks import OptimConfig
    from polyfm.medseg.data import SegmentationDataModule, VolumeFolderDataModule
    from polyfm.medseg.models import MedSegNet, UNet
    from polyfm.medseg.objectives import VolumeFusion
    from polyfm.medseg.tasks import VolumeSegmentation

    work = Path(tempfile.mkdtemp(prefix="polyfm-medseg-"))
    if data_dir is not None and (Path(data_dir) / "medseg" / "example_ct.nii.gz").exists():
        dataset_json = write_slab_dataset(data_dir, work / "slabs")
        pretrain_files = [str(Path(data_dir) / "medseg" / "example_ct.nii.gz")]
        class_names, label_map, roi = ["background", *ORGANS], organ_label_map(), [64, 64]
        source, target = "TotalSegmentator example CT (real)", "abdominal-organs-ct"
    else:
        dataset_json = write_synthetic_dataset(work / "phantoms", n_labelled=4 if quick else 8, shape=(48, 48, 12) if quick else (64, 64, 24))
        pretrain_files = sorted(str(p) for p in (work / "phantoms" / "unlabelled").glob("*.nii.gz"))
        class_names, label_map, roi = ["background", "liver", "spleen"], None, [48, 48]
        source, target = "built-in phantoms", "phantom-organs-ct"
    # The demo trains the 2D configuration (axial slices, evaluated slice by slice over whole
    # volumes): 3D convolutions are too slow for a 20-second CPU demo. Recipes train 3D.
    channels = (16, 32, 64)
    n_train = len(json.loads(Path(dataset_json).read_text())["training"])

    def make_encoder() -> UNet:
        return UNet(spatial_dims=2, in_channels=1, out_channels=len(class_names), channels=channels, strides=(2, 2), num_res_units=1)

    def make_pretraining(encoder: Encoder) -> Pretraining:
        if not isinstance(encoder, MedSegNet):  # the study hands back what make_encoder built
            raise ConfigError(f"the medseg kit pretrains a polyfm.medseg.models network, got {type(encoder).__name__}.")
        objective = VolumeFusion(block_min=8, block_max=24)
        encoder.reset_head(objective.num_classes)
        return Pretraining(encoder, objective, OptimConfig(lr=3e-3, weight_decay=1e-4))

    def make_pretrain_data() -> VolumeFolderDataModule:
        repeats = max(1, (10 if quick else 50) * 2 // len(pretrain_files))  # ~10 (quick) or 50 steps per epoch
        return VolumeFolderDataModule(files=pretrain_files, roi_size=roi, num_samples=8, repeats=repeats, a_min=-175.0, a_max=250.0, batch_size=2)

    def make_task(encoder: Encoder, adaptation: Adaptation) -> VolumeSegmentation:
        return VolumeSegmentation(
            encoder, len(class_names), roi_size=roi, sw_batch_size=16, slice_axis=2, adaptation=adaptation, class_names=class_names,
            optim=OptimConfig(lr=5e-3, weight_decay=1e-4),
        )  # fmt: skip

    def make_finetune_data(label_fraction: float, seed: int) -> SegmentationDataModule:
        repeats = max(1, (10 if quick else 25) * 2 // n_train)  # ~10 (quick) or 25 steps per epoch with all labels
        return SegmentationDataModule(
            str(dataset_json), roi_size=roi, a_min=-175.0, a_max=250.0, label_map=label_map, class_names=class_names,
            num_samples=8, repeats=repeats, batch_size=2, label_fraction=label_fraction, seed=seed, augment=False,
            val_fraction=0.0, class_ratios=[1.0] * len(class_names),
        )  # fmt: skip

    return DomainKit(
        name="medseg",
        target=target,
        metric="test/dice",
        higher_is_better=True,
        make_encoder=make_encoder,
        make_pretraining=make_pretraining,
        make_pretrain_data=make_pretrain_data,
        make_task=make_task,
        make_finetune_data=make_finetune_data,
        pretrain_epochs=2 if quick else 4,
        finetune_epochs=4 if quick else 6,
        data_source=source,
    )
