"""Benchmarks: polyfm's medseg training step and sliding-window inference vs a plain MONAI loop.

Same networks (MONAI's), same patches, same loss, same optimizer, in one process:

* ``medseg/unet3d/train`` and ``medseg/swin_unetr/train``: training patches/s and peak
  memory at 96^3 (quick: 32^3 / 64^3 with small widths), ours = ``VolumeSegmentation``'s
  training step (DiceCE, non-finite guard) + AdamW; reference = ``monai.networks.nets`` +
  ``DiceCELoss`` + AdamW written as in MONAI's tutorials.
* ``medseg/unet3d/sliding_window``: whole volumes/s, ours = ``VolumeSegmentation.infer``
  (``SlidingWindowInferer``, Gaussian blending); reference = ``sliding_window_inference``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from polyfm.core.bench import BenchCase


def _patches(device: torch.device, batch: int, roi: list[int], classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 1, *roi, generator=generator).to(device)
    y = torch.randint(0, classes, (batch, 1, *roi), generator=generator).to(device)
    return x, y


def _autocast(device: torch.device):  # noqa: ANN202
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def _ours_train(build: Callable[[], torch.nn.Module], batch: int, roi: list[int], classes: int) -> Callable[[torch.device], Callable[[], object]]:
    def make(device: torch.device) -> Callable[[], object]:
        from polyfm.medseg.tasks import VolumeSegmentation

        task = VolumeSegmentation(build(), classes, roi_size=roi).to(device)
        optimizer = torch.optim.AdamW([p for p in task.parameters() if p.requires_grad], lr=1e-4)
        x, y = _patches(device, batch, roi, classes)
        task.train()

        def step() -> object:
            with _autocast(device):
                loss = task.training_step({"input": x, "target": y}, 0)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss

        return step

    return make


def _monai_train(build: Callable[[], torch.nn.Module], batch: int, roi: list[int], classes: int) -> Callable[[torch.device], Callable[[], object]]:
    def make(device: torch.device) -> Callable[[], object]:
        from monai.losses import DiceCELoss

        network = build().to(device).train()
        loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
        optimizer = torch.optim.AdamW(network.parameters(), lr=1e-4)
        x, y = _patches(device, batch, roi, classes)

        def step() -> object:
            with _autocast(device):
                loss = loss_fn(network(x), y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss

        return step

    return make


def _sliding(ours: bool, build: Callable[[], torch.nn.Module], volume: list[int], roi: list[int], classes: int) -> Callable[[torch.device], Callable[[], object]]:
    def make(device: torch.device) -> Callable[[], object]:
        x = torch.rand(1, 1, *volume, generator=torch.Generator().manual_seed(0)).to(device)
        if ours:
            from polyfm.medseg.tasks import VolumeSegmentation

            task = VolumeSegmentation(build(), classes, roi_size=roi, sw_batch_size=4, overlap=0.5).to(device).eval()

            def step() -> object:
                with torch.no_grad(), _autocast(device):
                    return task.infer(x)

            return step
        from monai.inferers import sliding_window_inference

        network = build().to(device).eval()

        def reference() -> object:
            with torch.no_grad(), _autocast(device):
                return sliding_window_inference(x, roi, 4, network, overlap=0.5, mode="gaussian")

        return reference

    return make


def cases(quick: bool) -> list[BenchCase]:
    import monai.networks.nets as monai_nets

    from polyfm.medseg.models import SwinUNETR, UNet

    classes = 14
    unet_args = {"spatial_dims": 3, "in_channels": 1, "out_channels": classes, "num_res_units": 2}
    unet_args |= {"channels": (8, 16, 32), "strides": (2, 2)} if quick else {"channels": (16, 32, 64, 128, 256), "strides": (2, 2, 2, 2)}
    swin_args = {"spatial_dims": 3, "in_channels": 1, "out_channels": classes, "feature_size": 12 if quick else 48}
    unet_roi, swin_roi = ([32, 32, 32], [64, 64, 64]) if quick else ([96, 96, 96], [96, 96, 96])
    batch = 1 if quick else 2
    volume = [64, 64, 48] if quick else [256, 256, 160]

    def ours_unet() -> torch.nn.Module:
        return UNet(**unet_args)

    def monai_unet() -> torch.nn.Module:
        return monai_nets.UNet(**unet_args)

    def ours_swin() -> torch.nn.Module:
        return SwinUNETR(**swin_args)

    def monai_swin() -> torch.nn.Module:
        return monai_nets.SwinUNETR(**swin_args)

    rows = [
        ("medseg/unet3d/train", "patches", batch, _ours_train(ours_unet, batch, unet_roi, classes), _monai_train(monai_unet, batch, unet_roi, classes), "monai UNet + DiceCELoss + AdamW loop"),
        ("medseg/swin_unetr/train", "patches", batch, _ours_train(ours_swin, batch, swin_roi, classes), _monai_train(monai_swin, batch, swin_roi, classes), "monai SwinUNETR + DiceCELoss + AdamW loop"),
        ("medseg/unet3d/sliding_window", "volumes", 1, _sliding(True, ours_unet, volume, unet_roi, classes), _sliding(False, monai_unet, volume, unet_roi, classes), "monai sliding_window_inference (gaussian, overlap 0.5)"),
    ]  # fmt: skip
    return [BenchCase(name=n, unit=u, items=i, ours=o, reference=r, reference_name=rn) for n, u, i, o, r, rn in rows]
