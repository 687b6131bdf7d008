"""TTM's pretraining objective: direct multi-horizon forecasting on many series at once.

TTM is pretrained as a forecaster (no masking): univariate windows from many datasets,
at several resolutions (downsampling augmentation, ``PretrainDataModule``), each window
standardised by the model itself, loss MSE on the horizon (``loss="mae"`` for L1).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn


class MultiResolutionForecasting(nn.Module):
    """``objective(model, batch) -> {"loss", "mse", "mae"}`` for ``polyfm.core.pretrain.Pretraining``."""

    def __init__(self, loss: Literal["mse", "mae"] = "mse") -> None:
        super().__init__()
        if loss not in ("mse", "mae"):
            raise ValueError(f"loss={loss!r}: use 'mse' or 'mae'.")
        self.loss = loss

    def __call__(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        # typed like polyfm.core.pretrain.Objective, so LightningCLI accepts it as one
        out: dict[str, torch.Tensor] = super().__call__(model, batch)
        return out

    def forward(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        inputs = {k: v for k, v in batch.items() if k in ("past_values", "past_observed_mask", "freq_token")}
        out = model(**inputs)
        prediction = out["prediction_outputs"] if isinstance(out, dict) else out
        target = batch["future_values"][:, : prediction.shape[1]]
        mse, mae = F.mse_loss(prediction, target), F.l1_loss(prediction, target)
        return {"loss": mse if self.loss == "mse" else mae, "mse": mse.detach(), "mae": mae.detach()}
