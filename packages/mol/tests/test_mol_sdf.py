"""SD files as chemists have them: properties as columns, SMILES from the structure, records
named by number and title, broken records named (or skipped with a count), and Uni-Mol fed the
file's own 3D coordinates. Every file is written here by RDKit from real molecules."""

from __future__ import annotations

import gzip
import logging
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch
from rdkit import Chem
from rdkit.Chem import AllChem

from polyfm.core.errors import ConfigError, DataError
from polyfm.core.tasks import Regression
from polyfm.mol.data import MoleculeDataModule, read_molecule_sdf, read_molecules
from polyfm.mol.models import ChemBERTa, UniMol
from polyfm.mol.predict import MoleculePredictionWriter
from polyfm.mol.samples import sample_smiles

NEW = [  # (title, SMILES, properties)
    ("ethanol", "CCO", {"logS": "1.1", "vendor_id": "Z-001"}),
    ("aspirin", "CC(=O)Oc1ccccc1C(=O)O", {"logS": "-1.72", "vendor_id": "Z-002"}),
    ("caffeine", "Cn1cnc2c1c(=O)n(C)c(=O)n2C", {"vendor_id": "Z-003"}),  # no measured value: a missing label
]


def embedded(smiles: str, seed: int = 7) -> Chem.Mol:
    """A 3D conformer with every hydrogen, turned and moved away from the origin so that its
    coordinates are nothing ETKDG would give (and need centring)."""
    mol = Chem.AddHs(Chem.MolFromSmiles(smiles))
    assert AllChem.EmbedMolecule(mol, randomSeed=seed) == 0
    angle = 0.7
    turn = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    conformer = mol.GetConformer()
    for i, position in enumerate(conformer.GetPositions() @ turn.T + np.array([5.0, -3.0, 2.0])):
        conformer.SetAtomPosition(i, position.tolist())
    return mol


def write_sdf(path: Path, records: list[tuple[str, str, dict[str, str]]], three_d: bool = True, hydrogens: bool = True) -> Path:
    handle = gzip.open(path, "wt") if path.suffix == ".gz" else path.open("w")
    with handle, Chem.SDWriter(handle) as writer:
        for title, smiles, properties in records:
            mol = embedded(smiles) if three_d else Chem.MolFromSmiles(smiles)
            if not three_d:
                AllChem.Compute2DCoords(mol)
            if not hydrogens:
                mol = Chem.RemoveHs(mol)
            mol.SetProp("_Name", title)
            for name, value in properties.items():
                mol.SetProp(name, value)
            writer.write(mol)
    return path


def pentavalent_carbon_block(title: str) -> str:
    """A record RDKit refuses when sanitising: a carbon with five neighbours."""
    mol = Chem.MolFromSmiles("CC(C)(C)(C)C", sanitize=False)
    mol.UpdatePropertyCache(strict=False)
    mol.SetProp("_Name", title)
    return Chem.MolToMolBlock(mol, kekulize=False) + ">  <logS>\n0.5\n\n$$$$\n"


def test_sdf_properties_are_columns_and_smiles_come_from_the_structure(tmp_path: Path) -> None:
    plain = write_sdf(tmp_path / "new.sdf", NEW)
    gzipped = write_sdf(tmp_path / "new.sdf.gz", NEW)
    for path in (plain, gzipped):
        table = read_molecules(path, target_columns=["logS"])
        assert table.titles == ["ethanol", "aspirin", "caffeine"] and table.rows == [1, 2, 3]
        assert table.smiles == [Chem.MolToSmiles(Chem.MolFromSmiles(s)) for _, s, _ in NEW]
        assert table.targets[:2, 0].tolist() == pytest.approx([1.1, -1.72]) and np.isnan(table.targets[2, 0])
        assert table.other_columns == {"vendor_id": ["Z-001", "Z-002", "Z-003"]}
        assert table.meta()[1] == "record 2 'aspirin': CC(=O)Oc1ccccc1C(=O)O"
    # like a CSV: no target_columns takes every property, and a text one is named as not a number
    with pytest.raises(DataError, match=r"new\.sdf.*'vendor_id'.*record 1 'ethanol': target 'Z-001' is not a number"):
        read_molecule_sdf(plain)
    with pytest.raises(DataError, match=r"target properties \['logs'\] are in no record.*Did you mean 'logS'"):
        read_molecule_sdf(plain, target_columns=["logs"])


def test_sdf_record_rdkit_cannot_parse_is_named_or_skipped_with_a_count(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    good = write_sdf(tmp_path / "good.sdf", NEW[:2]).read_text()
    first, second = good.split("$$$$\n")[:2]
    path = tmp_path / "screen.sdf"
    path.write_text(first + "$$$$\n" + pentavalent_carbon_block("CHEMBL-broken") + second + "$$$$\n")
    with pytest.raises(DataError, match=r"screen\.sdf.*record 2 'CHEMBL-broken': RDKit cannot sanitise it \(Explicit valence.*skip_invalid=True"):
        read_molecule_sdf(path, target_columns=["logS"])
    with caplog.at_level(logging.WARNING, logger="polyfm.mol.data"):
        table = read_molecule_sdf(path, target_columns=["logS"], skip_invalid=True)
    assert table.titles == ["ethanol", "aspirin"] and table.rows == [1, 3]
    assert [(r, t) for r, t, _ in table.skipped] == [(2, "CHEMBL-broken")]
    assert "skipped 1 invalid records (records [2])" in caplog.text
    # the DataModule takes the same option, as for invalid SMILES in a CSV
    with pytest.raises(DataError, match="record 2 'CHEMBL-broken'"):
        MoleculeDataModule(str(path), target_columns=["logS"]).read()
    assert len(MoleculeDataModule(str(path), target_columns=["logS"], skip_invalid=True).read()) == 2


def tiny_chemberta(data: MoleculeDataModule) -> ChemBERTa:
    return ChemBERTa(vocab_size=len(data.featuriser.tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=136)  # fmt: skip


def quiet_trainer(root: Path, **kwargs) -> L.Trainer:
    return L.Trainer(default_root_dir=root, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, accelerator="cpu", num_sanity_val_steps=0, **kwargs)  # fmt: skip


def test_sdf_train_and_predict_names_rows_by_record_and_title(tmp_path: Path) -> None:
    """Training, test and predict paths all read SD files; the predictions CSV says which record each row is."""
    molecules = sample_smiles()[::25][:24]
    train = write_sdf(tmp_path / "assay.sdf.gz", [(f"mol-{i}", s, {"pIC50": f"{5 + len(s) / 20:.2f}"}) for i, s in enumerate(molecules)],
                      three_d=False)  # fmt: skip
    # vendors often add a SMILES property: it is kept under another name, not written over the record's own
    with_smiles_property = [(t, s, {**p, "smiles": s} if t == "ethanol" else p) for t, s, p in NEW]
    new = write_sdf(tmp_path / "screen.sdf", with_smiles_property, three_d=False)
    data = MoleculeDataModule(str(train), target_columns=["pIC50"], split="random", batch_size=8, predict_path=str(new))
    data.setup()
    assert data.target_names == ["pIC50"] and len(data.train_set) + len(data.val_set) + len(data.test_set) == 24
    mean, std = data.target_statistics()
    task = Regression(tiny_chemberta(data), target_names=["pIC50"], target_mean=mean, target_std=std)
    quiet_trainer(tmp_path, max_steps=2, limit_val_batches=0).fit(task, data)

    trainer = quiet_trainer(tmp_path, callbacks=[MoleculePredictionWriter()])
    trainer.predict(task, datamodule=data, return_predictions=False)
    table = pd.read_csv(tmp_path / "predictions/screen.csv", keep_default_na=False)
    assert list(table.columns) == ["record", "title", "smiles", "canonical_smiles", "logS", "vendor_id", "input_smiles", "pred_pIC50"]
    assert table["input_smiles"].tolist() == ["CCO", "", ""]
    assert table["record"].tolist() == [1, 2, 3] and table["title"].tolist() == ["ethanol", "aspirin", "caffeine"]
    assert table["vendor_id"].tolist() == ["Z-001", "Z-002", "Z-003"]
    task.eval()
    with torch.no_grad():
        direct = task(data.featuriser.tokenizer(["Cn1c(=O)c2c(ncn2C)n(C)c1=O"]))[0, 0].item()
    assert table["canonical_smiles"][2] == "Cn1c(=O)c2c(ncn2C)n(C)c1=O" and table["pred_pIC50"][2] == pytest.approx(direct, abs=1e-5)

    data.predict_path = None  # the test split of the SD file, named after it without .sdf.gz
    trainer.predict(task, datamodule=data, return_predictions=False)
    split = pd.read_csv(tmp_path / "predictions/assay_test.csv")
    assert list(split.columns)[:2] == ["record", "title"] and len(split) == len(data.test_set)
    assert all(title == f"mol-{record - 1}" for record, title in zip(split["record"], split["title"], strict=True))


def tiny_unimol(data: MoleculeDataModule) -> UniMol:
    return UniMol(dictionary=data.featuriser.dictionary, encoder_layers=1, embed_dim=16, ffn_embed_dim=32, attention_heads=2,
                  num_kernels=8, pretraining_heads=False, final_head_layer_norm=False)  # fmt: skip


@pytest.mark.parametrize("remove_hs", [False, True])
def test_unimol_from_file_feeds_the_records_own_coordinates_to_the_model(tmp_path: Path, remove_hs: bool) -> None:
    records = [("ethanol", "CCO", {"y": "1"}), ("phenol", "Oc1ccccc1", {"y": "2"}), ("acetic acid", "CC(=O)O", {"y": "3"})]
    path = write_sdf(tmp_path / "3d.sdf", records)
    data = MoleculeDataModule(str(path), model="unimol", target_columns=["y"], split="random", split_fractions=(1.0, 0.0, 0.0),
                              remove_hs=remove_hs, conformers="from_file", batch_size=3, predict_path=str(path))  # fmt: skip
    task = Regression(tiny_unimol(data), target_names=["y"], target_mean=[2.0], target_std=[1.0])
    seen: list[torch.Tensor] = []
    forward = task.encoder.forward

    def recording(src_tokens, src_distance, src_coord, src_edge_type, *args, **kwargs):
        seen.append(src_coord.detach().clone())
        return forward(src_tokens, src_distance, src_coord, src_edge_type, *args, **kwargs)

    task.encoder.forward = recording  # what reaches the model, as forward_features passes it on
    data.setup()
    quiet_trainer(tmp_path).predict(task, datamodule=data, return_predictions=False)
    (coordinates,) = seen
    for i, file_mol in enumerate(Chem.SDMolSupplier(str(path), removeHs=False)):  # read back independently of polyfm
        positions = file_mol.GetConformer().GetPositions()
        if remove_hs:
            positions = positions[[a.GetAtomicNum() != 1 for a in file_mol.GetAtoms()]]
        expected = positions - positions.mean(0)  # the centring the ETKDG path applies
        n = len(expected)
        assert torch.allclose(coordinates[i, 1 : n + 1], torch.tensor(expected, dtype=torch.float32), atol=1e-4)
        assert coordinates[i, n + 1 :].abs().sum() == 0  # [SEP] at the origin, then padding
    # not what ETKDG would have given: the same molecules through the default path differ
    etkdg = MoleculeDataModule(str(path), model="unimol", target_columns=["y"], remove_hs=remove_hs)
    generated = etkdg.featuriser.prepare(etkdg.read().smiles, etkdg.read().rows)(1)["src_coord"]
    assert generated.shape == coordinates[1, : len(generated)].shape
    assert not np.allclose(generated, coordinates[1, : len(generated)].numpy(), atol=1e-2)


def test_unimol_from_file_places_implicit_hydrogens_and_refuses_what_it_cannot_use(tmp_path: Path) -> None:
    heavy_only = write_sdf(tmp_path / "heavy.sdf", [("phenol", "Oc1ccccc1", {"y": "1"})], hydrogens=False)
    data = MoleculeDataModule(str(heavy_only), model="unimol", target_columns=["y"], conformers="from_file")
    table = data.read()
    (features,) = [data.featuriser.prepare(table.smiles, table.rows, table.conformers)(0)]
    assert len(features["src_tokens"]) == 2 + 7 + 6  # [CLS], C6H6O with its 6 hydrogens, [SEP]
    file_heavy = Chem.MolFromMolFile(str(heavy_only)).GetConformer().GetPositions()
    heavy = features["src_coord"][1:8]  # the file's heavy atoms come first, in file order
    assert np.allclose(heavy - heavy.mean(0), file_heavy - file_heavy.mean(0), atol=1e-4)

    flat = write_sdf(tmp_path / "flat.sdf", NEW, three_d=False)
    with pytest.raises(DataError, match=r"needs 3D coordinates, and 3 records have 2D ones \(records \[1, 2, 3\]\).*conformers='etkdg'"):
        MoleculeDataModule(str(flat), model="unimol", target_columns=["logS"], conformers="from_file").setup()
    csv = tmp_path / "plain.csv"
    csv.write_text("smiles,y\nCCO,1\nCCN,2\nCCC,3\n")
    with pytest.raises(ConfigError, match=r"conformers='from_file'.*\.sdf / \.sdf\.gz file, or use conformers='etkdg'"):
        MoleculeDataModule(str(csv), model="unimol", conformers="from_file", split="random").setup()
    with pytest.raises(ConfigError, match="conformers='from_file' is for model='unimol'"):
        MoleculeDataModule(str(flat), model="chemberta", conformers="from_file")


def test_cli_unimol_recipe_fits_and_predicts_sd_files_with_their_own_conformers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The Tox21 Uni-Mol recipe on a 3D SD file of two assays, its conformers from the file, then predictions for another."""
    import polyfm.mol
    from polyfm.core.cli import main

    monkeypatch.chdir(tmp_path)
    molecules = sample_smiles()[::40][:16]
    train = write_sdf(tmp_path / "assays.sdf", [(f"cpd-{i}", s, {"nr_ar": str(i % 2), "sr_mmp": str((i // 2) % 2)})
                                                for i, s in enumerate(molecules)])  # fmt: skip
    new = write_sdf(tmp_path / "library.sdf.gz", NEW)
    recipe = [
        "--config", str(Path(polyfm.mol.__file__).parent / "recipes" / "finetune-unimol-tox21.yaml"),
        "--model.init_args.encoder.init_args.encoder_layers=1", "--model.init_args.encoder.init_args.embed_dim=16",
        "--model.init_args.encoder.init_args.ffn_embed_dim=32", "--model.init_args.encoder.init_args.attention_heads=2",
        "--model.init_args.encoder.init_args.num_kernels=8", "--model.init_args.num_classes=2",
        "--model.init_args.class_names=[nr_ar,sr_mmp]",
        f"--data.init_args.csv_path={train}", "--data.init_args.target_columns=[nr_ar,sr_mmp]",
        "--data.init_args.conformers=from_file", "--data.init_args.split=random", "--data.init_args.split_fractions=[0.5,0.25,0.25]",
        "--data.init_args.batch_size=4", "--data.init_args.conformer_workers=1",
        "--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
    ]  # fmt: skip
    main(["fit", *recipe, "--trainer.max_steps=2", "--trainer.limit_val_batches=1"])
    last = tmp_path / "runs/mol-unimol-tox21/logs/version_0/checkpoints/last.ckpt"
    main(["predict", *recipe, f"--ckpt_path={last}", f"--data.init_args.predict_path={new}"])
    table = pd.read_csv(tmp_path / "runs/mol-unimol-tox21/predictions/library.csv", keep_default_na=False)
    assert list(table.columns) == ["record", "title", "smiles", "canonical_smiles", "logS", "vendor_id", "pred_nr_ar", "pred_sr_mmp"]
    assert table["title"].tolist() == ["ethanol", "aspirin", "caffeine"]
    assert ((table["pred_nr_ar"] > 0) & (table["pred_nr_ar"] < 1)).all()
    assert not (tmp_path / "runs/conformers").exists()  # nothing was embedded: the file's conformers were used
