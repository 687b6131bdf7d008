"""The YAML recipes run through `polyfm fit` (LightningCLI), and the demo kit runs end to end."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from polyfm.medseg.samples import write_synthetic_dataset

RECIPES = Path(__file__).parents[1] / "src" / "polyfm" / "medseg" / "recipes"


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    return write_synthetic_dataset(tmp_path_factory.mktemp("phantoms"), n_labelled=3, n_unlabelled=2, shape=(40, 40, 16))


def test_medseg_recipes_are_all_listed() -> None:
    assert {p.name for p in RECIPES.glob("*.yaml")} == {
        "pretrain-volume-fusion-unet.yaml", "pretrain-swin-ssl.yaml", "finetune-unet.yaml", "finetune-dynunet.yaml", "finetune-swin-unetr-lora.yaml",
    }  # fmt: skip


def test_medseg_pretrain_recipe_runs(phantoms, tmp_path) -> None:
    from polyfm.core.cli import main

    main([
        "fit", "--config", str(RECIPES / "pretrain-volume-fusion-unet.yaml"), "--trainer.fast_dev_run=true",
        f"--data.folder={phantoms.parent / 'unlabelled'}", "--data.roi_size=[32,32,16]", "--data.num_workers=0",
        "--model.model.init_args.channels=[4,8,16]", "--model.model.init_args.strides=[2,2]",
        "--model.objective.init_args.block_min=4", "--model.objective.init_args.block_max=8", f"--trainer.default_root_dir={tmp_path}",
    ])  # fmt: skip


def test_medseg_finetune_recipe_runs(phantoms, tmp_path) -> None:
    from polyfm.core.cli import main

    main([
        "fit", "--config", str(RECIPES / "finetune-dynunet.yaml"), "--trainer.fast_dev_run=true",
        f"--data.dataset_json={phantoms}", "--data.roi_size=[32,32,16]", "--data.pixdim=null", "--data.a_min=-175", "--data.a_max=250",
        "--model.roi_size=[32,32,16]", "--model.num_classes=3", "--model.model.init_args.kernel_size=[3,3,3]",
        "--model.model.init_args.strides=[1,2,2]", "--model.model.init_args.filters=[4,8,16]", "--model.model.init_args.deep_supr_num=1",
        f"--trainer.default_root_dir={tmp_path}",
    ])  # fmt: skip


def test_medseg_demo_kit_quick_pretrains_and_finetunes(tmp_path) -> None:
    import lightning as L

    from polyfm.core.adaptation import Adaptation
    from polyfm.medseg.samples import demo_kit

    start = time.perf_counter()
    kit = demo_kit(None, quick=True)
    encoder = kit.make_encoder()
    L.Trainer(max_epochs=kit.pretrain_epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False, default_root_dir=tmp_path).fit(
        kit.make_pretraining(encoder), datamodule=kit.make_pretrain_data()
    )
    task = kit.make_task(encoder, Adaptation(mode="full"))
    trainer = L.Trainer(max_epochs=kit.finetune_epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False, default_root_dir=tmp_path)
    data = kit.make_finetune_data(0.5, 0)
    trainer.fit(task, datamodule=data)
    result = trainer.test(task, datamodule=data, verbose=False)[0]
    assert 0.0 <= result[kit.metric] <= 1.0 and task.model.num_outputs == 3
    assert time.perf_counter() - start < 120  # the demo budget is ~20 s uncontended
