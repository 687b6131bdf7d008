"""Spatial block cross-validation of the GeoTIFF data modules, on generated tiles laid out on a
known grid (4 x 4 tiles of 80 m, 2 x 2 tiles per 160 m block)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from polyfm.core.crossval import check_fold_options
from polyfm.core.errors import ConfigError, DataError
from polyfm.geo.data import GeoTiffDataModule, GeoTiffSegmentationDataModule
from polyfm.geo.samples import write_geotiff

BANDS = ["red", "green", "blue"]
SIZE, RES, X0, Y0 = 8, 10.0, 500_000.0, 4_200_000.0  # 80 m tiles; X0, Y0 are multiples of 160 m
BLOCK = 160.0


def _tiles(folder: Path, rows: int = 4, cols: int = 4, crs: str = "EPSG:32633") -> dict[str, tuple[int, int]]:
    """Tiles ``r{row}c{col}.tif`` (and class-id masks) on a regular grid; returns each tile's block by hand."""
    rng = np.random.default_rng(0)
    blocks, lines, pairs = {}, ["path,label"], ["image,mask"]
    for r in range(rows):
        for c in range(cols):
            name = f"r{r}c{c}.tif"
            origin = (X0 + c * SIZE * RES, Y0 - r * SIZE * RES)
            write_geotiff(folder / name, rng.integers(1, 1000, (3, SIZE, SIZE)).astype(np.uint16), BANDS, origin=origin, res=RES, crs=crs)
            write_geotiff(folder / f"mask_{name}", rng.integers(0, 2, (1, SIZE, SIZE)).astype(np.uint8), origin=origin, res=RES, crs=crs)
            blocks[name] = (r // 2, c // 2)
            lines.append(f"{name},{'a' if (r + c) % 2 else 'b'}")
            pairs.append(f"{name},mask_{name}")
    (folder / "labels.csv").write_text("\n".join(lines) + "\n")
    (folder / "pairs.csv").write_text("\n".join(pairs) + "\n")
    return blocks


def _names(dataset) -> list[str]:
    items = getattr(dataset, "items", None) or getattr(dataset, "pairs", None)
    return sorted(Path(p).name for p, _ in items)


@pytest.fixture
def grid(tmp_path):
    return tmp_path, _tiles(tmp_path)


@pytest.mark.parametrize("module", ["classification", "segmentation"])
def test_block_folds_keep_every_block_on_one_side(grid, module):
    folder, blocks = grid
    held_out: list[str] = []
    for fold in range(4):
        if module == "classification":
            dm = GeoTiffDataModule(bands=BANDS, csv_path=str(folder / "labels.csv"), fold=fold, num_folds=4, block_size=BLOCK, batch_size=4)
        else:
            dm = GeoTiffSegmentationDataModule(str(folder / "pairs.csv"), BANDS, num_classes=2, fold=fold, num_folds=4, block_size=BLOCK,
                                               batch_size=4)
        dm.setup()
        train, val = _names(dm.train_set), _names(dm.val_set)
        assert {blocks[n] for n in train}.isdisjoint({blocks[n] for n in val})
        assert len({blocks[n] for n in val}) == 1 and len(val) == 4 and len(train) == 12  # one whole 2 x 2 block per fold
        assert _names(dm.test_set) == val  # no test_csv: the held-out fold is the test split too
        assert next(iter(dm.train_dataloader()))["input"].shape == (4, 3, SIZE, SIZE)
        held_out += val
    assert sorted(held_out) == sorted(blocks)  # every tile is held out exactly once


def test_without_block_size_neighbours_straddle_the_split(grid):
    folder, blocks = grid
    straddling = 0
    for fold in range(4):
        dm = GeoTiffDataModule(bands=BANDS, csv_path=str(folder / "labels.csv"), fold=fold, num_folds=4)
        dm.setup()
        train, val = _names(dm.train_set), _names(dm.val_set)
        assert len(val) == 4 and not set(train) & set(val)
        straddling += bool({blocks[n] for n in train} & {blocks[n] for n in val})
    assert straddling > 0  # what block_size prevents: a random deal splits blocks


def test_test_csv_stays_the_test_split_in_a_fold(grid, tmp_path_factory):
    folder, _ = grid
    other = tmp_path_factory.mktemp("test")
    _tiles(other, rows=1, cols=2)
    dm = GeoTiffDataModule(bands=BANDS, csv_path=str(folder / "labels.csv"), test_csv=str(other / "labels.csv"), fold=1, num_folds=4,
                           block_size=BLOCK)
    dm.setup()
    assert _names(dm.test_set) == ["r0c0.tif", "r0c1.tif"] and len(dm.val_set) == 4


def test_fold_errors(grid):
    folder, _ = grid
    csv_path = str(folder / "labels.csv")
    with pytest.raises(ConfigError, match=r"fold=4\) is not one of the 4 folds \(0 \.\. 3\)"):
        GeoTiffDataModule(bands=BANDS, csv_path=csv_path, fold=4, num_folds=4)
    with pytest.raises(ConfigError, match=r"block_size=160.0\) needs fold"):
        GeoTiffSegmentationDataModule(str(folder / "pairs.csv"), BANDS, num_classes=2, block_size=BLOCK)
    with pytest.raises(ConfigError, match=r"leave val_csv unset"):
        GeoTiffDataModule(bands=BANDS, csv_path=csv_path, val_csv=csv_path, fold=0)
    dm = GeoTiffDataModule(bands=BANDS, csv_path=csv_path, fold=0, num_folds=5, block_size=BLOCK)
    with pytest.raises(ConfigError, match=r"labels.csv have their centres in 4 spatial block\(s\) of 160.0 EPSG:32633 units, "
                                          r"fewer than the 5 folds: use a smaller block_size or num_folds <= 4"):
        dm.setup()


def test_files_in_another_crs_are_refused_with_block_size(grid):
    folder, _ = grid
    write_geotiff(folder / "r0c0.tif", np.ones((3, SIZE, SIZE), np.uint16), BANDS, origin=(X0, Y0), res=RES, crs="EPSG:32632")
    dm = GeoTiffDataModule(bands=BANDS, csv_path=str(folder / "labels.csv"), fold=0, num_folds=4, block_size=BLOCK)
    with pytest.raises(DataError, match=r"r0c1.tif: is in EPSG:32633 but .*r0c0.tif is in EPSG:32632: .* reproject"):
        dm.setup()
    import rasterio

    with rasterio.open(folder / "r0c0.tif", "w", driver="GTiff", height=SIZE, width=SIZE, count=3, dtype="uint16") as out:
        out.write(np.ones((3, SIZE, SIZE), np.uint16))  # no CRS, no transform
    with pytest.raises(DataError, match=r"r0c0.tif: has no CRS, so block_size=160.0 cannot place it"):
        GeoTiffDataModule(bands=BANDS, csv_path=str(folder / "labels.csv"), fold=0, num_folds=4, block_size=BLOCK).setup()
    # without block_size the CRS does not matter to a fold
    GeoTiffDataModule(bands=BANDS, csv_path=str(folder / "labels.csv"), fold=0, num_folds=4).setup()


def test_polyfm_cv_accepts_both_modules():
    for cls in (GeoTiffDataModule, GeoTiffSegmentationDataModule):
        check_fold_options(cls, with_num_folds=True)
