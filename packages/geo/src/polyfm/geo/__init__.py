"""polyfm.geo: SatMAE and SoftCon on multispectral and SAR imagery, band-aware.

Heavy modules (torchgeo, rasterio) load on first use; ``import polyfm.geo`` stays light.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__all__ = [
    "SatMAE",
    "SatMAETemporal",
    "SoftConResNet50",
    "SoftConViT",
    "DenseSegmenter",
    "TiledInferer",
    "Normalization",
    "plan_bands",
    "canonical_band",
    "SatMAEObjective",
    "SoftConObjective",
    "GeoTiffDataModule",
    "GeoTiffSegmentationDataModule",
    "GeoTiffChips",
    "TorchGeoDataModule",
    "ChipDataModule",
    "raster_dataset",
    "chip_loader",
    "GeoSegmentation",
    "GeoClassification",
    "GeoPredictionWriter",
]

_WHERE = {
    "SatMAE": "polyfm.geo.models.satmae",
    "SatMAETemporal": "polyfm.geo.models.satmae",
    "SoftConResNet50": "polyfm.geo.models.softcon",
    "SoftConViT": "polyfm.geo.models.softcon",
    "DenseSegmenter": "polyfm.geo.models.segmentation",
    "TiledInferer": "polyfm.geo.models.segmentation",
    "Normalization": "polyfm.geo.bands",
    "plan_bands": "polyfm.geo.bands",
    "canonical_band": "polyfm.geo.bands",
    "SatMAEObjective": "polyfm.geo.objectives",
    "SoftConObjective": "polyfm.geo.objectives",
    "GeoTiffDataModule": "polyfm.geo.data",
    "GeoTiffSegmentationDataModule": "polyfm.geo.data",
    "GeoTiffChips": "polyfm.geo.data",
    "TorchGeoDataModule": "polyfm.geo.data",
    "ChipDataModule": "polyfm.geo.data",
    "raster_dataset": "polyfm.geo.data",
    "chip_loader": "polyfm.geo.data",
    "GeoSegmentation": "polyfm.geo.tasks",
    "GeoClassification": "polyfm.geo.tasks",
    "GeoPredictionWriter": "polyfm.geo.predict",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'polyfm.geo' has no attribute {name!r}")
