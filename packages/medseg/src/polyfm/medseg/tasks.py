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
from monai.inferers.inferer import SliceInferer, SlidingWindowInferer
from monai.losses.dice import DiceCELoss
from monai.metrics.hausdorff_distance import HausdorffDistanceMetric
from monai.metrics.meandice import compute_dice
from monai.metrics.surface_dice import SurfaceDiceMetric
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
        # duck-typed: any network with polyfm.medseg.models.MedSegNet's methods (getattr: nn.Module's
        # __getattr__ would type them as tensors or modules)
        reset_head, load_pretrained, head_names = (getattr(model, n, None) for n in ("reset_head", "load_pretrained", "head_names"))
        if reset_head is not None:
            reset_head(num_classes)
        if pretrained:  # the recipe built the network; its weights come from here (a head of another shape stays fresh)
            if load_pretrained is None:
                raise ConfigError(f"pretrained={pretrained!r} needs a polyfm.medseg.models network, not {type(model).__name__}.")
            load_pretrained(pretrained)
        adaptation = adaptation or Adaptation()
        heads = list(head_names()) if head_names is not None else []
        if adaptation.mode == "lora" and adaptation.lora_targets is None and heads:
            adaptation = _lora_outside_heads(model, adaptation, heads)
        inferer: SlidingWindowInferer | None = None
        # MONAI's split: windows run on sw_device, the whole-volume logits are stitched on output_device
        # (MONAI's `device`; "cpu" keeps a large volume's logits off the GPU)
        if (sw_device or output_device) and not roi_size:
            raise ConfigError(f"sw_device={sw_device!r} / output_device={output_device!r} need roi_size: they configure the sliding window.")
        if roi_size and slice_axis is not None:  # a 2D network over 3D volumes, one slice at a time
            inferer = SliceInferer(
                spatial_dim=slice_axis, roi_size=roi_size, sw_batch_size=sw_batch_size, overlap=overlap, mode="gaussian", sw_device=sw_device, device=output_device
            )  # fmt: skip
        elif roi_size:
            inferer = SlidingWindowInferer(roi_size=roi_size, sw_batch_size=sw_batch_size, overlap=overlap, mode="gaussian", sw_device=sw_device, device=output_device)
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
        # per-case rows of the current val/test epoch, in this rank's order (gathered at epoch end)
        self._case_names_of: dict[str, list[str]] = {"val": [], "test": []}
        self._case_rows: dict[str, dict[str, list[torch.Tensor]]] = {"val": _empty_rows(), "test": _empty_rows()}
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
        data_names = getattr(data, "class_names", None)
        if self.class_names is None and data_names:
            self.class_names = list(data_names)

    def infer(self, x: torch.Tensor) -> torch.Tensor:
        """Whole-volume logits; with ``tta_flip_axes``, in test and predict, each window is run on
        every combination of flips of those axes and the softmax is averaged (nnU-Net's mirroring):
        the result is then the log of that mean, so softmax and argmax give the averaged prediction.
        Validation during fit stays unmirrored (2^k times the cost at every epoch)."""
        network: nn.Module = self.model
        if self.tta_flip_axes and not (self._trainer is not None and (self.trainer.validating or self.trainer.sanity_checking)):
            network = MirroredSoftmax(self.model, self.tta_flip_axes)
        output = self.inferer(x, network) if self.inferer is not None else network(x)
        result: torch.Tensor = output[0] if isinstance(output, list | tuple) else output
        return result

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        """Label maps ``(B, 1, *S)`` on the preprocessed grid and the case names; the softmax only with
        ``predict_probabilities`` (a whole CT's probabilities are gigabytes, and the trainer keeps every output)."""
        logits = self.infer(batch["input"])
        out = {"labels": logits.argmax(1, keepdim=True), "meta": batch.get("meta")}
        if self.predict_probabilities:
            out["probabilities"] = logits.softmax(1)
        return out

    def _infer_batch(self, batch: dict[str, Any], stage: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Whole-volume inference, its loss kept per case; (label map, target) on the target's device, where the
        metrics live, whichever device the logits were stitched on (``output_device``)."""
        logits = self.infer(batch["input"])
        target = batch["target"]
        loss = self._single_loss(logits, target.to(logits.device)).to(target.device)
        # one row per case (the batch's loss; evaluation batches are single volumes), logged at epoch end
        # from every rank's cases, each once: Lightning's sync_dist would average in the padded repeats
        self._case_rows[stage]["loss"].append(loss.detach().float().reshape(1, 1).expand(len(target), 1))
        return logits.argmax(1).to(target.device), target[:, 0].long()

    def _evaluate(self, batch: dict[str, Any], stage: str) -> None:
        prediction, labels = self._infer_batch(batch, stage)
        self.metrics[f"{stage}_"].update(prediction, labels)
        self._case_names_of[stage] += _batch_case_names(batch, len(labels))

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        prediction, labels = self._infer_batch(batch, "test")
        self.metrics["test_"].update(prediction, labels)
        one_hot_pred = nn.functional.one_hot(prediction, self.num_classes).movedim(-1, 1)
        one_hot_target = nn.functional.one_hot(labels, self.num_classes).movedim(-1, 1)
        kwargs = {"spacing": self.spacing} if self.spacing else {}
        # the per-case values are kept here and gathered across ranks by polyfm (gather_cases); MONAI's own
        # buffers would all-gather too, but count DistributedSampler's padded repeats as cases
        rows = self._case_rows["test"]
        hd95, surface_dice = self.hd95(one_hot_pred, one_hot_target, **kwargs), self.surface_dice(one_hot_pred, one_hot_target, **kwargs)
        assert isinstance(hd95, torch.Tensor) and isinstance(surface_dice, torch.Tensor)  # tensors in, a tensor out (MONAI's type allows lists)
        rows["hd95"].append(hd95.float())
        rows["surface_dice"].append(surface_dice.float())
        rows["dice"].append(compute_dice(one_hot_pred, one_hot_target, include_background=self.include_background))
        self._case_names_of["test"] += _batch_case_names(batch, len(labels))

    def on_validation_epoch_start(self) -> None:
        self._case_names_of["val"], self._case_rows["val"] = [], _empty_rows()

    def on_test_epoch_start(self) -> None:
        self._case_names_of["test"], self._case_rows["test"] = [], _empty_rows()

    def _stage_columns(self, stage: str) -> dict[str, torch.Tensor]:
        """This rank's per-case rows of the epoch (Dice state, loss, test's HD95 / surface Dice) on the host; cleared."""
        columns = {**self._dice_state(stage), **{k: torch.cat(v).cpu() for k, v in self._case_rows[stage].items() if v}}
        self._case_rows[stage] = _empty_rows()
        return columns

    def _dice_state(self, stage: str) -> dict[str, torch.Tensor]:
        """The Dice metric's per-case rows (torchmetrics' samplewise numerator/denominator, one row per case), read
        without torchmetrics' own all-gather (which would count padded repeats), and the metric reset."""
        metric = self.metrics[f"{stage}_"]
        rows = {"dice_numerator": metric.numerator, "dice_denominator": metric.denominator}
        state = {k: torch.cat([t.reshape(-1, t.shape[-1]) for t in v]).float().cpu() for k, v in rows.items() if len(v)}
        metric.reset()
        return state

    def _log_dice(self, stage: str, cases: dict[str, torch.Tensor] | None = None) -> None:
        """Dice per class and mean over the cases of *every* rank, each case once (see :func:`gather_cases`);
        the same as torchmetrics' samplewise ``DiceScore`` on one process."""
        if cases is None:
            cases, _ = self._gather(stage, self._stage_columns(stage), self._case_names_of.get(stage, []))
        if "loss" in cases:
            self._log_gathered(f"{stage}/loss", cases["loss"].mean())
        names = self.class_names or [str(i) for i in range(self.num_classes)]
        names = names if self.include_background else names[1:]
        if "dice_numerator" in cases:
            numerator, denominator = cases["dice_numerator"], cases["dice_denominator"]
            per_case = torch.where(denominator != 0, numerator / denominator, torch.tensor(float("nan")))
            per_class = per_case.nanmean(dim=0)[:-1]  # the last is the ignored pixels' class
        else:  # no case evaluated: NaN, as torchmetrics gives
            per_class = torch.full((len(names),), float("nan"))
        for name, value in zip(names, per_class, strict=False):
            self._log_gathered(f"{stage}/dice/{name}", value)
        self._log_gathered(f"{stage}/dice", torch.nanmean(per_class), prog_bar=True)

    def _log_gathered(self, key: str, value: torch.Tensor, prog_bar: bool = False) -> None:
        # Every rank holds the same gathered value: max over ranks gives it back exactly (a mean of copies
        # might round), and keeps Lightning from asking for sync_dist on epoch-level logs.
        self.log(key, value.to(self.device), prog_bar=prog_bar, sync_dist=True, reduce_fx="max")

    def _gather(self, stage: str, columns: dict[str, torch.Tensor], names: list[str]) -> tuple[dict[str, torch.Tensor], list[str]]:
        """This rank's per-case rows merged with every other rank's (one process: as they are)."""
        import torch.distributed as dist

        if self._trainer is None or self.trainer.world_size <= 1 or not (dist.is_available() and dist.is_initialized()):
            return columns, names
        keys, how = _case_keys(self.trainer, stage, names)
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, {"keys": keys, "names": names, "columns": columns})
        merged, merged_names, repeats = gather_cases(gathered)
        log.info("%s metrics over %d cases gathered from %d processes (cases matched by %s; %d repeated case(s) counted once).",
                 stage, len(merged_names), len(gathered), how, repeats)  # fmt: skip
        return merged, merged_names

    def on_test_epoch_end(self) -> None:
        columns = self._stage_columns("test")
        for metric in (self.hd95, self.surface_dice):  # the rows are in _case_rows; MONAI's copies go
            metric.reset()  # type: ignore[no-untyped-call]  # MONAI leaves the metrics' reset unannotated
        cases, case_names = self._gather("test", columns, self._case_names_of["test"])
        self._log_dice("test", cases)
        names = self.class_names or [str(i) for i in range(self.num_classes)]
        names = names if self.include_background else names[1:]
        for label in ("hd95", "surface_dice"):
            per_case = cases.get(label, torch.empty(0, len(names)))  # (cases, classes); NaN where a class is absent
            per_class = torch.nanmean(per_case.float(), dim=0)
            for name, value in zip(names, per_class, strict=False):
                self._log_gathered(f"test/{label}/{name}", value)
            self._log_gathered(f"test/{label}", torch.nanmean(per_class))
        per_case_columns = {label: cases.get(label) for label in ("dice", "hd95", "surface_dice")}
        self._write_per_case(per_case_columns, names, case_names)

    def _write_per_case(self, columns: dict[str, torch.Tensor | None], names: list[str], cases: list[str]) -> None:
        """``test_per_case.csv`` in the run's log folder: one row per case (its file), Dice / HD95 / surface
        Dice per class (MONAI's ``MetricsSaver`` layout, what papers report per case); NaN where a class is absent."""
        if columns["dice"] is None or self._trainer is None:
            return
        folder = Path(self.trainer.log_dir or self.trainer.default_root_dir)  # log_dir broadcasts under DDP: every rank asks
        if not self.trainer.is_global_zero:
            return
        folder.mkdir(parents=True, exist_ok=True)
        header = ["case", *(f"{metric}/{name}" for metric in columns for name in names)]
        with atomic_path(folder / "test_per_case.csv") as temporary, temporary.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(header)
            for row, case in enumerate(cases):
                values = [float(columns[metric][row, i]) for metric in columns for i in range(len(names))]  # type: ignore[index]
                writer.writerow([case, *(f"{v:.6g}" for v in values)])
        log.info("per-case test metrics: %s", folder / "test_per_case.csv")


def _empty_rows() -> dict[str, list[torch.Tensor]]:
    return {"loss": [], "dice": [], "hd95": [], "surface_dice": []}


def _batch_case_names(batch: dict[str, Any], size: int) -> list[str]:
    meta = batch.get("meta")
    return [str(m) for m in meta] if isinstance(meta, list | tuple) else [str(meta)] * size


def _case_keys(trainer: Any, stage: str, names: list[str]) -> tuple[list[Any], str]:
    """What identifies this rank's cases across ranks, and how: the dataset index from the
    ``DistributedSampler`` Lightning puts on the loader (its padding repeats the first indices on the
    last ranks), else the case name and its occurrence on this rank (a loader sharded otherwise)."""
    from torch.utils.data import DistributedSampler

    loaders = trainer.test_dataloaders if stage == "test" else trainer.val_dataloaders
    loader = loaders[0] if isinstance(loaders, list | tuple) and len(loaders) == 1 else loaders
    sampler = getattr(loader, "sampler", None)
    if not isinstance(sampler, DistributedSampler):
        sampler = getattr(getattr(loader, "batch_sampler", None), "sampler", None)
    if isinstance(sampler, DistributedSampler):
        indices = [int(i) for i in sampler]  # the order the loader yields them; limit_*_batches keeps a prefix
        if len(indices) >= len(names):
            return indices[: len(names)], "dataset index"
    seen: dict[str, int] = {}
    keys = []
    for name in names:
        seen[name] = seen.get(name, -1) + 1
        keys.append((name, seen[name]))
    return keys, "case name"


def gather_cases(per_rank: list[dict[str, Any]]) -> tuple[dict[str, torch.Tensor], list[str], int]:
    """Merge the per-case rows of every rank: ``per_rank[r]`` holds ``keys`` (one per case, equal for the
    same case on two ranks), ``names`` and ``columns`` (name -> ``(cases, classes)`` rows). A key seen again
    (``DistributedSampler`` pads the last ranks with repeats of the first cases, so every rank gets as many)
    counts once. Integer keys (dataset indices) come back in dataset order, the single-process order; others
    in rank order. Returns (columns, names, repeats left out)."""
    keys = [key for payload in per_rank for key in payload["keys"]]
    names = [name for payload in per_rank for name in payload["names"]]
    first: dict[Any, int] = {}
    for position, key in enumerate(keys):
        first.setdefault(key, position)
    order = sorted(first) if all(isinstance(k, int) for k in first) else list(first)
    chosen = torch.tensor([first[k] for k in order], dtype=torch.long)
    columns: dict[str, torch.Tensor] = {}
    for label in dict.fromkeys(label for payload in per_rank for label in payload["columns"]):
        holding = [payload for payload in per_rank if payload["keys"]]  # a rank without cases sends no columns
        parts = [payload["columns"].get(label, torch.empty(0)) for payload in holding]
        rows = sum(len(part) for part in parts)
        if rows != len(keys) or any(len(part) != len(payload["keys"]) for part, payload in zip(parts, holding, strict=True)):
            raise ValueError(f"gather_cases: column {label!r} has {rows} rows over the ranks for {len(keys)} cases.")
        columns[label] = torch.cat(parts)[chosen]
    return columns, [names[i] for i in chosen.tolist()], len(keys) - len(first)


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
