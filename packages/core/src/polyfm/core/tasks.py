"""Fine-tuning tasks as LightningModules: classification, regression, segmentation, forecasting.

A batch is a dict. ``batch["input"]`` goes to the encoder as-is; ``batch["target"]``
holds labels; ``batch["meta"]`` (optional) names where each sample came from, so a
non-finite loss can be traced to its files or rows.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, is_dataclass
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
import torchmetrics
from torch import nn

from polyfm.core.adaptation import Adaptation, apply_adaptation, freeze_batchnorm_statistics
from polyfm.core.errors import NonFiniteLossError
from polyfm.core.performance import expected_host_sync


@dataclass
class OptimConfig:
    """AdamW with linear warm-up then cosine (or constant) decay, per optimizer step."""

    lr: float = 1e-3
    weight_decay: float = 0.05
    layer_decay: float = 1.0
    warmup_steps: int = 0
    scheduler: Literal["cosine", "constant"] = "cosine"
    betas: tuple[float, float] = (0.9, 0.999)
    min_lr_ratio: float = 0.0


def _plain(value: Any) -> Any:
    """Hyper-parameters as plain data, so checkpoints load with weights_only=True."""
    if is_dataclass(value) and not isinstance(value, type):
        return {k: _plain(v) for k, v in asdict(value).items()}
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if not isinstance(v, nn.Module)}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return repr(value)


class EngineModule(L.LightningModule):
    """What every task and the pretraining module share: the optimizer and schedule,
    the non-finite-loss guard, RNG state in checkpoints (exact resume), and frozen
    BatchNorm statistics for frozen parts."""

    def __init__(self, optim: OptimConfig | None = None) -> None:
        super().__init__()
        self.optim = optim or OptimConfig()

    # -- optimisation ---------------------------------------------------------------
    def trainable_groups(self) -> list[dict[str, Any]]:
        """Parameter groups; tasks with an encoder override this to apply LLRD."""
        return _decay_groups(self.named_parameters(), self.optim.lr, self.optim.weight_decay)

    def configure_optimizers(self) -> Any:
        groups = [g for g in self.trainable_groups() if g["params"]]
        for group in groups:
            group.pop("names", None)
        if not groups:
            raise ValueError(f"{type(self).__name__} has no trainable parameters: check the adaptation mode.")
        fused = all(p.is_cuda for g in groups for p in g["params"])
        optimizer = torch.optim.AdamW(groups, lr=self.optim.lr, betas=self.optim.betas, fused=fused or None)
        total = max(1, int(self.trainer.estimated_stepping_batches)) if self._trainer is not None else 1
        schedule = _warmup_cosine(self.optim.warmup_steps, total, self.optim.scheduler, self.optim.min_lr_ratio)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- guards -----------------------------------------------------------------------
    def check_finite(self, loss: torch.Tensor, batch: Any, batch_idx: int) -> None:
        """Stop on a non-finite loss, naming the samples. On CPU the check is immediate.
        On CUDA, reading the flag would stall the host until the step's kernels finish,
        so it is copied to pinned host memory without waiting and read once the device
        got there: one or two steps later, and always before a checkpoint is written,
        so no checkpoint ever holds the poisoned weights."""
        meta = batch.get("meta") if isinstance(batch, dict) else None
        where = (self.current_epoch, self.global_step, batch_idx, meta)
        finite = torch.isfinite(loss.detach()).all()
        if loss.device.type != "cuda":
            with expected_host_sync():
                if not finite:
                    raise self._non_finite_error(float(loss.detach().float()), where)
            return
        flag = torch.empty((), dtype=torch.bool, pin_memory=True)
        flag.copy_(finite, non_blocking=True)
        value = torch.empty((), dtype=torch.float32, pin_memory=True)
        value.copy_(loss.detach().float(), non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._pending_finite_checks.append((flag, value, event, where))
        self.resolve_finite_checks(wait=False)

    @property
    def _pending_finite_checks(self) -> list[tuple[torch.Tensor, torch.Tensor, Any, tuple[Any, ...]]]:
        if "_finite_checks" not in self.__dict__:
            self.__dict__["_finite_checks"] = []
        return self.__dict__["_finite_checks"]

    def resolve_finite_checks(self, wait: bool) -> None:
        """Read the flags the device has written (all of them with ``wait``)."""
        pending = self._pending_finite_checks
        while pending and (wait or pending[0][2].query()):
            flag, value, event, where = pending.pop(0)
            event.synchronize()
            if not bool(flag):  # pinned host memory: no device sync
                pending.clear()
                raise self._non_finite_error(float(value), where)

    def _non_finite_error(self, value: float, where: tuple[Any, ...]) -> NonFiniteLossError:
        epoch, step, batch_idx, meta = where
        samples = f" Samples: {meta}." if meta is not None else ""
        return NonFiniteLossError(
            f"Loss is {value} at epoch {epoch}, step {step}, batch {batch_idx}.{samples} Training stopped; the last good "
            "checkpoint is kept. Check those samples for NaN/Inf values, or lower the learning rate."
        )

    def log_train_loss(self, loss: torch.Tensor, batch: Any, batch_idx: int, batch_size: int | None) -> torch.Tensor:
        """The end of every training step: the non-finite guard, then the logged loss.
        Not ``prog_bar=True``: Lightning turns progress-bar values into Python floats after
        every batch, a host sync per step; ``PolyfmProgressBar`` shows it every few steps."""
        self.check_finite(loss, batch, batch_idx)
        self.log("train/loss", loss, batch_size=batch_size)
        return loss

    def on_train_epoch_end(self) -> None:
        self.resolve_finite_checks(wait=True)

    def on_train_end(self) -> None:
        self.resolve_finite_checks(wait=True)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # Lightning restores each submodule's mode itself after validation, so this
        # runs per batch rather than in train(): frozen norms keep their statistics.
        freeze_batchnorm_statistics(self)

    # -- exact resume ---------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.resolve_finite_checks(wait=True)  # never write weights a non-finite step touched
        np_state: Any = np.random.get_state()
        checkpoint["polyfm_rng"] = {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "python": random.getstate(),
            "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        }
        if "hyper_parameters" in checkpoint:
            checkpoint["hyper_parameters"] = _plain(dict(checkpoint["hyper_parameters"]))

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("polyfm_rng")
        if not state:
            return
        torch.set_rng_state(state["torch"])
        if state["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
        random.setstate(_as_tuple(state["python"]))
        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, keys.numpy(), pos, has_gauss, cached))


def _as_tuple(value: Any) -> Any:
    return tuple(_as_tuple(v) for v in value) if isinstance(value, list | tuple) else value


def _decay_groups(named: Any, lr: float, weight_decay: float) -> list[dict[str, Any]]:
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, param in named:
        if param.requires_grad:
            (no_decay if param.ndim <= 1 or name.endswith(".bias") else decay).append(param)
    return [
        {"params": decay, "lr": lr, "weight_decay": weight_decay},
        {"params": no_decay, "lr": lr, "weight_decay": 0.0},
    ]


def _warmup_cosine(warmup: int, total: int, kind: str, min_ratio: float) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


class ObservedLabelsMean(torchmetrics.Metric):
    """Macro average of a per-label multilabel metric over the labels whose evaluation
    targets hold both classes. torchmetrics scores a label with no positives as 0, which
    drags the mean of sparse multi-task sets (Tox21 assays, rare tags) towards zero."""

    full_state_update = False
    positives: torch.Tensor
    negatives: torch.Tensor

    def __init__(self, per_label: torchmetrics.Metric, num_labels: int) -> None:
        super().__init__()
        self.per_label = per_label
        self.add_state("positives", default=torch.zeros(num_labels), dist_reduce_fx="sum")
        self.add_state("negatives", default=torch.zeros(num_labels), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        self.per_label.update(preds, target)
        self.positives += (target == 1).sum(0).float()
        self.negatives += (target == 0).sum(0).float()

    def compute(self) -> torch.Tensor:
        values = self.per_label.compute()
        valid = (self.positives > 0) & (self.negatives > 0)
        return values[valid].mean() if valid.any() else torch.tensor(float("nan"))

    def reset(self) -> None:
        super().reset()
        self.per_label.reset()


class EncoderTask(EngineModule):
    """An encoder plus a head, adapted by ``adaptation``, with layer-wise LR decay."""

    def __init__(self, encoder: nn.Module, adaptation: Adaptation | None, optim: OptimConfig | None) -> None:
        super().__init__(optim)
        self.adaptation = adaptation or Adaptation()
        self.encoder: Any = apply_adaptation(encoder, self.adaptation)  # Any: domain encoders add their own methods

    def head_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.named_parameters() if not n.startswith("encoder.")]

    def trainable_groups(self) -> list[dict[str, Any]]:
        layer_decay = self.adaptation.layer_decay if self.adaptation.layer_decay != 1.0 else self.optim.layer_decay
        if hasattr(self.encoder, "param_groups") and hasattr(self.encoder, "block_names"):
            return self.encoder.param_groups(self.optim.lr, self.optim.weight_decay, layer_decay, extra=self.head_parameters())
        return _decay_groups(self.named_parameters(), self.optim.lr, self.optim.weight_decay)

    def features(self, batch: dict[str, Any]) -> torch.Tensor:
        return self.encoder.forward_features(batch["input"])


class Classification(EncoderTask):
    """Multi-class (``target`` long ``(B,)``) or multi-label (``target`` float ``(B, C)``,
    NaN for a missing label: masked out of the loss and the metrics)."""

    def __init__(
        self,
        encoder: nn.Module,
        num_classes: int,
        multilabel: bool = False,
        adaptation: Adaptation | None = None,
        optim: OptimConfig | None = None,
        class_names: list[str] | None = None,
        head_dropout: float = 0.0,
    ) -> None:
        super().__init__(encoder, adaptation, optim)
        self.save_hyperparameters(ignore=["encoder"])
        self.num_classes, self.multilabel, self.class_names = num_classes, multilabel, class_names
        self.head = nn.Sequential(nn.Dropout(head_dropout), nn.Linear(self.encoder.feature_dim, num_classes))
        self.metrics: Any = nn.ModuleDict({stage: self._metrics() for stage in ("val_", "test_")})

    def _metrics(self) -> torchmetrics.MetricCollection:
        if self.multilabel:
            return torchmetrics.MetricCollection(
                {
                    "map": ObservedLabelsMean(
                        torchmetrics.classification.MultilabelAveragePrecision(self.num_classes, average="none", ignore_index=-1), self.num_classes
                    ),
                    "map_micro": torchmetrics.classification.MultilabelAveragePrecision(self.num_classes, average="micro", ignore_index=-1),
                    "auroc": ObservedLabelsMean(
                        torchmetrics.classification.MultilabelAUROC(self.num_classes, average="none", ignore_index=-1), self.num_classes
                    ),
                    "acc": torchmetrics.classification.MultilabelAccuracy(self.num_classes, ignore_index=-1),
                },
                compute_groups=False,  # the wrappers' inner metrics must each see every update
            )
        return torchmetrics.MetricCollection(
            {
                "acc": torchmetrics.classification.MulticlassAccuracy(self.num_classes, average="micro"),
                "f1": torchmetrics.classification.MulticlassF1Score(self.num_classes, average="macro"),
            }
        )

    def forward(self, x: Any) -> torch.Tensor:
        return self.head(self.encoder.forward_features(x))

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.multilabel:
            observed = ~torch.isnan(target)
            losses = F.binary_cross_entropy_with_logits(logits, torch.nan_to_num(target), reduction="none")
            return (losses * observed).sum() / observed.sum().clamp(min=1)
        return F.cross_entropy(logits, target.long())

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self.loss(self(batch["input"]), batch["target"])
        return self.log_train_loss(loss, batch, batch_idx, len(batch["target"]))

    def _evaluate(self, batch: dict[str, Any], stage: str) -> None:
        logits = self(batch["input"])
        target = batch["target"]
        self.log(f"{stage}/loss", self.loss(logits, target), batch_size=len(target), sync_dist=True)
        metrics = self.metrics[f"{stage}_"]
        if self.multilabel:
            metrics.update(torch.sigmoid(logits), torch.nan_to_num(target, nan=-1).long())
        else:
            metrics.update(logits, target.long())
        self.log_dict({f"{stage}/{k}": v for k, v in metrics.items()}, batch_size=len(target))

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        logits = self(batch["input"])
        probs = torch.sigmoid(logits) if self.multilabel else logits.softmax(-1)
        return {"probabilities": probs, "meta": batch.get("meta")}


class Regression(EncoderTask):
    """Multi-target regression; ``target`` float ``(B, T)`` with NaN for missing values.
    The head learns standardised targets (``target_mean``/``target_std`` from the train
    split); metrics are reported in original units."""

    def __init__(
        self,
        encoder: nn.Module,
        num_targets: int = 1,
        adaptation: Adaptation | None = None,
        optim: OptimConfig | None = None,
        target_names: list[str] | None = None,
        target_mean: list[float] | None = None,
        target_std: list[float] | None = None,
    ) -> None:
        super().__init__(encoder, adaptation, optim)
        self.save_hyperparameters(ignore=["encoder"])
        self.target_names = target_names
        self.head = nn.Linear(self.encoder.feature_dim, num_targets)
        self.target_mean: torch.Tensor
        self.target_std: torch.Tensor
        self.register_buffer("target_mean", torch.tensor(target_mean or [0.0] * num_targets, dtype=torch.float32))
        self.register_buffer("target_std", torch.tensor(target_std or [1.0] * num_targets, dtype=torch.float32))
        self.metrics: Any = nn.ModuleDict(
            {
                stage: torchmetrics.MetricCollection(
                    {
                        "rmse": torchmetrics.MeanSquaredError(squared=False),
                        "mae": torchmetrics.MeanAbsoluteError(),
                        "r2": torchmetrics.R2Score(),
                    }
                )
                for stage in ("val_", "test_")
            }
        )

    def forward(self, x: Any) -> torch.Tensor:
        """Predictions in original units."""
        return self.head(self.encoder.forward_features(x)) * self.target_std + self.target_mean

    def loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        target = target.reshape(pred.shape)
        observed = ~torch.isnan(target)
        scaled_error = (pred - torch.nan_to_num(target)) / self.target_std
        return (scaled_error.pow(2) * observed).sum() / observed.sum().clamp(min=1)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self.loss(self(batch["input"]), batch["target"])
        return self.log_train_loss(loss, batch, batch_idx, len(batch["target"]))

    def evaluation_output(self, batch: dict[str, Any]) -> torch.Tensor:
        """One prediction per target row of ``batch`` (original units), for evaluation and
        ``predict``; a subclass whose batches hold several inputs per item reduces them here."""
        return self(batch["input"])

    def _evaluate(self, batch: dict[str, Any], stage: str) -> None:
        pred = self.evaluation_output(batch)
        target = batch["target"].reshape(pred.shape)
        self.log(f"{stage}/loss", self.loss(pred, target), batch_size=len(target), sync_dist=True)
        observed = ~torch.isnan(target)
        metrics = self.metrics[f"{stage}_"]
        metrics.update(pred[observed], target[observed])
        self.log_dict({f"{stage}/{k}": v for k, v in metrics.items()}, batch_size=len(target))

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        return {"prediction": self.evaluation_output(batch), "meta": batch.get("meta")}


#: Label of pixels that count in no loss and no metric (torch's cross-entropy default).
IGNORE_LABEL = -100


class Segmentation(EngineModule):
    """Dense prediction over 2D or 3D inputs. ``model(x)`` returns logits ``(B, C, *S)``
    (a list/tuple for deep supervision, the first at full resolution); ``target`` is a
    label map ``(B, 1, *S)``. ``inferer(x, model)`` (e.g. MONAI's SlidingWindowInferer)
    replaces the plain forward in validation, test and predict.

    Pixels to leave out (nodata, padding, unlabelled) come either as ``batch["valid"]``
    (``(B, *S)`` or ``(B, 1, *S)``, true where the pixel counts) or as target pixels equal
    to ``ignore_index`` (default ``IGNORE_LABEL``). They count in neither the loss nor Dice.
    The default cross-entropy skips them; a custom ``loss`` is refused for such batches
    rather than trained on filled pixels, unless it declares ``ignore_index`` itself."""

    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        loss: nn.Module | None = None,
        inferer: Callable[..., Any] | None = None,  # MONAI types its inferers' result as tensor | tuple | dict
        adaptation: Adaptation | None = None,
        optim: OptimConfig | None = None,
        class_names: list[str] | None = None,
        include_background: bool = False,
        deep_supervision_weights: list[float] | None = None,
        ignore_index: int = IGNORE_LABEL,
    ) -> None:
        super().__init__(optim)
        self.save_hyperparameters(ignore=["model", "loss", "inferer"])
        self.ignore_index = ignore_index
        self.adaptation = adaptation or Adaptation()
        self.model: Any = apply_adaptation(model, self.adaptation)
        self.num_classes, self.class_names = num_classes, class_names
        self.loss_fn: Any = loss
        self.inferer = inferer
        self.include_background = include_background
        self.deep_supervision_weights = deep_supervision_weights
        from torchmetrics.segmentation import DiceScore

        # one class more than the task has: ignored pixels go there in both prediction and
        # target, so they add to no real class's overlap or size; it is dropped when logged
        self.metrics: Any = nn.ModuleDict(
            {
                stage: DiceScore(num_classes + 1, include_background=include_background, average="none", input_format="index")
                for stage in ("val_", "test_")
            }
        )

    def trainable_groups(self) -> list[dict[str, Any]]:
        if self.optim.layer_decay != 1.0 and hasattr(self.model, "param_groups"):
            return self.model.param_groups(self.optim.lr, self.optim.weight_decay, self.optim.layer_decay)
        return _decay_groups(self.named_parameters(), self.optim.lr, self.optim.weight_decay)

    def forward(self, x: torch.Tensor) -> Any:
        return self.model(x)

    def masked_target(self, batch: dict[str, Any]) -> torch.Tensor:
        """The target with pixels outside ``batch["valid"]`` set to ``ignore_index``."""
        target = batch["target"]
        valid = batch.get("valid")
        if valid is None:
            return target
        valid = valid.unsqueeze(1) if valid.ndim == target.ndim - 1 else valid
        if valid.shape != target.shape:
            raise ValueError(f"batch['valid'] has shape {tuple(batch['valid'].shape)}; it must match the target {tuple(target.shape)} (or lack its channel axis)")
        return target.masked_fill(~valid.bool(), self.ignore_index)

    def _refuse_unmaskable_loss(self, batch: dict[str, Any]) -> None:
        if self.loss_fn is not None and "valid" in batch and getattr(self.loss_fn, "ignore_index", None) != self.ignore_index:
            raise ValueError(
                f"This batch has a 'valid' mask, but the loss {type(self.loss_fn).__name__} cannot leave pixels out "
                f"(it has no ignore_index={self.ignore_index}). Use the default cross-entropy (loss=None), a loss with that "
                "ignore_index, or data without nodata filling."
            )

    def _single_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if logits.shape[2:] != target.shape[2:]:
            target = F.interpolate(target.float(), size=logits.shape[2:], mode="nearest")
        if self.loss_fn is not None:
            return self.loss_fn(logits, target)
        return F.cross_entropy(logits, target[:, 0].long(), ignore_index=self.ignore_index)

    def compute_loss(self, output: Any, target: torch.Tensor) -> torch.Tensor:
        if isinstance(output, torch.Tensor) and output.ndim == target.ndim + 1:  # MONAI DynUNet stacks heads on dim 1
            output = list(output.unbind(1))
        if isinstance(output, list | tuple):
            weights = self.deep_supervision_weights or [0.5**i for i in range(len(output))]
            total = torch.stack([w * self._single_loss(o, target) for w, o in zip(weights, output, strict=False)]).sum()
            return total / sum(weights[: len(output)])
        return self._single_loss(output, target)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        self._refuse_unmaskable_loss(batch)
        loss = self.compute_loss(self(batch["input"]), self.masked_target(batch))
        return self.log_train_loss(loss, batch, batch_idx, len(batch["target"]))

    def infer(self, x: torch.Tensor) -> torch.Tensor:
        output = self.inferer(x, self.model) if self.inferer is not None else self.model(x)
        return output[0] if isinstance(output, list | tuple) else output

    def _evaluate(self, batch: dict[str, Any], stage: str) -> None:
        self._refuse_unmaskable_loss(batch)
        logits = self.infer(batch["input"])
        target = self.masked_target(batch)
        self.log(f"{stage}/loss", self._single_loss(logits, target), batch_size=len(target), sync_dist=True)
        labels = target[:, 0].long()
        ignored = labels == self.ignore_index
        prediction = logits.argmax(1).masked_fill(ignored, self.num_classes)
        self.update_metrics(stage, prediction, labels.masked_fill(ignored, self.num_classes))

    def update_metrics(self, stage: str, prediction: torch.Tensor, labels: torch.Tensor) -> None:
        """``prediction`` and ``labels`` are ``(B, *S)`` class ids, ignored pixels set to
        ``num_classes`` in both. Subclasses add their metrics here (one inference per batch)."""
        self.metrics[f"{stage}_"].update(prediction, labels)

    def _log_dice(self, stage: str) -> None:
        metric = self.metrics[f"{stage}_"]
        per_class = metric.compute()[:-1]  # the last is the ignored pixels' class
        metric.reset()
        names = self.class_names or [str(i) for i in range(self.num_classes)]
        names = names if self.include_background else names[1:]
        for name, value in zip(names, per_class, strict=False):
            self.log(f"{stage}/dice/{name}", value)
        self.log(f"{stage}/dice", torch.nanmean(per_class), prog_bar=True)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._log_dice("val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._log_dice("test")

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        logits = self.infer(batch["input"])
        return {"labels": logits.argmax(1, keepdim=True), "probabilities": logits.softmax(1), "meta": batch.get("meta")}


class Forecasting(EngineModule):
    """Multi-horizon forecasting. ``model(**inputs)`` gets every batch key except
    ``future_values`` and ``meta`` and returns ``(B, H, C)`` (or a dict with
    ``prediction_outputs``); the loss and metrics compare with ``future_values`` on
    the scaled data, as forecasting papers report them."""

    def __init__(
        self,
        model: nn.Module,
        adaptation: Adaptation | None = None,
        optim: OptimConfig | None = None,
        loss: Literal["mse", "mae"] = "mse",
        target_channels: list[int] | None = None,
    ) -> None:
        super().__init__(optim)
        self.save_hyperparameters(ignore=["model"])
        self.adaptation = adaptation or Adaptation()
        self.model: Any = apply_adaptation(model, self.adaptation)
        self.loss_name = loss
        self.target_channels = target_channels
        self.metrics: Any = nn.ModuleDict(
            {
                stage: torchmetrics.MetricCollection({"mse": torchmetrics.MeanSquaredError(), "mae": torchmetrics.MeanAbsoluteError()})
                for stage in ("val_", "test_")
            }
        )

    def trainable_groups(self) -> list[dict[str, Any]]:
        if self.optim.layer_decay != 1.0 and hasattr(self.model, "param_groups"):
            return self.model.param_groups(self.optim.lr, self.optim.weight_decay, self.optim.layer_decay)
        return _decay_groups(self.named_parameters(), self.optim.lr, self.optim.weight_decay)

    def forward(self, **inputs: Any) -> torch.Tensor:
        out = self.model(**inputs)
        return out["prediction_outputs"] if isinstance(out, dict) else out

    def _pair(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = {k: v for k, v in batch.items() if k not in ("future_values", "meta", "future_observed_mask")}
        pred, target = self(**inputs), batch["future_values"]
        if self.target_channels is not None:
            pred, target = pred[..., self.target_channels], target[..., self.target_channels]
        if pred.shape != target.shape:  # mse_loss would broadcast (B,H,1) against (B,H,C) with only a warning
            raise ValueError(
                f"forecast shape {tuple(pred.shape)} does not match future_values {tuple(target.shape)} (batch, horizon, channels): "
                "build the model for the data's horizon and channels, or choose channels with target_channels."
            )
        return pred, target

    def loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(pred, target) if self.loss_name == "mse" else F.l1_loss(pred, target)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        pred, target = self._pair(batch)
        return self.log_train_loss(self.loss(pred, target), batch, batch_idx, len(target))

    def _evaluate(self, batch: dict[str, Any], stage: str) -> None:
        pred, target = self._pair(batch)
        self.log(f"{stage}/loss", self.loss(pred, target), batch_size=len(target), sync_dist=True)
        metrics = self.metrics[f"{stage}_"]
        metrics.update(pred.reshape(-1), target.reshape(-1))
        self.log_dict({f"{stage}/{k}": v for k, v in metrics.items()}, batch_size=len(target))

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        inputs = {k: v for k, v in batch.items() if k not in ("future_values", "meta", "future_observed_mask")}
        return {"prediction": self(**inputs), "meta": batch.get("meta")}


__all__: Sequence[str] = ["OptimConfig", "EngineModule", "EncoderTask", "Classification", "Regression", "Segmentation", "Forecasting"]
