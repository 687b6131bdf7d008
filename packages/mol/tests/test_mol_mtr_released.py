"""Continuing ChemBERTa-2 MTR from a released checkpoint: the targets and the de-normalised
outputs are upstream's (``RobertaForRegression``: ``norm_mean``/``norm_std`` in config.json and
the weights, labels RDKit's descList of 2020 without Ipc). The checkpoint is written here in the
hub layout with random weights; the reference is transformers' RobertaModel."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from rdkit import Chem
from rdkit.ML.Descriptors.MoleculeDescriptors import MolecularDescriptorCalculator
from transformers import RobertaConfig, RobertaModel

from polyfm.core.errors import CheckpointError
from polyfm.mol.data import MoleculePretrainDataModule
from polyfm.mol.descriptors import CHEMBERTA2_DESCRIPTORS_199, CHEMBERTA2_DESCRIPTORS_207
from polyfm.mol.models import ChemBERTa
from polyfm.mol.objectives import MultiTaskRegression
from polyfm.mol.samples import sample_smiles
from polyfm.mol.tokenizers import SmilesTokenizer

SMILES = list(sample_smiles()[::40][:24])


def write_released_mtr(folder, vocab_size: int, num_labels: int = 199, **extra) -> dict[str, torch.Tensor]:
    """A ChemBERTa-2 MTR folder as bert-loves-chemistry's train_roberta.py saves it."""
    rng = np.random.default_rng(0)
    mean = rng.normal(50, 40, num_labels).tolist()
    std = np.abs(rng.normal(20, 10, num_labels))
    std[[i for i in (3, 9) if i < num_labels]] = 0.0  # constant descriptors: upstream divides by 1 instead
    config = RobertaConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=40, max_position_embeddings=70, type_vocab_size=1, num_labels=num_labels,
                           architectures=["RobertaForRegression"], **extra)  # fmt: skip
    config.norm_mean, config.norm_std = mean, std.tolist()
    torch.manual_seed(0)
    trunk = RobertaModel(config, add_pooling_layer=False)
    head = {"regression.dense.weight": torch.randn(32, 32) * 0.3, "regression.dense.bias": torch.randn(32) * 0.3,
            "regression.out_proj.weight": torch.randn(num_labels, 32) * 0.3,
            "regression.out_proj.bias": torch.randn(num_labels) * 0.3}  # fmt: skip
    state = {f"roberta.{k}": v for k, v in trunk.state_dict().items()} | head
    state |= {"norm_mean": torch.tensor(mean), "norm_std": torch.tensor(np.where(std == 0, 1.0, std), dtype=torch.float32)}
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(folder))
    torch.save(state, folder / "pytorch_model.bin")
    return state


def test_released_mtr_targets_loss_and_outputs_are_upstreams(tmp_path) -> None:
    tokenizer = SmilesTokenizer.builtin(64)
    folder = tmp_path / "ChemBERTa-77M-MTR"
    state = write_released_mtr(folder, len(tokenizer))
    assert "norm_mean" in json.loads((folder / "config.json").read_text())  # the official layout
    mean = state["norm_mean"].double().numpy()
    std = state["norm_std"].double().numpy()

    dm = MoleculePretrainDataModule(smiles=SMILES, model="chemberta", targets="descriptors", descriptors_from=str(folder),
                                    max_length=64, batch_size=len(SMILES), val_fraction=0.0)  # fmt: skip
    assert dm.descriptor_names == list(CHEMBERTA2_DESCRIPTORS_199) and dm.num_descriptors == 199
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    # upstream's labels: MolecularDescriptorCalculator over its names, NaN/Inf -> 0, (x - norm_mean) / norm_std
    calculator = MolecularDescriptorCalculator(list(CHEMBERTA2_DESCRIPTORS_199))
    smiles = [m.split(": ", 1)[1] for m in batch["meta"]]  # the batch's order (the loader shuffles)
    raw = np.array([calculator.CalcDescriptors(Chem.MolFromSmiles(s)) for s in smiles], dtype=np.float64)
    expected = (np.nan_to_num(raw, nan=0.0, posinf=0.0, neginf=0.0) - mean) / std
    np.testing.assert_allclose(batch["target"].numpy(), expected, rtol=1e-5, atol=1e-5)
    assert not torch.isnan(batch["target"]).any()  # as upstream: nothing masked, so the same mean over all entries

    with pytest.warns(UserWarning, match="lm_head is freshly initialised"):
        model = ChemBERTa.from_pretrained(folder, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0).eval()
    objective = MultiTaskRegression(32, 199, dropout=0.0, pretrained=str(folder)).eval()
    assert objective.descriptor_names == list(CHEMBERTA2_DESCRIPTORS_199)
    assert {"norm_mean", "norm_std"} <= set(objective.state_dict())  # upstream's buffer names
    reference = RobertaModel.from_pretrained(str(folder), add_pooling_layer=False).eval()
    inputs = batch["input"]
    with torch.no_grad():
        cls = reference(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).last_hidden_state[:, 0]
        logits = F.linear(torch.relu(F.linear(cls, state["regression.dense.weight"], state["regression.dense.bias"])),
                          state["regression.out_proj.weight"], state["regression.out_proj.bias"])  # fmt: skip
        # RobertaForRegression.forward: MSE(logits, normalize(labels)); without labels: logits * std + mean
        upstream_loss = F.mse_loss(logits.view(-1), ((torch.from_numpy(raw).nan_to_num(0.0, 0.0, 0.0) - state["norm_mean"].double())
                                                     / state["norm_std"].double()).float().view(-1))  # fmt: skip
        upstream_out = logits * state["norm_std"] + state["norm_mean"]
        ours_loss = objective(model, batch)["loss"]
        ours_out = objective.predict_descriptors(model, inputs)
    torch.testing.assert_close(ours_loss, upstream_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours_out, upstream_out, rtol=1e-5, atol=1e-3)  # descriptor units (MolWt ~ 300)


def test_label_sets_and_config_names(tmp_path) -> None:
    assert len(CHEMBERTA2_DESCRIPTORS_199) == len(set(CHEMBERTA2_DESCRIPTORS_199)) == 199
    assert len(CHEMBERTA2_DESCRIPTORS_207) == 207 and "Ipc" not in CHEMBERTA2_DESCRIPTORS_207
    assert CHEMBERTA2_DESCRIPTORS_207[17:25] == tuple(n for n in CHEMBERTA2_DESCRIPTORS_207 if n.startswith("BCUT2D_"))
    # a config that names its outputs is read in that order
    names = ["TPSA", "MolWt", "NumHDonors"]
    write_released_mtr(tmp_path / "named", 40, num_labels=3, id2label=dict(enumerate(names)))
    dm = MoleculePretrainDataModule(smiles=["CCO", "c1ccccc1O"], targets="descriptors",
                                    descriptors_from=str(tmp_path / "named"), val_fraction=0.0)  # fmt: skip
    assert dm.descriptor_names == names
    dm.setup()
    from rdkit.Chem import Descriptors

    scaler = dm.scaler
    got = scaler.inverse(dm.train_set.targets)  # back in descriptor units
    mol = Chem.MolFromSmiles("CCO")
    np.testing.assert_allclose(got[0], [Descriptors.TPSA(mol), Descriptors.MolWt(mol), Descriptors.NumHDonors(mol)], rtol=1e-5)


def test_released_mtr_errors_name_the_file_and_the_fix(tmp_path) -> None:
    write_released_mtr(tmp_path / "odd", 40, num_labels=150)
    with pytest.raises(CheckpointError, match=r"150 regression outputs and no descriptor names.*199 or 207"):
        MoleculePretrainDataModule(smiles=["CCO"], targets="descriptors", descriptors_from=str(tmp_path / "odd"))
    write_released_mtr(tmp_path / "future", 40, num_labels=2, descriptor_names=["MolWt", "NotADescriptor2030"])
    with pytest.raises(CheckpointError, match="has no descriptor NotADescriptor2030"):
        MoleculePretrainDataModule(smiles=["CCO"], targets="descriptors", descriptors_from=str(tmp_path / "future"))
    write_released_mtr(tmp_path / "mtr", 40)
    with pytest.raises(CheckpointError, match="hidden_size 32 and 199 outputs.*Pass hidden_size: 32, num_targets: 199"):
        MultiTaskRegression(48, 217, pretrained=str(tmp_path / "mtr"))
    mlm = tmp_path / "mlm"
    mlm.mkdir()
    RobertaConfig(vocab_size=40, hidden_size=32, num_hidden_layers=1, num_attention_heads=4).save_pretrained(str(mlm))
    with pytest.raises(CheckpointError, match="no norm_mean/norm_std: not a ChemBERTa-2 MTR checkpoint"):
        MultiTaskRegression(32, 199, pretrained=str(mlm))
    with pytest.raises(Exception, match="needs targets='descriptors'"):
        MoleculePretrainDataModule(smiles=["CCO"], descriptors_from=str(tmp_path / "mtr"))
    # the head alone predicts standardised targets of our own scaler: refuse to call them descriptor units
    with pytest.raises(ValueError, match="no norm_mean/norm_std"):
        MultiTaskRegression(32, 3).predict_descriptors(torch.nn.Identity(), {})


def test_continued_pretraining_from_the_released_head_runs_and_keeps_its_normalisation(tmp_path) -> None:
    import lightning as L

    from polyfm.core.pretrain import Pretraining
    from polyfm.core.tasks import OptimConfig

    L.seed_everything(0)
    tokenizer = SmilesTokenizer.builtin(64)
    folder = tmp_path / "mtr"
    state = write_released_mtr(folder, len(tokenizer))
    dm = MoleculePretrainDataModule(smiles=SMILES, targets="descriptors", descriptors_from=str(folder), max_length=64,
                                    batch_size=8, val_fraction=0.25)  # fmt: skip
    with pytest.warns(UserWarning, match="lm_head is freshly initialised"):
        model = ChemBERTa(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                          intermediate_size=40, max_position_embeddings=70, type_vocab_size=1, pretrained=str(folder))  # fmt: skip
    task = Pretraining(model, MultiTaskRegression(32, 199, pretrained=str(folder)), optim=OptimConfig(lr=1e-4))
    trainer = L.Trainer(max_steps=4, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=str(tmp_path), accelerator="cpu")  # fmt: skip
    trainer.fit(task, dm)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    (checkpoint,) = tmp_path.rglob("*.ckpt")
    saved = torch.load(checkpoint, weights_only=True)["state_dict"]
    torch.testing.assert_close(saved["objective_module.norm_std"], state["norm_std"])  # a fixed buffer, not trained
