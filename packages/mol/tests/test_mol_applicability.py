"""Applicability domain: MoleculePredictionWriter(train_similarity=True) adds each predicted
molecule's highest Tanimoto similarity (Morgan radius 2, 2048 bits) to the training molecules,
computed at predict time and never part of the data module's state."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import pytest
from rdkit import Chem, DataStructs
from rdkit.Chem import rdFingerprintGenerator

from polyfm.core.tasks import Regression
from polyfm.mol.data import MoleculeDataModule
from polyfm.mol.models import ChemBERTa
from polyfm.mol.predict import MoleculePredictionWriter, predict_csv
from polyfm.mol.samples import sample_smiles

# far from the drug-like training set: no ring, no carbon chain, or a metal complex
DISSIMILAR = ["FS(F)(F)(F)(F)F", "O=C=O", "[Na+].[Cl-]"]


def quiet_trainer(root: Path, **kwargs) -> L.Trainer:
    return L.Trainer(default_root_dir=root, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, accelerator="cpu", num_sanity_val_steps=0, **kwargs)  # fmt: skip


def setup_data(folder: Path, **options) -> tuple[MoleculeDataModule, Regression, Path]:
    molecules = sample_smiles()[::10][:60]
    train = folder / "assay.csv"
    train.write_text("smiles,pIC50\n" + "".join(f"{s},{5 + len(s) / 20:.2f}\n" for s in molecules))
    data = MoleculeDataModule(str(train), target_columns=["pIC50"], batch_size=8, **options)
    data.setup()
    members = data.train_smiles()
    new = folder / "screen.csv"
    new.write_text("compound,smiles\n" + "".join(f"Z{i},{s}\n" for i, s in enumerate([members[0], members[5], *DISSIMILAR])))
    data.predict_path = str(new)
    encoder = ChemBERTa(vocab_size=len(data.featuriser.tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=136)  # fmt: skip
    return data, Regression(encoder, target_names=["pIC50"], target_mean=[6.0], target_std=[1.0]), new


def reference_similarity(smiles: str, train: list[str]) -> float:
    generator = rdFingerprintGenerator.GetMorganGenerator(radius=2, fpSize=2048)
    fingerprints = [generator.GetFingerprint(Chem.MolFromSmiles(s)) for s in train]
    return max(DataStructs.BulkTanimotoSimilarity(generator.GetFingerprint(Chem.MolFromSmiles(smiles)), fingerprints))


def test_train_similarity_column_is_one_for_training_molecules_and_low_for_others(tmp_path: Path) -> None:
    data, task, _ = setup_data(tmp_path)
    state_before = data.state_dict()
    out = tmp_path / "with.csv"
    quiet_trainer(tmp_path, callbacks=[MoleculePredictionWriter(output=str(out), train_similarity=True)]).predict(
        task, datamodule=data, return_predictions=False
    )
    table = pd.read_csv(out)
    assert list(table.columns) == ["row", "smiles", "canonical_smiles", "compound", "pred_pIC50", "train_similarity"]
    similarity = table["train_similarity"].to_numpy()
    assert similarity[:2].tolist() == [1.0, 1.0]  # molecules of the training split
    assert (similarity[2:] < 0.5).all(), similarity
    train = data.train_smiles()
    expected = [reference_similarity(s, train) for s in table["canonical_smiles"]]
    assert similarity == pytest.approx(expected, abs=1e-12)
    # nothing of it is kept in the data module's state (ensemble members are checked to agree on it)
    assert data.state_dict() == state_before == {}

    plain = tmp_path / "without.csv"
    quiet_trainer(tmp_path, callbacks=[MoleculePredictionWriter(output=str(plain))]).predict(task, datamodule=data, return_predictions=False)
    assert "train_similarity" not in pd.read_csv(plain).columns  # opt-in


def test_train_similarity_uses_only_the_molecules_trained_on(tmp_path: Path) -> None:
    # the held-out fold and a label fraction's left-out molecules are not training molecules
    data, task, _ = setup_data(tmp_path, fold=0, num_folds=3, label_fraction=0.5)
    train = data.train_smiles()
    assert len(train) == len(data.train_set) < len(data.split[0])
    data.predict_path = None  # predicts the held-out fold
    out = tmp_path / "fold0.csv"
    quiet_trainer(tmp_path, callbacks=[MoleculePredictionWriter(output=str(out), train_similarity=True)]).predict(
        task, datamodule=data, return_predictions=False
    )
    table = pd.read_csv(out)
    assert len(table) == len(data.split[1])
    assert table["train_similarity"].to_numpy() == pytest.approx([reference_similarity(s, train) for s in table["canonical_smiles"]])
    assert not set(table["canonical_smiles"]) & set(train)


def test_predict_csv_takes_the_training_molecules(tmp_path: Path) -> None:
    data, task, new = setup_data(tmp_path)
    table = predict_csv(task, new, data.featuriser, train_smiles=data.train_smiles())
    assert table.columns[-1] == "train_similarity"
    assert np.allclose(table["train_similarity"][:2], 1.0) and (table["train_similarity"][2:] < 0.5).all()
