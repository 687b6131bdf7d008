"""The YAML recipes run through `polyfm fit` (LightningCLI), on generated series."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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
