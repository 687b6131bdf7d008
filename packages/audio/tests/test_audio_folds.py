"""Cross-validation splits: ESC-50's official folds, group-aware folds of manifests, and
speaker-grouped folds of the real Free Spoken Digit Dataset."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from polyfm.audio.data import AudioClipsDataModule, FSDDDataModule, fsdd_speakers
from polyfm.core.errors import ConfigError, DataError

DATA = os.environ.get("POLYFM_DATA_DIR")
FSDD = Path(DATA) / "audio" / "fsdd" if DATA else None


def _wav(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, (0.1 * np.sin(np.arange(800) / 3)).astype(np.float32), 8000)


def _names(dataset) -> list[str]:  # noqa: ANN001 - an AudioClipDataset
    return [Path(p).name for p in dataset.paths]


def _esc50(tmp_path: Path) -> Path:
    """ESC-50's layout (meta/esc50.csv beside audio/): 5 folds x 2 classes x 2 clips."""
    rows = ["filename,fold,target,category,esc10,src_file,take"]
    for fold in range(1, 6):
        for target, category in ((0, "dog"), (1, "rain")):
            for take in "AB":
                name = f"{fold}-{target}{take}-{take}-{target}.wav"
                _wav(tmp_path / "audio" / name)
                rows.append(f"{name},{fold},{target},{category},True,{target},{take}")
    (tmp_path / "meta").mkdir()
    (tmp_path / "meta" / "esc50.csv").write_text("\n".join(rows) + "\n")
    return tmp_path / "meta" / "esc50.csv"


def test_esc50_official_fold_is_held_out_as_validation_and_test(tmp_path: Path) -> None:
    csv_path = _esc50(tmp_path)
    held_out_once: Counter[str] = Counter()
    for fold in range(1, 6):
        dm = AudioClipsDataModule(train=str(csv_path), format="folds", fold=fold, clip_seconds=0.1)
        dm.setup()
        train, val, test = _names(dm.train_set), _names(dm.val_set), _names(dm.test_set)
        assert val == test and len(val) == 4 and all(name.startswith(f"{fold}-") for name in val)  # exactly the CSV's fold
        assert len(train) == 16 and not set(train) & set(val)
        assert dm.class_names == ["dog", "rain"]
        held_out_once.update(val)
    assert len(held_out_once) == 20 and set(held_out_once.values()) == {1}


def test_esc50_fold_errors_name_the_folds(tmp_path: Path) -> None:
    csv_path = str(_esc50(tmp_path))
    with pytest.raises(ConfigError, match=r"fold=0 is not a fold of .*esc50.csv; its folds are \[1, 2, 3, 4, 5\]"):
        AudioClipsDataModule(train=csv_path, format="folds", fold=0).setup()
    with pytest.raises(ConfigError, match=r"leave val_folds / test_folds unset"):
        AudioClipsDataModule(train=csv_path, format="folds", fold=2, test_folds=[5]).setup()
    with pytest.raises(ConfigError, match=r"num_folds=10, but .* has 5 folds"):
        AudioClipsDataModule(train=csv_path, format="folds", fold=2, num_folds=10).setup()


def _grouped_manifest(tmp_path: Path, group_sizes: dict[str, int]) -> Path:
    rows = ["file,labels,group"]
    for group, size in group_sizes.items():
        for i in range(size):
            name = f"{group}_{i}.wav"
            _wav(tmp_path / name)
            rows.append(f"{name},{'dog' if i % 2 else 'cat'},{group}")
    (tmp_path / "clips.csv").write_text("\n".join(rows) + "\n")
    return tmp_path / "clips.csv"


def test_manifest_folds_keep_groups_on_one_side(tmp_path: Path) -> None:
    sizes = {"rec1": 5, "rec2": 4, "rec3": 3, "rec4": 2, "rec5": 2, "rec6": 1}  # 17 clips, 6 source recordings
    csv_path = _grouped_manifest(tmp_path, sizes)
    held_out_once: Counter[str] = Counter()
    for fold in range(3):
        dm = AudioClipsDataModule(train=str(csv_path), fold=fold, num_folds=3, clip_seconds=0.1)
        dm.setup()
        train, held = _names(dm.train_set), _names(dm.val_set)
        assert _names(dm.test_set) == held  # no test source: the held-out fold is scored
        assert sorted(train + held) == sorted(f"{g}_{i}.wav" for g, n in sizes.items() for i in range(n))
        train_groups, held_groups = {n.split("_")[0] for n in train}, {n.split("_")[0] for n in held}
        assert not train_groups & held_groups  # no recording on both sides
        held_out_once.update(held)
    assert len(held_out_once) == 17 and set(held_out_once.values()) == {1}
    # largest groups first into the emptiest fold: {rec1}, {rec2, rec5 or rec4 ...}: sizes 5-6 each, none 17/3 off by more than 1
    sizes_per_fold = sorted(
        len(AudioClipsDataModule(train=str(csv_path), fold=f, num_folds=3, clip_seconds=0.1).build()[1]) for f in range(3)
    )
    assert sizes_per_fold == [5, 6, 6]


def test_manifest_fold_with_test_split_and_errors(tmp_path: Path) -> None:
    csv_path = _grouped_manifest(tmp_path, {"a": 2, "b": 2, "c": 2})
    (tmp_path / "test.csv").write_text("file,labels\na_0.wav,cat\n")
    dm = AudioClipsDataModule(train=str(csv_path), test=str(tmp_path / "test.csv"), fold=1, num_folds=3, clip_seconds=0.1)
    dm.setup()
    assert _names(dm.test_set) == ["a_0.wav"] and len(dm.val_set) == 2
    with pytest.raises(ConfigError, match=r"leave val unset"):
        AudioClipsDataModule(train=str(csv_path), val=str(csv_path), fold=0, num_folds=3).setup()
    with pytest.raises(ConfigError, match=r"3 groups cannot fill 4 folds"):
        AudioClipsDataModule(train=str(csv_path), fold=0, num_folds=4).setup()
    text = csv_path.read_text().splitlines()
    text[3] = text[3].rsplit(",", 1)[0] + ","  # row 4 without its group
    csv_path.write_text("\n".join(text) + "\n")
    with pytest.raises(DataError, match=r"clips.csv, row 4: empty 'group'"):
        AudioClipsDataModule(train=str(csv_path), fold=0, num_folds=3).setup()


def test_folder_folds_without_groups_hold_each_clip_out_once(tmp_path: Path) -> None:
    for cls in ("cat", "dog"):
        for i in range(5):
            _wav(tmp_path / "train" / cls / f"{cls}{i}.wav")
    held_out_once: Counter[str] = Counter()
    for fold in range(5):
        dm = AudioClipsDataModule(train=str(tmp_path / "train"), format="folder", fold=fold, clip_seconds=0.1)
        dm.setup()
        assert len(dm.val_set) == 2 and len(dm.train_set) == 8 and not set(_names(dm.train_set)) & set(_names(dm.val_set))
        held_out_once.update(_names(dm.val_set))
    assert len(held_out_once) == 10 and set(held_out_once.values()) == {1}


@pytest.mark.skipif(FSDD is None or not (FSDD / "recordings").is_dir(), reason="POLYFM_DATA_DIR/audio/fsdd not available")
def test_fsdd_folds_never_share_a_speaker() -> None:
    held_out_once: Counter[str] = Counter()
    speakers_held: list[set[str]] = []
    for fold in range(5):
        dm = FSDDDataModule(fold=fold, num_folds=5, clip_seconds=0.5)
        train, val, test = dm.build()
        train_speakers, held_speakers = set(fsdd_speakers(train.paths)), set(fsdd_speakers(val.paths))
        assert not train_speakers & held_speakers
        assert test.paths == val.paths and len(train) + len(val) == 2500
        assert not {str(p) for p in train.paths} & {str(p) for p in val.paths}
        # every digit is trained and scored in every fold
        assert set(train.labels) == set(val.labels) == set(range(10))
        held_out_once.update(str(p) for p in val.paths)
        speakers_held.append(held_speakers)
    assert len(held_out_once) == 2500 and set(held_out_once.values()) == {1}
    # 5 speakers of 500 recordings each, 5 folds: leave one speaker out
    assert sorted(len(s) for s in speakers_held) == [1] * 5
    assert set().union(*speakers_held) == {"george", "jackson", "lucas", "nicolas", "yweweler"}
    with pytest.raises(ConfigError, match=r"leave val_indices unset"):
        FSDDDataModule(fold=0, val_indices=[5])
    with pytest.raises(ConfigError, match=r"5 groups cannot fill 6 folds"):
        FSDDDataModule(fold=0, num_folds=6).build()
