"""Geo tasks on top of core's: classification with MAE's linear-probe head, segmentation with mIoU."""

from __future__ import annotations

from typing import Any, cast

import torch
from torchmetrics.classification import MulticlassJaccardIndex

from polyfm.core.tasks import Classification, Segmentation


class GeoSegmentation(Segmentation):
    """:class:`polyfm.core.tasks.Segmentation` that also logs ``<stage>/miou`` next to Dice:
    the convention of EO benchmarks (mmsegmentation's): per-class IoU over all pixels of the
    split, background included, averaged over the classes that occur; nodata pixels
    (``batch["valid"]`` false) are left out."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # ignored pixels arrive as class ``num_classes`` (see Segmentation.update_metrics)
        self.iou = torch.nn.ModuleDict(
            {s: MulticlassJaccardIndex(self.num_classes, average="none", ignore_index=self.num_classes, zero_division=float("nan")) for s in ("val_", "test_")}
        )

    def _iou(self, stage: str) -> MulticlassJaccardIndex:
        # ModuleDict.__getitem__ is typed nn.Module; its entries are the metrics built in __init__
        return cast(MulticlassJaccardIndex, self.iou[f"{stage}_"])

    def update_metrics(self, stage: str, prediction: torch.Tensor, labels: torch.Tensor) -> None:
        super().update_metrics(stage, prediction, labels)
        self._iou(stage).update(prediction, labels)

    def _log_dice(self, stage: str) -> None:
        super()._log_dice(stage)
        metric = self._iou(stage)
        self.log(f"{stage}/miou", torch.nanmean(metric.compute()), prog_bar=True)
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
