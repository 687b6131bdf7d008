"""The bench entry builds ours and the MONAI reference on the same configuration, and both run."""

from __future__ import annotations

import torch
from monai.networks.nets import MedNeXtS

from polyfm.medseg.bench import cases, families


def _tensors(result: object) -> list[torch.Tensor]:
    """A step's output as tensors: a loss, logits, or the pipeline's list (cases) of lists (crops) of dicts."""
    if torch.is_tensor(result):
        return [result]
    crops = [crop for case in result for crop in case]  # type: ignore[attr-defined]
    return [torch.as_tensor(crop[key]) for crop in crops for key in sorted(crop) if key in ("input", "target", "image", "label")]


def test_every_quick_case_runs_ours_and_the_reference_side_by_side() -> None:
    quick = cases(quick=True)
    names = {case.name for case in quick}
    for family in ("unet3d", "basic_unet3d", "dynunet", "mednext", "segresnet", "swin_unetr", "unetr"):
        assert {f"medseg/{family}/train", f"medseg/{family}/sliding_window"} <= names
    assert "medseg/nifti-load-transform" in names
    device = torch.device("cpu")
    for case in quick:
        assert case.reference is not None and case.reference_name, case.name
        ours, reference = _tensors(case.ours(device)()), _tensors(case.reference(device)())
        assert [t.shape for t in ours] == [t.shape for t in reference], case.name
        if case.name.endswith("/sliding_window") or case.name == "medseg/nifti-load-transform":
            # same weights / same files and seed: the same numbers, not only the same shapes
            for a, b in zip(ours, reference, strict=True):
                assert torch.allclose(a.float(), b.float(), atol=1e-5), case.name


def test_full_cases_are_the_recipe_sizes() -> None:
    full = {case.name: case for case in cases(quick=False)}
    assert full["medseg/unet3d/train"].items == 2  # 96^3 patches, batch 2, as MONAI's recipes
    assert {f.name for f in families(quick=False)} == {"UNet", "BasicUNet", "DynUNet", "MedNeXt", "SegResNet", "SwinUNETR", "UNETR"}
    dynunet = next(f for f in families(quick=False) if f.name == "DynUNet")
    mednext = next(f for f in families(quick=False) if f.name == "MedNeXt").build(ours=True).state_dict()
    preset = MedNeXtS(out_channels=14).state_dict()  # the paper's S, as MONAI's factory builds it
    assert {k: v.shape for k, v in mednext.items()} == {k: v.shape for k, v in preset.items()}
    assert dynunet.config["strides"] == [1, 2, 2, 2, 2, 2] and dynunet.deep_supervision  # finetune-dynunet.yaml
