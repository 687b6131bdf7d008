"""Generated Sentinel-2 tiles (no labelled multispectral data is available offline) and the demo kit.

Tiles are uint16, 13 bands (B1..B12), reflectance x 10,000 in realistic ranges, built
from per-class spectral signatures of the nine Dynamic World land-cover classes
(the labels SoftCon uses) mixed spatially, with illumination and sensor noise. A
scene's class is its dominant cover; its multi-label vector is the cover fractions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from polyfm.geo.bands import SENTINEL2_BANDS

LAND_COVER = ["water", "trees", "grass", "flooded_vegetation", "crops", "shrub_and_scrub", "built", "bare", "snow_and_ice"]

# Typical top-of-atmosphere reflectance x 10,000 for B1..B12 (13 bands).
SIGNATURES = np.array(
    [
        [1250, 1050, 850, 600, 520, 420, 380, 330, 280, 120, 10, 150, 100],  # water
        [1300, 1050, 900, 650, 1100, 2300, 2800, 3000, 3100, 900, 15, 1500, 700],  # trees
        [1350, 1150, 1150, 950, 1500, 2500, 2900, 3100, 3200, 950, 15, 2300, 1300],  # grass
        [1250, 1050, 950, 750, 1000, 1600, 1900, 2000, 2050, 650, 12, 1000, 600],  # flooded vegetation
        [1400, 1250, 1300, 1150, 1700, 2700, 3100, 3300, 3400, 1000, 16, 2600, 1600],  # crops
        [1450, 1300, 1350, 1400, 1750, 2200, 2400, 2500, 2600, 850, 18, 2900, 2000],  # shrub and scrub
        [1800, 1700, 1700, 1800, 1900, 2000, 2100, 2200, 2250, 800, 20, 2600, 2300],  # built
        [1900, 1950, 2150, 2550, 2750, 2900, 3000, 3100, 3150, 1000, 25, 3800, 3200],  # bare
        [7000, 7200, 7100, 7000, 6950, 6900, 6800, 6700, 6600, 2500, 50, 1500, 1000],  # snow and ice
    ],
    dtype=np.float64,
)


def _blobs(rng: np.random.Generator, size: int, cells: int = 4) -> np.ndarray[Any, Any]:
    """A smooth random field in [0, 1] (bilinear upsampling of a coarse grid)."""
    coarse = torch.from_numpy(rng.random((1, 1, cells, cells)))
    field = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    return field[0, 0].numpy()


def synthetic_scene(
    dominant: int, size: int = 32, rng: np.random.Generator | None = None, num_classes: int = 9, purity: float = 0.7
) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    """One scene: ``(13, size, size)`` uint16, its per-pixel class map, its cover fractions."""
    rng = rng or np.random.default_rng()
    others = [c for c in range(num_classes) if c != dominant]
    second = int(rng.choice(others))
    share = purity + (1 - purity) * rng.random() * 0.5
    classmap = np.where(_blobs(rng, size) < share, dominant, second)
    speckle = rng.random((size, size)) < 0.05
    classmap = np.where(speckle, rng.integers(0, num_classes, (size, size)), classmap)
    reflectance = SIGNATURES[classmap].transpose(2, 0, 1)  # (13, H, W)
    illumination = rng.uniform(0.8, 1.2)
    texture = 1 + 0.08 * (_blobs(rng, size, 8) - 0.5)
    noise = rng.normal(0, 60, reflectance.shape)
    tile = np.clip(reflectance * illumination * texture + noise, 0, 10000).astype(np.uint16)
    fractions = np.bincount(classmap.ravel(), minlength=num_classes)[:num_classes] / classmap.size
    return tile, classmap.astype(np.uint8), fractions


def synthetic_dataset(n: int, size: int = 32, num_classes: int = 9, seed: int = 0) -> dict[str, np.ndarray[Any, Any]]:
    """``n`` scenes, balanced over dominant classes: images, labels, class maps, fractions."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % num_classes
    rng.shuffle(labels)
    tiles, maps, fracs = zip(*(synthetic_scene(int(c), size, rng, num_classes) for c in labels), strict=True)
    return {"images": np.stack(tiles), "labels": labels, "classmaps": np.stack(maps), "fractions": np.stack(fracs)}


def write_geotiff(
    path: str | Path, array: np.ndarray[Any, Any], band_names: list[str] | None = None, origin: tuple[float, float] = (10.0, 50.0),
    res: float = 0.0001, crs: str = "EPSG:4326", nodata: float | None = None,
) -> Path:
    """Write ``(C, H, W)`` as a GeoTIFF (EPSG:4326 unless ``crs``) with band descriptions and,
    if given, a declared ``nodata`` value."""
    import rasterio
    from rasterio.transform import from_origin

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    count, height, width = array.shape
    with rasterio.open(
        path, "w", driver="GTiff", height=height, width=width, count=count, dtype=array.dtype,
        crs=crs, transform=from_origin(origin[0], origin[1], res, res), nodata=nodata,
    ) as dst:
        dst.write(array)
        if band_names:
            for i, name in enumerate(band_names, start=1):
                dst.set_band_description(i, name)
    return path


def write_scene_folder(root: str | Path, per_class: int = 4, size: int = 32, num_classes: int = 4, seed: int = 0) -> tuple[Path, list[str]]:
    """``root/<class>/<i>.tif`` 13-band scenes and a ``labels.csv``: path, dominant class, multi-label
    tags (cover >= 15 %), and one ``cover_<class>`` column of land-cover fractions per class."""
    root = Path(root)
    data = synthetic_dataset(per_class * num_classes, size, num_classes, seed)
    names = LAND_COVER[:num_classes]
    rows = ["path,label,tags," + ",".join(f"cover_{n}" for n in names)]
    for i, (tile, label, frac) in enumerate(zip(data["images"], data["labels"], data["fractions"], strict=True)):
        rel = f"{names[label]}/{i:04d}.tif"
        write_geotiff(root / rel, tile, list(SENTINEL2_BANDS), origin=(10.0 + i * 0.01, 50.0))
        tags = ";".join(n for n, f in zip(names, frac, strict=True) if f >= 0.15)
        rows.append(f"{rel},{names[label]},{tags}," + ",".join(f"{f:.4f}" for f in frac))
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root, names


# ----------------------------------------------------------------------------- demo kit


def demo_kit(data_dir: Path | None, quick: bool = False) -> Any:
    """SoftCon pretraining of a small DINOv2-style ViT on generated 13-band tiles, then scene
    classification of their dominant land cover.

    Pretraining sees other tiles (other seeds) with only their land-cover *fraction*
    vectors, as SoftCon sees Dynamic World maps of SSL4EO-S12 scenes; fine-tuning learns
    the dominant class from few labels. No labelled multispectral data exists offline, so
    ``data_dir`` is not used (the real RGB files have no labels).
    """
    from polyfm.core.adaptation import Adaptation
    from polyfm.core.data import DictDataModule
    from polyfm.core.kit import DomainKit
    from polyfm.core.pretrain import Pretraining
    from polyfm.core.tasks import OptimConfig
    from polyfm.geo.bands import Normalization
    from polyfm.geo.models.softcon import SoftConViT
    from polyfm.geo.objectives import SoftConObjective
    from polyfm.geo.tasks import GeoClassification
    from polyfm.geo.weights import WEIGHTS

    size = 16 if quick else 32
    n_pretrain, n_train, n_eval = (192, 180, 90) if quick else (1536, 540, 270)
    num_classes = len(LAND_COVER)
    meta = next(w for w in WEIGHTS if w.name == "softcon-vits14-s2").meta
    norm = Normalization.from_meta({**meta["normalization"], "quantize": False})

    class Scenes(torch.utils.data.Dataset[dict[str, Any]]):
        def __init__(self, n: int, seed: int) -> None:
            data = synthetic_dataset(n, size, num_classes, seed)
            self.x = norm(torch.from_numpy(data["images"].astype(np.float32)))
            self.y = torch.from_numpy(data["labels"]).long()
            self.fractions = torch.from_numpy(data["fractions"]).float()

        def __len__(self) -> int:
            return len(self.x)

        def __getitem__(self, i: int) -> dict[str, Any]:
            return {"input": self.x[i], "labels": self.fractions[i], "target": self.y[i], "meta": i}

    class ScenesModule(DictDataModule):
        def __init__(self, sizes: tuple[int, int, int], seeds: tuple[int, int, int], label_fraction: float = 1.0, seed: int = 0) -> None:
            super().__init__(batch_size=32, label_fraction=label_fraction, seed=seed)
            self.sizes, self.seeds = sizes, seeds
            self._labels: list[int] = []

        def build(self) -> Any:
            train, val, test = (Scenes(n, s) for n, s in zip(self.sizes, self.seeds, strict=True))
            self._labels = train.y.tolist()
            return train, val, test

        def train_labels(self) -> list[int]:
            return self._labels

    def make_encoder() -> SoftConViT:
        return SoftConViT(in_chans=13, img_size=size, patch_size=4, embed_dim=64, depth=2 if quick else 4, num_heads=4)

    return DomainKit(
        name="geo",
        target="synthetic-s2-landcover",
        metric="test/acc",
        higher_is_better=True,
        make_encoder=make_encoder,
        make_pretraining=lambda enc: Pretraining(
            enc, SoftConObjective(enc.feature_dim, projection_dim=32, mask_ratio=0.3), OptimConfig(lr=1e-3, weight_decay=0.05, warmup_steps=5)
        ),
        make_pretrain_data=lambda: ScenesModule((n_pretrain, 64, 64), (101, 102, 103)),
        make_task=lambda enc, adaptation: GeoClassification(
            enc, num_classes, adaptation=adaptation or Adaptation(),
            optim=OptimConfig(lr=1e-2 if adaptation is not None and adaptation.mode == "linear" else 2e-3, weight_decay=0.01),
        ),
        make_finetune_data=lambda fraction, seed: ScenesModule((n_train, n_eval, n_eval), (201, 202, 203), fraction, seed),
        pretrain_epochs=4 if quick else 20,
        finetune_epochs=8 if quick else 20,
        data_source="generated Sentinel-2 tiles (no labelled multispectral data offline)",
    )
