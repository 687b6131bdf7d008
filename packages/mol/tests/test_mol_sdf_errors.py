"""SD-file errors, at reading and at featurisation, name the file, the record number (from 1)
and the record's title (its ``_Name``) when it has one. Files are written here by RDKit."""

from __future__ import annotations

from pathlib import Path

import pytest
from rdkit import Chem
from rdkit.Chem import AllChem

from polyfm.core.errors import DataError
from polyfm.mol.data import MoleculeDataModule, read_molecule_sdf


def write_sdf(path: Path, records: list[tuple[str, str]], three_d: bool = True) -> Path:
    with path.open("w") as handle, Chem.SDWriter(handle) as writer:
        for title, smiles in records:
            mol = Chem.AddHs(Chem.MolFromSmiles(smiles))
            if three_d:
                assert AllChem.EmbedMolecule(mol, randomSeed=1) == 0
            else:
                AllChem.Compute2DCoords(mol)
            if title:
                mol.SetProp("_Name", title)
            mol.SetProp("y", "1.0")
            writer.write(mol)
    return path


def test_unparsable_record_without_a_title_is_named_by_number(tmp_path: Path) -> None:
    good = write_sdf(tmp_path / "good.sdf", [("ethanol", "CCO")]).read_text()
    broken = Chem.MolFromSmiles("CC(C)(C)(C)C", sanitize=False)  # a carbon with five neighbours
    broken.UpdatePropertyCache(strict=False)
    path = tmp_path / "untitled.sdf"
    path.write_text(good + Chem.MolToMolBlock(broken, kekulize=False) + "$$$$\n")
    with pytest.raises(DataError, match=r"untitled\.sdf: 1 of 2 records .*: record 2: RDKit cannot sanitise it") as err:
        read_molecule_sdf(path)
    assert "record 2 ''" not in str(err.value)


def test_too_many_atoms_names_the_file_record_and_title(tmp_path: Path) -> None:
    path = write_sdf(tmp_path / "screen.sdf", [("ethanol", "CCO"), ("aspirin", "CC(=O)Oc1ccccc1C(=O)O")])
    data = MoleculeDataModule(str(path), model="unimol", target_columns=["y"], conformers="from_file", max_atoms=12,
                              max_atoms_policy="error", split="random", split_fractions=(0.5, 0.5, 0.0))  # fmt: skip
    with pytest.raises(DataError, match=r"screen\.sdf: record 2 'aspirin': 'CC\(=O\)Oc1ccccc1C\(=O\)O' has 21 atoms \(with hydrogens\), more than max_atoms=12"):
        data.setup()
    # the same file as new molecules to predict
    csv = tmp_path / "train.csv"
    csv.write_text("smiles,y\nCCO,1\nCCN,2\n")
    data = MoleculeDataModule(str(csv), model="unimol", mmff=False, max_atoms=12, max_atoms_policy="error", split="random",
                              split_fractions=(0.5, 0.5, 0.0), predict_path=str(path))  # fmt: skip
    data.setup()
    with pytest.raises(DataError, match=r"screen\.sdf: record 2 'aspirin': .* has 21 atoms"):
        data.predict_dataloader()


def test_no_atoms_left_and_flat_records_name_the_file_and_titles(tmp_path: Path) -> None:
    hydrogen = write_sdf(tmp_path / "gases.sdf", [("methane", "C"), ("hydrogen", "[H][H]")])
    data = MoleculeDataModule(str(hydrogen), model="unimol", target_columns=["y"], remove_hs=True, mmff=False, split="random",
                              split_fractions=(0.5, 0.5, 0.0))  # fmt: skip
    with pytest.raises(DataError, match=r"gases\.sdf: 1 molecules have no atoms left .*: record 2 'hydrogen' '\[H\]\[H\]'"):
        data.setup()
    flat = write_sdf(tmp_path / "flat.sdf", [("ethanol", "CCO"), ("", "CCN")], three_d=False)
    data = MoleculeDataModule(str(flat), model="unimol", target_columns=["y"], conformers="from_file", split="random",
                              split_fractions=(0.5, 0.5, 0.0))  # fmt: skip
    with pytest.raises(DataError, match=r"flat\.sdf: .*2 records have 2D ones \(records \[1, 2\]\) \(record 1 'ethanol'; record 2\)"):
        data.setup()
