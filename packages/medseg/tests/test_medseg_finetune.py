"""Fine-tuning on the real TotalSegmentator example CT: a few organs, held-out slabs, NIfTI output."""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from polyfm.core.adaptation import Adaptation
from polyfm.core.errors import ConfigError
from polyfm.core.tasks import OptimConfig
from polyfm.core.trainer import build_trainer
from polyfm.medseg.data import SegmentationDataModule
from polyfm.medseg.models import DynUNet, SwinUNETR, UNet
from polyfm.medseg.predict import predict_to_nifti
from polyfm.medseg.samples import ORGANS, organ_label_map, write_slab_dataset
from polyfm.medseg.tasks import VolumeSegmentation

ROI = [32, 32, 16]
ROI_2D = [64, 64]  # the real-data test trains a 2D UNet on axial slices (nnU-Net's 2D configuration): fast on 2 CPU cores
CLASSES = ["background", *ORGANS]


def slab_dataset(tmp_path: Path) -> Path:
    if not os.environ.get("POLYFM_DATA_DIR"):
        pytest.skip("POLYFM_DATA_DIR is not set")
    return write_slab_dataset(os.environ["POLYFM_DATA_DIR"], tmp_path / "slabs")


def datamodule(dataset_json: Path) -> SegmentationDataModule:
    return SegmentationDataModule(
        str(dataset_json), roi_size=ROI_2D, label_map=organ_label_map(), class_names=CLASSES, num_samples=8, batch_size=2,
        val_fraction=0.0, augment=False, a_min=-175.0, a_max=250.0, class_ratios=[1.0] * len(CLASSES), repeats=40,
    )  # fmt: skip


def test_medseg_finetune_real_organs_beats_untrained_and_writes_nifti(tmp_path) -> None:
    dataset_json = slab_dataset(tmp_path)
    results, steps = {}, 80
    for trained in (False, True):
        torch.manual_seed(0)
        model = UNet(spatial_dims=2, out_channels=len(CLASSES), channels=(16, 32, 64), strides=(2, 2), num_res_units=1)
        task = VolumeSegmentation(
            model, len(CLASSES), roi_size=ROI_2D, sw_batch_size=16, slice_axis=2, class_names=CLASSES, optim=OptimConfig(lr=5e-3, weight_decay=1e-4)
        )
        trainer = build_trainer(
            max_steps=steps, max_epochs=-1, limit_val_batches=0, default_root_dir=str(tmp_path / f"run{trained}"),
            enable_progress_bar=False, enable_checkpointing=False, loggers=(),
        )  # fmt: skip
        data = datamodule(dataset_json)
        if trained:
            trainer.fit(task, datamodule=data)
        results[trained] = trainer.test(task, datamodule=data, verbose=False)[0]
    untrained, trained = results[False], results[True]
    # held-out slab (axial slices 10-19, never seen in training): liver, spleen, kidneys, whole-volume slice inference
    assert trained["test/dice"] > untrained["test/dice"] + 0.3, (untrained["test/dice"], trained["test/dice"])
    assert trained["test/dice/liver"] > 0.6
    assert trained["test/hd95"] < untrained["test/hd95"] and trained["test/surface_dice"] > untrained["test/surface_dice"]

    # the prediction written for the held-out slab sits on its grid: Dice from the files agrees
    slab = dataset_json.parent / "images" / "slab_b.nii.gz"
    out = predict_to_nifti(task.model, slab, tmp_path / "pred" / "slab_b_seg.nii.gz", inferer=task.inferer, class_names=CLASSES, a_min=-175.0, a_max=250.0)
    written, source = nib.load(str(out)), nib.load(str(slab))
    assert written.shape == source.shape
    np.testing.assert_allclose(written.affine, source.affine, atol=1e-5)
    predicted = np.asarray(written.dataobj)
    truth = np.asarray(nib.load(str(dataset_json.parent / "labels" / "slab_b.nii.gz")).dataobj)
    liver_pred, liver_true = predicted == 1, truth == 5
    file_dice = 2 * (liver_pred & liver_true).sum() / (liver_pred.sum() + liver_true.sum())
    assert abs(file_dice - trained["test/dice/liver"]) < 0.05


@pytest.mark.parametrize("mode", ["linear", "freeze", "lora"])
def test_medseg_adaptation_modes_train_the_right_parameters(mode: str) -> None:
    model = UNet(spatial_dims=3, out_channels=5, channels=(4, 8, 16), strides=(2, 2), num_res_units=1)
    adaptation = Adaptation(mode=mode, freeze_blocks=2, lora_rank=2)
    task = VolumeSegmentation(model, 3, roi_size=ROI, adaptation=adaptation)
    trainable = {n for n, p in task.model.named_parameters() if p.requires_grad}
    heads = {n for n in trainable if n.startswith("model.2.")}
    assert heads and task.model.num_outputs == 3  # the new head always trains
    if mode == "linear":
        assert trainable == heads
    elif mode == "freeze":
        blocks = task.model.block_names()[:2]
        assert not any(n.startswith(tuple(b + "." for b in blocks)) for n in trainable)
        assert any(n.startswith("model.1.submodule.1.") for n in trainable)
    else:
        lora = {n for n in trainable if "lora_" in n}
        assert lora and any("conv" in n for n in lora) and trainable == lora | heads  # conv-LoRA outside the head
    groups = task.configure_optimizers()["optimizer"].param_groups
    assert sum(len(g["params"]) for g in groups) == len(trainable)
    # one training step moves only trainable weights
    before = {n: p.detach().clone() for n, p in task.model.named_parameters()}
    batch = {"input": torch.randn(2, 1, *ROI), "target": torch.randint(0, 3, (2, 1, *ROI))}
    optimizer = torch.optim.SGD([p for p in task.parameters() if p.requires_grad], lr=0.1)
    task.training_step(batch, 0).backward()
    optimizer.step()
    changed = {n for n, p in task.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= trainable


def test_medseg_dynunet_deep_supervision_and_swin_train_through_the_task() -> None:
    batch = {"input": torch.randn(2, 1, *ROI), "target": torch.randint(0, 3, (2, 1, *ROI))}
    dyn = DynUNet(out_channels=3, kernel_size=[3, 3, 3], strides=[1, 2, 2], filters=[4, 8, 16], deep_supervision=True, deep_supr_num=1)
    task = VolumeSegmentation(dyn, 3, roi_size=ROI)
    task.train()
    assert task(batch["input"]).shape == (2, 2, 3, *ROI)  # two supervised outputs in training
    loss = task.training_step(batch, 0)
    loss.backward()
    assert all(p.grad is not None for p in task.model.deep_supervision_heads.parameters())
    task.eval()
    assert task.infer(batch["input"]).shape == (2, 3, *ROI)  # sliding window, full resolution only

    swin = SwinUNETR(spatial_dims=2, out_channels=7, feature_size=12, depths=(1, 1, 1, 1))
    task = VolumeSegmentation(swin, 3, roi_size=[64, 64], adaptation=Adaptation(mode="lora", lora_rank=2))
    assert any("swinViT.layers1.0.blocks.0.attn.qkv.lora_A" in n for n, p in task.model.named_parameters() if p.requires_grad)
    loss = task.training_step({"input": torch.randn(2, 1, 64, 64), "target": torch.randint(0, 3, (2, 1, 64, 64))}, 0)
    assert torch.isfinite(loss)


def _volume_batch() -> dict:
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(1, 1, 40, 50, 20, generator=generator)  # z (20) smaller than the window (32): padded
    return {"input": x, "target": torch.randint(0, 3, (1, 1, 40, 50, 20), generator=generator)}


@pytest.mark.parametrize("family", ["unet", "segresnet"])
def test_medseg_sliding_window_matches_monai_with_the_device_split(family: str) -> None:
    from monai.inferers import sliding_window_inference

    from polyfm.medseg.models import SegResNet

    torch.manual_seed(0)
    model = UNet(spatial_dims=3, out_channels=3, channels=(4, 8, 16), strides=(2, 2)) if family == "unet" else SegResNet(
        init_filters=8, out_channels=3, blocks_down=(1, 1, 2), blocks_up=(1, 1), norm=("group", {"num_groups": 4}))  # fmt: skip
    task = VolumeSegmentation(model, 3, roi_size=[32, 32, 32], sw_batch_size=2, overlap=0.25, sw_device="cpu", output_device="cpu").eval()
    assert task.inferer.sw_device == "cpu" and task.inferer.device == "cpu"
    batch = _volume_batch()
    with torch.no_grad():
        ours = task.infer(batch["input"])
        reference = sliding_window_inference(batch["input"], (32, 32, 32), 2, task.model, overlap=0.25, mode="gaussian", sw_device="cpu", device="cpu")
        torch.testing.assert_close(ours, reference, atol=0, rtol=0)
        assert ours.shape == (1, 3, 40, 50, 20)
        task.test_step(batch, 0)  # the metrics take the label map wherever the logits were stitched
    assert task.hd95.aggregate().shape == (1, 2)
    with pytest.raises(ConfigError, match="need roi_size"):
        VolumeSegmentation(UNet(spatial_dims=3, out_channels=3, channels=(4, 8, 16), strides=(2, 2)), 3, output_device="cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_medseg_windows_on_gpu_logits_on_host() -> None:
    model = UNet(spatial_dims=3, out_channels=3, channels=(4, 8, 16), strides=(2, 2))
    task = VolumeSegmentation(model, 3, roi_size=[32, 32, 32], sw_device="cuda", output_device="cpu").cuda().eval()
    batch = {k: v.cuda() for k, v in _volume_batch().items()}
    with torch.no_grad():
        assert task.infer(batch["input"]).device.type == "cpu"
        task.test_step(batch, 0)
    assert task.metrics["test_"].compute().device.type == "cuda"
