"""Every quick geo bench case builds, and one step of ours and of its reference runs."""

from __future__ import annotations

import pytest
import torch

from polyfm.geo import bench

pytest.importorskip("rshf.satmae.model")
pytest.importorskip("dinov2.models.vision_transformer")
pytest.importorskip("torchgeo")

CPU = torch.device("cpu")
CASES = bench.cases(quick=True)


def test_case_names_are_unique_and_cover_each_model():
    names = [c.name for c in CASES]
    assert len(names) == len(set(names))
    for model in ("satmae/encoder", "satmae/encoder-vs-plain-vit", "softcon/vit", "softcon/rn50"):
        assert {f"geo/{model}/inference", f"geo/{model}/train-step"} <= set(names)
    assert {"geo/satmae/pretrain-step", "geo/softcon/pretrain-step", "geo/geotiff-chips"} <= set(names)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_one_step_of_ours_and_reference(case):
    assert case.reference is not None and case.reference_name
    ours, reference = case.ours(CPU)(), case.reference(CPU)()
    if case.name.endswith("/inference"):
        assert ours.shape == reference.shape == (case.items, ours.shape[-1])
    elif case.name == "geo/geotiff-chips":
        assert [b.shape for b in ours] == [b.shape for b in reference]
        assert sum(len(b) for b in ours) == case.items and ours[0].dtype == torch.float32
    else:
        assert ours.ndim == reference.ndim == 0 and torch.isfinite(ours) and torch.isfinite(reference)


@pytest.mark.parametrize("ours, reference", [
    (bench._satmae_encoder, bench._official_satmae_encoder),
    (bench._softcon_vit, bench._official_softcon_vit),
    (bench._softcon_rn50, bench._torchvision_rn50),
])
def test_same_weights_give_the_same_features(ours, reference):
    """The inference cases time the same function: our model carries the reference's weights."""
    a, b = ours(True, 2, CPU), reference(True, 2, CPU)
    a.module.eval(), b.module.eval()
    with torch.no_grad():
        torch.testing.assert_close(a.features(a.x), b.features(b.x), atol=1e-5, rtol=1e-4)
