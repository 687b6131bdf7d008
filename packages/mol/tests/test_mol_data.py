"""Reading MoleculeNet-style CSVs, bad input, splits, conformers and their cache."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from polyfm.core.errors import DataError
from polyfm.mol.conformers import ConformerSettings, generate_conformers
from polyfm.mol.data import (
    MoleculeDataModule,
    murcko_scaffold,
    read_molecule_csv,
    scaffold_split,
    stratified_split,
)


def write(path, text):
    path.write_text(text)
    return path


def test_invalid_smiles_are_reported_by_row_and_skipped_only_when_asked(tmp_path, caplog):
    csv = write(tmp_path / "bad.csv", "smiles,y\nCCO,1.0\nnot_a_smiles,2.0\n,3.0\nc1ccccc1,4.0\nC1CC,5\n")
    with pytest.raises(DataError) as err:
        read_molecule_csv(csv)
    message = str(err.value)
    assert "bad.csv" in message and "3 invalid SMILES" in message
    assert "row 2 (line 3) 'not_a_smiles'" in message and "row 3" in message and "empty SMILES" in message and "row 5" in message
    with caplog.at_level(logging.WARNING):
        table = read_molecule_csv(csv, skip_invalid=True)
    assert table.smiles == ["CCO", "c1ccccc1"] and table.rows == [1, 4]
    assert [r for r, _, _ in table.skipped] == [2, 3, 5]
    assert table.targets[:, 0].tolist() == [1.0, 4.0]
    assert "skipped 3 invalid SMILES" in caplog.text


def test_non_numeric_target_names_row_and_column(tmp_path):
    csv = write(tmp_path / "t.csv", "smiles,a,b\nCCO,1,0\nCCN,,1\nCCC,0,yes\n")
    with pytest.raises(DataError, match=r"t.csv, row 3, key 'b': \(line 4\) target 'yes' is not a number"):
        read_molecule_csv(csv)


def test_missing_labels_become_nan_and_columns_are_checked(tmp_path):
    csv = write(tmp_path / "m.csv", "SMILES,a,b\nOCC,1,\nC(=O)O,,0\n")
    table = read_molecule_csv(csv, smiles_column="SMILES")
    assert table.target_names == ["a", "b"] and np.isnan(table.targets).sum() == 2
    assert table.smiles == ["CCO", "O=CO"]  # canonical
    with pytest.raises(DataError, match="no SMILES column 'smiles'"):
        read_molecule_csv(csv)
    with pytest.raises(DataError, match=r"target columns \['c'\]"):
        read_molecule_csv(csv, smiles_column="SMILES", target_columns=["c"])


def test_salts_and_mixtures(tmp_path):
    csv = write(tmp_path / "salts.csv", "smiles,y\nCC(=O)[O-].[Na+],1\nCCO,2\n")
    kept = read_molecule_csv(csv)
    assert kept.mixtures == 1 and kept.smiles[0] == "CC(=O)[O-].[Na+]"
    largest = read_molecule_csv(csv, fragments="largest")
    assert largest.smiles[0] == "CC(=O)[O-]" and largest.fragments_stripped == 1
    with pytest.raises(DataError, match="salt or mixture"):
        read_molecule_csv(csv, fragments="error")


def test_scaffold_split_shares_no_scaffold_and_is_deterministic():
    from polyfm.mol.samples import sample_smiles

    smiles = list(sample_smiles()[:400])
    train, val, test = scaffold_split(smiles)
    assert len(train) + len(val) + len(test) == len(smiles)
    scaffolds = [{murcko_scaffold(smiles[i]) for i in part} for part in (train, val, test)]
    assert not (scaffolds[0] & scaffolds[2]) and not (scaffolds[0] & scaffolds[1]) and not (scaffolds[1] & scaffolds[2])
    again = scaffold_split(smiles)
    assert all(np.array_equal(a, b) for a, b in zip((train, val, test), again))
    balanced = scaffold_split(smiles, balanced=True, seed=1)
    assert sum(len(p) for p in balanced) == len(smiles)


def test_stratified_split_keeps_class_ratio():
    labels = np.array([1.0] * 30 + [0.0] * 170)
    train, val, test = stratified_split(labels, (0.8, 0.1, 0.1), seed=0)
    assert labels[train].mean() == pytest.approx(0.15) and labels[test].mean() == pytest.approx(0.15)


def test_conformer_cache_and_parallel_generation(tmp_path):
    smiles = ["CCO", "c1ccccc1O", "CC(=O)Nc1ccc(O)cc1", "C1=CC2=CC=C1C=C2"]  # the last cannot be embedded in 3D
    settings = ConformerSettings(seed=7, remove_hs=True, mmff=False)
    first, report = generate_conformers(smiles, settings, cache_dir=tmp_path, workers=2)
    assert report.from_cache == 0 and report.fallback_2d == [3]
    assert not first[3].is_3d and np.allclose(first[3].coordinates[:, 2], 0.0)
    again, report2 = generate_conformers(smiles, settings, cache_dir=tmp_path, workers=1)
    assert report2.from_cache == 4
    for a, b in zip(first, again):
        assert a.atoms == b.atoms and np.allclose(a.coordinates, b.coordinates)
    serial, _ = generate_conformers(smiles, settings, cache_dir=None, workers=1)
    assert np.allclose(serial[2].coordinates, first[2].coordinates)


def test_unimol_max_atoms_crop_is_counted_or_refused(tmp_path, caplog):
    csv = write(tmp_path / "big.csv", "smiles,y\n" + "C" * 40 + ",1\nCCO,2\nCCN,3\nCCC,4\n")
    dm = MoleculeDataModule(str(csv), model="unimol", split="random", split_fractions=(0.5, 0.25, 0.25), max_atoms=32, mmff=False)
    with caplog.at_level(logging.WARNING):
        dm.setup()
    assert dm.featuriser.cropped_rows == [1] and "1 molecules exceed max_atoms=32" in caplog.text
    sizes = [len(dm.featuriser.prepare(["C" * 40], [1])(0)["src_tokens"])]
    assert sizes == [34]  # 32 atoms + [CLS] + [SEP]
    strict = MoleculeDataModule(
        str(csv),
        model="unimol",
        split="random",
        split_fractions=(0.5, 0.25, 0.25),
        max_atoms=32,
        max_atoms_policy="error",
        mmff=False,
    )
    with pytest.raises(DataError, match="row 1: .*122 atoms \\(with hydrogens\\), more than max_atoms=32"):
        strict.setup()


def test_chemberta_batches_and_meta(tmp_path):
    csv = write(tmp_path / "c.csv", "smiles,y\n" + "".join(f"{'C' * (i + 1)}O,{i}\n" for i in range(10)))
    dm = MoleculeDataModule(str(csv), model="chemberta", split="random", batch_size=4, max_length=8, tokenizer=None)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert set(batch["input"]) == {"input_ids", "attention_mask"} and batch["target"].shape == (4, 1)
    assert batch["input"]["input_ids"].shape[1] <= 8 and batch["meta"][0].startswith("row ")
    assert dm.featuriser.truncated_rows == [6, 7, 8, 9, 10]  # C6O.. need more than 6 tokens + <s></s>


def test_delimiter_is_told_by_the_header_or_given(tmp_path):
    for name, sep in (("a.tsv", "\t"), ("b.csv", ";"), ("c.txt", "|")):
        csv = write(tmp_path / name, f"smiles{sep}y{sep}z\nCCO{sep}1.5{sep}\nc1ccccc1{sep}{sep}0\n")
        table = read_molecule_csv(csv)
        assert table.target_names == ["y", "z"] and table.smiles == ["CCO", "c1ccccc1"]
        np.testing.assert_array_equal(np.isnan(table.targets), [[False, True], [True, False]])  # empty cells: missing
    csv = write(tmp_path / "d.csv", "smiles;y\nCCO;1\n")
    with pytest.raises(DataError, match=r"columns are \['smiles;y'\]"):
        read_molecule_csv(csv, delimiter=",")


def test_repeated_header_names_and_wrong_column_names_are_clear(tmp_path):
    csv = write(tmp_path / "dup.csv", "smiles,y,y\nCCO,1,2\n")
    with pytest.raises(DataError, match=r"dup\.csv.*repeat.*'y': \[2, 3\]"):
        read_molecule_csv(csv)
    csv = write(tmp_path / "names.csv", "\ufeffSMILES,LogS\nCCO,1\n")  # with a byte-order mark
    with pytest.raises(DataError, match=r"names\.csv.*no SMILES column 'smiles'.*\['SMILES', 'LogS'\].*Did you mean 'SMILES'"):
        read_molecule_csv(csv)
    with pytest.raises(DataError, match=r"target columns \['logs'\].*Did you mean 'LogS'"):
        read_molecule_csv(csv, smiles_column="SMILES", target_columns=["logs"])
    assert read_molecule_csv(csv, smiles_column="SMILES").target_names == ["LogS"]


def test_unimol_featuriser_refuses_molecules_left_without_atoms_and_keeps_the_timeout(tmp_path):
    csv = write(tmp_path / "h2.csv", "smiles,y\nCCO,1\n[H][H],2\n")
    dm = MoleculeDataModule(str(csv), model="unimol", remove_hs=True, mmff=False, split="random", conformer_timeout=3)
    assert dm.featuriser.conformer_timeout == 3
    with pytest.raises(DataError, match=r"no atoms left.*row 2 '\[H\]\[H\]'"):
        dm.setup()


@pytest.mark.parametrize("value", ["inf", "-Infinity", "1e39"])
def test_infinite_labels_are_refused_with_file_row_and_column(tmp_path, value):
    csv = write(tmp_path / "inf.csv", f"smiles,y\nCCO,1\nCCN,{value}\n")
    with pytest.raises(DataError, match=r"inf\.csv.*row 2.*'y'|inf\.csv.*'y'.*row 2") as err:
        read_molecule_csv(csv)
    assert "line 3" in str(err.value) and "finite" in str(err.value)
