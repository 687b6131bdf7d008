"""Inference as nnU-Net and MONAI users expect it: mirroring TTA, post-processing, probability maps and
fold-ensemble uncertainty written on the input grid (polyfm.core.predict.Ensemble through the writer)."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import nibabel as nib
import numpy as np
import pytest
import torch

from polyfm.core.errors import ConfigError
from polyfm.core.predict import Ensemble
from polyfm.medseg.data import SegmentationDataModule
from polyfm.medseg.models import UNet
from polyfm.medseg.predict import NiftiPredictionWriter, postprocess_labels, predict_to_nifti
from polyfm.medseg.samples import write_synthetic_dataset
from polyfm.medseg.tasks import VolumeSegmentation

ROI = [16, 16, 8]


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    return write_synthetic_dataset(tmp_path_factory.mktemp("phantoms"), n_labelled=3, n_unlabelled=0, shape=(24, 20, 10))


def _task(seed: int = 0, **kwargs) -> VolumeSegmentation:
    torch.manual_seed(seed)
    return VolumeSegmentation(UNet(channels=[4, 8], strides=[2]), num_classes=3, roi_size=ROI, **kwargs)


def _quiet_trainer(root: Path, **kwargs) -> L.Trainer:
    return L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=root, **kwargs)


# ----------------------------------------------------------------------------- mirroring TTA


def test_medseg_tta_is_the_mean_softmax_of_the_flipped_predictions() -> None:
    task = _task(tta_flip_axes=[0, 2]).eval()
    x = torch.randn(1, 1, *ROI)  # one window: the sliding window adds nothing, the mean is exact
    with torch.no_grad():
        mirrored = task.infer(x).softmax(1)
        by_hand = torch.zeros_like(mirrored)
        for dims in ([], [2], [4], [2, 4]):  # spatial axes 0 and 2 are tensor dims 2 and 4
            flipped = torch.flip(x, dims) if dims else x
            by_hand += (lambda p, d=dims: torch.flip(p, d) if d else p)(task.model(flipped).softmax(1)) / 4
        plain = task.model(x).softmax(1)
    assert torch.allclose(mirrored, by_hand, atol=1e-6)
    assert not torch.allclose(mirrored, plain, atol=1e-3)  # a random U-Net is not flip-equivariant: TTA changed something


def test_medseg_tta_makes_the_sliding_window_flip_equivariant() -> None:
    """Volume 24 wide, windows 16 at overlap 0.5 (starts 0 and 8, a mirror-symmetric tiling): mirrored
    windows make the whole-volume prediction of a flipped input the flipped prediction; without, not."""
    x = torch.randn(1, 1, 24, 16, 8)
    with torch.no_grad():
        for axes, equivariant in (([0], True), (None, False)):
            task = _task(tta_flip_axes=axes).eval()
            direct, of_flipped = task.infer(x).softmax(1), task.infer(torch.flip(x, [2])).softmax(1)
            assert torch.allclose(torch.flip(of_flipped, [2]), direct, atol=1e-5) is equivariant


def test_medseg_tta_runs_in_predict_not_in_validation(phantoms, tmp_path) -> None:
    """(24, 20, 10) in 16x16x8 windows at overlap 0.5: 2x2x2 = 8 windows, two network calls of 4; mirrored
    over three axes, each call is 2^3 passes in predict, one in validation."""
    image = phantoms.parent / "imagesTs" / "phantom_003.nii.gz"
    data = SegmentationDataModule(str(phantoms), roi_size=ROI, val_fraction=0.34, orientation=None, predict_files=[str(image)])
    task = _task(tta_flip_axes=[0, 1, 2])
    calls: list[int] = []
    task.model.register_forward_hook(lambda *_: calls.append(1))
    _quiet_trainer(tmp_path).validate(task, datamodule=data, verbose=False)
    assert len(calls) == 2  # one validation case
    calls.clear()
    _quiet_trainer(tmp_path).predict(task, datamodule=data, return_predictions=False)
    assert len(calls) == 2 * 8
    with pytest.raises(ConfigError, match=r"tta_flip_axes=\[0, 3\]: give distinct spatial axes .* 0\.\.2"):
        _task(tta_flip_axes=[0, 3])


# ----------------------------------------------------------------------------- post-processing


def test_medseg_postprocessing_on_a_synthetic_label_map() -> None:
    labels = np.zeros((12, 12, 6), np.uint8)
    labels[1:6, 1:6, 1:5] = 1  # the organ, 100 voxels ...
    labels[3, 3, 2] = 0  # ... with an enclosed hole
    labels[9:11, 9:11, 1:3] = 1  # a stray piece of it, 8 voxels
    labels[1:4, 8:11, 1:4] = 2  # another organ, 27 voxels
    labels[8, 2, 4] = 2  # a speck of it, 1 voxel
    labels[7, 6, 5] = 2  # and another, 1 voxel
    expected = labels.copy()
    expected[3, 3, 2] = 1
    expected[9:11, 9:11, 1:3] = 0
    out = postprocess_labels(labels, keep_largest=[1], fill_holes=[1])
    assert np.array_equal(out, expected) and (out == 2).sum() == 29  # only label 1 was cleaned
    out = postprocess_labels(labels, keep_largest=[1], fill_holes=[1], min_component_size=5)
    expected[8, 2, 4] = expected[7, 6, 5] = 0
    assert np.array_equal(out, expected)
    corner = np.zeros((4, 4, 4), np.uint8)
    corner[0, 0, 0] = corner[1, 1, 1] = 1  # touch at a corner only: one component at connectivity 3, two at 1
    assert postprocess_labels(corner, min_component_size=2, connectivity=3).sum() == 2
    assert postprocess_labels(corner, min_component_size=2, connectivity=1).sum() == 0
    with pytest.raises(ConfigError, match=r"keep_largest=\[0\]\): foreground label ids"):
        NiftiPredictionWriter(keep_largest=[0])


# ----------------------------------------------------------------------------- probabilities, fold ensemble


@pytest.fixture(scope="module")
def fold_checkpoints(phantoms, tmp_path_factory) -> list[str]:
    """Two 'folds': one training step each from different initialisations, saved by Lightning."""
    folder = tmp_path_factory.mktemp("folds")
    paths = []
    for fold in range(2):
        data = SegmentationDataModule(str(phantoms), roi_size=ROI, val_fraction=0.0, num_samples=1, batch_size=1)
        trainer = _quiet_trainer(folder, max_steps=1, enable_checkpointing=False, limit_val_batches=0)
        trainer.fit(_task(seed=fold), datamodule=data)
        trainer.save_checkpoint(folder / f"fold{fold}.ckpt")
        paths.append(str(folder / f"fold{fold}.ckpt"))
    return paths


def _lps_copy(image: Path, folder: Path) -> Path:
    """The same voxels with the x and y axes pointing the other way: the preprocessing must flip them, the writer back."""
    source = nib.load(str(image))
    affine = source.affine.copy()
    affine[:2, :2] *= -1
    folder.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(source.dataobj), affine), str(folder / "lps_case.nii.gz"))
    return folder / "lps_case.nii.gz"


def test_medseg_fold_ensemble_writes_probabilities_and_uncertainty_on_the_input_grid(phantoms, fold_checkpoints, tmp_path) -> None:
    image = _lps_copy(phantoms.parent / "imagesTs" / "phantom_003.nii.gz", tmp_path / "in")
    data = SegmentationDataModule(str(phantoms), roi_size=ROI, predict_files=[str(image)])  # orientation RAS: flips x, y
    ensemble = Ensemble(_task(predict_probabilities=True), fold_checkpoints)
    writer = NiftiPredictionWriter(output=str(tmp_path / "out"), write_probabilities=True)
    _quiet_trainer(tmp_path, callbacks=[writer]).predict(ensemble, datamodule=data, return_predictions=False)

    source = nib.load(str(image))
    labels, probabilities, spread = (nib.load(str(tmp_path / "out" / f"lps_case_{kind}.nii.gz")) for kind in ("seg", "prob", "std"))
    for written in (labels, probabilities, spread):
        assert written.shape[:3] == source.shape and np.array_equal(written.affine, source.affine)
    assert probabilities.shape == (*source.shape, 3) and spread.shape == (*source.shape, 3) and probabilities.get_data_dtype() == np.float32
    sidecar = json.loads((tmp_path / "out" / "lps_case_seg.json").read_text())
    assert sidecar["members"] == 2 and sidecar["probabilities"] == "lps_case_prob.nii.gz" and sidecar["uncertainty"] == "lps_case_std.nii.gz"
    assert sidecar["labels"] == {"0": "background", "1": "liver", "2": "spleen"}
    assert sorted(p.name for p in writer.written) == sorted(["lps_case_prob.nii.gz", "lps_case_std.nii.gz", "lps_case_seg.nii.gz", "lps_case_seg.json"])

    # by hand: each fold's softmax on the preprocessed (RAS) grid, mean and std over the folds, flipped back to LPS
    x = torch.as_tensor(data.predict_preprocessing()({"image": str(image)})["image"]).unsqueeze(0).float()
    with torch.no_grad():
        members = torch.stack([m.infer(x).softmax(1)[0] for m in ensemble.members])
    mean, std = (np.flip(t.movedim(0, -1).numpy(), (0, 1)) for t in (members.mean(0), members.std(0, correction=1)))
    assert np.allclose(probabilities.get_fdata(), mean, atol=1e-5) and np.allclose(spread.get_fdata(), std, atol=1e-5)
    assert float(std.max()) > 1e-3  # the two folds disagree somewhere: the map is not all zeros
    assert np.array_equal(np.asarray(labels.dataobj), mean.argmax(-1))


def test_medseg_probabilities_resampled_back_and_postprocessed_labels(phantoms, fold_checkpoints, tmp_path) -> None:
    """With resampling (pixdim), uint8 probabilities come back on the input grid summing to 1, and the
    post-processed label map is the raw one post-processed on that grid."""
    image = phantoms.parent / "imagesTs" / "phantom_004.nii.gz"
    data = SegmentationDataModule(str(phantoms), roi_size=ROI, pixdim=[4.5, 4.0, 5.0], predict_files=[str(image)])
    task = _task(predict_probabilities=True)
    task.load_state_dict(torch.load(fold_checkpoints[0], weights_only=True)["state_dict"])
    raw_writer = NiftiPredictionWriter(output=str(tmp_path / "raw"), write_probabilities=True, probability_dtype="uint8")
    clean_writer = NiftiPredictionWriter(output=str(tmp_path / "clean"), keep_largest=[1, 2], min_component_size=3)
    for writer in (raw_writer, clean_writer):
        _quiet_trainer(tmp_path, callbacks=[writer]).predict(task, datamodule=data, return_predictions=False)
    source = nib.load(str(image))
    probabilities = nib.load(str(tmp_path / "raw" / "phantom_004_prob.nii.gz"))
    assert probabilities.shape == (*source.shape, 3) and np.array_equal(probabilities.affine, source.affine)
    assert probabilities.get_data_dtype() == np.uint8 and probabilities.dataobj.slope == pytest.approx(1 / 255)
    assert np.allclose(probabilities.get_fdata().sum(-1), 1.0, atol=3 * 0.5 / 255 + 1e-6)  # linear resampling keeps the sum; uint8 rounds each class
    raw = np.asarray(nib.load(str(tmp_path / "raw" / "phantom_004_seg.nii.gz")).dataobj)
    clean = nib.load(str(tmp_path / "clean" / "phantom_004_seg.nii.gz"))
    assert np.array_equal(clean.affine, source.affine)
    assert np.array_equal(np.asarray(clean.dataobj), postprocess_labels(raw, keep_largest=[1, 2], min_component_size=3))
    assert json.loads((tmp_path / "clean" / "phantom_004_seg.json").read_text())["postprocessing"]["keep_largest"] == [1, 2]


def test_medseg_writer_refuses_probabilities_the_task_does_not_give(phantoms, fold_checkpoints, tmp_path) -> None:
    data = SegmentationDataModule(str(phantoms), roi_size=ROI, predict_files=[str(phantoms.parent / "imagesTs" / "phantom_004.nii.gz")])
    writer = NiftiPredictionWriter(output=str(tmp_path / "out"), write_probabilities=True)
    with pytest.raises(ConfigError, match=r"write_probabilities=True\) needs the task's probabilities: set --model.predict_probabilities=true"):
        _quiet_trainer(tmp_path, callbacks=[writer]).predict(_task(), datamodule=data, return_predictions=False)
    # an ensemble of members without predict_probabilities drops the mean softmax: refused at the first case
    with pytest.raises(ConfigError, match=r"write_probabilities=True\) got no probabilities from the model: set --model.predict_probabilities=true"):
        _quiet_trainer(tmp_path, callbacks=[writer]).predict(Ensemble(_task(), fold_checkpoints), datamodule=data, return_predictions=False)
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- the Python API, same options as polyfm predict


def _read(path: Path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj)


def test_medseg_predict_to_nifti_writes_what_the_writer_writes(phantoms, fold_checkpoints, tmp_path) -> None:
    """TTA, probabilities (uint8) and post-processing through predict_to_nifti give the same files as the
    writer under trainer.predict, on an LPS input with resampling; the sidecar records the same settings."""
    image = _lps_copy(phantoms.parent / "imagesTs" / "phantom_003.nii.gz", tmp_path / "in")
    pre = {"pixdim": [4.5, 4.0, 5.0], "a_min": -175.0, "a_max": 250.0}
    post = {"keep_largest": [1], "fill_holes": [1, 2], "min_component_size": 3}
    task = _task(predict_probabilities=True, tta_flip_axes=[0, 1, 2])
    task.load_state_dict(torch.load(fold_checkpoints[0], weights_only=True)["state_dict"])
    data = SegmentationDataModule(str(phantoms), roi_size=ROI, predict_files=[str(image)], **pre)
    writer = NiftiPredictionWriter(output=str(tmp_path / "cli"), write_probabilities=True, probability_dtype="uint8", **post)
    _quiet_trainer(tmp_path, callbacks=[writer]).predict(task, datamodule=data, return_predictions=False)
    out = predict_to_nifti(
        task.model, image, tmp_path / "api" / "lps_case_seg.nii.gz", inferer=task.inferer, class_names=data.class_names,
        tta_flip_axes=[0, 1, 2], write_probabilities=True, probability_dtype="uint8", **pre, **post,
    )  # fmt: skip
    assert sorted(p.name for p in out.parent.iterdir()) == ["lps_case_prob.nii.gz", "lps_case_seg.json", "lps_case_seg.nii.gz"]
    for name in ("lps_case_seg.nii.gz", "lps_case_prob.nii.gz"):
        api, cli = nib.load(str(tmp_path / "api" / name)), nib.load(str(tmp_path / "cli" / name))
        assert np.array_equal(api.affine, cli.affine) and np.array_equal(_read(tmp_path / "api" / name), _read(tmp_path / "cli" / name))
        assert api.get_data_dtype() == cli.get_data_dtype() and api.shape[:3] == nib.load(str(image)).shape
    sidecar = json.loads((tmp_path / "api" / "lps_case_seg.json").read_text())
    assert sidecar == json.loads((tmp_path / "cli" / "lps_case_seg.json").read_text())
    assert sidecar["tta_flip_axes"] == [0, 1, 2] and sidecar["postprocessing"]["fill_holes"] == [1, 2]
    # without the options: plain argmax, no probability file; the mirrored map differs from it somewhere
    plain = predict_to_nifti(task.model, image, tmp_path / "plain" / "lps_case_seg.nii.gz", inferer=task.inferer, class_names=data.class_names, **pre)
    assert sorted(p.name for p in plain.parent.iterdir()) == ["lps_case_seg.json", "lps_case_seg.nii.gz"]
    with pytest.raises(ConfigError, match=r"predict_to_nifti\(min_component_size=-1\)"):
        predict_to_nifti(task.model, image, tmp_path / "bad.nii.gz", min_component_size=-1)
    with pytest.raises(ConfigError, match=r"tta_flip_axes=\[3\]: give distinct spatial axes .* 0\.\.2"):
        predict_to_nifti(task.model, image, tmp_path / "bad.nii.gz", inferer=task.inferer, tta_flip_axes=[3])
    assert not (tmp_path / "bad.nii.gz").exists()


def test_medseg_predict_to_nifti_on_the_real_ct_with_tta_probabilities_and_postprocessing(tmp_path) -> None:
    """The TotalSegmentator example CT (122x101x30, 3 mm, its own affine): a tiny 3D UNet, resampled to 6 mm
    for the network, mirrored over 3 axes; label map and probabilities come back on the CT's grid."""
    if not __import__("os").environ.get("POLYFM_DATA_DIR"):
        pytest.skip("POLYFM_DATA_DIR is not set (the real sample CT)")
    ct = Path(__import__("os").environ["POLYFM_DATA_DIR"]) / "medseg" / "example_ct_sm.nii.gz"
    torch.manual_seed(0)
    task = VolumeSegmentation(UNet(channels=[4, 8], strides=[2]), num_classes=3, roi_size=[32, 32, 16])
    names = ["background", "liver", "spleen"]
    options = {"inferer": task.inferer, "class_names": names, "pixdim": [6.0, 6.0, 6.0], "tta_flip_axes": [0, 1, 2]}
    raw = predict_to_nifti(task.model, ct, tmp_path / "raw" / "ct_seg.nii.gz", write_probabilities=True, **options)
    clean = predict_to_nifti(task.model, ct, tmp_path / "clean" / "ct_seg.nii.gz", keep_largest=[1, 2], min_component_size=20, **options)
    source = nib.load(str(ct))
    probabilities = nib.load(str(tmp_path / "raw" / "ct_prob.nii.gz"))
    for written in (nib.load(str(raw)), nib.load(str(clean)), probabilities):
        assert written.shape[:3] == source.shape and np.array_equal(written.affine, source.affine)
    assert probabilities.shape == (*source.shape, 3) and np.allclose(probabilities.get_fdata().sum(-1), 1.0, atol=1e-4)
    raw_labels, clean_labels = _read(raw), _read(clean)
    assert set(np.unique(raw_labels)) <= {0, 1, 2} and json.loads((tmp_path / "raw" / "ct_seg.json").read_text())["tta_flip_axes"] == [0, 1, 2]
    assert np.array_equal(clean_labels, postprocess_labels(raw_labels, keep_largest=[1, 2], min_component_size=20))
    assert not np.array_equal(clean_labels, raw_labels)  # an untrained network's specks were removed
    from scipy import ndimage

    for label in (1, 2):  # one piece per organ left
        assert ndimage.label(clean_labels == label)[1] <= 1
