"""The YAML recipes run through `polyfm fit` (LightningCLI), on generated clips."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

import polyfm.audio

RECIPES = Path(polyfm.audio.__file__).parent / "recipes"


def _clips(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for label, freq in (("low", 300.0), ("high", 3000.0)):
        (root / label).mkdir(parents=True)
        for i in range(4):
            t = np.arange(8000) / 16000
            sf.write(root / label / f"{i}.wav", (0.3 * np.sin(2 * np.pi * freq * t) + 0.01 * rng.standard_normal(8000)).astype(np.float32), 16000)
    return root


def _fit(tmp_path: Path, recipe: str, *overrides: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "polyfm.core.cli", "fit", "--config", str(RECIPES / recipe), "--trainer.fast_dev_run=true", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny models: one thread, no spin-waiting on a shared CPU
    return subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)


def test_every_recipe_parses() -> None:
    import yaml

    names = sorted(p.name for p in RECIPES.glob("*.yaml"))
    assert {"finetune-folder.yaml", "finetune-esc50.yaml", "finetune-fsdd.yaml", "finetune-sed.yaml", "pretrain-audioset.yaml", "pretrain-ssl-folder.yaml"} <= set(names)
    for name in names:
        config = yaml.safe_load((RECIPES / name).read_text())
        assert config["model"]["class_path"] and config["data"]["class_path"].startswith("polyfm.audio.data.")


@pytest.mark.parametrize("recipe", ["finetune-folder.yaml", "pretrain-ssl-folder.yaml", "finetune-sed.yaml"])
def test_recipe_fast_dev_run(tmp_path: Path, recipe: str) -> None:
    clips = _clips(tmp_path / "clips")
    small = ["--model.init_args.encoder.init_args.pretrained="] if recipe.startswith("finetune") else ["--model.init_args.objective.init_args.feature_dim=128"]
    prefix = "encoder" if recipe.startswith("finetune") else "model"
    overrides = [
        *small,
        f"--model.init_args.{prefix}.init_args.base_channels=4",
        "--data.init_args.num_workers=0",
        "--data.init_args.batch_size=4",
        "--trainer.accelerator=cpu",
        "--trainer.enable_progress_bar=false",
    ]
    if recipe == "finetune-sed.yaml":
        events = tmp_path / "events.tsv"
        events.write_text("filename\tonset\toffset\tevent_label\nlow/0.wav\t0.1\t0.3\tlow\nhigh/0.wav\t0.0\t0.5\thigh\n")
        overrides += [f"--data.init_args.train={events}", f"--data.init_args.val={events}", f"--data.init_args.audio_root={clips}"]
        overrides += ["--data.init_args.clip_seconds=0.5", "--model.init_args.num_classes=2"]
    elif recipe.startswith("finetune"):
        overrides += [f"--data.init_args.train={clips}", f"--data.init_args.val={clips}", "--data.init_args.clip_seconds=0.5"]
    else:
        overrides += [f"--data.init_args.source={clips / 'low'}", "--data.init_args.clip_seconds=0.5", "--data.init_args.val_fraction=0.25"]
    result = _fit(tmp_path, recipe, *overrides)
    assert result.returncode == 0, result.stderr[-3000:]
