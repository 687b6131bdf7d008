"""Fine-tuning through polyfm.core.tasks on generated 13-band GeoTIFF scenes: multi-class, multi-label,
linear probe, LoRA, and segmentation with mIoU."""

from __future__ import annotations

import pytest
import torch

from polyfm.core.adaptation import Adaptation
from polyfm.core.tasks import Classification, OptimConfig
from polyfm.geo.bands import SENTINEL2_BANDS
from polyfm.geo.data import GeoTiffDataModule, GeoTiffSegmentationDataModule
from polyfm.geo.models.satmae import SatMAE
from polyfm.geo.models.segmentation import DenseSegmenter
from polyfm.geo.models.softcon import SoftConResNet50, SoftConViT
from polyfm.geo.samples import synthetic_dataset, write_geotiff, write_scene_folder
from polyfm.geo.tasks import GeoClassification, GeoSegmentation
from polyfm.geo.weights import WEIGHTS

NUM_CLASSES = 4
SATMAE_META = next(w for w in WEIGHTS if w.family == "satmae").meta


@pytest.fixture(scope="module")
def scene_root(tmp_path_factory):
    root, _ = write_scene_folder(tmp_path_factory.mktemp("ft"), per_class=30, size=16, num_classes=NUM_CLASSES, seed=7)
    return root


def tiny_satmae() -> SatMAE:
    torch.manual_seed(0)
    model = SatMAE(img_size=16, patch_size=4, embed_dim=48, channel_embed=16, depth=2, num_heads=4, decoder_depth=0,
                   normalization=SATMAE_META["normalization"])
    model.adapt_bands(list(SENTINEL2_BANDS))  # the files carry all 13 bands; SatMAE reads its 10 by name
    return model


def datamodule(root, model, **kwargs) -> GeoTiffDataModule:
    dm = GeoTiffDataModule(bands=list(SENTINEL2_BANDS), root=str(root), normalization=model.input_normalization(),
                           batch_size=16, val_fraction=0.25, test_fraction=0.25, **kwargs)
    return dm


def test_multiclass_far_above_chance(scene_root, trainer_factory):
    model = tiny_satmae()
    dm = datamodule(scene_root, model)
    task = Classification(model, NUM_CLASSES, optim=OptimConfig(lr=2e-3, weight_decay=0.01))
    trainer = trainer_factory(epochs=15)
    trainer.fit(task, dm)
    result = trainer.test(task, dm, verbose=False)[0]
    assert result["test/acc"] >= 0.7, result  # chance is 0.25


def test_multilabel_map(scene_root, trainer_factory):
    model = tiny_satmae()
    dm = GeoTiffDataModule(bands=list(SENTINEL2_BANDS), csv_path=str(scene_root / "labels.csv"), label_column="tags", multilabel=True,
                           normalization=model.input_normalization(), batch_size=16, val_fraction=0.25, test_fraction=0.25)
    task = Classification(model, NUM_CLASSES, multilabel=True, optim=OptimConfig(lr=2e-3, weight_decay=0.01))
    trainer = trainer_factory(epochs=15)
    trainer.fit(task, dm)
    result = trainer.test(task, dm, verbose=False)[0]
    targets = torch.stack([dm.test_set[i]["target"] for i in range(len(dm.test_set))])
    prevalence = targets.mean().item()  # the mAP of a constant score
    assert result["test/map"] > prevalence + 0.25 and result["test/map_micro"] > prevalence + 0.25, (result, prevalence)


@pytest.mark.parametrize("mode", ["linear", "lora"])
def test_linear_probe_and_lora_train_only_what_they_should(scene_root, trainer_factory, mode):
    model = tiny_satmae()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dm = datamodule(scene_root, model)
    adaptation = Adaptation(mode=mode, lora_rank=4, lora_targets=[r"attn\.qkv", r"mlp\.fc\d"])
    # MAE's probe head: BatchNorm1d(affine=False) before the linear layer
    task = GeoClassification(model, NUM_CLASSES, adaptation=adaptation, optim=OptimConfig(lr=1e-2 if mode == "linear" else 3e-3, weight_decay=0.0))
    head = {"head.2.weight", "head.2.bias"}
    trainable = {n for n, p in task.named_parameters() if p.requires_grad}
    if mode == "linear":
        assert trainable == head
    else:
        assert trainable - head and all("lora_" in n for n in trainable if n.startswith("encoder."))
    trainer = trainer_factory(epochs=8)
    trainer.fit(task, dm)
    for name, value in task.encoder.state_dict().items():
        if "lora_" not in name and "base_layer" not in name and name in before:
            torch.testing.assert_close(value, before[name], msg=f"{name} changed under {mode}")
    result = trainer.test(task, dm, verbose=False)[0]
    assert result["test/acc"] > 0.5, result  # chance 0.25 (measured: linear 0.81, LoRA 0.62)


def test_softcon_resnet_and_vit_encoders_fit_the_task_contract():
    x = torch.rand(2, 13, 28, 28)
    for encoder in (SoftConResNet50(in_chans=13), SoftConViT(in_chans=13, img_size=28, embed_dim=32, depth=2, num_heads=2)):
        groups = encoder.param_groups(1e-3, 0.05, layer_decay=0.5)
        assert min(g["lr"] for g in groups) < 1e-3 / 8  # LLRD reaches the stem
        first = encoder.block_names()[:2]
        task = Classification(encoder, 3, adaptation=Adaptation(mode="freeze", freeze_blocks=2))
        assert task(x).shape == (2, 3)
        frozen = {n for n, p in encoder.named_parameters() if not p.requires_grad}
        assert frozen and all(n.split(".")[0] in {f.split(".")[0] for f in first} for n in frozen)
    assert all(p.requires_grad is False for n, p in encoder.named_parameters() if n in ("cls_token", "pos_embed"))


@pytest.fixture(scope="module")
def segmentation_csv(tmp_path_factory):
    root = tmp_path_factory.mktemp("seg")
    data = synthetic_dataset(48, size=16, num_classes=3, seed=5)
    rows = ["image,mask"]
    for i in range(48):
        write_geotiff(root / f"img{i}.tif", data["images"][i], list(SENTINEL2_BANDS))
        write_geotiff(root / f"mask{i}.tif", data["classmaps"][i][None])
        rows.append(f"img{i}.tif,mask{i}.tif")
    (root / "pairs.csv").write_text("\n".join(rows) + "\n")
    return root / "pairs.csv"


def test_segmentation_miou_beats_majority(segmentation_csv, trainer_factory):
    torch.manual_seed(0)
    encoder = SoftConViT(in_chans=13, img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2,
                         normalization=next(w for w in WEIGHTS if w.name == "softcon-vits14-s2").meta["normalization"])
    model = DenseSegmenter(encoder, num_classes=3, decoder_channels=32)
    dm = GeoTiffSegmentationDataModule(str(segmentation_csv), list(SENTINEL2_BANDS), num_classes=3,
                                       normalization=encoder.input_normalization(), batch_size=8)
    task = GeoSegmentation(model, num_classes=3, optim=OptimConfig(lr=3e-3, weight_decay=0.0))
    trainer = trainer_factory(epochs=8)
    trainer.fit(task, dm)
    result = trainer.test(task, dm, verbose=False)[0]
    labels = torch.cat([dm.test_set[i]["target"].flatten() for i in range(len(dm.test_set))])
    majority = torch.bincount(labels, minlength=3).max().item() / len(labels)
    majority_miou = majority / 3  # predicting the majority everywhere: IoU = its share for one class, 0 for the others
    assert result["test/miou"] > majority_miou + 0.3, (result, majority_miou)
    frozen = Adaptation(mode="freeze", freeze_blocks=len(encoder.block_names()))
    probe = GeoSegmentation(DenseSegmenter(SoftConViT(in_chans=13, img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2), 3), 3, adaptation=frozen)
    assert all(not p.requires_grad for n, p in probe.named_parameters() if n.startswith("model.encoder."))
    assert any(p.requires_grad for n, p in probe.named_parameters() if n.startswith("model.decoder."))


def test_lora_on_resnet_convolutions():
    torch.manual_seed(0)
    encoder = SoftConResNet50(in_chans=13)
    task = Classification(encoder, 3, adaptation=Adaptation(mode="lora", lora_rank=4, lora_targets=[r"layer4\.\d\.conv\d"]))
    trainable = [n for n, p in task.named_parameters() if p.requires_grad and n.startswith("encoder.")]
    assert trainable and all("lora_" in n and "layer4" in n for n in trainable)
    loss = torch.nn.functional.cross_entropy(task(torch.rand(2, 13, 64, 64)), torch.tensor([0, 2]))
    loss.backward()
    assert all(p.grad is not None for n, p in task.named_parameters() if p.requires_grad and "lora_B" in n)


def test_tiled_inference_matches_a_full_pass():
    from polyfm.geo.models.segmentation import TiledInferer

    pixelwise = torch.nn.Conv2d(13, 4, kernel_size=1)  # translation-equivariant, no context: tiles must agree exactly
    x = torch.randn(2, 13, 70, 90)
    with torch.no_grad():
        full = pixelwise(x)
        tiled = TiledInferer(window=32, overlap=0.25, batch_size=3)(x, pixelwise)
        small = TiledInferer(window=128)(x, pixelwise)  # scene smaller than the window: padded, cropped back
    torch.testing.assert_close(tiled, full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(small, full, atol=1e-5, rtol=1e-5)


def test_segmentation_miou_is_split_level_and_leaves_nodata_out(trainer_factory):
    """mIoU as EO benchmarks count it: per-class IoU over all valid pixels of the split
    (one confusion matrix), averaged over the classes present; nodata pixels count nowhere."""
    torch.manual_seed(0)
    model = torch.nn.Conv2d(2, 3, 3, padding=1)
    task = GeoSegmentation(model, num_classes=3)
    g = torch.Generator().manual_seed(3)
    batches = []
    for _ in range(3):
        x = torch.randn(4, 2, 10, 10, generator=g)
        target = torch.randint(0, 3, (4, 1, 10, 10), generator=g)
        batches.append({"input": x, "target": target, "valid": torch.rand(4, 10, 10, generator=g) > 0.3})
    loader = torch.utils.data.DataLoader(batches, batch_size=None)
    result = trainer_factory(epochs=1).validate(task, loader, verbose=False)[0]
    confusion = torch.zeros(3, 3)
    with torch.no_grad():
        for b in batches:
            keep = b["valid"]
            pred, true = model(b["input"]).argmax(1)[keep], b["target"][:, 0][keep]
            confusion += torch.bincount(true * 3 + pred, minlength=9).reshape(3, 3).float()
    iou = confusion.diag() / (confusion.sum(0) + confusion.sum(1) - confusion.diag())
    assert result["val/miou"] == pytest.approx(float(iou.mean()), abs=1e-6)
