"""The YAML recipes run through `polyfm fit` (LightningCLI), on generated series."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

import polyfm.ts
from polyfm.ts.samples import synthetic_series

RECIPES = Path(polyfm.ts.__file__).parent / "recipes"
SMALL = ["context_length=64", "prediction_length=16", "patch_length=8", "d_model=16", "decoder_d_model=8", "adaptive_patching_levels=1"]


def test_ts_every_recipe_parses() -> None:
    names = sorted(p.name for p in RECIPES.glob("*.yaml"))
    assert {"finetune-etth1-fewshot.yaml", "finetune-csv-scratch.yaml", "pretrain-multiseries.yaml"} <= set(names)
    for name in names:
        config = yaml.safe_load((RECIPES / name).read_text())
        assert config["model"]["init_args"]["model"]["class_path"] == "polyfm.ts.models.ttm.TTM"
        assert config["data"]["class_path"].startswith("polyfm.ts.data.")


@pytest.mark.parametrize("recipe", ["finetune-csv-scratch.yaml", "pretrain-multiseries.yaml"])
def test_ts_recipe_fast_dev_run(tmp_path: Path, recipe: str) -> None:
    (tmp_path / "ts").mkdir()
    synthetic_series(1200, channels=7, seed=0).rename(columns=lambda c: c.replace("x", "c")).to_csv(tmp_path / "ts" / "ETTh1.csv", index=False)
    model = [f"--model.init_args.model.init_args.{arg}" for arg in SMALL]
    data = ["--data.init_args.context_length=64", "--data.init_args.horizon=16", "--data.init_args.batch_size=8"]
    if recipe.startswith("pretrain"):
        data += ["--data.init_args.max_windows=8"]
    command = [sys.executable, "-m", "polyfm.core.cli", "fit", "--config", str(RECIPES / recipe), "--trainer.fast_dev_run=true",
               "--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false", *model, *data]
    env = {**os.environ, "POLYFM_DATA_DIR": str(tmp_path), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]


def _csv_recipe_args() -> list[str]:
    """The CSV recipe on ./plant.csv, small and on CPU, as a user would override it."""
    return ["--config", str(RECIPES / "finetune-csv-scratch.yaml"), "--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false", "--data.init_args.path=plant.csv",
            *[f"--model.init_args.model.init_args.{arg}" for arg in SMALL],
            "--data.init_args.context_length=64", "--data.init_args.horizon=16", "--data.init_args.batch_size=8"]


def test_ts_recipe_wrong_channel_count_names_the_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The recipe's TTM is built for 7 channels; a 3-channel file is refused before training, saying what to set."""
    from polyfm.core.cli import main
    from polyfm.core.errors import ConfigError

    synthetic_series(600, channels=3, seed=1).to_csv(tmp_path / "plant.csv", index=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("POLYFM_TRACEBACK", "1")  # the error itself, not the CLI's one-line print and exit 2
    with pytest.raises(ConfigError, match=r"num_input_channels: model 7, data 3.*--model\.init_args\.model\.init_args\.num_input_channels=3"):
        main(["fit", *_csv_recipe_args(), "--trainer.fast_dev_run=true"])
    with pytest.raises(ConfigError, match=r"forecasts 16 steps but the data's horizon is 12.*--data\.init_args\.horizon=16"):
        main(["fit", *_csv_recipe_args(), "--model.init_args.model.init_args.num_input_channels=3", "--data.init_args.horizon=12",
              "--trainer.fast_dev_run=true"])


def test_ts_recipe_fit_predict_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The user's path: fit the CSV recipe, predict from its last.ckpt into a CSV named by the input, resume the fit."""
    import torch

    from polyfm.core.cli import main

    frame = synthetic_series(900, channels=3, seed=1)
    frame[["x0", "x1", "x2"]] += 100.0  # far from the scaled units, so a forgotten inverse scaling shows
    frame.rename(columns={"date": "when"}).to_csv(tmp_path / "plant.csv", index=False)
    monkeypatch.chdir(tmp_path)
    common = [*_csv_recipe_args(), "--data.init_args.timestamp_column=when", "--data.init_args.eval_stride=16",
              "--model.init_args.model.init_args.num_input_channels=3"]
    steps = ["--trainer.limit_val_batches=1", "--trainer.val_check_interval=2"]
    main(["fit", *common, *steps, "--trainer.max_steps=2"])
    last = tmp_path / "runs" / "ts-csv" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 2

    main(["predict", *common, f"--ckpt_path={last}"])
    out = pd.read_csv(tmp_path / "runs" / "ts-csv" / "predictions" / "plant-forecast.csv", parse_dates=["origin", "when"])
    test_rows = len(frame) - int(len(frame) * 0.8)  # split [0.7, 0.1, 0.2]
    windows = len(range(0, test_rows - 16 + 1, 16))
    assert list(out.columns) == ["origin", "step", "when", "x0", "x1", "x2", "x0_true", "x1_true", "x2_true"]
    assert len(out) == windows * 16 and out["step"].tolist()[:16] == list(range(1, 17))
    truth = frame.set_index("date").loc[out["when"]]
    np.testing.assert_allclose(out[["x0_true", "x1_true", "x2_true"]].to_numpy(), truth[["x0", "x1", "x2"]].to_numpy(), rtol=1e-5)
    assert np.isfinite(out[["x0", "x1", "x2"]].to_numpy()).all() and out["x0"].mean() > 50  # the file's units

    main(["fit", *common, *steps, "--trainer.max_steps=4", f"--ckpt_path={last}"])
    assert torch.load(last, weights_only=True)["global_step"] == 4


def test_ts_fewshot_recipe_loads_cached_weights_and_predicts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The pretrained few-shot recipe on the real ETTh1: `pretrained: ttm-r2-512-96` read from the cache (an official-layout
    folder, small architecture), the backbone frozen, then `polyfm predict` from last.ckpt writes ETTh1-forecast.csv."""
    import torch

    from polyfm.core.cli import main
    from polyfm.ts.models.ttm import TTM

    root = os.environ.get("POLYFM_DATA_DIR")
    if not root or not (Path(root) / "ts" / "ETTh1.csv").exists():
        pytest.skip("POLYFM_DATA_DIR with ts/ETTh1.csv is not set")
    small = dict(arg.split("=") for arg in SMALL)
    architecture = {k: int(v) for k, v in small.items()} | {"adaptive_patching_levels": 3, "decoder_num_layers": 2}
    pretrained = TTM(**architecture)
    pretrained.save_pretrained(tmp_path / "cache" / "weights" / "ttm-r2-512-96")
    monkeypatch.setenv("POLYFM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("POLYFM_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    args = ["--config", str(RECIPES / "finetune-etth1-fewshot.yaml"), "--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false", *[f"--model.init_args.model.init_args.{k}={v}" for k, v in architecture.items()],
            "--data.init_args.context_length=64", "--data.init_args.horizon=16", "--data.init_args.eval_stride=96"]
    main(["fit", *args, "--trainer.max_steps=2", "--trainer.limit_val_batches=1", "--trainer.val_check_interval=2"])
    last = tmp_path / "runs" / "ts-etth1-fewshot" / "checkpoints" / "last.ckpt"
    state = torch.load(last, weights_only=True)["state_dict"]
    patcher = "backbone.encoder.patcher.weight"
    torch.testing.assert_close(state[f"model.{patcher}"], pretrained.state_dict()[patcher])  # loaded and frozen
    main(["predict", *args, f"--ckpt_path={last}"])
    out = pd.read_csv(tmp_path / "runs" / "ts-etth1-fewshot" / "predictions" / "ETTh1-forecast.csv")
    assert list(out.columns)[:4] == ["origin", "step", "date", "HUFL"] and "OT_true" in out.columns
    assert len(out) == len(range(11520, 14400 - 16 + 1, 96)) * 16
