"""``polyfm cv``: a fit per fold, the summary, resuming a killed cross-validation, the fold ensemble."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from polyfm.core.cli import lightning_main
from polyfm.core.cli import main as polyfm
from polyfm.core.toy import ToyDataModule

RECIPE = Path(__file__).parents[1] / "src/polyfm/core/recipes/finetune-toy.yaml"
FAST = ["--trainer.logger=false", "--trainer.max_epochs=2", "--trainer.enable_progress_bar=false", "--data.n_train=96", "--data.n_val=48"]


def test_toy_folds_partition_train_and_val() -> None:
    held: list[str] = []
    for fold in range(3):
        dm = ToyDataModule(n_train=60, n_val=30, fold=fold, num_folds=3)
        dm.setup("fit")
        train_meta, val_meta = set(dm.train_set.meta), set(dm.val_set.meta)
        assert not train_meta & val_meta and len(train_meta) + len(val_meta) == 90
        held += sorted(val_meta)
    assert len(held) == len(set(held)) == 90


def test_polyfm_cv_fits_each_fold_summarises_resumes_and_ensembles(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cv"
    polyfm(["cv", "--config", str(RECIPE), "--num-folds", "3", "--output", str(out), *FAST])
    report = json.loads((out / "cv.json").read_text())
    accuracy = report["summary"]["validate"]["val/acc"]
    values = [accuracy["folds"][str(k)] for k in range(3)]
    assert all(0.0 <= v <= 1.0 for v in values)
    mean = sum(values) / 3
    assert accuracy["mean"] == pytest.approx(mean)
    assert accuracy["std"] == pytest.approx(float(torch.tensor(values).std()))  # sample std, ddof 1
    checkpoints = [Path(c) for c in report["checkpoints"]]
    assert [c.parent.parent.name for c in checkpoints] == ["fold0", "fold1", "fold2"] and all(c.is_file() for c in checkpoints)
    # the folds trained different models on different data (the recipe's LoRA adapters and head)
    states = [torch.load(c, weights_only=True)["state_dict"] for c in checkpoints]
    assert any(not torch.equal(states[0][key], states[1][key]) for key in states[0])
    printed = capsys.readouterr().out
    assert "val/acc" in printed and "polyfm predict" in printed

    # fold 1 "killed" after its last checkpoint: the rerun skips folds 0 and 2 and resumes fold 1
    (out / "fold1" / "result.json").unlink()
    polyfm(["cv", "--config", str(RECIPE), "--num-folds", "3", "--output", str(out), *FAST])
    err = capsys.readouterr().err
    assert "fold 0: done before" in err and "fold 2: done before" in err and "fold 1: resuming from" in err
    again = json.loads((out / "cv.json").read_text())["summary"]["validate"]["val/acc"]
    assert again["folds"] == accuracy["folds"]

    # other arguments into the same folder would mix two experiments in one summary
    with pytest.raises(SystemExit):
        polyfm(["cv", "--config", str(RECIPE), "--num-folds", "3", "--output", str(out), *FAST, "--model.optim.lr=0.1"])
    assert "other recipes or arguments" in capsys.readouterr().err

    # the fold models as an ensemble
    predict_out = tmp_path / "predict"
    lightning_main(["predict", "-c", str(RECIPE), *FAST, f"--trainer.default_root_dir={predict_out}", f"--ckpt_path={','.join(report['checkpoints'])}"])


def test_polyfm_cv_names_a_data_module_without_folds(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        polyfm(["cv", "--config", str(RECIPE), "--num-folds", "3", "--output", str(tmp_path), "--data=lightning.pytorch.demos.boring_classes.BoringDataModule"])
    err = capsys.readouterr().err
    assert "BoringDataModule takes no fold or num_folds argument" in err
    with pytest.raises(SystemExit):
        polyfm(["cv", "--config", str(RECIPE), "--output", str(tmp_path)])
    assert "--num-folds K" in capsys.readouterr().err
