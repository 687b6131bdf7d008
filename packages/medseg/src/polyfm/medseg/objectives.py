"""Self-supervised pretraining objectives for 3D (and 2D) segmentation networks.

Each is a callable ``objective(model, batch) -> {"loss": ..., ...}`` for
``polyfm.core.pretrain.Pretraining``; ``batch["input"]`` holds random crops ``(B, C, *S)``
of unlabelled volumes (``polyfm.medseg.data.VolumeFolderDataModule``).

* :class:`VolumeFusion` (MIS-FM, Wang et al. 2023; PyMIC ``Crop4VolumeFusion`` +
  ``VolumeFusion``): two views of the data are fused block by block with a discrete
  coefficient ``alpha = k / K`` (``k`` in ``1..K`` on a ``foreground_ratio`` share of the
  blocks, 0 elsewhere): ``x = alpha * v1 + (1 - alpha) * v2``. The whole U-Net (encoder
  *and* decoder) learns to segment ``k`` per voxel, with Dice + CE, so the pretrained
  decoder transfers too. The network needs ``out_channels = K + 1`` (5 by default).
* :class:`MaskedVolumeInpainting`: random cubes are replaced by noise and the U-Net
  (``out_channels = in_channels``) restores them; L1 on the masked voxels (the masked
  image modelling of STU-Net/MAE-style CNN pretraining, dense so the decoder learns).
* :class:`SwinSSL` (Tang et al. 2022, research-contributions ``SwinUNETR/Pretrain``):
  rotation prediction (4 classes) + contrastive coding (512-d, NT-Xent with tau 0.5) +
  inpainting of randomly dropped patches, on the Swin-ViT of a ``SwinUNETR``; loss = CE +
  contrastive + L1. Its heads use the official names (``rotation_head``,
  ``contrastive_head``, ``conv``) so :meth:`SwinSSL.official_state_dict` writes the layout
  of the released ``model_swinvit.pt``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses.dice import DiceCELoss
from torch import nn

from polyfm.core.errors import ConfigError


def _random_flip(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Flip each sample along each spatial axis with probability 1/2 (PyMIC's random_flip)."""
    out = x.clone()
    for i in range(len(x)):
        axes = [d + 1 for d in range(x.ndim - 2) if torch.rand((), generator=generator) < 0.5]
        if axes:
            out[i] = x[i].flip(axes)
    return out


class ObjectiveModule(nn.Module):
    """An objective with parameters (heads, projectors). The explicit ``__call__`` signature lets
    LightningCLI see that it implements ``polyfm.core.pretrain.Objective`` (nn.Module's is ``*args``)."""

    def __call__(self, model: nn.Module, batch: Any) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = super().__call__(model, batch)
        return out


def _check_outputs(model: nn.Module, needed: int, objective: str) -> None:
    have = getattr(model, "num_outputs", None)
    if have is not None and have != needed:
        raise ConfigError(
            f"{objective} needs a network with out_channels={needed}, got {have}. "
            f"Call model.reset_head({needed}) before pretraining (fine-tuning resets it again)."
        )


class VolumeFusion(ObjectiveModule):
    """MIS-FM Volume Fusion: predict the per-voxel fusion coefficient of two fused sub-volumes."""

    def __init__(
        self,
        num_classes: int = 5,
        foreground_ratio: float = 0.7,
        block_min: Sequence[int] | int = 8,
        block_max: Sequence[int] | int = 32,
        flip: bool = True,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ConfigError(f"Volume Fusion needs at least 2 classes (K + 1 coefficients), got {num_classes}.")
        self.num_classes, self.foreground_ratio, self.flip = num_classes, foreground_ratio, flip
        self.block_min, self.block_max = block_min, block_max
        self.loss = DiceCELoss(to_onehot_y=True, softmax=True)

    def fuse(self, view1: torch.Tensor, view2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(fused volume, coefficient map ``(B, 1, *S)`` in 0..K). One block size per sample, on a grid
        with a random offset, ``foreground_ratio`` of the blocks fused (PyMIC's VolumeFusion)."""
        k_max = self.num_classes - 1
        spatial = view1.shape[2:]
        dims = len(spatial)
        lo = [self.block_min] * dims if isinstance(self.block_min, int) else list(self.block_min)
        hi = [self.block_max] * dims if isinstance(self.block_max, int) else list(self.block_max)
        mask = torch.zeros(len(view1), 1, *spatial, dtype=torch.long, device=view1.device)
        for i in range(len(view1)):
            block = [min(int(torch.randint(lo[d], hi[d] + 1, ())), spatial[d]) for d in range(dims)]
            offset = [int(torch.randint(0, spatial[d] % block[d] + 1, ())) for d in range(dims)]
            grid = [spatial[d] // block[d] for d in range(dims)]
            n_blocks = int(torch.tensor(grid).prod())
            n_fg = int(n_blocks * self.foreground_ratio)
            chosen = torch.randperm(n_blocks)[:n_fg]
            coefficients = torch.randint(1, k_max + 1, (n_fg,))
            for flat, k in zip(chosen.tolist(), coefficients.tolist(), strict=True):
                position = np.unravel_index(flat, grid)
                slices = [slice(offset[d] + int(position[d]) * block[d], offset[d] + (int(position[d]) + 1) * block[d]) for d in range(dims)]
                index: tuple[int | slice, ...] = (i, 0, *slices)
                mask[index] = k
        alpha = mask.to(view1.dtype) / k_max
        return alpha * view1 + (1.0 - alpha) * view2, mask

    def views(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Two crops per sample: ``view1``/``view2`` when the datamodule gives them, else each crop
        paired with another crop of the batch (different location or volume)."""
        if "view1" in batch:
            return batch["view1"], batch["view2"]
        x = batch["input"]
        other = x.roll(1, 0) if len(x) > 1 else x.flip(list(range(2, x.ndim)))
        return x, other

    def forward(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        _check_outputs(model, self.num_classes, "Volume Fusion")
        view1, view2 = self.views(batch)
        if self.flip:
            view1, view2 = _random_flip(view1), _random_flip(view2)
        fused, target = self.fuse(view1, view2)
        logits = model(fused)
        if isinstance(logits, torch.Tensor) and logits.ndim == fused.ndim + 1:  # DynUNet deep supervision: main head
            logits = logits[:, 0]
        loss = self.loss(logits, target)
        accuracy = (logits.argmax(1, keepdim=True) == target).float().mean()
        return {"loss": loss, "voxel_accuracy": accuracy.detach()}


class MaskedVolumeInpainting(ObjectiveModule):
    """Masked-volume modelling for CNN U-Nets: cubes of ``block_size`` covering about ``mask_ratio``
    of the volume are replaced by noise; L1 between the output and the original on masked voxels."""

    def __init__(self, mask_ratio: float = 0.4, block_size: int = 8, noise: bool = True) -> None:
        super().__init__()
        if not 0.0 < mask_ratio < 1.0:
            raise ConfigError(f"mask_ratio must be in (0, 1), got {mask_ratio}.")
        self.mask_ratio, self.block_size, self.noise = mask_ratio, block_size, noise

    def make_mask(self, x: torch.Tensor) -> torch.Tensor:
        spatial = x.shape[2:]
        coarse = [max(1, -(-s // self.block_size)) for s in spatial]
        keep = torch.rand(len(x), 1, *coarse, device=x.device) < self.mask_ratio
        mask = keep.float()
        for d in range(len(spatial)):
            mask = mask.repeat_interleave(self.block_size, dim=2 + d)
        return mask[(slice(None), slice(None), *(slice(0, s) for s in spatial))]

    def forward(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        x = batch["input"]
        _check_outputs(model, x.shape[1], "Masked-volume inpainting")
        mask = self.make_mask(x)
        fill = torch.rand_like(x) * (x.amax() - x.amin()) + x.amin() if self.noise else torch.zeros_like(x)
        corrupted = x * (1 - mask) + fill * mask
        output = model(corrupted)
        if output.ndim == x.ndim + 1:  # DynUNet deep supervision: main head
            output = output[:, 0]
        masked = mask.expand_as(x)
        loss = (torch.abs(output - x) * masked).sum() / masked.sum().clamp(min=1)
        return {"loss": loss, "mask_fraction": mask.mean().detach()}


# ----------------------------------------------------------------------------- SwinUNETR SSL


def rotate_batch(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate each sample by 0/90/180/270 degrees in the plane of the first two spatial axes
    (the official ``rot_rand``: ``rot90(k, (2, 3))`` on ``(C, H, W, D)``); returns (rotated, k)."""
    ks = torch.randint(0, 4, (len(x),))
    rotated = torch.stack([xi.rot90(int(k), (1, 2)) for xi, k in zip(x, ks, strict=True)])
    return rotated, ks.to(x.device)


def patch_rand_drop(x: torch.Tensor, replacement: torch.Tensor | None = None, max_drop: float = 0.3, max_block: float = 0.25, tolerance: float = 0.05) -> torch.Tensor:
    """The official ``patch_rand_drop`` on one sample ``(C, *S)``: random boxes covering up to
    ``max_drop`` of the voxels are filled with min-max scaled noise or another sample's voxels."""
    x = x.clone()
    spatial = x.shape[1:]
    target = float(torch.rand(())) * max_drop * float(torch.tensor(spatial).prod())
    tol = [max(1, int(tolerance * s)) for s in spatial]
    biggest = [max(t + 1, int(s * max_block)) for s, t in zip(spatial, tol, strict=True)]
    dropped = 0
    while dropped < target:
        starts = [int(torch.randint(0, s - t, ())) for s, t in zip(spatial, tol, strict=True)]
        ends = [min(st + int(torch.randint(t, b, ())), s) for st, t, b, s in zip(starts, tol, biggest, spatial, strict=True)]
        box = (slice(None), *(slice(a, b) for a, b in zip(starts, ends, strict=True)))
        if replacement is None:
            noise = torch.randn_like(x[box])
            x[box] = (noise - noise.min()) / (noise.max() - noise.min()).clamp(min=1e-8)
        else:
            x[box] = replacement[box]
        dropped += int(torch.tensor([b - a for a, b in zip(starts, ends, strict=True)]).prod())
    return x


def aug_rand(x: torch.Tensor) -> torch.Tensor:
    """The official ``aug_rand``: drop patches (noise), then usually patches of another sample."""
    out = x.clone()
    for i in range(len(x)):
        out[i] = patch_rand_drop(out[i])
        j = int(torch.randint(0, len(x), ()))
        if j != i:
            out[i] = patch_rand_drop(out[i], x[j])
    return out


class SwinSSL(ObjectiveModule):
    """SwinUNETR self-supervised pretraining (rotation + contrastive + reconstruction) on the
    Swin-ViT of a :class:`polyfm.medseg.models.SwinUNETR`; ``dim`` is its ``16 * feature_size``."""

    def __init__(self, dim: int = 768, in_channels: int = 1, spatial_dims: int = 3, temperature: float = 0.5, contrastive_dim: int = 512) -> None:
        super().__init__()
        self.temperature = temperature
        self.rotation_head = nn.Linear(dim, 4)
        self.contrastive_head = nn.Linear(dim, contrastive_dim)
        conv = nn.Conv3d if spatial_dims == 3 else nn.Conv2d
        norm = nn.InstanceNorm3d if spatial_dims == 3 else nn.InstanceNorm2d
        mode = "trilinear" if spatial_dims == 3 else "bilinear"
        widths = [dim, dim // 2, dim // 4, dim // 8, dim // 16, dim // 16]
        layers: list[nn.Module] = []
        for w_in, w_out in zip(widths[:-1], widths[1:], strict=True):  # the official "vae" upsampler: 5 x (conv, norm, act, up x2)
            layers += [conv(w_in, w_out, 3, padding=1), norm(w_out), nn.LeakyReLU(), nn.Upsample(scale_factor=2, mode=mode, align_corners=False)]
        layers.append(conv(widths[-1], in_channels, kernel_size=1))
        self.conv = nn.Sequential(*layers)

    def heads(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        tokens = features.flatten(2).transpose(1, 2)  # (B, N, dim); the official heads read tokens 0 and 1
        return self.rotation_head(tokens[:, 0]), self.contrastive_head(tokens[:, 1]), self.conv(features)

    def contrast(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        """NT-Xent exactly as the official ``Contrast`` (cosine similarity, all 2B-1 others in the denominator)."""
        z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
        sim = z @ z.T / self.temperature
        n = len(z1)
        positives = torch.cat([torch.diagonal(sim, n), torch.diagonal(sim, -n)])
        sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
        return (torch.logsumexp(sim, dim=1) - positives).mean()

    def forward(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        swin_features = getattr(model, "swin_features", None)
        if swin_features is None:
            raise ConfigError(f"SwinSSL pretrains a SwinUNETR's Swin-ViT; got {type(model).__name__}. Use VolumeFusion or MaskedVolumeInpainting for CNN U-Nets.")
        x = batch["input"]
        x1, rot1 = rotate_batch(x)
        x2, rot2 = rotate_batch(x)
        rot1_p, con1, rec1 = self.heads(swin_features(aug_rand(x1)))
        rot2_p, con2, rec2 = self.heads(swin_features(aug_rand(x2)))
        rotation = F.cross_entropy(torch.cat([rot1_p, rot2_p]), torch.cat([rot1, rot2]))
        contrastive = self.contrast(con1, con2)
        reconstruction = F.l1_loss(torch.cat([rec1, rec2]), torch.cat([x1, x2]))
        loss = rotation + contrastive + reconstruction
        return {"loss": loss, "rotation": rotation.detach(), "contrastive": contrastive.detach(), "reconstruction": reconstruction.detach()}

    def official_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Swin-ViT + heads in the released ``model_swinvit.pt`` layout (``module.`` prefix, MLP ``fc1/fc2``)."""
        state = {}
        for key, value in model.state_dict().items():
            if key.startswith("swinViT."):
                key = key.removeprefix("swinViT.").replace(".mlp.linear1.", ".mlp.fc1.").replace(".mlp.linear2.", ".mlp.fc2.")
                state[f"module.{key}"] = value
        state |= {f"module.{k}": v for k, v in self.state_dict().items()}
        return state
