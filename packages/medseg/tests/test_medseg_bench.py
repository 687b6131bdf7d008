"""The bench entry builds ours and the MONAI reference on the same configuration."""

from __future__ import annotations

import torch

from polyfm.medseg.bench import cases


def test_medseg_bench_cases_run_side_by_side() -> None:
    quick = {case.name: case for case in cases(quick=True)}
    assert set(quick) == {"medseg/unet3d/train", "medseg/swin_unetr/train", "medseg/unet3d/sliding_window"}
    device = torch.device("cpu")
    for name in ("medseg/unet3d/train", "medseg/unet3d/sliding_window"):
        ours, reference = quick[name].ours(device), quick[name].reference(device)
        a, b = ours(), reference()
        assert torch.is_tensor(a) and torch.is_tensor(b) and a.shape == b.shape
    full = {case.name: case for case in cases(quick=False)}
    assert full["medseg/unet3d/train"].items == 2  # 96^3 patches, batch 2, as MONAI's recipes
