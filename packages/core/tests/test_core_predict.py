"""Prediction files and checkpoint ensembles: the shared parts of every domain's ``polyfm predict``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from polyfm.core.cli import checkpoint_list, lightning_main
from polyfm.core.errors import ConfigError
from polyfm.core.files import atomic_path
from polyfm.core.predict import Ensemble, PredictionFileWriter, load_task_checkpoint
from polyfm.core.tasks import Classification, OptimConfig, Segmentation
from polyfm.core.toy import ToyDataModule, ToyEncoder
from polyfm.core.trainer import build_trainer

RECIPE = Path(__file__).parents[1] / "src/polyfm/core/recipes/finetune-toy.yaml"


def test_atomic_path_keeps_the_old_file_when_the_write_fails_and_keeps_the_suffix(tmp_path: Path) -> None:
    target = tmp_path / "out" / "case_seg.nii.gz"
    with atomic_path(target) as temporary:
        assert temporary.name.endswith(".case_seg.nii.gz") and temporary.parent == target.parent
        temporary.write_text("first")
    with pytest.raises(RuntimeError), atomic_path(target) as temporary:
        temporary.write_text("half")
        raise RuntimeError("killed mid-write")
    assert target.read_text() == "first"
    assert [p.name for p in target.parent.iterdir()] == ["case_seg.nii.gz"]  # no temporary left behind


def test_class_names_of_the_wrong_length_are_an_error_naming_their_source() -> None:
    task = Classification(ToyEncoder(), num_classes=3)
    task.class_names = ["cat", "dog"]  # type: ignore[attr-defined]
    trainer = build_trainer(max_epochs=1, loggers=(), enable_progress_bar=False)
    with pytest.raises(ConfigError, match=r"Classification.class_names has 2 names.*predicts 3 outputs"):
        PredictionFileWriter.class_names(trainer, task, 3)
    assert PredictionFileWriter.class_names(trainer, Classification(ToyEncoder(), num_classes=3), 3, lambda i: f"class_{i}") == ["class_0", "class_1", "class_2"]


def _fit_toy(tmp_path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    task = Classification(ToyEncoder(), num_classes=3, optim=OptimConfig(lr=0.01))
    trainer = build_trainer(max_epochs=2, default_root_dir=str(tmp_path / f"seed{seed}"), loggers=(), enable_progress_bar=False)
    trainer.fit(task, ToyDataModule(n_train=128, n_val=64, batch_size=32, seed=seed))
    path = tmp_path / f"seed{seed}.ckpt"
    trainer.save_checkpoint(path)
    return path


def test_ensemble_averages_members_and_reports_their_spread(tmp_path: Path) -> None:
    checkpoints = [_fit_toy(tmp_path, seed) for seed in (0, 1)]
    data = ToyDataModule(n_train=128, n_val=64, batch_size=32)
    trainer = build_trainer(max_epochs=1, default_root_dir=str(tmp_path / "predict"), loggers=(), enable_progress_bar=False)
    members = [load_task_checkpoint(Classification(ToyEncoder(), num_classes=3), c) for c in checkpoints]
    singles = [torch.cat([b["probabilities"] for b in trainer.predict(m, data)]) for m in members]
    assert not torch.allclose(singles[0], singles[1], atol=1e-3)  # two different models, or the test proves nothing
    ensemble = Ensemble(Classification(ToyEncoder(), num_classes=3), [str(c) for c in checkpoints])
    outputs = trainer.predict(ensemble, data)
    mean = torch.cat([b["probabilities"] for b in outputs])
    spread = torch.cat([b["probabilities_std"] for b in outputs])
    torch.testing.assert_close(mean, (singles[0] + singles[1]) / 2)
    torch.testing.assert_close(spread, (singles[0] - singles[1]).abs() / 2**0.5)  # sample std of two values
    assert outputs[0]["members"] == 2 and outputs[0]["meta"][0] == "blob-3-0"


class _PixelModel(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def test_ensemble_recomputes_label_maps_from_the_mean_probabilities(tmp_path: Path) -> None:
    paths = []
    for seed in (0, 1, 2):
        torch.manual_seed(seed)
        task = Segmentation(_PixelModel(), num_classes=3)
        paths.append(tmp_path / f"{seed}.ckpt")
        torch.save({"state_dict": task.state_dict()}, paths[-1])
    ensemble = Ensemble(Segmentation(_PixelModel(), num_classes=3), [str(p) for p in paths])
    batch = {"input": torch.randn(2, 2, 5, 5), "meta": ["a", "b"]}
    out = ensemble.predict_step(batch, 0)
    assert out["labels"].shape == (2, 1, 5, 5)
    assert torch.equal(out["labels"], out["probabilities"].argmax(1, keepdim=True))
    singles = torch.stack([m.predict_step(batch, 0)["probabilities"] for m in ensemble.members])
    torch.testing.assert_close(out["probabilities"], singles.mean(0))


def test_an_ensemble_checkpoint_of_another_model_is_named(tmp_path: Path) -> None:
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": Classification(ToyEncoder(), num_classes=3).state_dict()}, good)
    wide = tmp_path / "wide.ckpt"
    torch.save({"state_dict": Classification(ToyEncoder(width=16), num_classes=3).state_dict()}, wide)
    with pytest.raises(ConfigError, match="wide.ckpt does not fit Classification"):
        Ensemble(Classification(ToyEncoder(), num_classes=3), [str(good), str(wide)])
    with pytest.raises(ConfigError, match="missing.ckpt does not exist"):
        Ensemble(Classification(ToyEncoder(), num_classes=3), [str(good), str(tmp_path / "missing.ckpt")])


def test_polyfm_predict_with_comma_separated_checkpoints_runs_the_ensemble(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    common = ["-c", str(RECIPE), "--trainer.logger=false", "--trainer.max_epochs=1", "--trainer.enable_progress_bar=false"]
    for seed in (0, 1):
        lightning_main(["fit", *common, f"--seed_everything={seed}", f"--trainer.default_root_dir={tmp_path / f'fit{seed}'}"])
    checkpoints = [next((tmp_path / f"fit{seed}").rglob("last.ckpt")) for seed in (0, 1)]
    out = tmp_path / "predict"
    lightning_main(["predict", *common, f"--trainer.default_root_dir={out}", f"--ckpt_path={checkpoints[0]},{checkpoints[1]}"])
    assert checkpoint_list(f"{tmp_path}/fit*/**/last.ckpt") == [str(c) for c in checkpoints]
    assert checkpoint_list(f"{checkpoints[1]}, {checkpoints[0]}") == [str(checkpoints[1]), str(checkpoints[0])]
    assert checkpoint_list("last") == ["last"]
    lightning_main(["predict", *common, f"--trainer.default_root_dir={out}", f"--ckpt_path={tmp_path}/fit*/**/last.ckpt"])
    with pytest.raises(SystemExit):
        lightning_main(["predict", *common, f"--trainer.default_root_dir={out}", f"--ckpt_path={tmp_path}/fold*/last.ckpt"])
    assert "matches no file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        lightning_main(["predict", *common, f"--trainer.default_root_dir={out}", f"--ckpt_path={checkpoints[0]},{tmp_path / 'nope.ckpt'}"])
    assert "nope.ckpt does not exist" in capsys.readouterr().err


def test_polyfm_predict_with_a_writer_does_not_also_keep_every_batch_in_memory(tmp_path: Path) -> None:
    from polyfm.core.cli import run_polyfm_cli

    common = ["-c", str(RECIPE), "--trainer.logger=false", "--trainer.max_epochs=1", "--trainer.enable_progress_bar=false",
              f"--trainer.default_root_dir={tmp_path}"]  # fmt: skip
    plain = run_polyfm_cli(["predict", *common])
    assert plain.trainer.predict_loop.return_predictions is True  # no writer: the return value is the output
    writer = ["--trainer.callbacks+=polyfm.core.predict.PredictionFileWriter"]
    written = run_polyfm_cli(["predict", *common, *writer])
    assert any(type(c).__name__ == "PredictionFileWriter" for c in written.trainer.callbacks)
    assert written.trainer.predict_loop.return_predictions is False
    asked = run_polyfm_cli(["predict", *common, *writer, "--return_predictions=true"])
    assert asked.trainer.predict_loop.return_predictions is True  # the user's choice stands
