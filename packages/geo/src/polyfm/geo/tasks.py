"""Geo tasks on top of core's: classification with MAE's linear-probe head, segmentation with mIoU."""

from __future__ import annotations

from typing import Any

import torch
from torchmetrics.segmentation import MeanIoU

from polyfm.core.tasks import Classification, Segmentation


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


class GeoClassification(Classification):
    """:class:`polyfm.core.tasks.Classification` with MAE's linear-probe head option.

    MAE features (pooled, layer-normed tokens) share a large common component; MAE and
    SatMAE probe them through ``BatchNorm1d(affine=False)`` before the linear layer
    (``probe_batchnorm=True``), which makes a probe trainable in a few epochs.
    """

    def __init__(self, *args: Any, probe_batchnorm: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if probe_batchnorm:
            self.head = torch.nn.Sequential(torch.nn.BatchNorm1d(self.encoder.feature_dim, affine=False, eps=1e-6), *self.head)
