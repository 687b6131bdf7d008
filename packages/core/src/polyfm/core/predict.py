"""What ``polyfm predict`` leaves on disk, and prediction from several checkpoints.

Each domain's writer (``polyfm.<domain>.predict``) subclasses :class:`PredictionFileWriter`
for the parts every field shares: where the files go, which names the classes carry, one
atomic write per file, and the refusal of multi-process runs whose rows would be split.
:class:`Ensemble` averages the predictions of several fine-tuned checkpoints (k-fold
models, seeds) and adds their spread, so every writer can report it."""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import pandas as pd
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info

from polyfm.core.errors import ConfigError
from polyfm.core.files import atomic_path

log = logging.getLogger(__name__)


class PredictionFileWriter(BasePredictionWriter):
    """Base of the domain prediction writers (a Lightning callback in the recipes).

    ``output`` is the file or folder to write (the subclass says which); unset, files go
    under ``<default_root_dir>/predictions``. Writers that gather rows from the whole run
    into one table set ``one_process = True``: a multi-process predict would give each
    process only its share of the rows, so it is refused with what to pass instead.
    Everything written is listed in ``written`` and logged at the end."""

    #: True for writers that build one table from every batch (rows would be split across processes)
    one_process: ClassVar[bool] = False

    def __init__(self, output: str | None = None, write_interval: str = "batch") -> None:
        super().__init__(write_interval=write_interval)  # type: ignore[arg-type]
        self.output = output
        self.written: list[Path] = []

    # -- where ---------------------------------------------------------------------------------
    def predictions_folder(self, trainer: L.Trainer) -> Path:
        """``output`` when it names a folder, else ``<default_root_dir>/predictions``."""
        return Path(self.output) if self.output else Path(trainer.default_root_dir) / "predictions"

    def output_file(self, trainer: L.Trainer, default_name: str) -> Path:
        """``output`` when it names a file, else ``<default_root_dir>/predictions/<default_name>``."""
        return Path(self.output) if self.output else Path(trainer.default_root_dir) / "predictions" / default_name

    # -- what the classes are called -------------------------------------------------------------
    @staticmethod
    def class_names(trainer: L.Trainer, module: L.LightningModule, count: int, default: Callable[[int], str] = str) -> list[str]:
        """The names of the model's ``count`` outputs: the task's ``class_names`` or
        ``target_names``, else the datamodule's, else ``default(i)``. A list of the wrong
        length is an error that names where it came from (it would label columns wrongly)."""
        sources = (module, getattr(trainer, "datamodule", None))
        for source in sources:
            for attribute in ("class_names", "target_names"):
                names = getattr(source, attribute, None) if source is not None else None
                if names:
                    if len(names) != count:
                        raise ConfigError(f"{type(source).__name__}.{attribute} has {len(names)} names {list(names)[:8]} but the model "
                                          f"predicts {count} outputs: give {count} names, or leave it unset")
                    return [str(name) for name in names]
        return [default(i) for i in range(count)]

    # -- writing ---------------------------------------------------------------------------------
    def write_file(self, path: Path, write: Callable[[Path], Any]) -> Path:
        """``write(temporary_path)`` then an atomic rename onto ``path``; recorded in ``written``."""
        with atomic_path(path) as temporary:
            write(temporary)
        self.written.append(path)
        return path

    def write_table(self, path: Path, frame: pd.DataFrame, sep: str = ",") -> Path:
        """A DataFrame as CSV/TSV (no index), atomically."""
        return self.write_file(path, lambda temporary: frame.to_csv(temporary, index=False, sep=sep))

    # -- lifecycle (subclasses override the write hook of their write_interval) -------------------
    def write_on_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, prediction: Any, batch_indices: Sequence[int] | None,
                           batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        pass

    def write_on_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, predictions: Sequence[Any], batch_indices: Sequence[Any]) -> None:
        pass

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.one_process and trainer.world_size > 1:
            raise ConfigError(f"{type(self).__name__} writes one table from every batch, and {trainer.world_size} processes would each "
                              "hold only their share of the rows: predict with --trainer.devices=1 --trainer.num_nodes=1")
        self.written = []
        self.reset()

    def reset(self) -> None:
        """Clear what the previous predict run gathered (subclasses with state)."""

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.finish(trainer, pl_module)
        if self.written:
            shown = ", ".join(str(p) for p in self.written[:3]) + (f" and {len(self.written) - 3} more" if len(self.written) > 3 else "")
            rank_zero_info(f"{type(self).__name__}: wrote {len(self.written)} file(s): {shown}")

    def finish(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Write what was gathered over the run (writers of one table)."""


#: Prediction keys that are averaged over ensemble members (others are taken from the first).
AVERAGED_KEYS = ("probabilities", "prediction", "clipwise_output", "framewise_output", "embedding")


class Ensemble(L.LightningModule):
    """Predict with several fine-tuned checkpoints of one task (k-fold models, seeds) and
    average them: ``probabilities``, ``prediction`` and the other keys of
    :data:`AVERAGED_KEYS` become the member mean, each with ``<key>_std`` beside it (the
    spread across members, an uncertainty estimate; ``correction=1``), and ``labels`` is
    recomputed from the mean probabilities as the task does (argmax over classes).

    ``member`` is the task built as for one checkpoint (a recipe's ``model:``); each
    checkpoint's ``state_dict`` is loaded into a copy of it (``weights_only=True``), with
    the key names of a missing or extra weight in the error. From the command line:
    ``polyfm predict -c recipe.yaml --ckpt_path fold0.ckpt,fold1.ckpt,fold2.ckpt``."""

    def __init__(self, member: L.LightningModule, checkpoints: Sequence[str]) -> None:
        super().__init__()
        if len(checkpoints) < 2:
            raise ConfigError(f"Ensemble needs two or more checkpoints, got {list(checkpoints)}")
        self.checkpoints = [str(c) for c in checkpoints]
        # a task that keeps probabilities only on request (medseg: a CT's are gigabytes) gives them to the mean
        self.keep_probabilities = bool(getattr(member, "predict_probabilities", True))
        if hasattr(member, "predict_probabilities"):
            setattr(member, "predict_probabilities", True)  # noqa: B010 - an attribute of some tasks only
        checkpoints_read = [read_task_checkpoint(path) for path in self.checkpoints]
        self.members: Any = torch.nn.ModuleList(load_task_checkpoint(copy.deepcopy(member), path, state)
                                                for path, state in zip(self.checkpoints, checkpoints_read, strict=True))
        # what else the checkpoints hold that is small (a datamodule's state, e.g. ts scalers), for setup
        self._checkpoint_extras = [{k: v for k, v in state.items() if k not in _BULKY_CHECKPOINT_KEYS} for state in checkpoints_read]
        for name in ("class_names", "target_names", "multilabel", "threshold", "num_classes"):  # what writers read from the task
            if hasattr(member, name):
                setattr(self, name, getattr(member, name))

    def setup(self, stage: str) -> None:
        self._restore_datamodule_state()
        for member in self.members:  # members sit in a ModuleList, which Lightning does not attach
            member.trainer = self.trainer
            member.setup(stage)
        for name in ("class_names", "target_names"):  # a member may take its names from the data in setup
            if getattr(self.members[0], name, None) is not None:
                setattr(self, name, getattr(self.members[0], name))

    def _restore_datamodule_state(self) -> None:
        """What Lightning does for one ``ckpt_path``: the datamodule gets the state its checkpoint saved (the
        scaling its targets were trained in). The members' states must agree, as their outputs are averaged."""
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None:
            return
        key = type(datamodule).__qualname__  # where Lightning saves LightningDataModule.state_dict()
        states = [extras.get(key) for extras in self._checkpoint_extras]
        if all(state is None for state in states):
            return
        for path, state in zip(self.checkpoints[1:], states[1:], strict=True):
            if not _same_state(state, states[0]):
                raise ConfigError(f"the ensemble's checkpoints hold different {key} states ({path} differs from {self.checkpoints[0]}), "
                                  "e.g. scalings fitted on other data, so their outputs cannot be averaged: ensemble checkpoints "
                                  "trained on the same data (folds of one split scheme, seeds), or predict them one at a time")
        datamodule.load_state_dict(states[0])

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            members: Any = self._modules.get("members")
            if members is not None and len(members) and not name.startswith("_"):
                return getattr(members[0], name)  # e.g. encoder_base() for the audio writer
            raise

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return torch.stack([m(*args, **kwargs) for m in self.members]).mean(0)

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        outputs = [member.predict_step(batch, batch_idx) for member in self.members]
        combined = dict(outputs[0])
        for key in AVERAGED_KEYS:
            if key in combined and isinstance(combined[key], torch.Tensor):
                stacked = torch.stack([o[key].float() for o in outputs])
                combined[key] = stacked.mean(0)
                combined[f"{key}_std"] = stacked.std(0, correction=1)
        if "labels" in combined and "probabilities" in combined:
            combined["labels"] = combined["probabilities"].argmax(1, keepdim=True)
        if not self.keep_probabilities:
            combined.pop("probabilities", None)
            combined.pop("probabilities_std", None)
        combined["members"] = len(outputs)
        return combined


#: Checkpoint entries an ensemble does not keep (weights go into the members; the rest is for training).
_BULKY_CHECKPOINT_KEYS = frozenset({"state_dict", "optimizer_states", "lr_schedulers", "callbacks", "loops"})


def _same_state(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and bool(torch.equal(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_state(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_same_state(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def read_task_checkpoint(path: str | Path) -> dict[str, Any]:
    """A Lightning checkpoint, read with ``weights_only=True``; a missing file is named."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"checkpoint {path} does not exist: give the .ckpt files a fit run wrote (its checkpoints folder)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ConfigError(f"{path} holds a {type(state).__name__}, not a checkpoint: give a Lightning .ckpt written by polyfm fit")
    return state


def load_task_checkpoint(task: L.LightningModule, path: str | Path, checkpoint: dict[str, Any] | None = None) -> L.LightningModule:
    """``task`` with the weights of a Lightning checkpoint (its ``state_dict``; ``checkpoint`` when
    already read), read with ``weights_only=True``; keys that do not fit are named, with what to do."""
    path = Path(path)
    state = checkpoint if checkpoint is not None else read_task_checkpoint(path)
    weights = state.get("state_dict", state)
    if not isinstance(weights, dict):
        raise ConfigError(f"{path} holds no state_dict: give a Lightning .ckpt written by polyfm fit")
    own = task.state_dict()
    missing, unexpected = sorted(own.keys() - weights.keys()), sorted(weights.keys() - own.keys())
    resized = [f"{k} {tuple(weights[k].shape)} vs {tuple(own[k].shape)}" for k in own.keys() & weights.keys()
               if isinstance(weights[k], torch.Tensor) and weights[k].shape != own[k].shape]
    if missing or unexpected or resized:
        raise ConfigError(f"{path} does not fit {type(task).__name__}: missing {missing[:5]}, unexpected {unexpected[:5]}, "
                          f"other shapes {sorted(resized)[:3]}; the checkpoint was trained with another model configuration: "
                          "predict with the recipe it was trained with")
    task.load_state_dict(weights)
    task.eval()
    return task


__all__ = ["PredictionFileWriter", "Ensemble", "AVERAGED_KEYS", "load_task_checkpoint", "read_task_checkpoint"]
