"""The YAML recipes run through the polyfm CLI (LightningCLI), with tiny overrides."""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import pytest
import yaml

from polyfm.geo.samples import synthetic_scene, write_geotiff, write_scene_folder

RECIPES = Path(__file__).resolve().parents[1] / "src" / "polyfm" / "geo" / "recipes"


def _class_paths(node):
    if isinstance(node, dict):
        if "class_path" in node:
            yield node["class_path"]
        for value in node.values():
            yield from _class_paths(value)
    elif isinstance(node, list):
        for value in node:
            yield from _class_paths(value)


@pytest.mark.parametrize("recipe", sorted(p.name for p in RECIPES.glob("*.yaml")))
def test_recipe_class_paths_import(recipe):
    config = yaml.safe_load((RECIPES / recipe).read_text())
    for path in _class_paths(config):
        module, _, name = path.rpartition(".")
        assert hasattr(importlib.import_module(module), name), path


def _fit(tmp_path, recipe: str, override: dict) -> None:
    from polyfm.core.cli import lightning_main

    (tmp_path / "override.yaml").write_text(yaml.safe_dump(override))
    lightning_main(["fit", "--config", str(RECIPES / recipe), "--config", str(tmp_path / "override.yaml")])


def test_finetune_recipe_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root, _ = write_scene_folder(tmp_path / "scenes", per_class=3, size=16, num_classes=3)
    _fit(tmp_path, "finetune-satmae-geotiff.yaml", {
        "model": {"init_args": {"encoder": {"init_args": {"pretrained": None, "embed_dim": 64, "depth": 1, "num_heads": 2, "channel_embed": 16}},
                                "num_classes": 3}},
        "data": {"init_args": {"root": str(root), "batch_size": 4, "num_workers": 0}},
        "trainer": {"fast_dev_run": True, "enable_progress_bar": False},
    })


def test_pretrain_recipe_runs_on_chips(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tile, _, _ = synthetic_scene(2, 96, np.random.default_rng(0))
    write_geotiff(tmp_path / "big" / "scene.tif", tile[[1, 2, 3, 4, 5, 6, 7, 8, 11, 12]])
    _fit(tmp_path, "pretrain-satmae-chips.yaml", {
        "model": {"init_args": {"model": {"init_args": {"img_size": 32, "embed_dim": 64, "depth": 1, "num_heads": 2, "channel_embed": 16,
                                                         "decoder_embed_dim": 32, "decoder_depth": 1, "decoder_num_heads": 2,
                                                         "decoder_channel_embed": 8}}}},
        "data": {"init_args": {"paths": [str(tmp_path / "big")], "size": 32, "length": 8, "batch_size": 4}},
        "trainer": {"fast_dev_run": True, "enable_progress_bar": False},
    })


def test_softcon_lora_multilabel_recipe_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root, _ = write_scene_folder(tmp_path / "scenes", per_class=3, size=28, num_classes=3)
    _fit(tmp_path, "finetune-softcon-lora-multilabel.yaml", {
        "model": {"init_args": {"encoder": {"init_args": {"pretrained": None, "img_size": 28, "embed_dim": 32, "depth": 1, "num_heads": 2}},
                                "num_classes": 3}},
        "data": {"init_args": {"csv_path": str(root / "labels.csv"), "chip_size": 28, "batch_size": 4}},
        "trainer": {"fast_dev_run": True, "enable_progress_bar": False},
    })


def test_softcon_pretrain_recipe_runs_on_cover_fractions(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root, names = write_scene_folder(tmp_path / "scenes", per_class=3, size=28, num_classes=3)
    _fit(tmp_path, "pretrain-softcon-geotiff.yaml", {
        "model": {"init_args": {"model": {"init_args": {"pretrained": None, "img_size": 28, "embed_dim": 32, "depth": 1, "num_heads": 2}},
                                "objective": {"init_args": {"feature_dim": 32, "projection_dim": 16}}}},
        "data": {"init_args": {"csv_path": str(root / "labels.csv"), "label_columns": [f"cover_{n}" for n in names],
                               "chip_size": 28, "batch_size": 4}},
        "trainer": {"fast_dev_run": True, "enable_progress_bar": False},
    })


def test_softcon_segmentation_recipe_fits_a_spatial_fold(tmp_path, monkeypatch):
    import torch

    from polyfm.geo.bands import SENTINEL2_BANDS
    from polyfm.geo.samples import synthetic_dataset

    monkeypatch.chdir(tmp_path)
    data = synthetic_dataset(8, size=28, num_classes=3, seed=2)
    rows = ["image,mask"]
    for i in range(8):  # four 0.01 degree blocks, two tiles each, centres well inside their block
        origin = (10.005 + 0.01 * (i % 4), 50.0 - 0.003 * (i // 4))
        write_geotiff(tmp_path / "tiles" / f"img{i}.tif", data["images"][i], list(SENTINEL2_BANDS), origin=origin)
        write_geotiff(tmp_path / "tiles" / f"mask{i}.tif", data["classmaps"][i][None].astype(np.uint8), origin=origin)
        rows.append(f"img{i}.tif,mask{i}.tif")
    (tmp_path / "tiles" / "pairs.csv").write_text("\n".join(rows) + "\n")
    vit = {"pretrained": None, "img_size": 28, "embed_dim": 32, "depth": 1, "num_heads": 2}
    _fit(tmp_path, "finetune-softcon-segmentation-geotiff.yaml", {
        "model": {"init_args": {"model": {"init_args": {"encoder": {"init_args": vit}, "num_classes": 3, "decoder_channels": 16}},
                                "num_classes": 3, "optim": {"warmup_steps": 0}}},
        "data": {"init_args": {"csv_path": str(tmp_path / "tiles" / "pairs.csv"), "num_classes": 3, "batch_size": 2, "num_workers": 0,
                               "fold": 0, "num_folds": 4, "block_size": 0.01}},
        "trainer": {"max_epochs": 1, "limit_train_batches": 2, "limit_val_batches": 1, "num_sanity_val_steps": 0, "accelerator": "cpu",
                    "devices": 1, "enable_progress_bar": False, "enable_model_summary": False, "default_root_dir": str(tmp_path / "run")},
    })
    last = list((tmp_path / "run").rglob("last.ckpt"))
    assert len(last) == 1
    checkpoint = torch.load(last[0], map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == 2  # two optimizer steps on the fold's 6 training tiles
    (state,) = [v for k, v in checkpoint["callbacks"].items() if k.startswith("ModelCheckpoint")]
    assert 0.0 <= float(state["best_model_score"]) <= 1.0  # val/miou was computed on the held-out block
    assert checkpoint["state_dict"]["model.decoder.classifier.weight"].shape[0] == 3
