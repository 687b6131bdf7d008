"""3D segmentation fine-tuning: polyfm's ``Segmentation`` task with MONAI's loss, inferer and metrics.

:class:`VolumeSegmentation` adds what the generic task cannot know about U-Nets:

* the output layers are the task head: they are rebuilt for ``num_classes``
  (``model.reset_head``) and stay trainable under every adaptation mode. ``linear``
  trains only them (a linear probe of a U-Net is its 1x1 output convolution), ``lora``
  puts PEFT adapters on every other convolution and linear layer (conv-LoRA), and
  ``freeze`` freezes the first k entries of ``model.block_names()``;
* DiceCE loss (MONAI, one-hot targets, softmax), deep supervision weights for DynUNet;
* sliding-window inference with Gaussian blending (MONAI ``SlidingWindowInferer``) in
  validation, test and predict when ``roi_size`` is given; with ``slice_axis`` (2 = axial)
  a 2D network runs slice by slice over 3D volumes (MONAI ``SliceInferer``); ``sw_device`` /
  ``output_device`` are MONAI's ``sw_device`` / ``device`` (windows on the GPU, the stitched
  logits of a large volume on the host), and the metrics follow;
* mirroring test-time augmentation (``tta_flip_axes``, nnU-Net's default): in test and predict the
  softmax is averaged over every combination of flips of those axes, window by window;
* test metrics beyond Dice: HD95 and surface Dice per class (MONAI metrics, in voxels
  unless ``spacing`` is given), logged as ``test/hd95``, ``test/surface_dice`` and per class.
"""

from __future__ import annotations

import csv
import logging
import re
from pathlib import Path
from typing import Any

import torch
from monai.inferers import SliceInferer, SlidingWindowInferer
from monai.losses import DiceCELoss
from monai.metrics import HausdorffDistanceMetric, SurfaceDiceMetric, compute_dice
from torch import nn

from polyfm.core.adaptation import Adaptation
from polyfm.core.errors import ConfigError
from polyfm.core.files import atomic_path
from polyfm.core.tasks import OptimConfig, Segmentation

log = logging.getLogger(__name__)


class VolumeSegmentation(Segmentation):
    """Fine-tune a MONAI U-Net (``polyfm.medseg.models``) for ``num_classes`` classes (background included)."""

    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        roi_size: list[int] | None = None,
        sw_batch_size: int = 4,
        overlap: float = 0.5,
        adaptation: Adaptation | None = None,
        optim: OptimConfig | None = None,
        class_names: list[str] | None = None,
        include_background: bool = False,
        deep_supervision_weights: list[float] | None = None,
        lambda_dice: float = 1.0,
        lambda_ce: float = 1.0,
        spacing: list[float] | None = None,
        surface_tolerance: float = 2.0,
        slice_axis: int | None = None,
        sw_device: str | None = None,
        output_device: str | None = None,
        predict_probabilities: bool = False,
        tta_flip_axes: list[int] | None = None,
        pretrained: str | None = None,
    ) -> None:
        check_flip_axes(tta_flip_axes, len(roi_size) if roi_size else 3)
        if hasattr(model, "reset_head"):
            model.reset_head(num_classes)
        if pretrained:  # the recipe built the network; its weights come from here (a head of another shape stays fresh)
            if not hasattr(model, "load_pretrained"):
                raise ConfigError(f"pretrained={pretrained!r} needs a polyfm.medseg.models network, not {type(model).__name__}.")
            model.load_pretrained(pretrained)
        adaptation = adaptation or Adaptation()
        heads = list(model.head_names()) if hasattr(model, "head_names") else []
        if adaptation.mode == "lora" and adaptation.lora_targets is None and heads:
            adaptation = _lora_outside_heads(model, adaptation, heads)
        inferer = None
        # MONAI's split: windows run on sw_device, the whole-volume logits are stitched on output_device
        # (MONAI's `device`; "cpu" keeps a large volume's logits off the GPU)
        devices = {"sw_device": sw_device, "device": output_device}
        if (sw_device or output_device) and not roi_size:
            raise ConfigError(f"sw_device={sw_device!r} / output_device={output_device!r} need roi_size: they configure the sliding window.")
        if roi_size and slice_axis is not None:  # a 2D network over 3D volumes, one slice at a time
            inferer = SliceInferer(spatial_dim=slice_axis, roi_size=roi_size, sw_batch_size=sw_batch_size, overlap=overlap, mode="gaussian", **devices)
        elif roi_size:
            inferer = SlidingWindowInferer(roi_size=roi_size, sw_batch_size=sw_batch_size, overlap=overlap, mode="gaussian", **devices)
        super().__init__(
            model=model,
            num_classes=num_classes,
            loss=DiceCELoss(to_onehot_y=True, softmax=True, lambda_dice=lambda_dice, lambda_ce=lambda_ce),
            inferer=inferer,
            adaptation=adaptation,
            optim=optim,
            class_names=class_names,
            include_background=include_background,
            deep_supervision_weights=deep_supervision_weights,
        )
        # The head is new for this task: it always trains, whatever the encoder's adaptation.
        for name, param in self.model.named_parameters():
            if any(name == h or name.startswith(h + ".") for h in heads) and "lora_" not in name:
                param.requires_grad_(True)
        self.spacing, self.surface_tolerance = spacing, surface_tolerance
        self.predict_probabilities = predict_probabilities
        self.tta_flip_axes = [int(a) for a in tta_flip_axes] if tta_flip_axes else None
        self._case_dice: list[torch.Tensor] = []
        self._case_names: list[str] = []
        self.hd95 = HausdorffDistanceMetric(include_background=include_background, percentile=95.0, reduction="none")
        n_thresholds = num_classes if include_background else num_classes - 1
        self.surface_dice = SurfaceDiceMetric([surface_tolerance] * n_thresholds, include_background=include_background, reduction="none")

    def setup(self, stage: str) -> None:
        """Check the task against the datamodule before the first step: a class count that differs
        fails later inside MONAI's one-hot ("index 2 is out of bounds"); the class names come from
        the dataset when the task has none, so metrics read ``val/dice/liver``, not ``val/dice/1``."""
        super().setup(stage)
        data = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        data_classes = getattr(data, "num_classes", None)
        if isinstance(data_classes, int) and data_classes != self.num_classes:
            source = getattr(data, "dataset_json", type(data).__name__)
            raise ConfigError(
                f"the task has num_classes={self.num_classes} but the data ({source}: its 'labels', or label_map / class_names) "
                f"has {data_classes} classes, background included: set --model.num_classes={data_classes} "
                f"(VolumeSegmentation(num_classes={data_classes})), or change the data's label_map."
            )
        if self.class_names is None and getattr(data, "class_names", None):
            self.class_names = list(data.class_names)

    def infer(self, x: torch.Tensor) -> torch.Tensor:
        """Whole-volume logits; with ``tta_flip_axes``, in test and predict, each window is run on
        every combination of flips of those axes and the softmax is averaged (nnU-Net's mirroring):
        the result is then the log of that mean, so softmax and argmax give the averaged prediction.
        Validation during fit stays unmirrored (2^k times the cost at every epoch)."""
        network: nn.Module = self.model
        if self.tta_flip_axes and not (self._trainer is not None and (self.trainer.validating or self.trainer.sanity_checking)):
            network = MirroredSoftmax(self.model, self.tta_flip_axes)
        output = self.inferer(x, network) if self.inferer is not None else network(x)
        return output[0] if isinstance(output, list | tuple) else output

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        """Label maps ``(B, 1, *S)`` on the preprocessed grid and the case names; the softmax only with
        ``predict_probabilities`` (a whole CT's probabilities are gigabytes, and the trainer keeps every output)."""
        logits = self.infer(batch["input"])
        out = {"labels": logits.argmax(1, keepdim=True), "meta": batch.get("meta")}
        if self.predict_probabilities:
            out["probabilities"] = logits.softmax(1)
        return out

    def _infer_batch(self, batch: dict[str, Any], stage: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Whole-volume inference, loss logged; (label map, target) on the target's device, where the
        metrics live, whichever device the logits were stitched on (``output_device``)."""
        logits = self.infer(batch["input"])
        target = batch["target"]
        loss = self._single_loss(logits, target.to(logits.device)).to(target.device)
        self.log(f"{stage}/loss", loss, batch_size=len(target), sync_dist=True)
        return logits.argmax(1).to(target.device), target[:, 0].long()

    def _evaluate(self, batch: dict[str, Any], stage: str) -> None:
        self.metrics[f"{stage}_"].update(*self._infer_batch(batch, stage))

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        prediction, labels = self._infer_batch(batch, "test")
        self.metrics["test_"].update(prediction, labels)
        one_hot_pred = nn.functional.one_hot(prediction, self.num_classes).movedim(-1, 1)
        one_hot_target = nn.functional.one_hot(labels, self.num_classes).movedim(-1, 1)
        kwargs = {"spacing": self.spacing} if self.spacing else {}
        self.hd95(one_hot_pred, one_hot_target, **kwargs)
        self.surface_dice(one_hot_pred, one_hot_target, **kwargs)
        self._case_dice.append(compute_dice(one_hot_pred, one_hot_target, include_background=self.include_background).cpu())
        meta = batch.get("meta")
        self._case_names += [str(m) for m in meta] if isinstance(meta, list | tuple) else [str(meta)] * len(labels)

    def on_test_epoch_start(self) -> None:
        self._case_dice, self._case_names = [], []

    def on_test_epoch_end(self) -> None:
        self._log_dice("test")
        names = self.class_names or [str(i) for i in range(self.num_classes)]
        names = names if self.include_background else names[1:]
        per_case_columns = {"dice": torch.cat(self._case_dice) if self._case_dice else None}
        for metric, label in ((self.hd95, "hd95"), (self.surface_dice, "surface_dice")):
            per_case = metric.aggregate()  # (cases, classes); NaN where a class is absent
            metric.reset()
            per_case_columns[label] = per_case
            per_class = torch.nanmean(per_case.float(), dim=0)
            for name, value in zip(names, per_class, strict=False):
                self.log(f"test/{label}/{name}", value)
            self.log(f"test/{label}", torch.nanmean(per_class))
        self._write_per_case(per_case_columns, names)

    def _write_per_case(self, columns: dict[str, torch.Tensor | None], names: list[str]) -> None:
        """``test_per_case.csv`` in the run's log folder: one row per case (its file), Dice / HD95 / surface
        Dice per class (MONAI's ``MetricsSaver`` layout, what papers report per case); NaN where a class is absent."""
        if columns["dice"] is None or self._trainer is None or not self.trainer.is_global_zero:
            return
        folder = Path(self.trainer.log_dir or self.trainer.default_root_dir)
        folder.mkdir(parents=True, exist_ok=True)
        header = ["case", *(f"{metric}/{name}" for metric in columns for name in names)]
        with atomic_path(folder / "test_per_case.csv") as temporary, temporary.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(header)
            for row, case in enumerate(self._case_names):
                values = [float(columns[metric][row, i]) for metric in columns for i in range(len(names))]  # type: ignore[index]
                writer.writerow([case, *(f"{v:.6g}" for v in values)])
        log.info("per-case test metrics: %s", folder / "test_per_case.csv")


def check_flip_axes(tta_flip_axes: list[int] | None, spatial_dims: int) -> list[int] | None:
    """``tta_flip_axes`` as ints, or a ConfigError: distinct spatial axes of the network's input (``spatial_dims`` of them)."""
    if tta_flip_axes is None:
        return None
    axes = [int(a) for a in tta_flip_axes]
    if not axes or len(set(axes)) != len(axes) or any(not 0 <= a < spatial_dims for a in axes):
        raise ConfigError(
            f"tta_flip_axes={list(tta_flip_axes)}: give distinct spatial axes of the network's input, 0..{spatial_dims - 1} "
            "(nnU-Net's mirroring is [0, 1, 2]; a 2D network run slice by slice has axes 0 and 1), or leave it unset."
        )
    return axes


class MirroredSoftmax(nn.Module):
    """``log(mean over flips f of f^-1(softmax(model(f(x)))))`` over every subset of ``axes`` (spatial
    axes of ``x``, 0 = the first after the channels; the identity included, 2^k passes). Runs inside the
    sliding window, one window at a time, so no second whole-volume buffer is needed."""

    def __init__(self, model: nn.Module, axes: list[int]) -> None:
        super().__init__()
        self.model, self.axes = model, list(axes)

    def flips(self) -> list[tuple[int, ...]]:
        from itertools import combinations

        return [combo for k in range(len(self.axes) + 1) for combo in combinations(self.axes, k)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total: torch.Tensor | None = None
        flips = self.flips()
        for axes in flips:
            dims = [a + 2 for a in axes]
            output = self.model(torch.flip(x, dims) if dims else x)
            output = output[0] if isinstance(output, list | tuple) else output
            probabilities = output.float().softmax(1)
            probabilities = torch.flip(probabilities, dims) if dims else probabilities
            total = probabilities if total is None else total + probabilities
        assert total is not None
        # the log keeps the task's contract (logits in, softmax/argmax/loss out); the floor keeps log finite
        return (total / len(flips)).clamp_min(torch.finfo(torch.float32).tiny).log()


def _lora_outside_heads(model: nn.Module, adaptation: Adaptation, heads: list[str]) -> Adaptation:
    """LoRA on every Linear/Conv except the (new, fully trained) output layers."""
    from polyfm.core.adaptation import lora_target_names

    keep = [n for n in lora_target_names(model) if not any(n == h or n.startswith(h + ".") for h in heads)]
    return Adaptation(
        mode="lora",
        lora_rank=adaptation.lora_rank,
        lora_alpha=adaptation.lora_alpha,
        lora_dropout=adaptation.lora_dropout,
        lora_targets=[f"^{re.escape(n)}$" for n in keep],
        layer_decay=adaptation.layer_decay,
    )
