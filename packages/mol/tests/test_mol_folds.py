"""Scaffold k-fold cross-validation of MoleculeDataModule (``fold``/``num_folds``, what
``polyfm cv`` passes): on real ESOL molecules, whole Bemis-Murcko scaffolds stay in one fold,
the held-out folds cover every molecule exactly once, the deal is deterministic, and bad fold
options are refused with what to pass instead."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import polyfm.mol
from polyfm.core.errors import ConfigError, DataError
from polyfm.mol.data import MoleculeDataModule, murcko_scaffold
from polyfm.mol.samples import sample_smiles

DATA = os.environ.get("POLYFM_DATA_DIR")
RECIPES = Path(polyfm.mol.__file__).parent / "recipes"


@pytest.fixture(scope="module")
def esol(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ESOL (500 real molecules) from POLYFM_DATA_DIR; without it, the package's own samples."""
    real = Path(DATA or "") / "mol" / "esol_500.csv"
    if DATA and real.is_file():
        return real
    path = tmp_path_factory.mktemp("mol") / "samples.csv"
    path.write_text("smiles,logSolubility\n" + "".join(f"{s},{-len(s) / 20:.2f}\n" for s in sample_smiles()))
    return path


def folds_of(path: Path, num_folds: int = 5, **options) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    splits = []
    for k in range(num_folds):
        data = MoleculeDataModule(str(path), fold=k, num_folds=num_folds, **options)
        data.read()
        splits.append(data.split)
    return splits


def test_scaffold_folds_cover_every_molecule_once_and_never_split_a_scaffold(esol: Path) -> None:
    table = MoleculeDataModule(str(esol)).read()
    n = len(table)
    scaffolds = np.array([murcko_scaffold(s) for s in table.smiles])
    splits = folds_of(esol)
    held = [val for _, val, _ in splits]
    # every molecule is held out in exactly one fold
    assert np.array_equal(np.sort(np.concatenate(held)), np.arange(n))
    for train, val, test in splits:
        assert np.array_equal(val, test)  # the held-out fold is validation and test
        assert len(np.intersect1d(train, val)) == 0 and len(train) + len(val) == n
        assert not set(scaffolds[train]) & set(scaffolds[val])  # no scaffold on both sides
    # a scaffold's molecules all sit in one fold
    fold_of = np.empty(n, dtype=int)
    for k, val in enumerate(held):
        fold_of[val] = k
    for scaffold in set(scaffolds):
        assert len(set(fold_of[scaffolds == scaffold])) == 1, scaffold
    # dealt largest scaffold first to the emptiest fold: sizes stay close unless one scaffold is huge
    sizes = [len(v) for v in held]
    largest = max(np.unique(scaffolds, return_counts=True)[1])
    assert max(sizes) - min(sizes) <= largest, sizes


def test_folds_are_deterministic_and_scaffold_balanced_deals_the_same(esol: Path) -> None:
    first, again = folds_of(esol), folds_of(esol)
    for a, b in zip(first, again, strict=True):
        assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    balanced = folds_of(esol, split="scaffold_balanced")
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(first, balanced, strict=True))
    # split_fractions are not used with fold (the fold is the held-out part)
    other = MoleculeDataModule(str(esol), fold=2, split_fractions=(0.5, 0.25, 0.25))
    other.read()
    assert np.array_equal(other.split[1], first[2][1])


def test_random_folds_deal_molecules_one_by_one(esol: Path) -> None:
    table = MoleculeDataModule(str(esol)).read()
    scaffolds = np.array([murcko_scaffold(s) for s in table.smiles])
    splits = folds_of(esol, split="random")
    held = [val for _, val, _ in splits]
    assert np.array_equal(np.sort(np.concatenate(held)), np.arange(len(table)))
    assert max(map(len, held)) - min(map(len, held)) <= 1
    # unlike the scaffold folds, common scaffolds (benzene, the acyclic one) land on both sides
    assert any(set(scaffolds[train]) & set(scaffolds[val]) for train, val, _ in splits)


def test_fold_trains_on_the_other_folds(esol: Path) -> None:
    data = MoleculeDataModule(str(esol), fold=1, num_folds=4, batch_size=16)
    data.setup()
    train, val, _ = data.split
    assert len(data.train_set) == len(train) and len(data.val_set) == len(val) == len(data.test_set)
    assert sorted(data.train_smiles()) == sorted(data.table.smiles[i] for i in train)
    mean, _ = data.target_statistics()  # the fold's training molecules only
    assert mean[0] == pytest.approx(float(np.nanmean(data.table.targets[train, 0])), abs=1e-5)
    batch = next(iter(data.val_dataloader()))
    assert set(batch["meta"]) <= {f"row {data.table.rows[i]}: {data.table.input_smiles[i]}" for i in val}


def test_bad_fold_options_are_refused_with_what_to_pass(esol: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"fold=5\) is not one of the 5 folds \(0 \.\. 4\)"):
        MoleculeDataModule(str(esol), fold=5, num_folds=5)
    with pytest.raises(ConfigError, match=r"fold=-1\) is not one of the 3 folds"):
        MoleculeDataModule(str(esol), fold=-1, num_folds=3)
    with pytest.raises(ConfigError, match=r"num_folds=1\): cross-validation needs 2 or more folds"):
        MoleculeDataModule(str(esol), fold=0, num_folds=1)
    with pytest.raises(ConfigError, match=r"split='stratified'.*split='scaffold'.*split='random'"):
        MoleculeDataModule(str(esol), fold=0, split="stratified")
    # fewer scaffolds than folds: named with the file, and what to do
    few = tmp_path / "few.csv"
    few.write_text("smiles,y\nc1ccccc1O,1\nc1ccccc1N,2\nC1CCCCC1O,3\nCCO,4\nCCN,5\n")
    with pytest.raises(ConfigError, match=r"few\.csv: the 5 molecules have 3 Bemis-Murcko scaffold\(s\), fewer than num_folds=4.*num_folds <= 3"):
        MoleculeDataModule(str(few), fold=0, num_folds=4).read()
    with pytest.raises(ConfigError, match=r"few\.csv: 5 items cannot fill 6 folds"):
        MoleculeDataModule(str(few), fold=0, num_folds=6, split="random").read()
    assert len(MoleculeDataModule(str(few), fold=0, num_folds=3).read()) == 5


def test_invalid_smiles_stop_a_fold_as_they_stop_any_split(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("smiles,y\nc1ccccc1O,1\nnot_a_smiles,2\nC1CCCCC1O,3\nCCO,4\nc1ccncc1,5\n")
    with pytest.raises(DataError, match=r"bad\.csv.*row 2 \(line 3\) 'not_a_smiles'.*skip_invalid=True"):
        MoleculeDataModule(str(bad), fold=0, num_folds=2).read()
    data = MoleculeDataModule(str(bad), fold=0, num_folds=2, skip_invalid=True)
    table = data.read()
    assert [r for r, _, _ in table.skipped] == [2]  # counted, and in no fold
    held = np.concatenate([folds_of(bad, 2, skip_invalid=True)[k][1] for k in range(2)])
    assert sorted(table.rows[i] for i in held) == [1, 3, 4, 5]


def test_polyfm_cv_runs_the_chemberta_recipe_by_scaffold_fold(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The shipped recipe through `polyfm cv`: each fold fits on the other folds' scaffolds."""
    from polyfm.core.cli import main

    monkeypatch.chdir(tmp_path)
    csv = tmp_path / "assay.csv"
    csv.write_text("smiles,pIC50\n" + "".join(f"{s},{5 + len(s) / 20:.2f}\n" for s in sample_smiles()[::20][:40]))
    recipe = [
        "--config", str(RECIPES / "finetune-chemberta-esol.yaml"),
        f"--data.init_args.csv_path={csv}", "--data.init_args.target_columns=[pIC50]", "--data.init_args.batch_size=8",
        "--model.init_args.target_names=[pIC50]", "--model.init_args.target_mean=[6.0]", "--model.init_args.target_std=[1.0]",
        "--model.init_args.encoder.init_args.hidden_size=16", "--model.init_args.encoder.init_args.num_hidden_layers=1",
        "--model.init_args.encoder.init_args.num_attention_heads=2", "--model.init_args.encoder.init_args.intermediate_size=32",
        "--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--trainer.logger=false",
    ]  # fmt: skip
    main(["cv", *recipe, "--num-folds", "2", "--output", str(tmp_path / "cv"), "--trainer.max_steps=1", "--trainer.limit_val_batches=1"])
    summary = json.loads((tmp_path / "cv" / "cv.json").read_text())
    assert summary["summary"]["validate"]["val/rmse"]["folds"].keys() == {"0", "1"}
    for k in (0, 1):
        assert (tmp_path / "cv" / f"fold{k}" / "result.json").is_file()
    # the fold models as an ensemble, with the applicability-domain column (the recipe's writer is its last callback)
    new = tmp_path / "screen.csv"
    new.write_text("compound,smiles\nZ1,CCO\nZ2,FS(F)(F)(F)(F)F\n")
    main(["predict", *recipe, f"--ckpt_path={','.join(summary['checkpoints'])}", f"--data.init_args.predict_path={new}",
          "--trainer.callbacks.train_similarity=true"])  # fmt: skip
    table = pd.read_csv(tmp_path / "runs/mol-chemberta-esol/predictions/screen.csv")
    assert list(table.columns) == ["row", "smiles", "canonical_smiles", "compound", "pred_pIC50", "pred_pIC50_std", "train_similarity"]
    assert (table["train_similarity"] < 0.5).all() and table["pred_pIC50_std"].notna().all()
