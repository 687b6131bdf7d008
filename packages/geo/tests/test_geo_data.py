"""GeoTIFF readers and DataModules on generated 13-band tiles, with hand-made bad files."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from polyfm.core.errors import ConfigError, DataError
from polyfm.geo.bands import SENTINEL2_BANDS, Normalization
from polyfm.geo.data import (
    GeoTiffDataModule,
    GeoTiffSegmentationDataModule,
    TorchGeoDataModule,
    band_names_of,
    read_label_csv,
    scan_class_folders,
)
from polyfm.geo.samples import synthetic_dataset, write_geotiff, write_scene_folder
from polyfm.geo.weights import WEIGHTS


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    root, names = write_scene_folder(tmp_path_factory.mktemp("scenes"), per_class=5, size=16, num_classes=3, seed=1)
    return root, names


def test_generated_tiles_look_like_sentinel2(scenes):
    root, names = scenes
    items, classes = scan_class_folders(root)
    assert classes == sorted(names) and len(items) == 15
    assert band_names_of(items[0][0]) == list(SENTINEL2_BANDS)
    import rasterio

    with rasterio.open(items[0][0]) as src:
        array = src.read()
    assert array.dtype == np.uint16 and array.shape == (13, 16, 16) and 0 < array.mean() < 10000
    data = synthetic_dataset(90, size=8, seed=0)
    water = data["images"][data["labels"] == 0].astype(float)
    trees = data["images"][data["labels"] == 1].astype(float)
    # NIR (B8) is low over water and high over vegetation; the classes are separable by spectrum
    assert water[:, 7].mean() < 1500 < trees[:, 7].mean()


def test_folder_datamodule_normalises_with_the_weights_meta(scenes):
    root, _ = scenes
    meta = next(w for w in WEIGHTS if w.name == "softcon-rn50-s2").meta
    dm = GeoTiffDataModule(bands=list(SENTINEL2_BANDS), root=str(root), normalization=meta["normalization"], batch_size=4)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert batch["input"].shape == (4, 13, 16, 16) and batch["input"].dtype == torch.float32
    assert 0.0 <= batch["input"].min() and batch["input"].max() <= 1.0
    assert batch["target"].dtype == torch.long and len(batch["meta"]) == 4
    assert dm.num_classes == 3 and len(dm.train_set) + len(dm.val_set) + len(dm.test_set) == 15


def test_multilabel_csv(scenes):
    root, names = scenes
    dm = GeoTiffDataModule(bands=list(SENTINEL2_BANDS), csv_path=str(root / "labels.csv"), label_column="tags", multilabel=True, batch_size=4)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert batch["target"].shape == (4, 3) and batch["target"].dtype == torch.float32
    assert set(batch["target"].unique().tolist()) <= {0.0, 1.0}


def test_csv_errors_name_file_and_row(tmp_path, scenes):
    root, _ = scenes
    good = next(iter(sorted((root / "water").glob("*.tif"))))
    bad = tmp_path / "labels.csv"
    bad.write_text(f"path,label\n{good},water\n{tmp_path / 'missing.tif'},water\n")
    with pytest.raises(DataError, match=r"labels.csv, row 3: image .*missing.tif"):
        read_label_csv(bad)
    bad.write_text(f"path,label\n{good},water\n{good},lava\n")
    with pytest.raises(DataError, match=r"row 3: label 'lava' is not one of the classes"):
        read_label_csv(bad, class_names=["water", "trees"])
    bad.write_text("file,label\n")
    with pytest.raises(DataError, match=r"missing column\(s\) \['path'\]"):
        read_label_csv(bad)
    bad.write_text(f"path,water,trees\n{good},1,\n{good},yes,0\n")
    with pytest.raises(DataError, match=r"row 3: column 'water' holds 'yes'; expected a value in \[0, 1\]"):
        read_label_csv(bad, label_column=None, label_columns=["water", "trees"])
    bad.write_text(f"path,water,trees\n{good},1,\n")
    items, _ = read_label_csv(bad, label_column=None, label_columns=["water", "trees"])
    assert np.isnan(items[0][1][1])  # empty = missing label (NaN, masked by the task)


def test_corrupt_and_mislabelled_files(tmp_path):
    corrupt = tmp_path / "scene" / "broken.tif"
    corrupt.parent.mkdir(parents=True)
    corrupt.write_bytes(b"II*\x00not really a tiff")
    dm = GeoTiffDataModule(bands=list(SENTINEL2_BANDS), root=str(tmp_path), val_fraction=0, test_fraction=0)
    dm.setup()
    with pytest.raises(DataError, match="broken.tif: not a readable raster"):
        dm.train_set[0]
    four = write_geotiff(tmp_path / "four" / "a.tif", np.zeros((4, 8, 8), np.uint16))
    dm = GeoTiffDataModule(bands=list(SENTINEL2_BANDS), root=str(four.parent.parent), val_fraction=0, test_fraction=0)
    dm.setup()
    index = [str(p) for p, _ in dm.train_set.items].index(str(four))
    with pytest.raises(DataError, match="a.tif: has 4 bands but 13 band names were declared"):
        dm.train_set[index]
    with pytest.raises(DataError, match="unnamed bands"):
        band_names_of(four)
    with pytest.raises(ConfigError, match="exactly one of root"):
        GeoTiffDataModule(bands=["B2"])


def test_segmentation_pairs(tmp_path):
    data = synthetic_dataset(6, size=16, num_classes=3, seed=0)
    rows = ["image,mask"]
    for i in range(6):
        write_geotiff(tmp_path / f"img{i}.tif", data["images"][i], list(SENTINEL2_BANDS))
        write_geotiff(tmp_path / f"mask{i}.tif", data["classmaps"][i][None])
        rows.append(f"img{i}.tif,mask{i}.tif")
    (tmp_path / "pairs.csv").write_text("\n".join(rows) + "\n")
    dm = GeoTiffSegmentationDataModule(str(tmp_path / "pairs.csv"), list(SENTINEL2_BANDS), num_classes=3, batch_size=2,
                                       normalization=Normalization("scale", divisor=10000.0))
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert batch["input"].shape == (2, 13, 16, 16) and batch["target"].shape == (2, 1, 16, 16)
    dm = GeoTiffSegmentationDataModule(str(tmp_path / "pairs.csv"), list(SENTINEL2_BANDS), num_classes=2, batch_size=2)
    dm.setup()
    with pytest.raises(DataError, match="outside 0..1"):
        for i in range(len(dm.train_set)):
            dm.train_set[i]


def test_torchgeo_dataset_by_path_reports_missing_data(tmp_path):
    dm = TorchGeoDataModule("EuroSAT", root=str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="EuroSAT"):
        dm.setup()
    with pytest.raises(ConfigError, match="no dataset 'NotADataset'"):
        TorchGeoDataModule("NotADataset", root=str(tmp_path)).setup()


EUROSAT_ORDER = ["B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B09", "B10", "B11", "B12", "B8A"]


def test_torchgeo_eurosat_by_path_maps_its_band_order(tmp_path):
    """A EuroSAT folder laid out as torchgeo reads it; its B8A-last band order is mapped by name."""
    base = tmp_path / "ds" / "images" / "remote_sensing" / "otherDatasets" / "sentinel_2" / "tif"
    data = synthetic_dataset(12, size=16, num_classes=2, seed=3)
    order = [SENTINEL2_BANDS.index(b.replace("B0", "B")) for b in EUROSAT_ORDER]
    names: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    seen = [0, 0]
    for i, (tile, label) in enumerate(zip(data["images"], data["labels"], strict=True)):
        cls = ["AnnualCrop", "Forest"][label]
        write_geotiff(base / cls / f"{cls}_{i}.tif", tile[order])
        names[["train", "train", "val", "test"][seen[label] % 4]].append(f"{cls}_{i}.jpg")  # every split holds both classes
        seen[label] += 1
    for split, files in names.items():
        (tmp_path / f"eurosat-{split}.txt").write_text("\n".join(files) + "\n")
    dm = TorchGeoDataModule("EuroSAT", root=str(tmp_path), batch_size=3)
    dm.setup()
    assert dm.bands[-1] == "B8A" and dm.class_names == ["AnnualCrop", "Forest"]
    batch = next(iter(dm.train_dataloader()))
    assert batch["input"].shape == (3, 13, 16, 16) and batch["target"].dtype == torch.long

    from polyfm.geo.models.softcon import SoftConViT

    model = SoftConViT(in_chans=13, img_size=14, embed_dim=32, depth=1, num_heads=2).eval()
    x = batch["input"][:, :, :14, :14]
    with torch.no_grad():
        in_s2_order = model(x[:, [EUROSAT_ORDER.index(b) for b in ["B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10", "B11", "B12"]]])
        model.adapt_bands(dm.bands)
        torch.testing.assert_close(model(x), in_s2_order, atol=1e-5, rtol=1e-4)


def test_nan_pixels_are_reported_with_the_file(tmp_path):
    tile = np.full((13, 8, 8), 1000.0, dtype=np.float32)
    tile[4, 2, 2] = np.nan
    write_geotiff(tmp_path / "water" / "cloudy.tif", tile)
    dm = GeoTiffDataModule(bands=list(SENTINEL2_BANDS), root=str(tmp_path), val_fraction=0, test_fraction=0)
    dm.setup()
    with pytest.raises(DataError, match="cloudy.tif: holds NaN or Inf values"):
        dm.train_set[0]


# ----------------------------------------------------------------------------- real-world file variants

S2_NORM = Normalization.from_meta(next(w for w in WEIGHTS if w.name == "softcon-rn50-s2").meta["normalization"])


def _one_scene(tmp_path, name="scene.tif", **kwargs):
    tile = np.maximum(synthetic_dataset(1, size=16, num_classes=3, seed=4)["images"][0], 1)  # no 0 (clipped noise) in it
    return tile, write_geotiff(tmp_path / "water" / name, tile, list(SENTINEL2_BANDS), **kwargs)


def _first(tmp_path, **kwargs):
    dm = GeoTiffDataModule(bands=list(SENTINEL2_BANDS), root=str(tmp_path), normalization=S2_NORM, val_fraction=0, test_fraction=0,
                           batch_size=1, **kwargs)
    dm.setup()
    return dm, dm.train_set[0]


def test_declared_nodata_is_refused_or_filled_and_flagged(tmp_path):
    tile, _ = _one_scene(tmp_path, nodata=0)
    tile = tile.copy()
    tile[4, 3:5, 6:9] = 0  # six B5 pixels at the declared nodata value
    write_geotiff(tmp_path / "water" / "scene.tif", tile, list(SENTINEL2_BANDS), nodata=0)
    with pytest.raises(DataError, match=r"scene.tif: band 'B5' has 6 pixels at the declared nodata value 0.0"):
        _first(tmp_path)
    dm, sample = _first(tmp_path, nodata="fill")
    assert sample["valid"].shape == (16, 16) and int((~sample["valid"]).sum()) == 6 and not sample["valid"][3, 6]
    # filled with the band's training mean: it normalises to the mean level, never to "reflectance 0"
    level = S2_NORM(torch.tensor(S2_NORM.mean, dtype=torch.float32).view(13, 1, 1))[4, 0, 0]
    assert torch.equal(sample["input"][4, 3:5, 6:9], level.expand(2, 3))
    assert torch.equal(sample["input"][:, 0, 0], S2_NORM(torch.from_numpy(tile[:, :1, :1].astype(np.float32)))[:, 0, 0])
    assert next(iter(dm.train_dataloader()))["valid"].shape == (1, 16, 16)
    _, kept = _first(tmp_path, nodata="keep")
    assert "valid" not in kept


def test_float_reflectance_needs_an_explicit_scale(tmp_path):
    tile, _ = _one_scene(tmp_path)
    _, reference = _first(tmp_path)
    write_geotiff(tmp_path / "water" / "scene.tif", (tile / 10000.0).astype(np.float32), list(SENTINEL2_BANDS))
    with pytest.raises(DataError, match=r"scene.tif: values span .*, like reflectance in 0-1.*Pass scale=10000"):
        _first(tmp_path)
    _, scaled = _first(tmp_path, scale=10000.0)
    torch.testing.assert_close(scaled["input"], reference["input"], atol=1 / 255 + 1e-6, rtol=0)  # float32 rounding vs uint8 steps
    assert (scaled["input"] != reference["input"]).float().mean() < 0.01


def test_band_descriptions_in_another_order_are_read_by_name(tmp_path):
    tile, _ = _one_scene(tmp_path)
    _, reference = _first(tmp_path)
    order = [12, 0, 8, 3, 2, 1, 4, 5, 6, 7, 9, 10, 11]  # a file writer that put B12 first and B8A after B2
    write_geotiff(tmp_path / "water" / "scene.tif", tile[order], [SENTINEL2_BANDS[i] for i in order])
    _, reordered = _first(tmp_path)
    assert torch.equal(reordered["input"], reference["input"])
    other = [b for b in SENTINEL2_BANDS if b != "B10"] + ["VV"]
    write_geotiff(tmp_path / "water" / "scene.tif", tile, other)
    with pytest.raises(DataError, match=r"scene.tif: its band descriptions name the bands .*'VV'.* but bands="):
        _first(tmp_path)


def test_band_files_on_different_grids_are_refused(tmp_path):
    from polyfm.geo.data import raster_dataset

    band = np.full((1, 40, 40), 500, np.uint16)
    write_geotiff(tmp_path / "scene_B04.tif", band)
    write_geotiff(tmp_path / "scene_B03.tif", band)
    write_geotiff(tmp_path / "scene_B02.tif", band[:, :20, :20], res=0.0002)  # a 20 m band among 10 m ones
    kwargs = dict(bands=["B04", "B03", "B02"], separate_files=True, filename_glob="scene_B04.tif", filename_regex=r"^scene_(?P<band>B\d\d)\.tif$")
    with pytest.raises(DataError, match=r"scene_B02.tif: band 'B02' is on another grid than .*scene_B04.tif: .*resolution \(0.0002"):
        raster_dataset(tmp_path, **kwargs)
    write_geotiff(tmp_path / "scene_B02.tif", band, origin=(1113194.9, 6446275.8), res=11.1, crs="EPSG:3857")
    with pytest.raises(DataError, match=r"scene_B02.tif: band 'B02' is on another grid than .*scene_B04.tif: CRS EPSG:3857 vs EPSG:4326"):
        raster_dataset(tmp_path, **kwargs)
    (tmp_path / "scene_B02.tif").unlink()
    with pytest.raises(DataError, match=r"scene_B02.tif: band 'B02' file does not exist"):
        raster_dataset(tmp_path, **kwargs)


def test_chips_small_tiles_and_grid_edges(tmp_path):
    from polyfm.geo.data import chip_loader, raster_dataset

    scene = synthetic_dataset(1, size=40, num_classes=2, seed=5)["images"][0]
    write_geotiff(tmp_path / "big.tif", scene, list(SENTINEL2_BANDS))
    dataset = raster_dataset(tmp_path, bands=list(SENTINEL2_BANDS))
    # 40 px with 32 px chips: torchgeo's grid runs the second chip 24 px past the edge (zero-filled);
    # ours ends it at the edge: the chips are exactly the scene's corners
    chips = [b for b in chip_loader(dataset, size=32, sampler="grid", batch_size=8)][0]["input"]
    assert chips.shape == (4, 13, 32, 32)
    corners = [scene[:, :32, :32], scene[:, :32, 8:], scene[:, 8:, :32], scene[:, 8:, 8:]]
    assert {c.astype(np.float32).tobytes() for c in corners} == {c.numpy().tobytes() for c in chips}
    write_geotiff(tmp_path / "small.tif", scene[:, :20, :24], list(SENTINEL2_BANDS), origin=(11.0, 50.0))
    with pytest.raises(DataError, match=r"small.tif: covers 24 x 20 px, smaller than the 32 px chips"):
        chip_loader(raster_dataset(tmp_path, bands=list(SENTINEL2_BANDS)), size=32, sampler="random", length=4)
