"""Decathlon reading, MONAI preprocessing and the errors bad volumes get (hand-made corrupt files)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import ThreadDataLoader

from polyfm.core.errors import ConfigError, DataError
from polyfm.medseg.data import (
    SegmentationDataModule,
    ToDevice,
    VolumeFolderDataModule,
    find_volumes,
    label_names,
    read_decathlon,
)
from polyfm.medseg.predict import predict_to_nifti

AFFINE = np.array([[-1.5, 0, 0, 10.0], [0, -1.5, 0, 20.0], [0, 0, 2.0, -30.0], [0, 0, 0, 1]])  # LPS-ish, as scanners write


def _save(path: Path, array: np.ndarray, affine: np.ndarray = AFFINE) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return str(path)


def _dataset(tmp_path: Path, n: int = 3, shape=(24, 20, 12), labels=None, image_fn=None, label_fn=None) -> Path:
    rng = np.random.default_rng(0)
    training = []
    for i in range(n):
        image = rng.normal(0, 100, shape).astype(np.float32)
        label = np.zeros(shape, np.uint8)
        label[4:12, 4:10, 2:8] = 1
        label[14:20, 10:16, 4:10] = 2
        image = image_fn(i, image) if image_fn else image
        label_img = label_fn(i, label) if label_fn else (label, AFFINE)
        _save(tmp_path / "imagesTr" / f"case{i}.nii.gz", image)
        _save(tmp_path / "labelsTr" / f"case{i}.nii.gz", *label_img)
        training.append({"image": f"./imagesTr/case{i}.nii.gz", "label": f"./labelsTr/case{i}.nii.gz"})
    description = {"name": "toy", "labels": labels or {"0": "background", "1": "liver", "2": "spleen"}, "training": training}
    (tmp_path / "dataset.json").write_text(json.dumps(description))
    return tmp_path / "dataset.json"


def _first_batch(dataset_json: Path, **kwargs) -> dict:
    dm = SegmentationDataModule(str(dataset_json), roi_size=[16, 16, 8], cache="none", val_fraction=0.34, **kwargs)
    dm.setup()
    return next(iter(dm.train_dataloader()))


def test_medseg_decathlon_batches(tmp_path) -> None:
    batch = _first_batch(_dataset(tmp_path), num_samples=2, batch_size=2)
    assert batch["input"].shape == (4, 1, 16, 16, 8) and batch["input"].dtype == torch.float32
    assert batch["target"].shape == (4, 1, 16, 16, 8) and batch["target"].dtype == torch.long
    assert type(batch["input"]) is torch.Tensor  # plain tensors, not MetaTensors
    assert -0.1 <= float(batch["input"].min()) and float(batch["input"].max()) <= 1.1  # CT window to [0, 1] + intensity shift
    assert set(batch["target"].unique().tolist()) <= {0, 1, 2}
    assert all(m.endswith(".nii.gz") for m in batch["meta"])


def test_medseg_label_map_and_names(tmp_path) -> None:
    dm = SegmentationDataModule(str(_dataset(tmp_path)), roi_size=[16, 16, 8], cache="none", label_map={2: 1})
    assert dm.class_names == ["background", "spleen"] and dm.num_classes == 2
    dm.setup()
    assert set(next(iter(dm.train_dataloader()))["target"].unique().tolist()) <= {0, 1}
    assert label_names({"background": 0, "liver": 1}) == ["background", "liver"]


def test_medseg_missing_file_is_named(tmp_path) -> None:
    path = _dataset(tmp_path)
    (tmp_path / "labelsTr" / "case1.nii.gz").unlink()
    with pytest.raises(DataError, match=r"training\[1\]\.label = \./labelsTr/case1\.nii\.gz") as info:
        read_decathlon(path)
    assert "relative to the folder of dataset.json" in str(info.value)


def test_medseg_shape_mismatch(tmp_path) -> None:
    path = _dataset(tmp_path, label_fn=lambda i, lab: (lab[:, :, :10], AFFINE) if i == 2 else (lab, AFFINE))
    with pytest.raises(DataError, match=r"labelsTr/case2.nii.gz.*grids differ.*\(24, 20, 12\).*\(24, 20, 10\)"):
        SegmentationDataModule(str(path), roi_size=[16, 16, 8], cache="memory").setup()


def test_medseg_affine_mismatch(tmp_path) -> None:
    shifted = AFFINE.copy()
    shifted[0, 3] += 5.0
    path = _dataset(tmp_path, label_fn=lambda i, lab: (lab, shifted if i == 0 else AFFINE))
    with pytest.raises(DataError, match=r"(?s)case0.nii.gz.*affines differ.*resample it"):
        SegmentationDataModule(str(path), roi_size=[16, 16, 8], cache="memory").setup()


def test_medseg_non_integer_labels(tmp_path) -> None:
    path = _dataset(tmp_path, label_fn=lambda i, lab: (lab.astype(np.float32) * (0.5 if i == 1 else 1.0), AFFINE))
    with pytest.raises(DataError, match=r"case1.nii.gz.*must be integers.*linear interpolation"):
        SegmentationDataModule(str(path), roi_size=[16, 16, 8], cache="memory").setup()


def test_medseg_out_of_range_labels(tmp_path) -> None:
    def bad(i, lab):
        lab = lab.copy()
        if i == 0:
            lab[0, 0, 0] = 7
        return lab, AFFINE

    with pytest.raises(DataError, match=r"case0.nii.gz.*\[7\] are outside 0..2.*label_map"):
        SegmentationDataModule(str(_dataset(tmp_path, label_fn=bad)), roi_size=[16, 16, 8], cache="memory").setup()


def test_medseg_nan_voxels(tmp_path) -> None:
    def nan(i, image):
        if i == 2:
            image[3, 3, 3] = np.nan
        return image

    with pytest.raises(DataError, match=r"imagesTr/case2.nii.gz.*1 voxels are NaN or Inf"):
        SegmentationDataModule(str(_dataset(tmp_path, image_fn=nan)), roi_size=[16, 16, 8], cache="memory").setup()


def test_medseg_4d_volume(tmp_path) -> None:
    _save(tmp_path / "scan4d.nii.gz", np.zeros((16, 16, 8, 3), np.float32))
    dm = VolumeFolderDataModule(folder=str(tmp_path), roi_size=[16, 16, 8], cache="memory")
    with pytest.raises(DataError, match=r"scan4d.nii.gz.*3 channels \(a 4D volume.*in_channels=1.*Split the 4D file"):
        dm.setup()


def test_medseg_volume_folder_crops_and_empty_folder(tmp_path) -> None:
    _save(tmp_path / "a" / "ct.nii.gz", np.random.default_rng(0).normal(size=(30, 30, 12)).astype(np.float32))
    dm = VolumeFolderDataModule(folder=str(tmp_path), roi_size=[16, 16, 8], num_samples=3, batch_size=1, repeats=2)
    dm.setup()
    assert len(dm.train_set) == 2
    assert next(iter(dm.train_dataloader()))["input"].shape == (3, 1, 16, 16, 8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no NIfTI"):
        find_volumes(tmp_path / "empty")


def test_medseg_prediction_keeps_grid_and_affine(tmp_path) -> None:
    from monai.inferers import SlidingWindowInferer

    from polyfm.medseg.models import UNet

    image_path = _save(tmp_path / "scan.nii.gz", np.random.default_rng(1).normal(size=(20, 18, 10)).astype(np.float32))
    model = UNet(spatial_dims=3, out_channels=3, channels=(4, 8, 16), strides=(2, 2))
    inferer = SlidingWindowInferer(roi_size=(16, 16, 8), overlap=0.5, mode="gaussian")
    out = predict_to_nifti(
        model, image_path, tmp_path / "pred" / "scan_seg.nii.gz", inferer=inferer, class_names=["background", "liver", "spleen"], pixdim=[2.0, 2.0, 2.5]
    )
    written, source = nib.load(str(out)), nib.load(image_path)
    assert written.shape == source.shape
    np.testing.assert_allclose(written.affine, source.affine, atol=1e-5)
    assert set(np.unique(np.asarray(written.dataobj)).tolist()) <= {0, 1, 2}
    assert json.loads((tmp_path / "pred" / "scan_seg.json").read_text())["labels"]["2"] == "spleen"


@pytest.mark.parametrize("name", ["{z}.dcm", "IM{z:04d}"])  # PACS exports often drop the extension
def test_medseg_dicom_series_folder_is_read(tmp_path, name: str) -> None:
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    series, study = generate_uid(), generate_uid()
    for z in range(6):  # one CT series, 6 slices 2 mm apart, value 100 * slice index
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID, meta.TransferSyntaxUID = CTImageStorage, generate_uid(), ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID, ds.SeriesInstanceUID, ds.StudyInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID, series, study
        ds.Modality, ds.Rows, ds.Columns, ds.PixelSpacing, ds.SliceThickness = "CT", 20, 18, [1.5, 1.5], 2.0
        ds.ImagePositionPatient, ds.ImageOrientationPatient, ds.InstanceNumber = [0.0, 0.0, 2.0 * z], [1, 0, 0, 0, 1, 0], z + 1
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 1, "MONOCHROME2", 16, 16, 15
        ds.PixelRepresentation, ds.RescaleIntercept, ds.RescaleSlope = 1, 0, 1
        ds.PixelData = np.full((20, 18), 100 * z, np.int16).tobytes()
        (tmp_path / "series").mkdir(exist_ok=True)
        pydicom.dcmwrite(tmp_path / "series" / name.format(z=z), ds, enforce_file_format=True)
    (tmp_path / "series" / "notes.txt").write_text("not a slice")  # beside the series, ignored by find_volumes
    assert find_volumes(tmp_path) == [str(tmp_path / "series")]
    dm = VolumeFolderDataModule(folder=str(tmp_path), roi_size=[16, 16, 6], num_samples=1, batch_size=1, orientation=None, a_min=0, a_max=500)
    dm.setup()
    crop = next(iter(dm.train_dataloader()))["input"][0, 0]
    assert crop.shape == (16, 16, 6)
    torch.testing.assert_close(crop[0, 0].sort().values, torch.arange(6) * 100 / 500.0)  # all six slices, scaled


# ----------------------------------------------------------------------------- transform_device (GPU augmentation)


def _cached_module(dataset_json, **kwargs) -> SegmentationDataModule:
    dm = SegmentationDataModule(str(dataset_json), roi_size=[16, 16, 8], cache="memory", val_fraction=0.34, num_samples=2, batch_size=2, **kwargs)
    dm.setup()
    return dm


def _batches(dm: SegmentationDataModule, epochs: int = 2) -> list[dict]:
    loader = dm.train_dataloader()  # MONAI's loaders re-seed the transforms from torch's RNG when built: seed after
    dm.train_set.dataset.transform.set_random_state(seed=0)  # CheckedDataset -> CacheDataset -> Compose
    out = []
    for epoch in range(epochs):
        loader.sampler.set_epoch(epoch)
        out += list(loader)
    return out


def test_medseg_transform_device_cpu_matches_default(tmp_path) -> None:
    path = _dataset(tmp_path, n=4)
    default, threaded = _cached_module(path), _cached_module(path, transform_device="cpu")
    assert isinstance(threaded.train_dataloader(), ThreadDataLoader) and threaded.train_dataloader().num_workers == 0
    assert not isinstance(default.train_dataloader(), ThreadDataLoader)
    cached = threaded.train_set.dataset._cache[0]  # the cache holds host MetaTensors; ToDevice runs per fetch
    assert cached["image"].device.type == "cpu" and hasattr(cached["image"], "meta")
    assert any(isinstance(t, ToDevice) for t in threaded.train_set.dataset.transform.transforms)
    expected, got = _batches(default), _batches(threaded)
    assert len(expected) == len(got) > 0
    for a, b in zip(expected, got, strict=True):
        assert torch.equal(a["input"], b["input"]) and torch.equal(a["target"], b["target"])
        assert a["target"].dtype == b["target"].dtype == torch.long and type(b["input"]) is torch.Tensor
        assert a["meta"] == b["meta"]  # the file name survives track_meta=False
    assert not any(isinstance(t, ToDevice) for t in threaded.val_set.dataset.transform.transforms)  # whole volumes as before


def test_medseg_transform_device_needs_memory_cache(tmp_path) -> None:
    path = _dataset(tmp_path, n=2)
    with pytest.raises(ConfigError, match=r"transform_device='cpu' needs cache='memory' \(got cache='disk'\)"):
        SegmentationDataModule(str(path), cache="disk", transform_device="cpu")
    with pytest.raises(ConfigError, match="not a torch device"):
        SegmentationDataModule(str(path), transform_device="gpu0")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_medseg_transform_device_cuda_batches(tmp_path) -> None:
    dm = _cached_module(_dataset(tmp_path, n=3), transform_device="cuda")
    assert dm.train_set.dataset._cache[0]["image"].device.type == "cpu"
    batch = next(iter(dm.train_dataloader()))
    assert batch["input"].is_cuda and batch["target"].is_cuda
    assert batch["input"].shape == (4, 1, 16, 16, 8) and batch["target"].dtype == torch.long


# ----------------------------------------------------------------------------- real-world file variants


def test_medseg_float_labels_with_rounding_noise_are_snapped(tmp_path) -> None:
    """Float label maps written with noise (0.9999999, 2.0000001) keep their classes: a plain cast
    would truncate 0.9999999 to background. Fractions (0.5) are still refused (test above)."""
    noise = {1: -1e-7, 2: 1e-7}
    path = _dataset(tmp_path, n=2, label_fn=lambda i, lab: (lab + np.vectorize(lambda v: noise.get(int(v), 0.0))(lab), AFFINE))
    assert nib.load(str(tmp_path / "labelsTr" / "case0.nii.gz")).get_data_dtype() == np.float64
    dm = SegmentationDataModule(str(path), roi_size=[16, 16, 8], cache="memory", val_fraction=0.5)
    dm.setup()
    whole = dm.val_set[0]["target"]  # validation: the whole volume, no crop
    expected = np.asarray(nib.load(str(tmp_path / "labelsTr" / "case0.nii.gz")).dataobj).round().astype(int)
    assert torch.bincount(whole.flatten(), minlength=3).tolist() == np.bincount(expected.ravel(), minlength=3).tolist()
    assert set(next(iter(dm.train_dataloader()))["target"].unique().tolist()) <= {0, 1, 2}


def test_medseg_unreadable_files_are_named_and_macos_metadata_skipped(tmp_path, caplog) -> None:
    path = _dataset(tmp_path, n=2)
    (tmp_path / "imagesTr" / "case1.nii.gz").write_bytes(b"\x00\x05\x16\x07" + bytes(200))  # truncated / not gzip
    with pytest.raises(DataError, match=r"imagesTr/case1.nii.gz: cannot be read as the image \(.*\). Expected a NIfTI file"):
        SegmentationDataModule(str(path), roi_size=[16, 16, 8], cache="memory").setup()
    (tmp_path / "imagesTr" / "._case0.nii.gz").write_bytes(b"\x00\x05\x16\x07" + bytes(200))  # AppleDouble, as in MSD tarballs
    (tmp_path / "imagesTr" / "case1.nii.gz").unlink()
    with caplog.at_level("INFO", logger="polyfm.medseg.data"):
        assert find_volumes(tmp_path / "imagesTr") == [str(tmp_path / "imagesTr" / "case0.nii.gz")]
    assert "skipped 1 macOS '._*' metadata files" in caplog.text
    with pytest.raises(DataError, match=r"\._case0.nii.gz: cannot be read.*'\._\*' are macOS metadata"):
        VolumeFolderDataModule(files=[str(tmp_path / "imagesTr" / "._case0.nii.gz")], roi_size=[16, 16, 8]).setup()


class _Threshold(torch.nn.Module):
    """Logits for 'above 0.5 after the CT window': the written label map must be the input's own threshold."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([0.5 - x[:, :1], x[:, :1] - 0.5], 1)


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_medseg_prediction_round_trip_on_a_permuted_grid(tmp_path, suffix: str) -> None:
    """A PSR-oriented input (axes permuted and flipped vs RAS, anisotropic): the prediction is made in
    RAS (resampled to 1.5 mm) and written back voxel for voxel on the input's own grid and header."""
    psr = np.array([[0, 0, -2.0, 5.0], [-1.5, 0, 0, 3.0], [0, 1.0, 0, -7.0], [0, 0, 0, 1]])
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in (20, 18, 10)], indexing="ij"), -1)
    world = grid @ psr[:3, :3].T + psr[:3, 3]
    image = np.where(np.linalg.norm(world - world.mean((0, 1, 2)), axis=-1) < 8.0, 250.0, -175.0).astype(np.float32)  # a ball
    source = tmp_path / f"scan{suffix}"
    nib.save(nib.Nifti1Image(image, psr), str(source))
    expected = (image > 0).astype(np.uint8)
    for pixdim, agreement in ((None, 1.0), ([1.5, 1.5, 1.5], 0.97)):
        out = predict_to_nifti(_Threshold(), source, tmp_path / f"seg{suffix}", pixdim=pixdim, a_min=-175.0, a_max=250.0)
        written = nib.load(str(out))
        assert written.shape == image.shape and nib.aff2axcodes(written.affine) == ("P", "S", "L")
        np.testing.assert_allclose(written.affine, psr, atol=1e-5)
        got = np.asarray(written.dataobj)
        assert (got == expected).mean() >= agreement, pixdim
        assert got.sum() > 0.5 * expected.sum()


def test_medseg_4d_multimodal_channels_last(tmp_path) -> None:
    """MSD BrainTumour-style 4D images (modalities on the last NIfTI axis) with in_channels set."""
    path = _dataset(tmp_path, n=2, image_fn=lambda i, image: np.stack([image, -image + 50.0], -1))
    dm = SegmentationDataModule(str(path), roi_size=[16, 16, 8], modality="MR", in_channels=2, cache="memory", val_fraction=0.5)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert batch["input"].shape == (2, 2, 16, 16, 8) and batch["target"].shape == (2, 1, 16, 16, 8)  # one case, 2 crops
    whole = dm.val_set[0]["input"]
    assert float(torch.corrcoef(whole.flatten(1))[0, 1]) < -0.99  # the channels are the two modalities, in order
    out = predict_to_nifti(_Threshold(), tmp_path / "imagesTr" / "case0.nii.gz", tmp_path / "seg.nii.gz", modality="MR", in_channels=2)
    written = nib.load(str(out))
    assert written.shape == (24, 20, 12) and np.allclose(written.affine, AFFINE)


def _nnunet_v2_dataset(root: Path, cases: list[str], channels: int = 2) -> Path:
    """nnU-Net v2's raw layout: imagesTr/{case}_{XXXX}.nii.gz per channel, labelsTr/{case}.nii.gz, no 'training' list."""
    for number, case in enumerate(cases):
        for channel in range(channels):  # channel c is 100 * (c + 1) HU: the order must survive stacking
            _save(root / "imagesTr" / f"{case}_{channel:04d}.nii.gz", np.full((20, 18, 10), 100.0 * (channel + 1) + number, np.float32))
        label = np.zeros((20, 18, 10), np.uint8)
        label[5:10, 5:10, 2:6] = 1
        _save(root / "labelsTr" / f"{case}.nii.gz", label)
    description = {"channel_names": {"0": "T2", "1": "ADC"}, "labels": {"background": 0, "lesion": 1}, "numTraining": len(cases), "file_ending": ".nii.gz"}
    (root / "dataset.json").write_text(json.dumps(description))
    return root / "dataset.json"


def test_medseg_nnunet_v2_raw_dataset_reads_one_file_per_channel(tmp_path) -> None:
    path = _nnunet_v2_dataset(tmp_path, ["prostate_001", "prostate_002"])
    cases, names = read_decathlon(path)
    assert names == ["background", "lesion"] and len(cases) == 2
    assert [Path(f).name for f in cases[0]["image"]] == ["prostate_001_0000.nii.gz", "prostate_001_0001.nii.gz"]
    dm = SegmentationDataModule(str(path), roi_size=[16, 16, 8], in_channels=2, a_min=0.0, a_max=1000.0, cache="memory", val_fraction=0.5)
    dm.setup()
    whole = dm.val_set[0]["input"]  # CT window [0, 1000] -> [0, 1]: channel c holds (100 (c + 1) + case) / 1000
    assert whole.shape == (2, 20, 18, 10)
    assert torch.allclose(whole[:, 0, 0, 0], torch.tensor([0.1, 0.2]), atol=0.002)
    assert next(iter(dm.train_dataloader()))["input"].shape == (2, 2, 16, 16, 8)
    with pytest.raises(DataError, match=r"2 channels \(a 4D volume or one file per channel.*set in_channels=2"):
        SegmentationDataModule(str(path), roi_size=[16, 16, 8], cache="memory").setup()
    (tmp_path / "imagesTr" / "prostate_002_0001.nii.gz").unlink()
    with pytest.raises(DataError, match=r"training\[1\]\.image = imagesTr/prostate_002_0001.nii.gz"):
        read_decathlon(path)
    (tmp_path / "labelsTr" / "prostate_002.nii.gz").unlink()
    with pytest.raises(DataError, match=r"numTraining is 2 but labelsTr/ holds 1"):
        read_decathlon(path)
    description = json.loads(path.read_text()) | {"labels": {"background": 0, "lesion": 1, "ignore": 2}, "numTraining": 1}
    path.write_text(json.dumps(description))  # sparse annotations: nnU-Net's ignore label
    with pytest.raises(DataError, match=r"dataset.json: 'labels' declares nnU-Net's 'ignore' label \(id 2"):
        SegmentationDataModule(str(path), in_channels=2)


def test_medseg_prediction_writer_reads_every_channel_file_of_a_case(tmp_path) -> None:
    """predict on one-file-per-channel cases (nnU-Net v2): the writer re-reads both channels to invert, names by the first."""
    import lightning as L

    from polyfm.medseg.models import UNet
    from polyfm.medseg.predict import NiftiPredictionWriter
    from polyfm.medseg.tasks import VolumeSegmentation

    path = _nnunet_v2_dataset(tmp_path, ["prostate_001", "prostate_002"])
    dm = SegmentationDataModule(str(path), roi_size=[16, 16, 8], in_channels=2, a_min=0.0, a_max=1000.0, val_fraction=0.5)
    trainer = L.Trainer(logger=False, enable_progress_bar=False, callbacks=[NiftiPredictionWriter(str(tmp_path / "out"), postfix="")], default_root_dir=tmp_path)
    task = VolumeSegmentation(UNet(in_channels=2, channels=[4, 8], strides=[2]), num_classes=2, roi_size=[16, 16, 8])
    trainer.predict(task, datamodule=dm, return_predictions=False)
    (written,) = (tmp_path / "out").glob("*.nii.gz")  # the validation case (no test list, no predict_files)
    assert written.name.endswith("_0000.nii.gz") and nib.load(str(written)).shape == (20, 18, 10)
    assert json.loads(written.with_name(written.name.replace(".nii.gz", ".json")).read_text())["labels"] == {"0": "background", "1": "lesion"}


def test_medseg_label_stored_in_another_orientation_is_reoriented_onto_the_image(tmp_path, caplog) -> None:
    """A label map on the image's voxels but saved in another axis order and direction (a tool writing SRA beside
    an LPS scan) trains on the same targets as the label written on the image's grid; a label in another
    orientation that is *not* the same voxels (shifted by a voxel) is still refused."""
    from polyfm.medseg.data import segmentation_transforms

    path = _dataset(tmp_path, n=1)
    label_file = tmp_path / "labelsTr" / "case0.nii.gz"
    original = nib.load(str(label_file))
    start, end = nib.orientations.io_orientation(original.affine), nib.orientations.axcodes2ornt(("S", "R", "A"))
    reoriented = original.as_reoriented(nib.orientations.ornt_transform(start, end))
    assert reoriented.shape == (12, 24, 20)
    other = tmp_path / "labelsTr" / "case0_sra.nii.gz"
    nib.save(reoriented, str(other))
    pipeline = segmentation_transforms(False, [16, 16, 8], num_classes=3, pixdim=None)
    image = str(tmp_path / "imagesTr" / "case0.nii.gz")
    expected = pipeline({"image": image, "label": str(label_file)})["target"]
    with caplog.at_level("INFO", logger="polyfm.medseg.data"):
        got = pipeline({"image": image, "label": str(other)})["target"]
    assert "case0_sra.nii.gz: stored in another orientation" in caplog.text
    assert torch.equal(got, expected) and int(expected.sum()) > 0
    shifted = reoriented.affine.copy()
    shifted[:3, 3] += reoriented.affine[:3, 0]  # one voxel along the first axis: other voxels, not a reordering
    nib.save(nib.Nifti1Image(np.asarray(reoriented.dataobj), shifted), str(other))
    description = json.loads(path.read_text())
    description["training"][0]["label"] = "./labelsTr/case0_sra.nii.gz"
    path.write_text(json.dumps(description))
    with pytest.raises(DataError, match=r"case0_sra.nii.gz: image and label grids differ"):
        SegmentationDataModule(str(path), roi_size=[16, 16, 8], cache="memory").setup()


def test_medseg_label_map_must_fit_the_class_names(tmp_path) -> None:
    path = _dataset(tmp_path)
    with pytest.raises(ConfigError, match=r"label_map=\{1: 1, 2: 2\}\) sends \{2: 2\} to classes past the 2 of class_names"):
        SegmentationDataModule(str(path), roi_size=[16, 16, 8], label_map={1: 1, 2: 2}, class_names=["background", "liver"])
    with pytest.raises(ConfigError, match=r"negative ids are not labels"):
        SegmentationDataModule(str(path), roi_size=[16, 16, 8], label_map={-1: 1, 2: 2})
    with pytest.raises(DataError, match=r"outside 0..1 \(2 classes: dataset.json's 'labels', or class_names\)"):
        SegmentationDataModule(str(path), roi_size=[16, 16, 8], class_names=["background", "liver"], cache="memory").setup()


def test_medseg_remap_labels_ignores_huge_stray_ids() -> None:
    """The lookup table is sized by label_map, not by the largest voxel value (a corrupt map holding 2**40
    would ask for 8 TB): ids past the map are background."""
    from polyfm.medseg.data import RemapLabels

    label = torch.tensor([[0, 5, 1, 2**40]])
    assert RemapLabels({5: 1, 1: 2})({"label": label})["label"].tolist() == [[0, 1, 2, 0]]


def test_medseg_channel_files_on_different_grids_are_named(tmp_path) -> None:
    root = tmp_path / "raw"
    path = _nnunet_v2_dataset(root, ["la_001", "la_002"])
    _save(root / "imagesTr" / "la_002_0001.nii.gz", np.zeros((20, 18, 8), np.float32))  # one channel cropped differently
    with pytest.raises(DataError, match=r"la_002_0000.nii.gz, .*la_002_0001.nii.gz: the 2 channel files .* one grid"):
        SegmentationDataModule(str(path), roi_size=[16, 16, 8], in_channels=2, modality="MR", cache="memory", val_fraction=0.5).setup()
