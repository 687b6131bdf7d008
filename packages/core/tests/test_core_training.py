"""The engine's training guarantees: exact resume after a real kill, atomic checkpoints,
non-finite losses stopped and traced, tasks and the LightningCLI entry point."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from polyfm.core import Classification, NonFiniteLossError, OptimConfig, Regression, build_trainer
from polyfm.core.data import TensorDictDataset, label_fraction_indices
from polyfm.core.errors import ConfigError
from polyfm.core.toy import ToyDataModule, ToyEncoder
from polyfm.core.trainer import AtomicCheckpointIO, check_output_dir

HERE = Path(__file__).parent
SCRIPT = HERE / "train_toy_script.py"


def run_script(out: Path, epochs: int, sleep: float) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    return subprocess.Popen([sys.executable, str(SCRIPT), str(out), str(epochs), str(sleep)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def test_killed_run_resumes_to_the_same_weights(tmp_path):
    epochs = 5
    reference = run_script(tmp_path / "reference", epochs, 0.0)
    assert reference.wait(timeout=300) == 0, reference.stderr.read().decode()[-2000:]

    out = tmp_path / "killed"
    rng = random.Random(1)
    kills = 0
    for _attempt in range(2):  # kill twice at random points after a checkpoint exists
        proc = run_script(out, epochs, 0.03)
        last = out / "checkpoints" / "last.ckpt"
        start = time.time()
        mtime = last.stat().st_mtime if last.exists() else None
        while time.time() - start < 120 and proc.poll() is None:
            if last.exists() and last.stat().st_mtime != mtime:
                break
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 0.4))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
    assert kills >= 1, "the run finished before it could be killed; slow it down"
    final = run_script(out, epochs, 0.0)
    assert final.wait(timeout=300) == 0, final.stderr.read().decode()[-2000:]

    expected, resumed = load_file(tmp_path / "reference" / "final.safetensors"), load_file(out / "final.safetensors")
    assert expected.keys() == resumed.keys()
    for key in expected:
        assert torch.equal(expected[key], resumed[key]), f"{key} differs after {kills} kill(s) and resume"


def test_interrupted_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "epoch": 1}, path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()

    def dying_save(obj, handle, *args, **kwargs):
        handle.write(b"partial bytes of a checkpoint")
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "epoch": 2}, path)
    monkeypatch.undo()
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
    assert io.load_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"], "temporary file left behind"


class PoisonedData(ToyDataModule):
    def build(self):
        train, val, test = super().build()
        train.inputs = train.inputs.clone()
        train.inputs[5] = float("nan")
        return train, val, test


def test_nan_loss_stops_naming_the_batch_and_keeps_the_last_good_checkpoint(tmp_path):
    L.seed_everything(0)
    task = Classification(ToyEncoder(), 3)
    trainer = build_trainer(max_epochs=1, default_root_dir=str(tmp_path), enable_progress_bar=False, loggers=())
    trainer.fit(task, ToyDataModule(n_train=64, n_val=32))
    last = tmp_path / "checkpoints" / "last.ckpt"
    digest = hashlib.sha256(last.read_bytes()).hexdigest()

    trainer = build_trainer(max_epochs=2, default_root_dir=str(tmp_path), enable_progress_bar=False, loggers=())
    with pytest.raises(NonFiniteLossError, match="blob-1-5"):
        trainer.fit(task, PoisonedData(n_train=64, n_val=32), ckpt_path=str(last))
    assert hashlib.sha256(last.read_bytes()).hexdigest() == digest


def test_unwritable_output_folder_fails_before_training(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(ConfigError, match="not writable"):
        check_output_dir(blocker / "run")


def test_multilabel_classification_masks_missing_labels(tmp_path):
    L.seed_everything(0)
    x = torch.randn(128, 8)
    y = torch.stack([(x[:, 0] > 0), (x[:, 1] > 0), (x[:, 2] + x[:, 3] > 0)], dim=1).float()
    y[::3, 1] = float("nan")  # a third of label 1 unknown
    data = TensorDictDataset(x, y)
    task = Classification(ToyEncoder(), 3, multilabel=True, optim=OptimConfig(lr=1e-2))
    loader = torch.utils.data.DataLoader(data, batch_size=32, shuffle=True)
    trainer = build_trainer(max_epochs=15, default_root_dir=str(tmp_path), enable_progress_bar=False, loggers=(), enable_checkpointing=False)
    trainer.fit(task, loader)
    metrics = trainer.validate(task, torch.utils.data.DataLoader(data, batch_size=64), verbose=False)[0]
    assert metrics["val/map"] > 0.9 and metrics["val/auroc"] > 0.9
    assert torch.isfinite(torch.tensor(metrics["val/loss"]))


def test_regression_learns_in_original_units(tmp_path):
    L.seed_everything(0)
    x = torch.randn(256, 8)
    y = torch.stack([100 + 20 * x[:, 0], -5 + x[:, 1] * x[:, 2]], dim=1)
    y[::4, 1] = float("nan")
    data = TensorDictDataset(x, y)
    observed = y[~torch.isnan(y[:, 1])]
    task = Regression(
        ToyEncoder(),
        2,
        optim=OptimConfig(lr=1e-2),
        target_mean=[y[:, 0].mean().item(), observed[:, 1].mean().item()],
        target_std=[y[:, 0].std().item(), observed[:, 1].std().item()],
    )
    trainer = build_trainer(max_epochs=20, default_root_dir=str(tmp_path), enable_progress_bar=False, loggers=(), enable_checkpointing=False)
    trainer.fit(task, torch.utils.data.DataLoader(data, batch_size=32, shuffle=True))
    metrics = trainer.validate(task, torch.utils.data.DataLoader(data, batch_size=64), verbose=False)[0]
    baseline_rmse = torch.sqrt(((y[:, 0] - y[:, 0].mean()) ** 2).mean()).item()
    assert metrics["val/rmse"] < 0.3 * baseline_rmse and metrics["val/r2"] > 0.8


def test_label_fractions_are_stratified_and_nested():
    labels = [0] * 50 + [1] * 30 + [2] * 20
    small = label_fraction_indices(labels, 0.1, seed=3)
    large = label_fraction_indices(labels, 0.5, seed=3)
    assert [sum(labels[i] == c for i in small) for c in range(3)] == [5, 3, 2]
    assert set(small) <= set(large)
    assert list(label_fraction_indices(labels, 0.1, seed=3)) == list(small)


def test_polyfm_fit_runs_a_yaml_recipe_end_to_end(tmp_path):
    recipe = Path(__import__("polyfm.core", fromlist=["x"]).__file__).parent / "recipes" / "finetune-toy.yaml"
    result = subprocess.run(
        [sys.executable, "-m", "polyfm.core.cli", "fit", "--config", str(recipe), "--trainer.enable_progress_bar=false"],
        cwd=tmp_path,  # the recipe writes under runs/toy, relative to where it is run
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoints = list(tmp_path.rglob("*.ckpt"))
    assert checkpoints, "no checkpoint written"
    metrics_csv = next(tmp_path.rglob("metrics.csv")).read_text()
    assert "val/acc" in metrics_csv
    last_acc = [line for line in metrics_csv.splitlines()[1:] if line.split(",")[0] != ""]
    assert last_acc
    state = torch.load(checkpoints[0], weights_only=True)  # our checkpoints are weights_only-safe
    assert any("lora_A" in k for k in state["state_dict"])


def test_full_disk_fails_before_training(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10 << 30, (10 << 30) - (50 << 20), 50 << 20))
    with pytest.raises(ConfigError, match="only 50 MB free"):
        build_trainer(default_root_dir=str(tmp_path / "run"))


def test_multilabel_macro_metrics_skip_labels_without_both_classes():
    from torchmetrics.classification import MultilabelAUROC

    from polyfm.core.tasks import ObservedLabelsMean

    metric = ObservedLabelsMean(MultilabelAUROC(3, average="none", ignore_index=-1), 3)
    target = torch.tensor([[1, 0, -1], [0, 0, 1], [1, 0, 0], [0, 0, -1]])
    preds = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.3, 0.8], [0.8, 0.2, 0.1], [0.1, 0.9, 0.5]])
    metric.update(preds, target)
    # label 0 is perfectly ranked (1.0), label 1 has no positives (skipped, not counted as 0), label 2 is 1.0
    assert metric.compute().item() == pytest.approx(1.0)


def test_forecast_shape_mismatch_is_refused_not_broadcast():
    from polyfm.core import Forecasting

    class OneChannel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(8, 4)

        def forward(self, past_values):
            return self.proj(past_values[..., 0]).unsqueeze(-1)  # (B, 4, 1)

    task = Forecasting(OneChannel())
    batch = {"past_values": torch.randn(2, 8, 3), "future_values": torch.randn(2, 4, 3)}
    with pytest.raises(ValueError, match=r"forecast shape \(2, 4, 1\) does not match future_values \(2, 4, 3\)"):
        task.training_step(batch, 0)
    one_channel_batch = {**batch, "future_values": batch["future_values"][..., :1]}
    assert torch.isfinite(task.training_step(one_channel_batch, 0))


class _StopAt(L.Callback):
    """Ends the process's run mid-epoch, after a step checkpoint, as a kill would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError("stopped")


def _step_checkpointed_fit(root: Path, stop_at: int | None = None, resume: bool = False, seen: list | None = None):
    L.seed_everything(7)
    task = Classification(ToyEncoder(dropout=0.2), 3, optim=OptimConfig(lr=1e-2, warmup_steps=3), head_dropout=0.1)

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
            if seen is not None:
                seen.append((trainer.current_epoch, batch["input"][:, 0].tolist()))

    callbacks = [Record()] + ([_StopAt(stop_at)] if stop_at else [])
    trainer = build_trainer(max_epochs=2, default_root_dir=str(root), enable_progress_bar=False, loggers=(), deterministic=True,
                            checkpoint_every_n_steps=2, callbacks=callbacks)  # fmt: skip
    last = root / "checkpoints" / "last.ckpt"
    trainer.fit(task, ToyDataModule(n_train=96, n_val=16, batch_size=16), ckpt_path=str(last) if resume else None)
    return task


def test_resume_from_a_mid_epoch_step_checkpoint_sees_the_remaining_batches_and_ends_equal(tmp_path):
    """6 batches an epoch, a checkpoint every 2 steps, stopped after step 9 (mid epoch 2, last
    checkpoint at step 8): the resumed run must train on batches 3..6 of epoch 2, not restart it."""
    reference_seen: list = []
    expected = _step_checkpointed_fit(tmp_path / "reference", seen=reference_seen).state_dict()
    with pytest.raises(RuntimeError, match="stopped"):
        _step_checkpointed_fit(tmp_path / "stopped", stop_at=9)
    resumed_seen: list = []
    resumed = _step_checkpointed_fit(tmp_path / "stopped", resume=True, seen=resumed_seen).state_dict()
    assert resumed_seen == reference_seen[8:], "the resumed run must see exactly the batches the uninterrupted one saw after step 8"
    for key in expected:
        assert torch.equal(expected[key], resumed[key]), f"{key} differs after a mid-epoch resume"


def _cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    recipe = Path(__import__("polyfm.core", fromlist=["x"]).__file__).parent / "recipes" / "finetune-toy.yaml"
    return subprocess.run(
        [sys.executable, "-m", "polyfm.core.cli", args[0], "--config", str(recipe), "--trainer.enable_progress_bar=false", *args[1:]],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip


def test_cli_ckpt_path_last_finds_the_fit_checkpoint_in_a_new_process_or_says_where_it_looked(tmp_path):
    missing = _cli(tmp_path, "test", "--ckpt_path", "last")
    assert missing.returncode == 2, missing.stderr[-2000:]
    assert "--ckpt_path last: no last.ckpt in" in missing.stderr and "runs/toy" in missing.stderr and "Traceback" not in missing.stderr
    fit = _cli(tmp_path, "fit", "--trainer.max_epochs=1")
    assert fit.returncode == 0, fit.stderr[-2000:]
    assert "args parameter" not in fit.stderr  # no LightningCLI warning about args and sys.argv both set
    tested = _cli(tmp_path, "test", "--ckpt_path", "last")
    assert tested.returncode == 0, tested.stderr[-2000:]
    assert "--ckpt_path last ->" in tested.stderr and "last.ckpt" in tested.stderr
    assert "Restoring states from the checkpoint" in tested.stderr or "Loaded model weights from the checkpoint" in tested.stderr


def test_cli_error_message_is_dug_out_of_jsonargparse_wrapping():
    from polyfm.core.cli import polyfm_error_message

    wrapped = ValueError(
        "Does not validate against any of the Union subtypes\nSubtypes: [<class 'LightningModule'>, <class 'NoneType'>]\nErrors:\n"
        "  - Weights 'panns-cnn6' need the file 'Cnn6.pth', which is not in the cache. Put it at /cache/Cnn6.pth.\n"
        "  - Expected a <class 'NoneType'>\nGiven value type: <class 'Namespace'>\nGiven value: Namespace(... the whole config ...)"
    )
    assert polyfm_error_message(wrapped) == "Weights 'panns-cnn6' need the file 'Cnn6.pth', which is not in the cache. Put it at /cache/Cnn6.pth."
    try:
        try:
            raise ConfigError("bad recipe key 'x': use 'y'")
        except ConfigError as inner:
            raise RuntimeError("while instantiating") from inner
    except RuntimeError as outer:
        assert polyfm_error_message(outer) == "bad recipe key 'x': use 'y'"
    assert polyfm_error_message(TypeError("a bug")) is None  # anything else keeps its traceback


def test_a_datamodule_without_validation_split_trains_without_validation(tmp_path):
    from polyfm.core.toy import ToyDataModule

    class TrainOnly(ToyDataModule):
        def build(self):
            train, _, test = super().build()
            return train, None, test

    task = Classification(ToyEncoder(), 3, optim=OptimConfig(lr=1e-2))
    trainer = build_trainer(max_epochs=2, default_root_dir=str(tmp_path), enable_progress_bar=False, loggers=(), enable_checkpointing=False)
    trainer.fit(task, TrainOnly(n_train=64, n_val=16, batch_size=16))
    assert trainer.global_step == 8 and not any(k.startswith("val/") for k in trainer.callback_metrics)


def test_last_checkpoint_holds_the_final_step_when_max_steps_ends_between_step_checkpoints(tmp_path):
    task = Classification(ToyEncoder(), 3, optim=OptimConfig(lr=1e-2))
    trainer = build_trainer(max_epochs=-1, max_steps=5, default_root_dir=str(tmp_path), enable_progress_bar=False, loggers=(),
                            checkpoint_every_n_steps=2)  # fmt: skip
    trainer.fit(task, ToyDataModule(n_train=64, n_val=16, batch_size=16))
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 5
    assert all(torch.equal(last["state_dict"][k], v) for k, v in task.state_dict().items())


def test_pretraining_can_be_tested_on_held_out_data(tmp_path):
    from polyfm.core.toy import toy_kit

    kit = toy_kit()
    encoder = kit.make_encoder()
    task = kit.make_pretraining(encoder)
    trainer = build_trainer(max_epochs=2, default_root_dir=str(tmp_path), enable_progress_bar=False, loggers=(), enable_checkpointing=False)
    data = kit.make_pretrain_data()
    before = trainer.test(task, data, verbose=False)[0]["test/loss"]
    trainer.fit(task, data)
    after = trainer.test(task, data, verbose=False)[0]["test/loss"]
    assert after < 0.8 * before


def test_fold_indices_hold_each_item_out_once_and_never_split_a_group():
    from polyfm.core.data import fold_indices

    held = [fold_indices(23, 5, k, seed=3)[1] for k in range(5)]
    assert sorted(np.concatenate(held).tolist()) == list(range(23))  # each item held out exactly once
    assert sorted(len(h) for h in held) == [4, 4, 5, 5, 5]  # 23 items dealt round-robin
    train, val = fold_indices(23, 5, 2, seed=3)
    assert not set(train) & set(val) and len(train) + len(val) == 23
    assert np.array_equal(fold_indices(23, 5, 2, seed=3)[1], val)  # another process agrees
    groups = ["a"] * 6 + ["b"] * 5 + ["c"] * 4 + ["d"] * 3 + ["e"] * 2 + ["f"] * 2 + ["g"]
    folds = [fold_indices(len(groups), 3, k, groups=groups, seed=0)[1] for k in range(3)]
    for held_out in folds:
        names = {groups[i] for i in held_out}
        for name in names:  # a group is wholly inside one held-out fold
            assert all(groups[i] in names for i in range(len(groups)) if groups[i] == name)
            assert sum(groups[i] == name for i in held_out) == groups.count(name)
    assert sorted(len(f) for f in folds) == [7, 8, 8]  # 6+1 | 5+3 | 4+2+2, largest first into the emptiest
    with pytest.raises(ConfigError, match="2 groups cannot fill 3 folds"):
        fold_indices(4, 3, 0, groups=["x", "x", "y", "y"])
    with pytest.raises(ConfigError, match="fold=5 is not one of the 5 folds"):
        fold_indices(10, 5, 5)
