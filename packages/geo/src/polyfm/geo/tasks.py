"""Segmentation with mean IoU: core's Segmentation task plus torchmetrics' MeanIoU."""

from __future__ import annotations

from typing import Any

import torch
from polyfm.core.tasks import Segmentation
from torchmetrics.segmentation import MeanIoU


class GeoSegmentation(Segmentation):
    """:class:`polyfm.core.tasks.Segmentation` that also logs ``<stage>/miou`` (all classes,
    background included, the convention of EO benchmarks) next to Dice."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.iou = torch.nn.ModuleDict({s: MeanIoU(num_classes=self.num_classes, input_format="index") for s in ("val_", "test_")})

    def _evaluate(self, batch: dict[str, Any], stage: str) -> None:
        super()._evaluate(batch, stage)
        logits = self.infer(batch["input"])
        self.iou[f"{stage}_"].update(logits.argmax(1), batch["target"][:, 0].long())

    def _log_dice(self, stage: str) -> None:
        super()._log_dice(stage)
        metric = self.iou[f"{stage}_"]
        self.log(f"{stage}/miou", metric.compute(), prog_bar=True)
        metric.reset()
