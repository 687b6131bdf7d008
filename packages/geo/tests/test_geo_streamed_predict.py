"""Tiled prediction streamed to the output GeoTIFFs strip by strip: the same maps as stitching the
whole scene in memory, on the input's grid, and never a partial file at the final path."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import rasterio
import torch
from rasterio.transform import from_origin
from torch import nn

from polyfm.core.errors import ConfigError
from polyfm.core.predict import Ensemble
from polyfm.geo.data import GeoTiffChips, GeoTiffSegmentationDataModule, gdal_cache
from polyfm.geo.predict import GeoPredictionWriter, blending_weights
from polyfm.geo.tasks import GeoSegmentation

BANDS = ["red", "green", "blue"]
SCALE = 0.01


def _write_scene(path: Path, height: int, width: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    array = rng.integers(1, 1000, size=(3, height, width)).astype(np.uint16)
    array[:, :3, :4] = 0  # nodata corner
    array[2, height // 2 : height // 2 + 5, 3:9] = 0  # one band at nodata in a patch mid-scene (a strip boundary region)
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(path, "w", driver="GTiff", height=height, width=width, count=3, dtype="uint16", crs="EPSG:32633",
                       transform=from_origin(600_000 + 7 * seed, 5_100_000, 10, 10), nodata=0) as out:
        out.write(array)


def _data(tmp_path: Path, scenes: list[Path], chip: int, stride: int, batch_size: int = 7, **options: object) -> GeoTiffSegmentationDataModule:
    _write_scene(tmp_path / "train" / "image.tif", 8, 8, 99)
    with rasterio.open(tmp_path / "train" / "mask.tif", "w", driver="GTiff", height=8, width=8, count=1, dtype="uint8") as out:
        out.write(np.zeros((1, 8, 8), np.uint8))
    (tmp_path / "train" / "pairs.csv").write_text("image,mask\nimage.tif,mask.tif\n")
    return GeoTiffSegmentationDataModule(str(tmp_path / "train" / "pairs.csv"), bands=BANDS, num_classes=3, scale=SCALE, nodata="fill",
                                         predict_paths=[str(p) for p in scenes], predict_chip_size=chip, predict_stride=stride,
                                         batch_size=batch_size, **options)  # type: ignore[arg-type]


def _task(seed: int) -> GeoSegmentation:
    """A 3x3 convolution: not per-pixel, so each chip's edge differs from the whole-scene pass and
    only a stitch of the same chips gives the same map."""
    torch.manual_seed(seed)
    return GeoSegmentation(nn.Conv2d(3, 3, 3, padding=1), num_classes=3, class_names=["water", "crop", "urban"])


class _Recorder(L.Callback):
    """Keeps every chip's probabilities (and ensemble std), corner and valid mask, as the model gave them."""

    def __init__(self) -> None:
        self.chips: list[tuple[list[int], torch.Tensor, torch.Tensor | None, torch.Tensor]] = []

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):  # type: ignore[no-untyped-def]
        std = outputs.get("probabilities_std")
        for i, chip in enumerate(batch["chip"].tolist()):
            self.chips.append((chip, outputs["probabilities"][i].float(), None if std is None else std[i].float(), batch["valid"][i]))


def _in_memory(chips: list, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """The writer's previous path, the reference: the whole scene's weighted sums held in memory,
    divided once after the last chip."""
    classes = chips[0][1].shape[0]
    total, total_std = torch.zeros(classes, height, width), torch.zeros(classes, height, width)
    weight, valid = torch.zeros(height, width), torch.zeros(height, width, dtype=torch.bool)
    for (top, left, *_), p, std, v in chips:
        h, w = min(p.shape[-2], height - top), min(p.shape[-1], width - left)
        kernel = blending_weights(p.shape[-2], p.shape[-1])[:h, :w]
        total[:, top : top + h, left : left + w] += p[:, :h, :w] * kernel
        if std is not None:
            total_std[:, top : top + h, left : left + w] += std[:, :h, :w] * kernel
        weight[top : top + h, left : left + w] += kernel
        valid[top : top + h, left : left + w] |= v[:h, :w]
    total.div_(weight)
    return total, (total_std.div_(weight) if chips[0][2] is not None else None), valid


@pytest.mark.parametrize(("height", "width", "chip", "stride"), [(600, 40, 16, 12), (530, 260, 64, 40)])
def test_streamed_scene_equals_the_in_memory_stitch_on_the_input_grid(tmp_path, trainer_factory, height, width, chip, stride):
    """Scenes spanning 3 strips of 256 rows (the output's block height), chips whose overlap
    (4 / 24 px) does not divide the strip, so chips straddle every strip boundary; 600 x 40 is
    written in strips, 530 x 260 in 256 px tiles. Labels equal, probabilities to 1e-6."""
    scene = tmp_path / "scenes" / "big.tif"
    _write_scene(scene, height, width, 1)
    recorder, writer = _Recorder(), GeoPredictionWriter(str(tmp_path / "out"), write_probabilities=True)
    task = _task(0)
    trainer_factory(callbacks=[recorder, writer]).predict(task, _data(tmp_path, [scene], chip, stride))
    expected, _, valid = _in_memory(recorder.chips, height, width)
    expected_labels = expected.argmax(0).numpy().astype(np.uint8)
    expected_labels[~valid.numpy()] = 255
    with rasterio.open(scene) as src, rasterio.open(tmp_path / "out" / "big.tif") as out, \
            rasterio.open(tmp_path / "out" / "big_probabilities.tif") as probabilities:
        for f in (out, probabilities):
            assert (f.crs, f.transform, f.shape, f.bounds) == (src.crs, src.transform, src.shape, src.bounds)
        assert (out.count, out.dtypes[0], out.nodata, out.tags(1)["classes"]) == (1, "uint8", 255, "water,crop,urban")
        assert probabilities.descriptions == ("water", "crop", "urban")
        if min(height, width) >= 256:
            assert out.block_shapes[0] == (256, 256)
        labels = out.read(1)
        np.testing.assert_allclose(probabilities.read(), expected.numpy(), atol=1e-6)
    assert np.array_equal(labels, expected_labels)
    assert 0 < (labels == 255).sum() < 100 and (labels[:3, :4] == 255).all()  # the nodata corner and patch, nothing else
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]  # no temporary file left beside the maps


def test_streamed_ensemble_spread_equals_the_in_memory_stitch(tmp_path, trainer_factory):
    scene = tmp_path / "scenes" / "big.tif"
    _write_scene(scene, 300, 30, 2)
    checkpoints = []
    for seed in (1, 2):
        checkpoints.append(tmp_path / f"fold{seed}.ckpt")
        torch.save({"state_dict": _task(seed).state_dict()}, checkpoints[-1])
    recorder = _Recorder()
    trainer_factory(callbacks=[recorder, GeoPredictionWriter(str(tmp_path / "out"))]).predict(
        Ensemble(_task(0), [str(c) for c in checkpoints]), _data(tmp_path, [scene], 16, 12))
    mean, std, valid = _in_memory(recorder.chips, 300, 30)
    assert std is not None
    chosen = mean.argmax(0, keepdim=True)
    spread = std.gather(0, chosen)[0].numpy()
    spread[~valid.numpy()] = np.nan
    with rasterio.open(tmp_path / "out" / "big_uncertainty.tif") as uncertainty:
        assert uncertainty.tags(1)["members"] == "2"
        np.testing.assert_allclose(uncertainty.read(1), spread, atol=1e-6)  # NaN where nodata, in both


class _FailsAfter(nn.Module):
    """A 1x1 convolution that raises (or kills its process) on its ``calls``-th batch."""

    def __init__(self, calls: int, kill: bool = False) -> None:
        super().__init__()
        self.conv, self.calls, self.kill = nn.Conv2d(3, 3, 1), calls, kill

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls -= 1
        if self.calls == 0:
            if self.kill:
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError("the accelerator fell over")
        return self.conv(x)


def test_a_failed_predict_leaves_no_partial_map_and_keeps_finished_scenes(tmp_path, trainer_factory):
    """The second scene (600 rows: two strips already written to its temporary file) fails
    mid-way: the first scene's map is there, whole; the second has no file at its final path and
    no temporary file is left behind."""
    first, second = tmp_path / "scenes" / "a_first.tif", tmp_path / "scenes" / "b_second.tif"
    _write_scene(first, 20, 20, 3)
    _write_scene(second, 600, 40, 4)
    data = _data(tmp_path, [first, second], 16, 12, batch_size=4)
    torch.manual_seed(0)
    task = GeoSegmentation(_FailsAfter(calls=1 + 25), num_classes=3)  # first scene: 1 batch; second: 96 of its 150 chips, then fails
    with pytest.raises(RuntimeError, match="fell over"):
        trainer_factory(callbacks=[GeoPredictionWriter(str(tmp_path / "out"), write_probabilities=True)]).predict(task, data)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a_first.tif", "a_first_probabilities.tif"]
    with rasterio.open(tmp_path / "out" / "a_first.tif") as out:
        assert out.shape == (20, 20)


def test_a_killed_predict_leaves_nothing_at_the_final_path(tmp_path):
    """SIGKILL mid-scene (no clean-up can run): the map's final path does not exist; what was
    written lives only in a hidden temporary file beside it."""
    scene = tmp_path / "scenes" / "big.tif"
    _write_scene(scene, 600, 40, 5)
    _data(tmp_path, [scene], 16, 12)  # writes the training pair
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import lightning as L
        from test_geo_streamed_predict import _FailsAfter, _data
        from polyfm.geo.predict import GeoPredictionWriter
        from polyfm.geo.tasks import GeoSegmentation
        from pathlib import Path
        torch.set_num_threads(1)
        tmp = Path({str(tmp_path)!r})
        task = GeoSegmentation(_FailsAfter(calls=18, kill=True), num_classes=3)  # 150 chips in batches of 7: killed after 119
        L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp),
                  callbacks=[GeoPredictionWriter(str(tmp / "out"))]).predict(task, _data(tmp, [tmp / "scenes" / "big.tif"], 16, 12))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    left = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert not (tmp_path / "out" / "big.tif").exists()
    assert len(left) == 1 and left[0].startswith(".") and left[0].endswith(".big.tif")  # the partial map, hidden, never renamed


def _libgdal() -> ctypes.CDLL:
    """The GDAL that rasterio loaded (its wheel bundles it): dlopen of the same file shares its state."""
    found = sorted((Path(rasterio.__file__).parent.parent / "rasterio.libs").glob("libgdal*.so*"))
    if not found:
        pytest.skip("rasterio's GDAL is not a bundled libgdal (not a manylinux wheel): cannot ask GDAL for its cache size")
    lib = ctypes.CDLL(str(found[0]))
    lib.GDALGetCacheMax64.restype = ctypes.c_int64
    return lib


def test_gdal_cache_caps_gdals_block_cache_in_megabytes_and_restores_it():
    """rasterio passes an integer GDAL_CACHEMAX to GDAL as bytes: gdal_cache(3) must make it 3 MB
    (Env(GDAL_CACHEMAX=3) would be 3 bytes), and GDAL's own maximum comes back afterwards."""
    lib = _libgdal()
    default = lib.GDALGetCacheMax64()
    with gdal_cache(3):
        assert lib.GDALGetCacheMax64() == 3 * 1024 * 1024
        with gdal_cache(1):  # nested (a write inside a read's block): the inner cap, then the outer again
            assert lib.GDALGetCacheMax64() == 1024 * 1024
        assert lib.GDALGetCacheMax64() == 3 * 1024 * 1024
    assert lib.GDALGetCacheMax64() == default
    with gdal_cache(None):
        assert lib.GDALGetCacheMax64() == default


def test_a_capped_gdal_cache_writes_the_same_maps(tmp_path, trainer_factory):
    """A 1 MB cache, smaller than one 256-row block row of the probabilities (3 x 256 x 260 float32,
    0.8 MB) plus the class ids, gives the maps of GDAL's default cache, to the bit."""
    scene = tmp_path / "scenes" / "big.tif"
    _write_scene(scene, 530, 260, 6)
    maps = {}
    for cache in (1, None):
        out = tmp_path / f"out_{cache}"
        writer = GeoPredictionWriter(str(out), write_probabilities=True, gdal_cache_mb=cache)
        trainer_factory(callbacks=[writer]).predict(_task(0), _data(tmp_path, [scene], 64, 40, predict_gdal_cache_mb=cache))
        with rasterio.open(out / "big.tif") as labels, rasterio.open(out / "big_probabilities.tif") as probabilities:
            maps[cache] = (labels.read(), probabilities.read())
    assert np.array_equal(maps[1][0], maps[None][0]) and np.array_equal(maps[1][1], maps[None][1])


@pytest.mark.parametrize("bad", [0, -64, 1.5, True, "64"])
def test_gdal_cache_sizes_other_than_positive_integers_are_refused(tmp_path, bad):
    with pytest.raises(ConfigError, match=r"gdal_cache_mb is GDAL's block cache in MB: an integer >= 1, or None"):
        GeoPredictionWriter(str(tmp_path / "out"), gdal_cache_mb=bad)
    with pytest.raises(ConfigError, match=r"predict_gdal_cache_mb is GDAL's block cache in MB"):
        _data(tmp_path, [], 16, 12, predict_gdal_cache_mb=bad)
    with pytest.raises(ConfigError, match=r"gdal_cache_mb is GDAL's block cache in MB"):
        GeoTiffChips([], ["red"], 16, gdal_cache_mb=bad)
