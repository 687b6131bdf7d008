"""Benchmarks: polyfm's medseg training step, sliding-window inference and data pipeline vs plain MONAI.

Every network family we ship (UNet, BasicUNet, DynUNet, MedNeXt, SegResNet, SwinUNETR, UNETR) gets two cases, built by
one function (:func:`_family_cases`) from one configuration, both sides seeded alike so the
weights are the same:

* ``medseg/<family>/train``: training patches/s and peak memory; ours = ``VolumeSegmentation``'s
  training step (DiceCE, deep supervision, non-finite guard) + AdamW; reference =
  ``monai.networks.nets.<Family>`` + ``DiceCELoss`` + AdamW written as in MONAI's tutorials
  (DynUNet: the heads unbound and weighted 1, 1/2, 1/4..., as MONAI's dynunet pipeline).
* ``medseg/<family>/sliding_window``: whole volumes/s; ours = ``VolumeSegmentation.infer``
  (``SlidingWindowInferer``, Gaussian blending, overlap 0.5, 4 windows a batch); reference =
  ``sliding_window_inference`` with the same arguments.

Quick: tiny widths, 32^3 patches, batch 1, a 64x64x48 volume (CPU seconds). Full: the recipe
sizes, 96^3 patches, batch 2, a 256x256x160 volume (bf16 autocast on CUDA for both sides).

``medseg/nifti-load-transform``: volumes/s of the Decathlon training pipeline
(``polyfm.medseg.data.segmentation_transforms``: load, checks, RAS, 1.5x1.5x2 mm, CT window,
pad, positive/negative crops, flips) on NIfTI image/label pairs written with nibabel to a
temporary folder when the case is built, vs the same ``Compose`` written as in MONAI's spleen
tutorial; same files, same random seed, same crops.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

# imported at module level, not inside the steps' builders: the first case's memory must not count the imports
import monai.networks.nets as monai_nets
import nibabel as nib
import numpy as np
import torch
from monai.inferers.utils import sliding_window_inference
from monai.losses.dice import DiceCELoss
from monai.transforms.compose import Compose
from monai.transforms.croppad.dictionary import RandCropByPosNegLabeld, SpatialPadd
from monai.transforms.intensity.dictionary import RandShiftIntensityd, ScaleIntensityRanged
from monai.transforms.io.dictionary import LoadImaged
from monai.transforms.spatial.dictionary import Orientationd, RandFlipd, Spacingd
from monai.transforms.utility.dictionary import EnsureChannelFirstd

import polyfm.medseg.models as our_nets
from polyfm.core.bench import BenchCase
from polyfm.medseg.data import segmentation_transforms
from polyfm.medseg.tasks import VolumeSegmentation

Make = Callable[[torch.device], Callable[[], object]]

#: sliding-window settings shared by ours and the reference
SW_BATCH, OVERLAP = 4, 0.5


@dataclass(frozen=True)
class Family:
    """One network configuration, run by ours (``polyfm.medseg.models``) and by MONAI's class."""

    key: str  # the case name's middle part
    name: str  # the class name in both polyfm.medseg.models and monai.networks.nets
    config: dict[str, Any]
    classes: int
    deep_supervision: bool = False
    extra: dict[str, Any] = field(default_factory=dict)  # arguments MONAI requires that our wrapper defaults
    roi: tuple[int, ...] | None = None  # a patch size of its own (Swin: 32^3 leaves one voxel at its bottleneck)

    def build(self, ours: bool) -> torch.nn.Module:
        torch.manual_seed(0)  # the same weights on both sides
        args = {"spatial_dims": 3, "in_channels": 1, "out_channels": self.classes, **self.config}
        network: torch.nn.Module = getattr(our_nets, self.name)(**args) if ours else getattr(monai_nets, self.name)(**args, **self.extra)
        return network


#: MedNeXt-S, kernel 3 (``monai.networks.nets.MedNeXtS``), every argument given so both classes build it
MEDNEXT_S: dict[str, Any] = {
    "init_filters": 32, "kernel_size": 3, "use_residual_connection": True, "encoder_expansion_ratio": 2, "decoder_expansion_ratio": 2,
    "bottleneck_expansion_ratio": 2, "blocks_down": (2, 2, 2, 2), "blocks_bottleneck": 2, "blocks_up": (2, 2, 2, 2),
}  # fmt: skip


def families(quick: bool) -> list[Family]:
    """The seven families at tiny widths (quick) or at the recipes' sizes (SegResNet: wholeBody_ct_segmentation's,
    UNETR: MONAI's BTCV tutorial's, MedNeXt: the paper's S, kernel 3). MedNeXt's arguments are all spelled out,
    so MONAI's plain class builds the same network as our ``variant="S"``."""
    if quick:
        return [
            Family("unet3d", "UNet", {"channels": (8, 16, 32), "strides": (2, 2), "num_res_units": 2}, 14),
            Family("basic_unet3d", "BasicUNet", {"features": (4, 8, 16, 32, 64, 4)}, 14),
            Family("dynunet", "DynUNet", {"kernel_size": [3, 3, 3], "strides": [1, 2, 2], "filters": [8, 16, 32], "deep_supervision": True, "deep_supr_num": 1}, 2, True, {"upsample_kernel_size": [2, 2]}),
            Family("segresnet", "SegResNet", {"init_filters": 8, "blocks_down": (1, 2, 2, 4), "blocks_up": (1, 1, 1)}, 14),
            Family("mednext", "MedNeXt", {**MEDNEXT_S, "init_filters": 8}, 14),
            Family("swin_unetr", "SwinUNETR", {"feature_size": 12}, 14, roi=(64, 64, 32)),
            Family("unetr", "UNETR", {"img_size": (32, 32, 32), "feature_size": 8, "hidden_size": 96, "mlp_dim": 192, "num_heads": 4}, 14),
        ]  # fmt: skip
    dyn_strides = [1, 2, 2, 2, 2, 2]  # finetune-dynunet.yaml
    return [
        Family("unet3d", "UNet", {"channels": (16, 32, 64, 128, 256), "strides": (2, 2, 2, 2), "num_res_units": 2}, 14),
        Family("basic_unet3d", "BasicUNet", {"features": (32, 32, 64, 128, 256, 32)}, 14),
        Family("dynunet", "DynUNet", {"kernel_size": [3] * 6, "strides": dyn_strides, "deep_supervision": True, "deep_supr_num": 2}, 2, True, {"upsample_kernel_size": dyn_strides[1:]}),
        Family("segresnet", "SegResNet", {"init_filters": 32, "blocks_down": (1, 2, 2, 4), "blocks_up": (1, 1, 1)}, 14),
        Family("mednext", "MedNeXt", MEDNEXT_S, 14),
        Family("swin_unetr", "SwinUNETR", {"feature_size": 48}, 14),
        Family("unetr", "UNETR", {"img_size": (96, 96, 96), "feature_size": 16}, 14),
    ]  # fmt: skip


def _autocast(device: torch.device) -> torch.autocast:
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def _patches(device: torch.device, batch: int, roi: Sequence[int], classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 1, *roi, generator=generator).to(device)
    y = torch.randint(0, classes, (batch, 1, *roi), generator=generator).to(device)
    return x, y


def _task(family: Family, roi: Sequence[int], device: torch.device) -> VolumeSegmentation:
    return VolumeSegmentation(
        family.build(ours=True), family.classes, roi_size=list(roi), sw_batch_size=SW_BATCH, overlap=OVERLAP
    ).to(device)


def _train(family: Family, ours: bool, batch: int, roi: Sequence[int]) -> Make:
    def make(device: torch.device) -> Callable[[], object]:
        x, y = _patches(device, batch, roi, family.classes)
        if ours:
            task = _task(family, roi, device).train()
            parameters = [p for p in task.parameters() if p.requires_grad]

            def forward_loss() -> torch.Tensor:
                return task.training_step({"input": x, "target": y}, 0)
        else:
            network = family.build(ours=False).to(device).train()
            loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
            parameters = list(network.parameters())

            def forward_loss() -> torch.Tensor:
                output = network(x)
                if family.deep_supervision:  # MONAI's dynunet pipeline: heads stacked on dim 1
                    total: torch.Tensor = sum(0.5**i * loss_fn(p, y) for i, p in enumerate(torch.unbind(output, dim=1)))
                    return total
                loss: torch.Tensor = loss_fn(output, y)
                return loss

        optimizer = torch.optim.AdamW(parameters, lr=1e-4)

        def step() -> object:
            with _autocast(device):
                loss = forward_loss()
            loss.backward()  # type: ignore[no-untyped-call]  # torch leaves Tensor.backward unannotated
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss

        return step

    return make


def _sliding(family: Family, ours: bool, volume: Sequence[int], roi: Sequence[int]) -> Make:
    def make(device: torch.device) -> Callable[[], object]:
        x = torch.rand(1, 1, *volume, generator=torch.Generator().manual_seed(0)).to(device)
        if ours:
            infer = _task(family, roi, device).eval().infer
        else:
            network = family.build(ours=False).to(device).eval()

            def infer(x: torch.Tensor) -> torch.Tensor:
                logits = sliding_window_inference(x, list(roi), SW_BATCH, network, overlap=OVERLAP, mode="gaussian")
                assert isinstance(logits, torch.Tensor)  # a tensor network gives a tensor (MONAI's type allows tuples and dicts)
                return logits

        def step() -> object:
            with torch.no_grad(), _autocast(device):
                return infer(x)

        return step

    return make


def _family_cases(family: Family, batch: int, roi: Sequence[int], volume: Sequence[int]) -> list[BenchCase]:
    roi = family.roi or roi
    monai_name = f"monai.networks.nets.{family.name}"
    return [
        BenchCase(f"medseg/{family.key}/train", "patches", batch, _train(family, True, batch, roi), _train(family, False, batch, roi), reference_name=f"{monai_name} + DiceCELoss + AdamW loop"),
        BenchCase(f"medseg/{family.key}/sliding_window", "volumes", 1, _sliding(family, True, volume, roi), _sliding(family, False, volume, roi), reference_name=f"{monai_name} + sliding_window_inference (gaussian, overlap {OVERLAP})"),
    ]  # fmt: skip


# ----------------------------------------------------------------------------- data pipeline


class NiftiPairs:
    """Decathlon-style CT image/label NIfTI pairs, written with nibabel to a temporary folder on first use
    (0.8x0.8x2.5 mm, LPS-flipped affine so orientation and spacing both do work); removed with the object."""

    def __init__(self, count: int, shape: Sequence[int]) -> None:
        self.count, self.shape = count, tuple(shape)
        self._folder: tempfile.TemporaryDirectory[str] | None = None
        self._cases: list[dict[str, str]] = []

    def cases(self) -> list[dict[str, str]]:
        if self._folder is None:
            self._folder = tempfile.TemporaryDirectory(prefix="polyfm-medseg-bench-")
            rng = np.random.default_rng(0)
            affine = np.diag([-0.8, -0.8, 2.5, 1.0])
            grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in self.shape], indexing="ij"))
            for index in range(self.count):
                centre = rng.uniform(-0.4, 0.4, size=3)[:, None, None, None]
                organ = ((grid - centre) ** 2).sum(0) < 0.15
                image = rng.normal(-300, 200, self.shape) + organ * 350
                label = organ.astype(np.uint8) + (organ & (grid[2] > centre[2, 0, 0, 0])).astype(np.uint8)
                paths = {key: f"{self._folder.name}/case_{index}_{key}.nii.gz" for key in ("image", "label")}
                # nibabel leaves Nifti1Image's constructor unannotated
                nib.save(nib.Nifti1Image(image.astype(np.int16), affine), paths["image"])  # type: ignore[no-untyped-call]
                nib.save(nib.Nifti1Image(label, affine), paths["label"])  # type: ignore[no-untyped-call]
                self._cases.append(paths)
        return self._cases


def _reference_transforms(roi: Sequence[int], num_samples: int) -> Any:
    """MONAI's spleen / BTCV tutorial training transforms, with our defaults' values."""
    keys = ["image", "label"]
    return Compose(
        [
            LoadImaged(keys=keys),
            EnsureChannelFirstd(keys=keys),
            Orientationd(keys=keys, axcodes="RAS"),
            Spacingd(keys=keys, pixdim=(1.5, 1.5, 2.0), mode=("bilinear", "nearest")),
            ScaleIntensityRanged(keys=["image"], a_min=-175, a_max=250, b_min=0.0, b_max=1.0, clip=True),
            SpatialPadd(keys=keys, spatial_size=list(roi)),
            RandCropByPosNegLabeld(keys=keys, label_key="label", spatial_size=list(roi), pos=1, neg=1, num_samples=num_samples, image_key="image", image_threshold=0),
            RandFlipd(keys=keys, spatial_axis=[0], prob=0.10),
            RandFlipd(keys=keys, spatial_axis=[1], prob=0.10),
            RandFlipd(keys=keys, spatial_axis=[2], prob=0.10),
            RandShiftIntensityd(keys=["image"], offsets=0.10, prob=0.50),
        ]
    )  # fmt: skip


def _pipeline(files: NiftiPairs, ours: bool, roi: Sequence[int], num_samples: int = 2) -> Make:
    def make(device: torch.device) -> Callable[[], object]:
        if ours:
            transform = segmentation_transforms(True, list(roi), num_classes=3, pixdim=(1.5, 1.5, 2.0), num_samples=num_samples)
        else:
            transform = _reference_transforms(roi, num_samples)
        transform.set_random_state(seed=0)
        cases = files.cases()

        def step() -> object:
            return [transform(dict(case)) for case in cases]

        return step

    return make


def cases(quick: bool) -> list[BenchCase]:
    batch, roi, volume = (1, [32, 32, 32], [64, 64, 48]) if quick else (2, [96, 96, 96], [256, 256, 160])
    rows = [case for family in families(quick) for case in _family_cases(family, batch, roi, volume)]
    files = NiftiPairs(4, (128, 128, 64))
    files.cases()  # written now: making the fixtures must not count in the first side's memory
    crop = [48, 48, 32] if quick else [96, 96, 96]
    reference_name = "monai Compose as in the spleen tutorial (LoadImaged, EnsureChannelFirstd, Orientationd, Spacingd, ScaleIntensityRanged, RandCropByPosNegLabeld, flips)"
    rows.append(
        BenchCase(
            "medseg/nifti-load-transform",
            "volumes",
            files.count,
            _pipeline(files, True, crop),
            _pipeline(files, False, crop),
            reference_name=reference_name,
        )
    )
    return rows
