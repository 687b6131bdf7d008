"""Sound event detection fine-tuning (the audio task polyfm.core has no generic form of).

:class:`SoundEventDetection` puts a new per-segment classifier on a decision-level
encoder (:class:`~polyfm.audio.models.Cnn14_DecisionLevelMax`): segment logits from the
encoder's ``segment_embedding``, the clip logit is their maximum, and frame outputs are
interpolated to the log-mel frame rate exactly as PANNs does. It trains on strong labels
(``target`` ``(B, frames, classes)``, 0/1 per frame; NaN = unknown) or weak labels
(``target`` ``(B, classes)``: clip-level tags only, multiple-instance learning through the
max). Metrics: frame-level F1 (micro, ``threshold``), frame-level and clip-level mAP.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
import torchmetrics
from torch import nn

from polyfm.audio.models.cnn14_decision_level_max import interpolate, pad_framewise_output
from polyfm.core.adaptation import Adaptation
from polyfm.core.tasks import EncoderTask, OptimConfig


def frame_f1(probabilities: torch.Tensor, target: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Frame-level micro F1 over ``(B, frames, classes)`` (DCASE's frame-based F-score)."""
    from torchmetrics.functional.classification import multilabel_f1_score

    classes = probabilities.shape[-1]
    return multilabel_f1_score(probabilities.reshape(-1, classes), target.reshape(-1, classes).long(), classes, threshold=threshold, average="micro")


def align_frames(target: torch.Tensor, frames: int) -> torch.Tensor:
    """Nearest-neighbour resampling of a frame target ``(B, T, C)`` to ``frames`` steps."""
    if target.shape[1] == frames:
        return target
    return F.interpolate(target.transpose(1, 2), size=frames, mode="nearest").transpose(1, 2)


class SoundEventDetection(EncoderTask):
    """Fine-tune a decision-level PANNs encoder for frame-wise event detection."""

    def __init__(
        self,
        encoder: nn.Module,
        num_classes: int,
        adaptation: Adaptation | None = None,
        optim: OptimConfig | None = None,
        class_names: list[str] | None = None,
        threshold: float = 0.5,
    ) -> None:
        super().__init__(encoder, adaptation, optim)
        self.save_hyperparameters(ignore=["encoder"])
        self.num_classes, self.class_names, self.threshold = num_classes, class_names, threshold
        self.head = nn.Linear(encoder.feature_dim, num_classes)
        self.metrics = nn.ModuleDict(
            {
                stage: torchmetrics.MetricCollection(
                    {
                        "frame_f1": torchmetrics.classification.MultilabelF1Score(num_classes, threshold=threshold, average="micro", ignore_index=-1),
                        "frame_map": torchmetrics.classification.MultilabelAveragePrecision(num_classes, average="macro", ignore_index=-1),
                    }
                )
                for stage in ("val_", "test_")
            }
        )

    def encoder_base(self) -> Any:
        """The PANNs model itself (under PEFT's wrapper with LoRA): sample rate, hop, frames."""
        return getattr(self.encoder, "base_model", self.encoder)

    def forward(self, waveform: torch.Tensor) -> dict[str, torch.Tensor]:
        """``framewise_logits`` ``(B, frames, C)`` and ``clip_logits`` ``(B, C)``."""
        base = self.encoder_base()
        out = self.encoder(waveform)
        if "segment_embedding" not in out:
            raise TypeError(f"{type(base).__name__} has no segment output; SED needs a decision-level model such as Cnn14_DecisionLevelMax.")
        segment_logits = self.head(out["segment_embedding"])
        frames = base.num_frames(base.as_waveform(waveform).shape[-1])
        framewise = pad_framewise_output(interpolate(segment_logits, base.interpolate_ratio), frames)
        return {"framewise_logits": framewise, "clip_logits": segment_logits.amax(dim=1)}

    def loss(self, out: dict[str, torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        if target.dim() == 2:  # weak labels
            logits = out["clip_logits"]
        else:
            logits = out["framewise_logits"]
            target = align_frames(target, logits.shape[1])
        observed = ~torch.isnan(target)
        losses = F.binary_cross_entropy_with_logits(logits, torch.nan_to_num(target), reduction="none")
        return (losses * observed).sum() / observed.sum().clamp(min=1)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self.loss(self(batch["input"]), batch["target"])
        return self.log_train_loss(loss, batch, batch_idx, len(batch["target"]))

    def _evaluate(self, batch: dict[str, Any], stage: str) -> None:
        out = self(batch["input"])
        target = batch["target"]
        self.log(f"{stage}/loss", self.loss(out, target), batch_size=len(target), sync_dist=True)
        if target.dim() == 3:
            target = align_frames(target, out["framewise_logits"].shape[1])
            probs = torch.sigmoid(out["framewise_logits"]).reshape(-1, self.num_classes)
            metrics = self.metrics[f"{stage}_"]
            metrics.update(probs, torch.nan_to_num(target, nan=-1).reshape(-1, self.num_classes).long())
            self.log_dict({f"{stage}/{k}": v for k, v in metrics.items()}, batch_size=len(target))

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        out = self(batch["input"])
        return {
            "framewise_output": torch.sigmoid(out["framewise_logits"]),
            "clipwise_output": torch.sigmoid(out["clip_logits"]),
            "meta": batch.get("meta"),
        }
