"""polyfm.medseg: MONAI U-Nets (UNet, BasicUNet, DynUNet, MedNeXt, SegResNet, SwinUNETR, UNETR) in the polyfm encoder
contract, self-supervised pretraining (Volume Fusion, SwinUNETR's SSL recipe, masked-volume
inpainting) and 3D segmentation fine-tuning on Decathlon-style datasets.

Importing this module is cheap; the submodules (``models``, ``data``, ``objectives``,
``tasks``, ``predict``, ``weights``) import MONAI when used."""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "BasicUNet": "polyfm.medseg.models",
    "DynUNet": "polyfm.medseg.models",
    "MedNeXt": "polyfm.medseg.models",
    "SegResNet": "polyfm.medseg.models",
    "SwinUNETR": "polyfm.medseg.models",
    "UNet": "polyfm.medseg.models",
    "UNETR": "polyfm.medseg.models",
    "MODELS": "polyfm.medseg.models",
    "WEIGHTS": "polyfm.medseg.weights",
    "SegmentationDataModule": "polyfm.medseg.data",
    "VolumeFolderDataModule": "polyfm.medseg.data",
    "read_decathlon": "polyfm.medseg.data",
    "predict_to_nifti": "polyfm.medseg.predict",
    "NiftiPredictionWriter": "polyfm.medseg.predict",
    "postprocess_labels": "polyfm.medseg.predict",
    "save_overlay_png": "polyfm.medseg.data",
    "VolumeFusion": "polyfm.medseg.objectives",
    "MaskedVolumeInpainting": "polyfm.medseg.objectives",
    "SwinSSL": "polyfm.medseg.objectives",
    "VolumeSegmentation": "polyfm.medseg.tasks",
    "demo_kit": "polyfm.medseg.samples",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'polyfm.medseg' has no attribute {name!r}")
