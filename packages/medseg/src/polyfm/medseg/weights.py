"""The released checkpoints for the medical segmentation models.

* ``swin_unetr_ssl``: the self-supervised Swin-ViT of Tang et al. (CVPR 2022), trained on
  5,050 CT volumes with the rotation + contrastive + inpainting recipe
  (research-contributions ``SwinUNETR/Pretrain``). ``{"state_dict": {"module.<swin-vit key>": ...}}``;
  only the encoder: ``SwinUNETR.from_pretrained("swin_unetr_ssl", out_channels=K)`` gives a
  network whose Swin-ViT is pretrained and whose decoder and head are new.
* MONAI model-zoo bundles (zip with ``models/model.pt``, a plain MONAI state dict, and
  ``configs/inference.json`` declaring the network): ``spleen_ct_segmentation`` (UNet) and
  ``swin_unetr_btcv_segmentation`` (SwinUNETR, 13 abdominal organs).

research-contributions quotes an MD5 for ``model_swinvit.pt``, which is checked; the model zoo
lists no checksum for its zips, so they are recorded unverified. ``meta`` holds the preprocessing
the weights were trained with: use the same intensity window and spacing when fine-tuning.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from polyfm.core.weights import StateDict, WeightSpec, unwrap_state_dict

EXTRA_DATA = "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1"
MODEL_ZOO = "https://github.com/Project-MONAI/model-zoo/releases/download/hosting_storage_v1"

BTCV_LABELS = [
    "background", "spleen", "right kidney", "left kidney", "gallbladder", "esophagus", "liver", "stomach",
    "aorta", "inferior vena cava", "portal and splenic veins", "pancreas", "right adrenal gland", "left adrenal gland",
]  # fmt: skip


def convert_swinvit_ssl(checkpoint: Mapping[str, object]) -> StateDict:
    """``model_swinvit.pt`` -> SwinUNETR keys (``swinViT.*``, MLP ``linear1/2``), SSL heads dropped."""
    from polyfm.medseg.models.swin_unetr import SwinUNETR

    return SwinUNETR.convert_state_dict(unwrap_state_dict(checkpoint) if "state_dict" in checkpoint else checkpoint)  # type: ignore[arg-type]


def convert_bundle(checkpoint: Mapping[str, object]) -> StateDict:
    """MONAI bundle ``model.pt``: already MONAI's keys; unwrap and drop a DDP ``module.`` prefix."""
    state = unwrap_state_dict(checkpoint)
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def _ct_meta(a_min: float, a_max: float, **extra: object) -> dict[str, object]:
    """The preprocessing MONAI's CT recipes use: RAS, 1.5x1.5x2 mm, a HU window scaled to [0, 1], 96^3 patches."""
    return {
        "modality": "CT",
        "intensity": {"a_min": a_min, "a_max": a_max, "b_min": 0.0, "b_max": 1.0, "clip": True},
        "pixdim": [1.5, 1.5, 2.0],
        "roi_size": [96, 96, 96],
        "orientation": "RAS",
        **extra,
    }


WEIGHTS: list[WeightSpec] = [
    WeightSpec(
        name="swin_unetr_ssl",
        family="swin_unetr",
        files={"model_swinvit.pt": (f"{EXTRA_DATA}/model_swinvit.pt", "md5:c8d9deb6cbbd66839bc8dced6010103f")},  # the MD5 research-contributions quotes
        license="apache-2.0",
        meta=_ct_meta(
            -1000.0,
            1000.0,
            pretraining="rotation (4 classes) + contrastive (512-d, tau 0.5) + L1 inpainting, 5,050 CT volumes",
            part="Swin-ViT encoder only (decoder and head start from scratch)",
        ),
        config={"spatial_dims": 3, "in_channels": 1, "feature_size": 48},
        converter=convert_swinvit_ssl,
        description="Self-supervised Swin-ViT of Swin UNETR (Tang et al. 2022), encoder only",
    ),
    WeightSpec(
        name="spleen_ct_segmentation",
        family="unet",
        files={"spleen_ct_segmentation_v0.5.3.zip": (f"{MODEL_ZOO}/spleen_ct_segmentation_v0.5.3.zip", None)},
        license="apache-2.0",
        meta=_ct_meta(-57.0, 164.0, labels=["background", "spleen"], dataset="Medical Segmentation Decathlon Task09_Spleen"),
        config={
            "spatial_dims": 3, "in_channels": 1, "out_channels": 2, "channels": [16, 32, 64, 128, 256],
            "strides": [2, 2, 2, 2], "num_res_units": 2, "norm": "batch",
        },  # fmt: skip
        converter=convert_bundle,
        description="MONAI bundle: 3D UNet for spleen CT segmentation (MSD Task09)",
    ),
    WeightSpec(
        name="swin_unetr_btcv_segmentation",
        family="swin_unetr",
        files={"swin_unetr_btcv_segmentation_v0.5.0.zip": (f"{MODEL_ZOO}/swin_unetr_btcv_segmentation_v0.5.0.zip", None)},
        license="apache-2.0",
        meta=_ct_meta(-175.0, 250.0, labels=BTCV_LABELS, dataset="BTCV multi-organ (13 organs); mean Dice 0.8269 reported by the bundle"),
        config={"spatial_dims": 3, "in_channels": 1, "out_channels": 14, "feature_size": 48},
        converter=convert_bundle,
        description="MONAI bundle: SwinUNETR for BTCV 13-organ abdominal CT segmentation",
    ),
]
