"""Registered weights: names resolve through the cache, offline errors say where to put the file,
and the weights' meta (bands, normalisation) travels with the model."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from polyfm.core.errors import CheckpointError
from polyfm.core.weights import get_weights, register_weights
from polyfm.geo.models.satmae import SatMAE
from polyfm.geo.models.softcon import SoftConResNet50, SoftConViT


def test_offline_error_names_url_and_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("POLYFM_CACHE", str(tmp_path))
    monkeypatch.setenv("POLYFM_OFFLINE", "1")
    with pytest.raises(CheckpointError) as info:
        SoftConViT.from_pretrained("softcon-vits14-s2")
    text = str(info.value)
    assert "B13_vits14_softcon.pth" in text and "https://huggingface.co/wangyi111/softcon" in text and str(tmp_path) in text


def test_registered_name_loads_from_cache_with_meta(tmp_path, monkeypatch):
    monkeypatch.setenv("POLYFM_CACHE", str(tmp_path))
    monkeypatch.setenv("POLYFM_OFFLINE", "1")
    real = get_weights("satmae-vit-base-fmow-sentinel-pretrain")
    spec = dataclasses.replace(real, name="satmae-test-tiny", files={"tiny.pth": ("https://example.invalid/tiny.pth", None)}, config={"num_heads": 2})
    register_weights(spec)
    source = SatMAE(img_size=16, patch_size=8, embed_dim=32, channel_embed=8, depth=1, num_heads=2, decoder_embed_dim=16,
                    decoder_depth=1, decoder_num_heads=2, decoder_channel_embed=8)
    folder = tmp_path / "weights" / "satmae-test-tiny"
    folder.mkdir(parents=True)
    torch.save({"model": source.state_dict()}, folder / "tiny.pth")
    model = SatMAE.from_pretrained("satmae-test-tiny", decoder_depth=0)
    assert model.bands == real.meta["bands"] and model.normalization.kind == "sigma2"
    torch.testing.assert_close(model.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)
    # and the constructor path used by YAML recipes: same weights, bands mapped from a 13-band file
    built = SatMAE(img_size=16, patch_size=8, embed_dim=32, channel_embed=8, depth=1, num_heads=2, decoder_depth=0,
                   pretrained="satmae-test-tiny", input_bands=["B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B10", "B11", "B12"])
    x = torch.rand(1, 13, 16, 16)
    keep = [1, 2, 3, 4, 5, 6, 7, 8, 11, 12]
    torch.testing.assert_close(built.eval().forward_features(x), model.eval().forward_features(x[:, keep]))


def test_checkpoint_of_another_architecture_is_refused(tmp_path):
    torch.save(SoftConResNet50(in_chans=2).state_dict(), tmp_path / "B2_rn50_softcon.pth")
    with pytest.raises(CheckpointError, match="not a DINOv2 ViT checkpoint"):
        SoftConViT.from_pretrained(tmp_path / "B2_rn50_softcon.pth")
    model = SoftConResNet50.from_pretrained(tmp_path / "B2_rn50_softcon.pth")
    assert model.bands == ["VV", "VH"]
    wrong = SoftConResNet50(in_chans=13).state_dict()
    torch.save(wrong, tmp_path / "thirteen.pth")
    with pytest.raises(CheckpointError, match="shape mismatch"):
        SoftConResNet50(in_chans=2, pretrained=str(tmp_path / "thirteen.pth"))


@pytest.mark.parametrize(
    ("ours", "enum", "member"),
    [("softcon-rn50-s2", "ResNet50_Weights", "SENTINEL2_ALL_SOFTCON"), ("softcon-rn50-s1", "ResNet50_Weights", "SENTINEL1_GRD_SOFTCON"),
     ("softcon-vits14-s2", "ViTSmall14_DINOv2_Weights", "SENTINEL2_ALL_SOFTCON"),
     ("softcon-vitb14-s1", "ViTBase14_DINOv2_Weights", "SENTINEL1_GRD_SOFTCON")],
)
def test_softcon_meta_against_torchgeo_weights(ours, enum, member):
    """Same files, bands and statistics as torchgeo 0.8's SoftCon enums; the one deliberate
    difference is the scaling: ours is SoftCon's ±2σ, torchgeo's plain mean/std; the latter is
    one explicit ``kind="meanstd"`` away and then equals torchgeo's Normalize."""
    import torchgeo.models
    from torchvision.transforms import v2

    from polyfm.geo.bands import Normalization, canonical_band

    spec, theirs = get_weights(ours), getattr(getattr(torchgeo.models, enum), member)
    assert theirs.url.rsplit("/", 1)[1].replace("_enc.pth", ".pth") == spec.primary_file
    assert [canonical_band(b) for b in theirs.meta["bands"]] == spec.meta["bands"]
    normalize = next(t for t in theirs.transforms if isinstance(t, v2.Normalize))
    ours_norm = Normalization.from_meta(spec.meta["normalization"])
    assert ours_norm.kind == "sigma2" and ours_norm.quantize
    as_torchgeo = Normalization.from_meta({**spec.meta["normalization"], "kind": "meanstd"})
    x = torch.rand(1, len(spec.meta["bands"]), 8, 8) * 4000 - (40 if "s1" in ours else 0)
    torch.testing.assert_close(as_torchgeo(x), normalize(x.clone()), atol=1e-5, rtol=1e-5)
