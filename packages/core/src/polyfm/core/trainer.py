"""One way to build a Trainer: GPU (bf16, DDP, multi-node) when present, CPU otherwise.

Checkpoints are written atomically and carry RNG state, so a killed run resumes
exactly with ``trainer.fit(..., ckpt_path="last")``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, RichProgressBar

from polyfm.core.errors import CheckpointError, ConfigError
from polyfm.core.files import atomic_path


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write to a temporary file in the same folder, fsync, then rename: a checkpoint
    either exists whole or not at all, and the previous one survives a crash mid-write.
    Reads with ``weights_only=True`` only."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        with atomic_path(path) as temporary, open(temporary, "wb") as handle:
            torch.save(checkpoint, handle)

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = True) -> dict[str, Any]:
        try:
            return torch.load(path, map_location=map_location or "cpu", weights_only=True)
        except FileNotFoundError:
            raise
        except Exception as exc:
            raise CheckpointError(f"Cannot resume from {path}: {exc}. polyfm reads checkpoints with weights_only=True.") from exc


class PolyfmProgressBar(RichProgressBar):
    """Rich's bar, but its metrics are read every ``metrics_every_n_steps`` steps, not
    every batch: each read is a ``.item()``, which on a GPU makes the host wait for the
    step to finish and leaves the GPU idle while the next one is launched. Shows
    ``train/loss`` from the callback metrics (tasks log it without ``prog_bar``, which
    Lightning would convert to a float after every batch)."""

    def __init__(self, metrics_every_n_steps: int = 25, leave: bool = True) -> None:
        super().__init__(leave=leave)
        self.metrics_every_n_steps = metrics_every_n_steps

    def _update_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        training = trainer.training and not trainer.sanity_checking
        if not training or trainer.global_step % self.metrics_every_n_steps == 0:
            super()._update_metrics(trainer, pl_module)

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        loss = trainer.callback_metrics.get("train/loss")
        if isinstance(loss, torch.Tensor):
            metrics["train/loss"] = f"{loss.item():.4g}"
        return metrics


class RestoreLoaderState(Callback):
    """Hands a resumed run's saved train-loader state (``ResumableDataLoader``: where in the
    epoch it stopped) to the loader. Lightning 2.6 drops it when the train loader was built
    early, as it is when ``configure_optimizers`` asks ``trainer.estimated_stepping_batches``
    for the LR schedule (polyfm's tasks do): its own restore then finds the loader set up
    and returns. The loader's iterator only starts at the first batch, after this hook."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        fit_loop = trainer.fit_loop
        if getattr(fit_loop, "_combined_loader_states_to_load", None) and hasattr(fit_loop, "_load_combined_loader_states"):
            fit_loop._load_combined_loader_states()


class SaveLastOnTrainEnd(Callback):
    """When ``max_steps`` ends a run between step checkpoints, ``last.ckpt`` would hold an
    older step: write it once more at the end, so ``last`` always means the trained model."""

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for callback in trainer.checkpoint_callbacks:
            if not isinstance(callback, ModelCheckpoint) or not callback.save_last or not callback.dirpath:
                continue
            if getattr(callback, "_last_global_step_saved", None) != trainer.global_step:
                trainer.save_checkpoint(Path(callback.dirpath) / f"{callback.CHECKPOINT_NAME_LAST}{callback.FILE_EXTENSION}")


def default_callbacks(existing: list[Any], enable_progress_bar: bool = True) -> list[Callback]:
    """What every polyfm run gets unless it brings its own: the exact mid-epoch resume, the
    GPU path, the utilisation monitor (``perf/*`` metrics) and the sync-light progress bar."""
    from lightning.pytorch.callbacks import ProgressBar

    from polyfm.core.performance import GpuPath, UtilisationMonitor

    added: list[Callback] = [cls() for cls in (RestoreLoaderState, SaveLastOnTrainEnd) if not any(isinstance(c, cls) for c in existing)]
    if not any(isinstance(c, GpuPath) for c in existing):
        added.append(GpuPath())
    if not any(isinstance(c, UtilisationMonitor) for c in existing):
        added.append(UtilisationMonitor())
    if enable_progress_bar and not any(isinstance(c, ProgressBar) for c in existing):
        added.append(PolyfmProgressBar())
    return added


def check_output_dir(path: str | os.PathLike[str], min_free_mb: int = 200) -> Path:
    """Fail before training, not after an hour, when the output folder is unusable."""
    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".polyfm-write-probe"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"Output folder {folder} is not writable ({exc}). Choose another with --trainer.default_root_dir.") from exc
    free_mb = shutil.disk_usage(folder).free // (1 << 20)
    if free_mb < min_free_mb:
        raise ConfigError(f"Output folder {folder} has only {free_mb} MB free; checkpoints need at least {min_free_mb} MB.")
    return folder


def default_precision() -> str:
    if torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "32-true"


def build_trainer(
    max_epochs: int = 10,
    max_steps: int = -1,
    default_root_dir: str = "runs/default",
    accelerator: str = "auto",
    devices: int | str = "auto",
    num_nodes: int = 1,
    strategy: Literal["auto", "ddp", "fsdp", "ddp_find_unused_parameters_true"] | str = "auto",
    precision: str | None = None,
    accumulate_grad_batches: int = 1,
    gradient_clip_val: float | None = 1.0,
    log_every_n_steps: int = 10,
    loggers: tuple[str, ...] = ("csv", "tensorboard"),
    checkpoint_every_n_steps: int | None = None,
    monitor: str | None = None,
    monitor_mode: Literal["min", "max"] = "min",
    enable_progress_bar: bool = True,
    enable_checkpointing: bool = True,
    deterministic: bool | Literal["warn"] = False,
    limit_train_batches: int | float | None = None,
    limit_val_batches: int | float | None = None,
    num_sanity_val_steps: int = 0,
    callbacks: list[Callback] | None = None,
    channels_last: bool | str = "auto",
    compile: bool = False,
    **trainer_kwargs: Any,
) -> L.Trainer:
    """A Trainer with polyfm's defaults. Several GPUs: DDP; ``strategy="fsdp"`` for
    models that do not fit one GPU; multi-node launches (torchrun, SLURM) are detected
    by Lightning from the environment with ``num_nodes`` set."""
    root = check_output_dir(default_root_dir)
    if accelerator == "auto":
        accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    if strategy == "auto" and accelerator == "gpu" and torch.cuda.device_count() > 1:
        strategy = "ddp"
    callbacks = list(callbacks or [])
    from polyfm.core.performance import GpuPath

    callbacks.append(GpuPath(channels_last=channels_last, compile=compile))
    callbacks += default_callbacks(callbacks, enable_progress_bar)
    if enable_checkpointing:
        callbacks.append(
            ModelCheckpoint(
                dirpath=root / "checkpoints",
                save_last=True,
                every_n_train_steps=checkpoint_every_n_steps,
                monitor=monitor,
                mode=monitor_mode,
                save_top_k=1,
            )
        )
    return L.Trainer(
        max_epochs=max_epochs,
        max_steps=max_steps,
        default_root_dir=str(root),
        accelerator=accelerator,
        devices=devices,
        num_nodes=num_nodes,
        strategy=strategy,
        precision=precision or default_precision(),  # type: ignore[arg-type]
        accumulate_grad_batches=accumulate_grad_batches,
        gradient_clip_val=gradient_clip_val,
        log_every_n_steps=log_every_n_steps,
        logger=make_loggers(root, loggers),
        callbacks=callbacks,
        enable_progress_bar=enable_progress_bar,
        enable_checkpointing=enable_checkpointing,
        deterministic=deterministic,
        limit_train_batches=limit_train_batches,
        limit_val_batches=limit_val_batches,
        num_sanity_val_steps=num_sanity_val_steps,
        plugins=[AtomicCheckpointIO()],
        **trainer_kwargs,
    )


def make_loggers(root: Path, names: tuple[str, ...]) -> list[Any] | bool:
    from lightning.pytorch import loggers as pl_loggers

    made: list[Any] = []
    for name in names:
        if name == "csv":
            made.append(pl_loggers.CSVLogger(str(root), name="logs"))
        elif name == "tensorboard":
            made.append(pl_loggers.TensorBoardLogger(str(root), name="tensorboard"))
        elif name == "mlflow":
            try:
                made.append(pl_loggers.MLFlowLogger(experiment_name="polyfm", save_dir=str(root / "mlruns")))
            except ModuleNotFoundError as exc:
                raise ConfigError("The mlflow logger needs `pip install polyfm-core[mlflow]`.") from exc
        else:
            raise ConfigError(f"Unknown logger {name!r}: use csv, tensorboard or mlflow.")
    return made or False
