"""Real data: the Free Spoken Digit Dataset ($POLYFM_DATA_DIR/audio/fsdd, 8 kHz)."""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
import pytest
import soundfile as sf
import torch

from polyfm.audio.data import FSDDDataModule, read_fsdd
from polyfm.audio.models import Cnn6
from polyfm.core.adaptation import Adaptation
from polyfm.core.tasks import Classification, OptimConfig
from polyfm.core.trainer import build_trainer

DATA = os.environ.get("POLYFM_DATA_DIR")
pytestmark = pytest.mark.skipif(not DATA or not (Path(DATA) / "audio" / "fsdd" / "recordings").is_dir(), reason="POLYFM_DATA_DIR/audio/fsdd not available")


def test_fsdd_split_follows_the_dataset() -> None:
    root = Path(DATA) / "audio" / "fsdd"  # type: ignore[arg-type]
    train, train_labels, classes = read_fsdd(root, "train")
    test, _, _ = read_fsdd(root, "test")
    assert classes == [str(d) for d in range(10)]
    assert len(train) == 2250 and len(test) == 250
    assert all(int(p.stem.split("_")[2]) < 5 for p in test) and all(int(p.stem.split("_")[2]) >= 5 for p in train)
    assert train_labels[0] == int(train[0].name[0])


def test_8khz_input_reaches_the_model_at_32khz() -> None:
    dm = FSDDDataModule(sample_rate=32000, clip_seconds=1.0, batch_size=4, random_crop=False)
    dm.setup()
    batch = next(iter(dm.test_dataloader()))
    source, rate = sf.read(batch["meta"][0], dtype="float32")
    assert rate == 8000
    assert batch["input"].shape == (4, 32000)  # 1 s at 32 kHz, not 8000 samples
    # the resampled clip has 4x the samples of the source and the same content:
    # every 4th sample of the band-limited interpolation is the source sample
    n = min(len(source), 8000)
    resampled = batch["input"][0, : 4 * n : 4].numpy()
    assert abs(float((resampled - source[:n]).std())) < 0.05 * float(source[:n].std()) + 1e-4
    seen: list[tuple[int, ...]] = []
    model = Cnn6(base_channels=4, classes_num=10).eval()
    model.frontend.register_forward_hook(lambda module, inputs, output: seen.append((tuple(inputs[0].shape), tuple(output.shape))))
    with torch.no_grad():
        model(batch["input"])
    assert seen == [((4, 32000), (4, 1, 101, 64))]  # 1 + 32000 // 320 frames


def test_finetune_on_train_split_beats_chance_by_far(tmp_path: Path) -> None:
    """A small Cnn6 trained from scratch on (part of) the train split, scored on the
    dataset's own test split (index 0-4, all 250 clips). Chance is 10%."""
    L.seed_everything(0)
    dm = FSDDDataModule(sample_rate=32000, clip_seconds=0.5, max_train_clips=1000, val_indices=[], cache=True, batch_size=32)
    encoder = Cnn6(base_channels=4, mel_bins=32, hop_size=640, classes_num=10, spec_augment=False, block_dropout=0.0, head_dropout=0.0)
    task = Classification(encoder, 10, optim=OptimConfig(lr=1e-2, weight_decay=0.01, warmup_steps=5))
    trainer = build_trainer(
        max_epochs=8, default_root_dir=str(tmp_path), enable_progress_bar=False, enable_checkpointing=False,
        loggers=(), limit_val_batches=0, precision="32-true",
    )  # fmt: skip
    trainer.fit(task, dm)
    result = trainer.test(task, dm, verbose=False)[0]
    assert len(dm.test_set) == 250
    print(f"FSDD test accuracy (250 clips, chance 0.10): {result['test/acc']:.3f}")
    assert result["test/acc"] > 0.6, result


def test_demo_kit_with_real_data_builds_fsdd_runs() -> None:
    from polyfm.audio.samples import demo_kit

    kit = demo_kit(Path(DATA), quick=True)  # type: ignore[arg-type]
    assert kit.target == "fsdd-digits" and "FSDD" in kit.data_source
    pretrain = kit.make_pretrain_data()
    pretrain.setup()
    views = next(iter(pretrain.train_dataloader()))
    assert views["view1"].shape == views["view2"].shape == (32, 16000)
    finetune = kit.make_finetune_data(0.25, 0)
    finetune.setup()
    assert 200 <= len(finetune.train_set) <= 300 and len(finetune.test_set) == 250  # a quarter of 1000 clips, stratified
    encoder = kit.make_encoder()
    task = kit.make_task(encoder, Adaptation(mode="linear"))
    batch = next(iter(finetune.test_dataloader()))
    assert task(batch["input"]).shape == (32, 10)
