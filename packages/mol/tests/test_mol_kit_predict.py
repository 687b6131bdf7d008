"""The demo kit (built-in samples), predictions for a CSV and the parity plot."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch

from polyfm.core.adaptation import Adaptation
from polyfm.core.tasks import Regression
from polyfm.mol.data import ChemBERTaFeaturiser
from polyfm.mol.models import ChemBERTa
from polyfm.mol.predict import parity_plot, predict_csv
from polyfm.mol.samples import demo_kit


def quiet_trainer(**kwargs) -> L.Trainer:
    return L.Trainer(
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        num_sanity_val_steps=0,
        **kwargs,
    )


def test_demo_kit_quick_pretrains_and_finetunes_on_builtin_samples():
    L.seed_everything(0)
    kit = demo_kit(None, quick=True)
    assert kit.name == "mol" and kit.metric == "test/rmse" and not kit.higher_is_better
    encoder = kit.make_encoder()
    pretrain_data = kit.make_pretrain_data()
    quiet_trainer(max_steps=4, limit_val_batches=1).fit(kit.make_pretraining(encoder), pretrain_data)
    data = kit.make_finetune_data(0.5, 0)
    task = kit.make_task(encoder, Adaptation(mode="full"))
    trainer = quiet_trainer(max_epochs=1, limit_val_batches=0)
    trainer.fit(task, data)
    metrics = trainer.test(task, data, verbose=False)[0]
    assert np.isfinite(metrics["test/rmse"])
    full = kit.make_finetune_data(1.0, 0)
    full.setup()
    assert len(data.train_set) == pytest.approx(0.5 * len(full.train_set), abs=2)


def test_predict_csv_and_parity_plot(tmp_path):
    csv = tmp_path / "new.csv"
    csv.write_text("smiles,y\nCCO,1.0\nc1ccccc1,2.0\nCC(=O)O,\n")
    featuriser = ChemBERTaFeaturiser(tokenizer=None, max_length=32)
    encoder = ChemBERTa(
        vocab_size=len(featuriser.tokenizer),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=40,
    )
    task = Regression(encoder, num_targets=1, target_names=["y"], target_mean=[5.0], target_std=[2.0])
    frame = predict_csv(task, csv, featuriser)
    assert list(frame.columns) == ["row", "smiles", "canonical_smiles", "y", "pred_y"] and len(frame) == 3
    with torch.no_grad():
        direct = task(featuriser.tokenizer(["CCO"]))[0, 0].item()
    assert frame["pred_y"][0] == pytest.approx(direct, abs=1e-5)
    png = parity_plot(frame["y"], frame["pred_y"], tmp_path / "parity.png", title="test")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_predict_csv_keeps_text_columns_as_text(tmp_path):
    """New-molecule files carry names and identifiers; they are no targets and must not stop the run."""
    csv = tmp_path / "new.tsv"
    csv.write_text("id\tsmiles\tname\ty\nm1\tCCO\tethanol\t1.0\nm2\tc1ccccc1\tbenzene\t\n")
    featuriser = ChemBERTaFeaturiser(tokenizer=None, max_length=32)
    encoder = ChemBERTa(vocab_size=len(featuriser.tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=40)  # fmt: skip
    task = Regression(encoder, num_targets=1, target_names=["y"], target_mean=[5.0], target_std=[2.0])
    frame = predict_csv(task, csv, featuriser)
    assert list(frame.columns) == ["row", "smiles", "canonical_smiles", "id", "name", "y", "pred_y"]
    assert frame["name"].tolist() == ["ethanol", "benzene"] and frame["id"].tolist() == ["m1", "m2"]
    assert frame["y"][0] == 1.0 and np.isnan(frame["y"][1])
