"""Audio pretraining objectives for :class:`polyfm.core.pretrain.Pretraining`.

* :class:`AudioSetTagging`: PANNs' recipe. Multi-label tagging with binary
  cross-entropy on the clip output, mixup on the spectrogram (pairs of clips, Beta(1, 1)
  coefficients, targets mixed alike) and SpecAugment inside the model, on the model's
  device. Pair it with a balanced sampler (``AudioClipsDataModule(balanced=True)``).
* :class:`ContrastiveAudio`: self-supervised, for unlabelled folders. InfoNCE between
  the embeddings of two random crops of the same clip (``UnlabelledAudioDataModule``),
  through a small projection head, as in COLA (Saeed et al. 2021) / SimCLR.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from polyfm.audio.models.frontend import do_mixup, mixup_lambdas
from polyfm.core.pretrain import InfoNCE


class AudioSetTagging(nn.Module):
    """``objective(model, batch)`` for a PANNs model and ``{"input", "target"}`` batches
    (``target`` float ``(B, classes)``, NaN for an unknown label: masked out).

    In training with ``mixup_alpha > 0`` the batch is mixed in pairs (its size halves;
    an odd last clip is dropped), as PANNs' ``do_mixup``. The loss is BCE on the
    logits (PANNs uses BCE on the sigmoid output; the same loss, computed stably)."""

    def __init__(self, mixup_alpha: float = 1.0) -> None:
        super().__init__()
        self.mixup_alpha = mixup_alpha

    # An explicit signature: LightningCLI (jsonargparse) checks objectives against the
    # Objective protocol, and nn.Module's own __call__(*args, **kwargs) does not match it.
    def __call__(self, model: nn.Module, batch: Any) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = super().__call__(model, batch)
        return out

    def forward(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        waveform, target = batch["input"], batch["target"].float()
        mixup = model.training and self.mixup_alpha > 0 and len(waveform) >= 2
        if mixup:
            even = len(waveform) - len(waveform) % 2
            waveform, target = waveform[:even], target[:even]
            lam = mixup_lambdas(even, self.mixup_alpha, device=waveform.device)
            out = model(waveform, mixup_lambda=lam)
            observed = ~torch.isnan(target)
            target = do_mixup(torch.nan_to_num(target), lam)
            observed = observed[0::2] & observed[1::2]
        else:
            out = model(waveform)
            observed = ~torch.isnan(target)
            target = torch.nan_to_num(target)
        losses = F.binary_cross_entropy_with_logits(out["logits"], target, reduction="none")
        loss = (losses * observed).sum() / observed.sum().clamp(min=1)
        return {"loss": loss, "mixup": torch.tensor(float(mixup))}


class ContrastiveAudio(InfoNCE):
    """InfoNCE over two views of each clip (``batch["view1"]``, ``batch["view2"]``)
    with a two-layer projection head from ``feature_dim`` to ``projection_dim``.
    The head is trained with the model and dropped for fine-tuning."""

    def __init__(self, feature_dim: int, projection_dim: int = 128, temperature: float = 0.1) -> None:
        projector = nn.Sequential(nn.Linear(feature_dim, feature_dim), nn.ReLU(), nn.Linear(feature_dim, projection_dim))
        super().__init__(temperature=temperature, projector=projector)

    # An explicit signature: LightningCLI (jsonargparse) checks objectives against the
    # Objective protocol, and nn.Module's own __call__(*args, **kwargs) does not match it.
    def __call__(self, model: nn.Module, batch: Any) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = super().__call__(model, batch)
        return out
