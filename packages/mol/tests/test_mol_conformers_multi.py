"""Uni-Mol's multi-conformer protocol (``num_conformers=K``): K seeded ETKDG conformers per
molecule, one drawn per molecule and epoch in training (reproducible, resumable), each molecule's
mean over its K conformers at evaluation and prediction, one row per molecule in the file."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch

from polyfm.core.errors import ConfigError
from polyfm.core.tasks import Regression
from polyfm.mol.conformers import ConformerSettings, collate_unimol, generate_conformer_sets, generate_conformers
from polyfm.mol.data import ConformerDrawSampler, ConformerSet, MoleculeDataModule
from polyfm.mol.models import UniMol
from polyfm.mol.predict import MoleculePredictionWriter, predict_smiles
from polyfm.mol.samples import sample_smiles
from polyfm.mol.tasks import MoleculeClassification, MoleculeRegression

K = 3


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> tuple[Path, str]:
    folder = tmp_path_factory.mktemp("multi")
    molecules = sample_smiles()[::25][:16]
    path = folder / "assay.csv"
    path.write_text("smiles,solubility,toxic,active\n" + "".join(f"{s},{len(s) / 10:.2f},{i % 2},{int(i % 3 == 0)}\n" for i, s in enumerate(molecules)))
    return path, str(folder / "conformers")


def data(files, num_conformers: int = K, targets=("solubility",), **kwargs) -> MoleculeDataModule:
    path, cache = files
    options = {"split": "random", "split_fractions": (0.5, 0.25, 0.25), "batch_size": 4, "remove_hs": True, "mmff": False,
               "conformer_cache": cache, "conformer_timeout": 2, **kwargs}  # fmt: skip
    dm = MoleculeDataModule(str(path), model="unimol", target_columns=list(targets), num_conformers=num_conformers, **options)
    dm.setup()
    return dm


def tiny_unimol(dm: MoleculeDataModule) -> UniMol:
    return UniMol(dictionary=dm.featuriser.dictionary, encoder_layers=1, embed_dim=16, ffn_embed_dim=32, attention_heads=2,
                  num_kernels=8, pretraining_heads=False, final_head_layer_norm=False)  # fmt: skip


def geometry_aware(task: L.LightningModule) -> L.LightningModule:
    """The task with seeded noise on every weight: at Uni-Mol's init (and after a few steps) the
    distances barely reach the output, so every conformer would give the same one."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in task.parameters():
            parameter.add_(0.2 * torch.randn(parameter.shape, generator=generator))
    return task


def quiet_trainer(root: Path, **kwargs) -> L.Trainer:
    return L.Trainer(default_root_dir=root, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, accelerator="cpu", num_sanity_val_steps=0, **kwargs)  # fmt: skip


def test_one_conformer_is_the_single_conformer_path_unchanged(files) -> None:
    default = data(files, num_conformers=1)
    path, cache = files
    before = MoleculeDataModule(str(path), model="unimol", target_columns=["solubility"], split="random",
                                split_fractions=(0.5, 0.25, 0.25), batch_size=4, remove_hs=True, mmff=False,
                                conformer_cache=cache, conformer_timeout=2)  # fmt: skip  (the options as they were)
    before.setup()
    for loader_a, loader_b in ((default.train_dataloader(), before.train_dataloader()), (default.val_dataloader(), before.val_dataloader())):
        for a, b in zip(loader_a, loader_b, strict=True):
            assert "conformer_molecule" not in a and a["meta"] == b["meta"]
            for key in a["input"]:
                assert torch.equal(a["input"][key], b["input"][key])
    # the tasks add nothing when there is one conformer
    L.seed_everything(0)
    core = Regression(tiny_unimol(default), target_mean=[3.0], target_std=[1.5]).eval()
    ours = MoleculeRegression(tiny_unimol(default), target_mean=[3.0], target_std=[1.5]).eval()
    ours.load_state_dict(core.state_dict())
    batch = next(iter(default.val_dataloader()))
    with torch.no_grad():
        assert torch.equal(ours.predict_step(batch, 0)["prediction"], core.predict_step(batch, 0)["prediction"])
    # and the first of K conformers is the single one (seed 42, the same cache entry)
    smiles = default.table.smiles[:4]
    settings = ConformerSettings(seed=42, remove_hs=True, mmff=False, timeout=2)
    single, _ = generate_conformers(smiles, settings, cache)
    sets, report = generate_conformer_sets(smiles, K, settings, cache)
    assert report.from_cache >= len(smiles)  # the single path's entries were reused
    for one, several in zip(single, sets, strict=True):
        assert np.array_equal(one.coordinates, several[0].coordinates)


def test_three_conformers_per_molecule_differ(files) -> None:
    dm = data(files)
    featurise = dm.train_set.featurise
    for i in range(len(dm.train_set)):
        conformers = featurise(i)
        assert isinstance(conformers, ConformerSet) and len(conformers) == K
        coordinates = [conformers[c]["src_coord"] for c in range(K)]
        assert all(np.array_equal(conformers[c]["src_tokens"], conformers[0]["src_tokens"]) for c in range(K))
        for a in range(K):
            for b in range(a + 1, K):
                assert not np.allclose(coordinates[a], coordinates[b], atol=1e-3)
        distances = [conformers[c]["src_distance"] for c in range(K)]
        assert not np.allclose(distances[0], distances[1], atol=1e-3)  # another geometry, not a rotated copy
    assert dm.featuriser.repeated_conformer_rows == {}  # ETKDG without MMFF never lands twice on one geometry


def test_training_draws_change_each_epoch_and_repeat_with_the_seed(files) -> None:
    dm = data(files)
    n = len(dm.train_set)
    sampler = dm.train_dataloader().sampler
    assert isinstance(sampler, ConformerDrawSampler)
    epochs = [sampler.draws(epoch) for epoch in range(4)]
    assert all(((e >= 0) & (e < K)).all() for e in epochs)
    assert any(not np.array_equal(epochs[0], e) for e in epochs[1:])
    assert all(np.array_equal(a, b) for a, b in zip(epochs, [ConformerDrawSampler(n, K, dm.seed).draws(e) for e in range(4)], strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(epochs, [ConformerDrawSampler(n, K, dm.seed + 1).draws(e) for e in range(4)], strict=True))
    # what the loader hands out is the drawn conformer of each molecule
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(2)
    drawn = ConformerDrawSampler(n, K, dm.seed).draws(2)
    order = [code // K for code in loader.sampler]
    batch = next(iter(loader))
    for row, molecule in enumerate(order[: len(batch["meta"])]):
        expected = dm.train_set.featurise(molecule)[int(drawn[molecule])]["src_coord"]
        assert torch.allclose(batch["input"]["src_coord"][row, : len(expected)], torch.as_tensor(expected))
        assert batch["meta"][row] == dm.train_set.meta[molecule]


def test_training_draws_resume_mid_epoch(files) -> None:
    loader = data(files).train_dataloader()
    loader.sampler.set_epoch(1)
    batches = iter(loader)
    next(batches)
    state = loader.state_dict()
    rest = list(batches)
    resumed = data(files).train_dataloader()  # a new process: new objects, the same seed
    resumed.load_state_dict(state)
    resumed.sampler.set_epoch(1)
    again = list(resumed)
    assert len(again) == len(rest) >= 1
    for a, b in zip(again, rest, strict=True):
        assert a["meta"] == b["meta"] and torch.equal(a["input"]["src_coord"], b["input"]["src_coord"])


def per_conformer(task: L.LightningModule, dm: MoleculeDataModule, indices: list[int], probabilities: bool = False) -> np.ndarray:
    """``(molecules, K, outputs)``: the task on each conformer of each molecule alone, one at a time."""
    featurise = dm.featuriser.prepare(dm.table.smiles, dm.table.rows)
    task.eval()
    out = []
    with torch.no_grad():
        for i in indices:
            conformers = featurise(i)
            each = [task(collate_unimol([conformers[c]], dm.featuriser.dictionary.pad)) for c in range(len(conformers))]
            stacked = torch.cat(each)
            out.append((torch.sigmoid(stacked) if probabilities else stacked).numpy())
    return np.stack(out)


def test_evaluation_and_predictions_are_the_mean_over_conformers(files, tmp_path: Path) -> None:
    dm = data(files)
    L.seed_everything(0)
    task = MoleculeRegression(tiny_unimol(dm), target_names=["solubility"], target_mean=[3.0], target_std=[1.5])
    quiet_trainer(tmp_path, max_steps=2, limit_val_batches=0).fit(task, dm)  # the training loop takes the draws
    geometry_aware(task)

    val = dm.split[1].tolist()
    each = per_conformer(task, dm, val)  # (molecules, K, 1)
    assert each.shape == (len(val), K, 1) and each.std(axis=1).max() > 1e-4  # the conformers do give different outputs
    mean = each.mean(axis=1)[:, 0]
    targets = dm.table.targets[val, 0]
    metrics = quiet_trainer(tmp_path).validate(task, dm, verbose=False)[0]
    assert metrics["val/rmse"] == pytest.approx(float(np.sqrt(np.mean((mean - targets) ** 2))), abs=1e-5)  # per molecule
    assert metrics["val/mae"] == pytest.approx(float(np.mean(np.abs(mean - targets))), abs=1e-5)

    out = tmp_path / "predictions.csv"
    quiet_trainer(tmp_path, callbacks=[MoleculePredictionWriter(output=str(out))]).predict(task, datamodule=dm, return_predictions=False)
    table = pd.read_csv(out)
    test = dm.split[2].tolist()
    assert len(table) == len(test) and table["row"].tolist() == [dm.table.rows[i] for i in test]  # one row per molecule
    assert table["pred_solubility"].to_numpy() == pytest.approx(per_conformer(task, dm, test).mean(axis=1)[:, 0], abs=1e-5)
    # predict_smiles (predict_csv's path) averages the same way
    direct = predict_smiles(task, [dm.table.smiles[i] for i in test], dm.featuriser, batch_size=2)
    assert direct[:, 0] == pytest.approx(table["pred_solubility"].to_numpy(), abs=1e-5)


def test_classification_averages_probabilities(files, tmp_path: Path) -> None:
    dm = data(files, targets=("toxic", "active"))
    L.seed_everything(0)
    task = geometry_aware(MoleculeClassification(tiny_unimol(dm), num_classes=2, multilabel=True, class_names=["toxic", "active"]))
    out = tmp_path / "predictions.csv"
    quiet_trainer(tmp_path, callbacks=[MoleculePredictionWriter(output=str(out))]).predict(task, datamodule=dm, return_predictions=False)
    table = pd.read_csv(out)
    test = dm.split[2].tolist()
    each = per_conformer(task, dm, test, probabilities=True)
    assert len(table) == len(test) and each.std(axis=1).max() > 1e-4
    for j, name in enumerate(["toxic", "active"]):
        assert table[f"pred_{name}"].to_numpy() == pytest.approx(each.mean(axis=1)[:, j], abs=1e-6)
    metrics = quiet_trainer(tmp_path).validate(task, dm, verbose=False)[0]
    probabilities = torch.as_tensor(per_conformer(task, dm, dm.split[1].tolist(), probabilities=True).mean(axis=1))
    target = torch.as_tensor(dm.table.targets[dm.split[1]])
    expected = torch.nn.functional.binary_cross_entropy(probabilities, target)
    assert metrics["val/loss"] == pytest.approx(float(expected), abs=1e-5)


def test_a_task_that_does_not_average_is_refused(files, tmp_path: Path) -> None:
    dm = data(files)
    task = Regression(tiny_unimol(dm), target_mean=[3.0], target_std=[1.5])
    with pytest.raises(ConfigError, match=r"num_conformers=3 needs a task that averages .*tasks.MoleculeRegression"):
        quiet_trainer(tmp_path).validate(task, dm, verbose=False)


def test_repeated_geometries_are_kept_and_counted(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "rigid.csv"
    path.write_text("smiles,y\nc1ccccc1,1\nCCCCCCO,2\nC#N,3\n")
    with caplog.at_level(logging.WARNING, logger="polyfm.mol.data"):
        dm = MoleculeDataModule(str(path), model="unimol", target_columns=["y"], split="random", split_fractions=(1.0, 0.0, 0.0),
                                num_conformers=4, mmff=True, conformer_2d=True)  # fmt: skip
        dm.setup()
    repeated = dm.featuriser.repeated_conformer_rows
    # benzene and HCN: MMFF takes every seed to the one minimum; only the 2D conformer differs
    assert repeated.get(1) == 2 and repeated.get(3) == 2 and 2 not in repeated
    assert "2 of 3 molecules have fewer than 4 distinct conformers" in caplog.text and "repeats are kept" in caplog.text
    benzene = dm.train_set.featurise(0)
    assert len(benzene) == 4 and np.allclose(benzene[3]["src_coord"][:, 2], 0.0)  # the last one is the 2D conformer


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"model": "chemberta", "num_conformers": 2}, "for model='unimol'"),
        ({"model": "unimol", "num_conformers": 2, "conformers": "from_file"}, "one conformer per record"),
        ({"model": "unimol", "conformer_2d": True}, "needs num_conformers >= 2"),
        ({"model": "unimol", "num_conformers": 0}, "num_conformers=0"),
    ],
)
def test_conformer_options_that_cannot_work_are_refused(files, options, message) -> None:
    with pytest.raises(ConfigError, match=message):
        MoleculeDataModule(str(files[0]), **options)
