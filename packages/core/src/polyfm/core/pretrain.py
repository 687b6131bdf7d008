"""Pretraining as one LightningModule that takes an objective.

An objective is an ``nn.Module`` called as ``objective(model, batch) -> {"loss": ..., ...}``
(a module, so it can own heads and LightningCLI can build it from YAML); every other
entry it returns is logged. Domain packages write theirs (MAE, MLM, masked
atoms, Volume Fusion, TTM's multi-resolution forecasting) in their ``objectives.py``;
the generic ones live here.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from polyfm.core.tasks import EngineModule, OptimConfig


class Objective(Protocol):
    def __call__(self, model: nn.Module, batch: Any) -> dict[str, torch.Tensor]: ...


class Pretraining(EngineModule):
    """Self-supervised or supervised pretraining of ``model`` under ``objective``.

    If the objective is an ``nn.Module`` (it owns heads or projectors), its parameters
    are trained with the model's; after ``fit``, ``model`` holds the pretrained weights.
    """

    def __init__(self, model: nn.Module, objective: nn.Module, optim: OptimConfig | None = None) -> None:
        super().__init__(optim)
        self.save_hyperparameters(ignore=["model", "objective"])
        self.model = model
        self.objective = objective
        if isinstance(objective, nn.Module):
            self.objective_module = objective  # registered so its parameters train and checkpoint

    def _run(self, batch: Any) -> dict[str, torch.Tensor]:
        out = self.objective(self.model, batch)
        if "loss" not in out:
            raise KeyError(f"{type(self.objective).__name__} returned {sorted(out)}; an objective must return a 'loss'.")
        return out

    def _batch_size(self, batch: Any) -> int | None:
        if isinstance(batch, dict):
            first = next((v for v in batch.values() if isinstance(v, torch.Tensor)), None)
            return None if first is None else len(first)
        return None

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        out = self._run(batch)
        size = self._batch_size(batch)
        self.log_train_loss(out["loss"], batch, batch_idx, size)
        for key, value in out.items():
            if key != "loss" and isinstance(value, torch.Tensor) and value.numel() == 1:
                self.log(f"train/{key}", value, batch_size=size)
        return out["loss"]

    def _evaluate(self, batch: Any, stage: str) -> None:
        out = self._run(batch)
        size = self._batch_size(batch)
        for key, value in out.items():
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                self.log(f"{stage}/{key}", value, batch_size=size, sync_dist=True)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:  # `polyfm test` on a pretraining recipe: held-out objective
        self._evaluate(batch, "test")


def _l2_normalise(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.float(), dim=-1)


class InfoNCE(nn.Module):
    """NT-Xent / InfoNCE between two views. ``embed(model, view)`` gives ``(B, D)``;
    the batch holds ``view1`` and ``view2``. Symmetric cross-entropy over the 2B-1
    other samples, temperature ``temperature`` (SimCLR, SwinUNETR's contrastive head)."""

    def __init__(self, temperature: float = 0.1, embed: Any = None, projector: nn.Module | None = None) -> None:
        super().__init__()
        self.temperature = temperature
        self.embed = embed or (lambda model, x: model.forward_features(x))
        self.projector = projector or nn.Identity()

    def pair_loss(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        z = _l2_normalise(torch.cat([z1, z2]))
        sim = z @ z.T / self.temperature
        sim.fill_diagonal_(float("-inf"))
        n = len(z1)
        target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
        return F.cross_entropy(sim, target)

    def forward(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        z1 = self.projector(self.embed(model, batch["view1"]))
        z2 = self.projector(self.embed(model, batch["view2"]))
        return {"loss": self.pair_loss(z1, z2)}


class SoftContrastive(nn.Module):
    """Contrastive learning with soft targets (SoftCon, Wang et al. 2024).

    Scenes with similar multi-label vectors (e.g. land-cover fractions) are partial
    positives: the target distribution over the other view's samples is the softmax of
    the label similarity (cosine between label vectors) at ``target_temperature``,
    mixed with the one-hot identity so each sample's own other view stays the strongest
    positive. Cross-entropy against that soft target, symmetric over the two views.
    The batch holds ``view1``, ``view2`` and ``labels`` ``(B, K)``.
    """

    def __init__(
        self,
        temperature: float = 0.1,
        target_temperature: float = 0.1,
        identity_weight: float = 0.5,
        embed: Any = None,
        projector: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.temperature, self.target_temperature, self.identity_weight = temperature, target_temperature, identity_weight
        self.embed = embed or (lambda model, x: model.forward_features(x))
        self.projector = projector or nn.Identity()

    def soft_targets(self, labels: torch.Tensor) -> torch.Tensor:
        label_sim = _l2_normalise(labels) @ _l2_normalise(labels).T
        soft = torch.softmax(label_sim / self.target_temperature, dim=-1)
        identity = torch.eye(len(labels), device=labels.device)
        return self.identity_weight * identity + (1 - self.identity_weight) * soft

    def forward(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        z1 = _l2_normalise(self.projector(self.embed(model, batch["view1"])))
        z2 = _l2_normalise(self.projector(self.embed(model, batch["view2"])))
        targets = self.soft_targets(batch["labels"].float())
        logits = z1 @ z2.T / self.temperature
        loss = 0.5 * (
            torch.sum(-targets * F.log_softmax(logits, dim=-1), dim=-1).mean()
            + torch.sum(-targets.T * F.log_softmax(logits.T, dim=-1), dim=-1).mean()
        )
        return {"loss": loss, "positives_per_anchor": (targets > 1.0 / len(targets)).sum(-1).float().mean()}


class MultiTaskSupervised(nn.Module):
    """Supervised multi-task pretraining (AudioSet tagging, ChemBERTa-2 MTR).

    ``predict(model, inputs)`` gives ``(B, T)``; ``batch["target"]`` has NaN where a
    label is missing, masked out. ``kind="bce"`` for tags, ``"mse"`` for normalised
    regression targets."""

    def __init__(self, kind: str = "bce", predict: Any = None) -> None:
        super().__init__()
        if kind not in ("bce", "mse"):
            raise ValueError(f"kind must be 'bce' or 'mse', got {kind!r}")
        self.kind = kind
        self.predict = predict or (lambda model, x: model(x))

    def forward(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        pred = self.predict(model, batch["input"])
        target = batch["target"].to(pred.dtype)
        observed = ~torch.isnan(target)
        filled = torch.nan_to_num(target)
        if self.kind == "bce":
            losses = F.binary_cross_entropy_with_logits(pred, filled, reduction="none")
        else:
            losses = (pred - filled).pow(2)
        return {"loss": (losses * observed).sum() / observed.sum().clamp(min=1)}
