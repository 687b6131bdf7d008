"""nnU-Net-style cross-validation folds: splits_final.json read as written, core's fold_indices with patient groups."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from polyfm.core.errors import ConfigError, DataError
from polyfm.medseg.data import SegmentationDataModule, case_id

# two scans of patients 1 and 3: a patient's scans must stay in one fold
CASES = ["pat1_scan1", "pat1_scan2", "pat2_scan1", "pat3_scan1", "pat3_scan2", "pat4_scan1", "pat5_scan1"]


def _dataset(root: Path, names: list[str] = CASES, validation: bool = False) -> Path:
    """nnU-Net's naming (imagesTr/<case>_0000.nii.gz, labelsTr/<case>.nii.gz) and one labelled test case."""
    entries: dict[str, list[dict[str, str]]] = {"training": [], "test": []}
    for split, cases in (("training", names), ("test", ["held_out_case"])):
        for name in cases:
            for folder, suffix in (("imagesTr", "_0000"), ("labelsTr", "")):
                (root / folder).mkdir(parents=True, exist_ok=True)
                nib.save(nib.Nifti1Image(np.zeros((4, 4, 2), np.uint8), np.eye(4)), str(root / folder / f"{name}{suffix}.nii.gz"))
            entries[split].append({"image": f"imagesTr/{name}_0000.nii.gz", "label": f"labelsTr/{name}.nii.gz"})
    if validation:
        entries["validation"] = entries["training"][:1]
    (root / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "1": "organ"}, **entries}))
    return root / "dataset.json"


def _ids(cases: list[dict]) -> list[str]:
    return [case_id(c["image"]) for c in cases]


def test_medseg_case_ids_are_nnunet_identifiers() -> None:
    assert case_id("/data/imagesTr/la_003_0000.nii.gz") == "la_003"
    assert case_id("spleen_2.nii.gz") == "spleen_2" and case_id("BraTS_001_0003.nii") == "BraTS_001"


def test_medseg_splits_final_json_folds_are_read_as_written(tmp_path) -> None:
    dataset = _dataset(tmp_path)
    splits = [
        {"train": ["pat2_scan1", "pat3_scan1", "pat3_scan2", "pat4_scan1", "pat5_scan1"], "val": ["pat1_scan1", "pat1_scan2"]},
        {"train": ["pat1_scan1", "pat1_scan2", "pat5_scan1", "pat2_scan1"], "val": ["pat3_scan1", "pat4_scan1", "pat3_scan2"]},
    ]
    (tmp_path / "splits_final.json").write_text(json.dumps(splits))
    for fold, expected in enumerate(splits):
        data = SegmentationDataModule(str(dataset), splits_file="splits_final.json", fold=fold)  # found beside dataset.json
        train, val, test = data.split()
        assert _ids(train) == expected["train"] and _ids(val) == expected["val"]  # the file's cases, in the file's order
        assert _ids(test) == ["held_out_case"]  # the test list is never part of a fold
        assert all(Path(c["label"]).name == f"{case_id(c['image'])}.nii.gz" for c in train + val)  # image and label stay paired

    # ids the dataset does not have are named, with what ids look like here
    (tmp_path / "bad_splits.json").write_text(json.dumps([{"train": ["pat1_scan1", "patient_9"], "val": ["pat2_scan1", "pat7_scan4"]}]))
    with pytest.raises(DataError, match=r"bad_splits.json.*fold 0 names 2 case id\(s\) .*: patient_9, pat7_scan4\..*pat1_scan1"):
        SegmentationDataModule(str(dataset), splits_file=str(tmp_path / "bad_splits.json"), fold=0).split()
    with pytest.raises(ConfigError, match=r"fold=2 but splits_final.json has 2 folds \(0 \.\. 1\)"):
        SegmentationDataModule(str(dataset), splits_file="splits_final.json", fold=2).split()
    (tmp_path / "overlap.json").write_text(json.dumps([{"train": ["pat1_scan1"], "val": ["pat1_scan1"]}]))
    with pytest.raises(DataError, match=r"overlap.json.*fold 0 has case\(s\) in both 'train' and 'val': \['pat1_scan1'\]"):
        SegmentationDataModule(str(dataset), splits_file=str(tmp_path / "overlap.json"), fold=0).split()
    with pytest.raises(ConfigError, match=r"splits_file='splits_final.json'\) needs fold"):
        SegmentationDataModule(str(dataset), splits_file="splits_final.json")


def test_medseg_folds_hold_each_case_out_once_and_keep_patients_together(tmp_path) -> None:
    dataset = _dataset(tmp_path)
    held_out: list[str] = []
    for fold in range(3):
        data = SegmentationDataModule(str(dataset), fold=fold, num_folds=3, group_pattern=r"^(pat\d+)_")
        train, val, test = data.split()
        assert sorted(_ids(train) + _ids(val)) == sorted(CASES) and not set(_ids(train)) & set(_ids(val))
        patients = lambda cases: {name.split("_")[0] for name in _ids(cases)}  # noqa: E731
        assert not patients(train) & patients(val)  # pat1 and pat3 never straddle a fold
        assert _ids(test) == ["held_out_case"]
        held_out += _ids(val)
    assert sorted(held_out) == sorted(CASES)  # every case held out exactly once
    # without groups: still each case once; the same fold twice (another process) gives the same cases
    plain = [_ids(SegmentationDataModule(str(dataset), fold=f, num_folds=3).split()[1]) for f in range(3)]
    assert sorted(sum(plain, [])) == sorted(CASES)
    assert plain[1] == _ids(SegmentationDataModule(str(dataset), fold=1, num_folds=3).split()[1])

    with pytest.raises(DataError, match=r"case 'pat1_scan1' does not match group_pattern='\^\(patient\\\\d\+\)'"):
        SegmentationDataModule(str(dataset), fold=0, group_pattern=r"^(patient\d+)").split()
    with pytest.raises(ConfigError, match=r"5 groups cannot fill 6 folds"):
        SegmentationDataModule(str(dataset), fold=0, num_folds=6, group_pattern=r"^(pat\d+)_").split()
    with pytest.raises(ConfigError, match=r"has its own 'validation' list and fold=0"):
        SegmentationDataModule(str(_dataset(tmp_path / "with_val", validation=True)), fold=0).split()
