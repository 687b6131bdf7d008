"""A user's path through the CLI: pretrain, fine-tune from that checkpoint, predict to NIfTI files named by
input, resume from last.ckpt; and the errors met on the way."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from polyfm.core.errors import ConfigError, DataError
from polyfm.medseg.samples import write_synthetic_dataset

RECIPES = Path(__file__).parents[1] / "src" / "polyfm" / "medseg" / "recipes"
TINY_UNET = ["--model.model.init_args.channels=[4,8,16]", "--model.model.init_args.strides=[2,2]"]


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    return write_synthetic_dataset(tmp_path_factory.mktemp("phantoms"), n_labelled=3, n_unlabelled=2, shape=(40, 40, 16))


@pytest.fixture(scope="module")
def pretrained_ckpt(phantoms, tmp_path_factory) -> Path:
    """One step of the Volume Fusion recipe: its last.ckpt is what a user fine-tunes from."""
    from polyfm.core.cli import main

    root = tmp_path_factory.mktemp("pretrain")
    main([
        "fit", "--config", str(RECIPES / "pretrain-volume-fusion-unet.yaml"), "--trainer.max_steps=1", f"--trainer.default_root_dir={root}",
        f"--data.folder={phantoms.parent / 'unlabelled'}", "--data.roi_size=[32,32,16]", "--data.num_workers=0", "--data.repeats=1",
        *TINY_UNET, "--model.objective.init_args.block_min=4", "--model.objective.init_args.block_max=8", "--trainer.enable_progress_bar=false",
    ])  # fmt: skip
    (last,) = root.glob("lightning_logs/version_*/checkpoints/last.ckpt")
    return last


@pytest.fixture(scope="module")
def finetuned(phantoms, pretrained_ckpt, tmp_path_factory) -> Path:
    """finetune-unet.yaml from the pretraining checkpoint, one step, validated: its run folder."""
    from polyfm.core.cli import main

    root = tmp_path_factory.mktemp("finetune")
    main([
        "fit", "--config", str(RECIPES / "finetune-unet.yaml"), f"--model.pretrained={pretrained_ckpt}", f"--data.dataset_json={phantoms}",
        "--data.roi_size=[32,32,16]", "--model.roi_size=[32,32,16]", "--data.pixdim=null", "--data.num_samples=1", "--model.num_classes=3",
        *TINY_UNET, "--trainer.max_steps=1", "--trainer.check_val_every_n_epoch=1", f"--trainer.default_root_dir={root}",
        "--trainer.enable_progress_bar=false",
    ])  # fmt: skip
    return root


def test_medseg_task_starts_from_a_pretraining_checkpoint_with_a_fresh_head(pretrained_ckpt) -> None:
    from polyfm.medseg.models import UNet
    from polyfm.medseg.tasks import VolumeSegmentation

    saved = torch.load(pretrained_ckpt, map_location="cpu", weights_only=True)["state_dict"]
    task = VolumeSegmentation(UNet(spatial_dims=3, out_channels=2, channels=[4, 8, 16], strides=[2, 2]), num_classes=3, pretrained=str(pretrained_ckpt))
    heads = tuple(f"{h}." for h in task.model.head_names())
    state = task.model.state_dict()
    body = [k for k in state if not k.startswith(heads)]
    assert body and all(torch.equal(state[k], saved[f"model.{k}"]) for k in body)  # encoder and decoder transfer
    assert task.model.num_outputs == 3 and saved["model.model.2.0.conv.weight"].shape[1] == 5  # the 5-class fusion head is not ours
    same = VolumeSegmentation(UNet(spatial_dims=3, out_channels=5, channels=[4, 8, 16], strides=[2, 2]), num_classes=5, pretrained=str(pretrained_ckpt))
    assert all(torch.equal(v, saved[f"model.{k}"]) for k, v in same.model.state_dict().items())  # a head that fits is kept


def test_medseg_training_without_validation_cases_runs_and_test_says_what_to_add(phantoms, tmp_path) -> None:
    import lightning as L

    from polyfm.medseg.data import SegmentationDataModule
    from polyfm.medseg.models import UNet
    from polyfm.medseg.tasks import VolumeSegmentation

    only_training = tmp_path / "dataset.json"  # one labelled case, nothing held out: a first try on one's own scan
    description = json.loads(phantoms.read_text())
    only_training.write_text(json.dumps({"labels": description["labels"], "training": [{k: str(phantoms.parent / v) for k, v in description["training"][0].items()}]}))
    data = SegmentationDataModule(str(only_training), roi_size=[32, 32, 16], num_samples=1, batch_size=1, val_fraction=0.0)
    task = VolumeSegmentation(UNet(channels=[4, 8], strides=[2]), num_classes=3, roi_size=[32, 32, 16])
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(task, datamodule=data)  # was: TypeError "object of type 'NoneType' has no len()"
    assert trainer.global_step == 1
    with pytest.raises(DataError, match=r"dataset.json: has no labelled cases to evaluate on: keep val_fraction > 0 .* add a 'test' list"):
        trainer.test(task, datamodule=data)


def test_medseg_recipe_checkpoint_predicts_nifti_named_by_input_on_its_grid(phantoms, finetuned) -> None:
    from polyfm.core.cli import main

    run = finetuned / "lightning_logs" / "version_0"  # the fit's (predict and resume add versions)
    assert (run / "checkpoints" / "last.ckpt").exists()
    main(["predict", "--config", str(run / "config.yaml"), "--ckpt_path", str(run / "checkpoints" / "last.ckpt"), "--trainer.enable_progress_bar=false"])
    tests = [phantoms.parent / c["image"] for c in json.loads(phantoms.read_text())["test"]]
    for image in tests:  # dataset.json's test list, each on its own grid, named by input
        out = finetuned / "predictions" / image.name.replace(".nii.gz", "_seg.nii.gz")
        source, written = nib.load(str(image)), nib.load(str(out))
        assert written.shape == source.shape and np.allclose(written.affine, source.affine) and written.get_data_dtype() == np.uint8
        assert set(np.unique(np.asarray(written.dataobj))) <= {0, 1, 2}
        sidecar = json.loads(out.with_name(out.name.replace(".nii.gz", ".json")).read_text())
        assert sidecar["labels"] == {"0": "background", "1": "liver", "2": "spleen"} and sidecar["source"] == str(image)


def test_medseg_recipe_resumes_from_last_ckpt(phantoms, finetuned, caplog) -> None:
    import logging

    from polyfm.core.cli import main

    run = finetuned / "lightning_logs" / "version_0"
    caplog.set_level(logging.INFO, logger="lightning.pytorch")
    main(["fit", "--config", str(run / "config.yaml"), "--ckpt_path", str(run / "checkpoints" / "last.ckpt"), "--trainer.max_steps=2", "--trainer.enable_progress_bar=false"])
    resumed = max(finetuned.glob("lightning_logs/version_*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
    assert "Restored all states from the checkpoint" in caplog.text  # weights, optimizer, loops: one more step, not two from scratch
    assert torch.load(resumed, map_location="cpu", weights_only=True)["global_step"] == 2


def test_medseg_task_class_count_that_differs_from_the_data_is_refused_naming_the_key(phantoms, tmp_path) -> None:
    import lightning as L

    from polyfm.medseg.data import SegmentationDataModule
    from polyfm.medseg.models import UNet
    from polyfm.medseg.tasks import VolumeSegmentation

    data = SegmentationDataModule(str(phantoms), roi_size=[32, 32, 16], num_samples=1, batch_size=1, val_fraction=0.0)
    trainer = L.Trainer(fast_dev_run=True, logger=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"num_classes=2 .* has 3 classes.*--model.num_classes=3"):
        trainer.fit(VolumeSegmentation(UNet(channels=[4, 8], strides=[2]), num_classes=2), datamodule=data)
    task = VolumeSegmentation(UNet(channels=[4, 8], strides=[2]), num_classes=3)
    trainer.fit(task, datamodule=data)
    assert task.class_names == ["background", "liver", "spleen"]  # logged as val/dice/liver, not val/dice/1


def test_medseg_test_writes_per_case_metrics_named_by_file(phantoms, tmp_path) -> None:
    import csv

    import lightning as L

    from polyfm.medseg.data import SegmentationDataModule
    from polyfm.medseg.models import UNet
    from polyfm.medseg.tasks import VolumeSegmentation

    data = SegmentationDataModule(str(phantoms), roi_size=[32, 32, 16], num_samples=1, batch_size=1)
    task = VolumeSegmentation(UNet(channels=[4, 8], strides=[2]), num_classes=3, roi_size=[32, 32, 16])
    trainer = L.Trainer(logger=L.pytorch.loggers.CSVLogger(tmp_path), enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    result = trainer.test(task, datamodule=data, verbose=False)[0]
    (table,) = tmp_path.glob("**/test_per_case.csv")
    rows = list(csv.DictReader(table.open()))
    assert [Path(r["case"]).name for r in rows] == ["phantom_003.nii.gz", "phantom_004.nii.gz"]  # dataset.json's labelled test list
    assert set(rows[0]) == {"case", *(f"{m}/{c}" for m in ("dice", "hd95", "surface_dice") for c in ("liver", "spleen"))}
    mean_liver = np.nanmean([float(r["dice/liver"]) for r in rows])
    assert mean_liver == pytest.approx(result["test/dice/liver"], abs=1e-4)  # the per-case values are the logged ones


def test_medseg_prediction_files_named_alike_are_refused_not_overwritten(phantoms, tmp_path) -> None:
    import lightning as L

    from polyfm.medseg.data import SegmentationDataModule
    from polyfm.medseg.models import UNet
    from polyfm.medseg.predict import NiftiPredictionWriter, prediction_name
    from polyfm.medseg.tasks import VolumeSegmentation

    assert prediction_name("/d/case_7.nii.gz") == "case_7_seg.nii.gz" and prediction_name("a/CT1", "") == "CT1.nii.gz"
    assert prediction_name("x/scan.nii", "pred") == "scan_pred.nii"
    image = phantoms.parent / "imagesTs" / "phantom_003.nii.gz"
    copy = tmp_path / "other" / image.name
    copy.parent.mkdir()
    copy.write_bytes(image.read_bytes())
    data = SegmentationDataModule(str(phantoms), roi_size=[32, 32, 16], predict_files=[str(image), str(copy.parent)])
    writer = NiftiPredictionWriter(output=str(tmp_path / "out"))
    trainer = L.Trainer(logger=False, enable_progress_bar=False, callbacks=[writer], default_root_dir=tmp_path)
    task = VolumeSegmentation(UNet(channels=[4, 8], strides=[2]), num_classes=3, roi_size=[32, 32, 16])
    with pytest.raises(DataError, match=r"both give the prediction file .*phantom_003_seg.nii.gz"):
        trainer.predict(task, datamodule=data, return_predictions=False)
    assert (tmp_path / "out" / "phantom_003_seg.nii.gz").exists()  # the first was written, the second did not overwrite it


DOC = Path(__file__).parents[3] / "docs" / "medseg.md"


def _python_blocks(markdown: str) -> list[str]:
    return [block.split("```", 1)[0] for block in markdown.split("```python\n")[1:]]


@pytest.mark.skipif(not __import__("os").environ.get("POLYFM_DATA_DIR"), reason="needs POLYFM_DATA_DIR (the real sample CT)")
def test_medseg_docs_quick_start_runs(tmp_path, monkeypatch) -> None:
    (quick_start,) = [b for b in _python_blocks(DOC.read_text()) if "POLYFM_DATA_DIR" in b]
    monkeypatch.chdir(tmp_path)
    exec(compile(quick_start, str(DOC), "exec"), {"__name__": "__docs__"})  # exactly as written in the doc
    source = nib.load(str(Path(__import__("os").environ["POLYFM_DATA_DIR"]) / "medseg" / "example_ct.nii.gz"))
    written = nib.load(str(tmp_path / "medseg-quickstart" / "example_ct_seg.nii.gz"))
    assert written.shape == source.shape and np.allclose(written.affine, source.affine)
    sidecar = json.loads((tmp_path / "medseg-quickstart" / "example_ct_seg.json").read_text())
    assert sidecar["labels"] == {"0": "background", "1": "liver", "2": "spleen"}


def test_medseg_cli_predicts_with_a_checkpoint_ensemble_tta_and_probabilities(phantoms, finetuned, tmp_path) -> None:
    """`polyfm predict --ckpt_path a.ckpt,b.ckpt` (core's Ensemble) through the recipe's writer, mirrored, with
    probability and uncertainty maps. Both checkpoints hold the same one-step weights: the spread is zero."""
    from polyfm.core.cli import main

    run = finetuned / "lightning_logs" / "version_0"
    checkpoints = sorted(str(p) for p in (run / "checkpoints").glob("*.ckpt"))
    assert len(checkpoints) == 2  # last.ckpt and the best by val/dice
    main([
        "predict", "--config", str(run / "config.yaml"), "--ckpt_path", ",".join(checkpoints), "--model.predict_probabilities=true",
        "--model.tta_flip_axes=[0,1]", "--trainer.callbacks.init_args.write_probabilities=true",
        "--trainer.callbacks.init_args.probability_dtype=uint8", f"--trainer.callbacks.init_args.output={tmp_path / 'out'}",
        "--trainer.enable_progress_bar=false",
    ])  # fmt: skip
    image = phantoms.parent / json.loads(phantoms.read_text())["test"][0]["image"]
    source = nib.load(str(image))
    stem = tmp_path / "out" / image.name.removesuffix(".nii.gz")
    probabilities, spread = nib.load(f"{stem}_prob.nii.gz"), nib.load(f"{stem}_std.nii.gz")
    assert probabilities.shape == spread.shape == (*source.shape, 3) and np.array_equal(spread.affine, source.affine)
    assert probabilities.get_data_dtype() == np.uint8 and float(spread.get_fdata().max()) == 0.0
    labels = np.asarray(nib.load(f"{stem}_seg.nii.gz").dataobj)
    assert (labels == probabilities.get_fdata().argmax(-1)).mean() > 0.99  # one grid, no resampling; uint8 rounding may tie two classes
    assert json.loads(Path(f"{stem}_seg.json").read_text())["members"] == 2
