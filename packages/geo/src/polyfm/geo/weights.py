"""Released SatMAE and SoftCon checkpoints, with their bands and normalisation.

Each spec's ``meta`` declares what data must look like: ``bands`` (names, in the
model's channel order), ``wavelengths_nm``, and ``normalization`` (a
:class:`polyfm.geo.bands.Normalization` as a dict). The key layouts are the
official ones, so no converter is needed (``module.`` prefixes are stripped).
Publishers give no sha256 for these files: they are recorded as unverified.
"""

from __future__ import annotations

from polyfm.core.weights import WeightSpec
from polyfm.geo.bands import SENTINEL1_BANDS, SENTINEL2_BANDS, SENTINEL2_WAVELENGTHS

# fMoW-Sentinel statistics (SatMAE util/datasets.py, 13 bands B1..B12), used with the ±2σ scaling.
FMOW_SENTINEL_MEAN = [1370.19151926, 1184.3824625, 1120.77120066, 1136.26026392, 1263.73947144, 1645.40315151, 1846.87040806,
                      1762.59530783, 1972.62420416, 582.72633433, 14.77112979, 1732.16362238, 1247.91870117]
FMOW_SENTINEL_STD = [633.15169573, 650.2842772, 712.12507725, 965.23119807, 948.9819932, 1108.06650639, 1258.36394548,
                     1233.1492281, 1364.38688993, 472.37967789, 14.3114637, 1310.36996126, 1087.6020813]
# SSL4EO-S12 statistics (S2 L1C 13 bands; S1 GRD VV, VH in dB), as torchgeo and the SSL4EO-S12 code give them.
SSL4EO_S2_MEAN = [1612.9, 1397.6, 1322.3, 1373.1, 1561.0, 2108.4, 2390.7, 2318.7, 2581.0, 837.7, 22.0, 2195.2, 1537.4]
SSL4EO_S2_STD = [791.0, 854.3, 878.7, 1144.9, 1127.5, 1164.2, 1276.0, 1249.5, 1345.9, 577.5, 47.5, 1340.0, 1142.9]
SSL4EO_S1_MEAN = [-12.59, -20.26]
SSL4EO_S1_STD = [5.26, 5.91]

SATMAE_BANDS = ["B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B11", "B12"]
_KEEP = [SENTINEL2_BANDS.index(b) for b in SATMAE_BANDS]


def _sigma2(mean: list[float], std: list[float]) -> dict[str, object]:
    # (x - (mean - 2 std)) / 4 std * 255, clipped, cast to uint8, then /255 by ToTensor
    return {"kind": "sigma2", "mean": mean, "std": std, "divisor": 1.0, "quantize": True}


def _s2_meta(bands: list[str], normalization: dict[str, object], **extra: object) -> dict[str, object]:
    return {
        "bands": bands,
        "wavelengths_nm": [SENTINEL2_WAVELENGTHS[b] for b in bands],
        "normalization": normalization,
        "sensor": "Sentinel-2 MSI L1C, reflectance x 10000",
        **extra,
    }


_SATMAE_META = _s2_meta(
    SATMAE_BANDS,
    _sigma2([FMOW_SENTINEL_MEAN[i] for i in _KEEP], [FMOW_SENTINEL_STD[i] for i in _KEEP]),
    channel_groups=[["B2", "B3", "B4", "B8"], ["B5", "B6", "B7", "B8A"], ["B11", "B12"]],
    img_size=96,
    patch_size=8,
    dataset="fMoW-Sentinel",
    paper="https://arxiv.org/abs/2207.08051",
)
_S2_SOFTCON = _s2_meta(list(SENTINEL2_BANDS), _sigma2(SSL4EO_S2_MEAN, SSL4EO_S2_STD), dataset="SSL4EO-S12", img_size=224,
                       paper="https://arxiv.org/abs/2405.20462",
                       note="SoftCon recommends the ±2σ scaling; torchgeo normalises these weights with mean/std instead.")
_S1_SOFTCON = {
    "bands": list(SENTINEL1_BANDS),
    "wavelengths_nm": [None, None],
    "normalization": _sigma2(SSL4EO_S1_MEAN, SSL4EO_S1_STD),
    "sensor": "Sentinel-1 GRD, backscatter in dB",
    "dataset": "SSL4EO-S12",
    "img_size": 224,
    "paper": "https://arxiv.org/abs/2405.20462",
}

_ZENODO_BASE = "https://zenodo.org/records/7338613/files/"
_ZENODO_LARGE = "https://zenodo.org/record/7325339/files/"
_SOFTCON_HF = "https://huggingface.co/wangyi111/softcon/resolve/62ff465b2e7467dbfc70758ec1e9d08ab87fc46b/"
_SOFTCON_HF_MAIN = "https://huggingface.co/wangyi111/softcon/resolve/main/"


def _satmae(name: str, url: str, description: str, **config: object) -> WeightSpec:
    filename = url.rsplit("/", 1)[1]
    return WeightSpec(name=name, family="satmae", files={filename: (url, None)}, license="unspecified (no LICENSE in sustainlab-group/SatMAE)",
                      meta=_SATMAE_META, config=config, description=description)


def _softcon(name: str, family: str, filename: str, meta: dict[str, object], base: str, description: str) -> WeightSpec:
    return WeightSpec(name=name, family=family, files={filename: (base + filename, None)}, license="unspecified (see huggingface.co/wangyi111/softcon)",
                      meta=meta, description=description)


WEIGHTS: list[WeightSpec] = [
    _satmae("satmae-vit-base-fmow-sentinel-pretrain", _ZENODO_BASE + "pretrain-vit-base-e199.pth",
            "SatMAE group-channel ViT-B/8, 96 px, MAE-pretrained 200 epochs on fMoW-Sentinel (encoder + decoder)."),
    _satmae("satmae-vit-base-fmow-sentinel-finetune", _ZENODO_BASE + "finetune-vit-base-e7.pth",
            "SatMAE ViT-B/8 fine-tuned on fMoW-Sentinel (62 classes; head of the released file kept).", num_heads=12),
    _satmae("satmae-vit-large-fmow-sentinel-pretrain", _ZENODO_LARGE + "pretrain-vit-large-e199.pth",
            "SatMAE group-channel ViT-L/8, 96 px, MAE-pretrained 200 epochs on fMoW-Sentinel.", num_heads=16),
    _satmae("satmae-vit-large-fmow-sentinel-finetune", _ZENODO_LARGE + "finetune-vit-large-e7.pth",
            "SatMAE ViT-L/8 fine-tuned on fMoW-Sentinel (63.84% top-1).", num_heads=16),
    _softcon("softcon-rn50-s2", "softcon-resnet50", "B13_rn50_softcon.pth", _S2_SOFTCON, _SOFTCON_HF,
             "SoftCon ResNet-50, 13-band Sentinel-2 L1C (SSL4EO-S12), 2048-d features."),
    _softcon("softcon-rn50-s1", "softcon-resnet50", "B2_rn50_softcon.pth", _S1_SOFTCON, _SOFTCON_HF,
             "SoftCon ResNet-50, Sentinel-1 GRD VV/VH."),
    _softcon("softcon-vits14-s2", "softcon-vit", "B13_vits14_softcon.pth", _S2_SOFTCON, _SOFTCON_HF_MAIN,
             "SoftCon DINOv2 ViT-S/14, 13-band Sentinel-2 L1C, 224 px."),
    _softcon("softcon-vits14-s1", "softcon-vit", "B2_vits14_softcon.pth", _S1_SOFTCON, _SOFTCON_HF_MAIN,
             "SoftCon DINOv2 ViT-S/14, Sentinel-1 GRD VV/VH."),
    _softcon("softcon-vitb14-s2", "softcon-vit", "B13_vitb14_softcon.pth", _S2_SOFTCON, _SOFTCON_HF_MAIN,
             "SoftCon DINOv2 ViT-B/14, 13-band Sentinel-2 L1C, 224 px."),
    _softcon("softcon-vitb14-s1", "softcon-vit", "B2_vitb14_softcon.pth", _S1_SOFTCON, _SOFTCON_HF_MAIN,
             "SoftCon DINOv2 ViT-B/14, Sentinel-1 GRD VV/VH."),
]
