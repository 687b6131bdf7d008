"""Deep-ensemble predictions to a CSV: polyfm.core.predict.Ensemble over two fine-tuned
checkpoints of a molecule task, through trainer.predict and MoleculePredictionWriter; the file
holds each checkpoint's mean and, beside it, their spread (sample std over members)."""

from __future__ import annotations

import copy
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch

from polyfm.core.errors import ConfigError
from polyfm.core.predict import Ensemble, load_task_checkpoint
from polyfm.core.tasks import Classification, Regression
from polyfm.mol.data import MoleculeDataModule
from polyfm.mol.models import ChemBERTa
from polyfm.mol.predict import MoleculePredictionWriter
from polyfm.mol.samples import sample_smiles

NEW = ["CCO", "c1ccccc1O", "CC(=O)Oc1ccccc1C(=O)O", "Cn1cnc2c1c(=O)n(C)c(=O)n2C"]


def quiet_trainer(root: Path, **kwargs) -> L.Trainer:
    return L.Trainer(default_root_dir=root, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, accelerator="cpu", num_sanity_val_steps=0, **kwargs)  # fmt: skip


def write_data(folder: Path) -> tuple[Path, Path]:
    molecules = sample_smiles()[::25][:24]
    train = folder / "assay.csv"
    train.write_text("smiles,solubility,toxic\n" + "".join(f"{s},{len(s) / 10:.2f},{i % 2}\n" for i, s in enumerate(molecules)))
    new = folder / "screen.csv"
    new.write_text("compound,smiles\n" + "".join(f"Z{i},{s}\n" for i, s in enumerate(NEW)))
    return train, new


def make_task(kind: str, data: MoleculeDataModule) -> L.LightningModule:
    encoder = ChemBERTa(vocab_size=len(data.featuriser.tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=136)  # fmt: skip
    if kind == "regression":
        return Regression(encoder, target_names=["solubility"], target_mean=[3.0], target_std=[1.5])
    return Classification(encoder, num_classes=2, multilabel=True, class_names=["solubility", "toxic"])


@pytest.mark.parametrize("kind", ["regression", "classification"])
def test_ensemble_of_two_checkpoints_writes_means_and_their_spread(tmp_path: Path, kind: str) -> None:
    train, new = write_data(tmp_path)
    targets = ["solubility"] if kind == "regression" else ["solubility", "toxic"]
    data = MoleculeDataModule(str(train), target_columns=targets, split="random", batch_size=4, predict_path=str(new))  # predict: one batch, as below
    checkpoints = []
    for seed in (0, 1):  # two fine-tuning runs of the same recipe, as k-fold or seed ensembles are made
        L.seed_everything(seed)
        trainer = quiet_trainer(tmp_path / f"run{seed}", max_steps=2, limit_val_batches=0)
        trainer.fit(make_task(kind, data), data)
        checkpoints.append(str(tmp_path / f"member{seed}.ckpt"))
        trainer.save_checkpoint(checkpoints[-1])

    member = make_task(kind, data)
    out = tmp_path / "out" / "screen_ensemble.csv"
    quiet_trainer(tmp_path, callbacks=[MoleculePredictionWriter(output=str(out))]).predict(
        Ensemble(member, checkpoints), datamodule=data, return_predictions=False
    )
    table = pd.read_csv(out)

    # each checkpoint on its own, outside Lightning
    inputs = data.featuriser.tokenizer(table["canonical_smiles"].tolist())  # what the model reads
    with torch.no_grad():
        each = []
        for path in checkpoints:
            task = load_task_checkpoint(copy.deepcopy(member), path)
            output = task(inputs)
            each.append(torch.sigmoid(output) if kind == "classification" else output)
    stacked = torch.stack(each).numpy()
    names = [f"pred_{n}" for n in targets]
    assert list(table.columns) == ["row", "smiles", "canonical_smiles", "compound", *[c for n in names for c in (n, f"{n}_std")]]
    for j, name in enumerate(names):
        assert table[name].to_numpy() == pytest.approx(stacked[:, :, j].mean(0), abs=1e-5)
        # two members: the sample std is |a - b| / sqrt(2)
        spread = np.abs(stacked[0, :, j] - stacked[1, :, j]) / np.sqrt(2)
        assert table[f"{name}_std"].to_numpy() == pytest.approx(spread, abs=1e-5)
        assert (spread > 1e-4).all()  # the members differ, so the column is no constant
    assert table["compound"].tolist() == ["Z0", "Z1", "Z2", "Z3"]


def test_writer_refuses_a_task_whose_names_do_not_fit_its_outputs(tmp_path: Path) -> None:
    train, new = write_data(tmp_path)
    data = MoleculeDataModule(str(train), target_columns=["solubility"], split="random", predict_path=str(new))
    task = make_task("regression", data)
    task.target_names = ["solubility", "toxic"]  # two names, one output: the columns would be mislabelled
    with pytest.raises(ConfigError, match=r"Regression\.target_names has 2 names .* predicts 1 outputs"):
        quiet_trainer(tmp_path, callbacks=[MoleculePredictionWriter()]).predict(task, datamodule=data, return_predictions=False)
    assert not (tmp_path / "predictions").exists()  # nothing half-written
