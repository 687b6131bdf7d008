"""Pretraining objectives through polyfm.core.pretrain.Pretraining; adaptation modes; the demo kit."""

from __future__ import annotations

import time
from pathlib import Path

import lightning as L
import pytest
import torch

from polyfm.audio.models import Cnn6, Cnn14
from polyfm.audio.objectives import AudioSetTagging, ContrastiveAudio
from polyfm.audio.samples import SyntheticAudioDataModule, demo_encoder, demo_kit, synthetic_tagging
from polyfm.core.adaptation import Adaptation
from polyfm.core.pretrain import Pretraining
from polyfm.core.tasks import Classification, OptimConfig


def _fit(module: L.LightningModule, dm: L.LightningDataModule, epochs: int, root: Path) -> L.Trainer:
    trainer = L.Trainer(
        max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=str(root), num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(module, dm)
    return trainer


def test_audioset_tagging_with_mixup_loss_falls(tmp_path: Path) -> None:
    L.seed_everything(0)
    data = synthetic_tagging(64, 0.5, seed=1)
    model = demo_encoder()
    objective = AudioSetTagging(mixup_alpha=1.0)
    batch = {"input": data.inputs[:9], "target": data.targets[:9]}
    model.train()
    out = objective(model, batch)
    assert out["mixup"] == 1.0  # 9 clips -> 4 mixed pairs
    model.eval()
    before = objective(model, {"input": data.inputs, "target": data.targets})["loss"].item()
    model.train()  # Lightning keeps the modes it is given
    _fit(Pretraining(model, objective, OptimConfig(lr=1e-2, weight_decay=0.0)), SyntheticAudioDataModule("tagging", 128, 64, 0.5, batch_size=32), 6, tmp_path)
    model.eval()
    after = objective(model, {"input": data.inputs, "target": data.targets})["loss"].item()
    assert after < 0.8 * before, (before, after)


def test_contrastive_pretraining_loss_falls(tmp_path: Path) -> None:
    L.seed_everything(0)
    data = synthetic_tagging(32, 1.0, seed=3)
    model = demo_encoder()
    objective = ContrastiveAudio(model.feature_dim, projection_dim=16, temperature=0.2)
    g = torch.Generator().manual_seed(0)

    def views() -> dict[str, torch.Tensor]:
        starts = torch.randint(0, 16000, (2, 32), generator=g)
        crop = lambda s: torch.stack([data.inputs[i, int(s[i]) : int(s[i]) + 16000] for i in range(32)])  # noqa: E731
        return {"view1": crop(starts[0]), "view2": crop(starts[1])}

    module = Pretraining(model, objective, OptimConfig(lr=3e-3, weight_decay=0.0))
    optimizer = torch.optim.AdamW(module.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        loss = objective(model, views())["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.85 * sum(losses[:5]) / 5, losses


@pytest.mark.parametrize("mode", ["linear", "freeze", "lora"])
def test_adaptation_modes_train_the_right_parameters(mode: str) -> None:
    encoder = Cnn14(base_channels=4, classes_num=3)
    adaptation = Adaptation(mode=mode, freeze_blocks=3, lora_rank=2, lora_targets=[r"conv_block\d\.conv\d", "fc1"] if mode == "lora" else None)
    task = Classification(encoder, 3, adaptation=adaptation)
    trainable = {n for n, p in task.named_parameters() if p.requires_grad}
    assert {"head.1.weight", "head.1.bias"} <= trainable
    if mode == "linear":
        assert trainable == {"head.1.weight", "head.1.bias"}
    if mode == "freeze":  # bn0, conv_block1, conv_block2 frozen; conv_block3 on trains
        assert not any(n.startswith(("encoder.bn0", "encoder.conv_block1.", "encoder.conv_block2.")) for n in trainable)
        assert any(n.startswith("encoder.conv_block3.") for n in trainable)
    if mode == "lora":
        assert any("lora_A" in n and "conv_block2.conv1" in n for n in trainable)
        assert not any(n.startswith("encoder.") and "lora_" not in n for n in trainable)
    x = torch.randn(2, 16000) * 0.1
    logits = task(x)
    logits.sum().backward()
    assert all(p.grad is not None for n, p in task.named_parameters() if p.requires_grad and not n.startswith("encoder.fc_audioset"))


def test_demo_kit_builtin_quick_runs_and_learns(tmp_path: Path) -> None:
    L.seed_everything(0)
    kit = demo_kit(None, quick=True)
    assert kit.name == "audio" and kit.metric == "test/acc"
    start = time.time()
    encoder = kit.make_encoder()
    _fit(kit.make_pretraining(encoder), kit.make_pretrain_data(), kit.pretrain_epochs, tmp_path / "pre")
    task = kit.make_task(encoder, Adaptation(mode="full"))
    dm = kit.make_finetune_data(1.0, 0)
    trainer = _fit(task, dm, kit.finetune_epochs, tmp_path / "ft")
    accuracy = trainer.test(task, dm, verbose=False)[0]["test/acc"]
    elapsed = time.time() - start
    assert accuracy > 2.5 / 8, accuracy  # 8 sound types: chance is 12.5%
    assert elapsed < 120, elapsed  # well under 20 s on an idle 2-core CPU; generous for a loaded CI box
    Cnn6  # noqa: B018 - the kit's encoder family


def test_multilabel_finetuning_reports_map_and_auroc(tmp_path: Path) -> None:
    L.seed_everything(0)
    task = Classification(demo_encoder(), 8, multilabel=True, optim=OptimConfig(lr=1e-2, weight_decay=0.0, warmup_steps=2))
    dm = SyntheticAudioDataModule("tagging", n_train=192, n_eval=64, clip_seconds=0.5, batch_size=32)
    trainer = _fit(task, dm, 5, tmp_path)
    result = trainer.test(task, dm, verbose=False)[0]
    assert {"test/map", "test/auroc", "test/acc"} <= set(result)
    assert result["test/auroc"] > 0.7 and result["test/map"] > 0.45, result  # random scores: AUROC 0.5, mAP ~0.25
