"""Model registry of polyfm-geo (the ``polyfm.models`` entry point)."""

from __future__ import annotations

from polyfm.geo.models.satmae import SatMAE, SatMAETemporal
from polyfm.geo.models.segmentation import DenseSegmenter, TiledInferer
from polyfm.geo.models.softcon import SoftConResNet50, SoftConViT

MODELS: dict[str, type] = {
    "satmae": SatMAE,
    "satmae-temporal": SatMAETemporal,
    "softcon-resnet50": SoftConResNet50,
    "softcon-vit": SoftConViT,
    "dense-segmenter": DenseSegmenter,
}

__all__ = ["MODELS", "SatMAE", "SatMAETemporal", "SoftConResNet50", "SoftConViT", "DenseSegmenter", "TiledInferer"]
