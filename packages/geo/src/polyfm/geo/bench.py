"""Benchmarks (``polyfm bench``), each side by side with a reference on the same
configuration, weights and inputs:

* SatMAE group-channel encoder, inference and one fine-tuning step, against the official
  ``GroupChannelsVisionTransformer`` (rshf's copy of sustainlab-group/SatMAE) with the same
  weights, and against a plain timm ViT of the same width, depth and token count (the cost
  of the group-channel design); SatMAE MAE pretraining against the official MAE class;
* SoftCon ViT against the official DINOv2 ``DinoVisionTransformer`` (the build the parity
  tests compare with) and SoftCon ResNet-50 against torchvision's ``resnet50``, same
  weights, inference and one fine-tuning step; SoftCon pretraining (soft targets) against
  hard-target InfoNCE on the same encoder;
* ``geo/geotiff-chips``: chips/s cut from 13-band GeoTIFF scenes written at build time,
  through :func:`polyfm.geo.data.chip_loader` (normalised) against a plain torchgeo
  ``RasterDataset`` + ``RandomGeoSampler`` + ``stack_samples`` loop with the same
  normalisation applied.

A training step is one optimiser step (forward, backward, AdamW); a fine-tuning step puts
a linear head on the pooled features (cross-entropy). ``quick`` uses tiny models for a CPU
smoke run; the full sizes are ViT-B/8 at 96 px (SatMAE), ViT-S/14 and ResNet-50 at 224 px
(SoftCon), 120 px chips from 512 x 512 scenes.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from polyfm.core.bench import BenchCase
from polyfm.geo.bands import Normalization, resolve_normalization

Step = Callable[[], object]
Factory = Callable[[torch.device], Step]


def _autocast(device: torch.device) -> torch.autocast:
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def _train_step(module: nn.Module, loss_fn: Callable[[], torch.Tensor], device: torch.device) -> Step:
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-4)

    def step() -> object:
        with _autocast(device):
            loss = loss_fn()
        optimizer.zero_grad(set_to_none=True)
        torch.autograd.backward(loss)  # loss.backward(); Tensor.backward carries no annotations
        optimizer.step()
        return loss

    return step


def _rand(*shape: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    """The same input for ours and the reference: seeded, made on the CPU, then moved."""
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed)).to(device)


# ----------------------------------------------------------------------------- encoder pairs


@dataclass
class Net:
    """A model, the call that gives its pooled ``(B, D)`` features, and its input batch."""

    module: nn.Module
    features: Callable[[torch.Tensor], torch.Tensor]
    x: torch.Tensor


Builder = Callable[[torch.device], Net]


def inference(build: Builder) -> Factory:
    """Forward passes in eval mode under ``inference_mode`` (bf16 autocast on GPU)."""

    def make(device: torch.device) -> Step:
        net = build(device)
        net.module.eval()

        def step() -> object:
            with torch.inference_mode(), _autocast(device):
                return net.features(net.x)

        return step

    return make


def finetune(build: Builder, classes: int = 10) -> Factory:
    """One supervised step: a linear head on the features, cross-entropy, AdamW."""

    def make(device: torch.device) -> Step:
        net = build(device)
        net.module.eval()  # one sample in train mode would trip BatchNorm
        with torch.no_grad():
            dim = net.features(net.x[:1]).shape[-1]
        net.module.train()
        head = nn.Linear(dim, classes).to(device)
        y = torch.randint(0, classes, (net.x.shape[0],), generator=torch.Generator().manual_seed(0)).to(device)
        both = nn.ModuleList([net.module, head])
        return _train_step(both, lambda: nn.functional.cross_entropy(head(net.features(net.x)), y), device)

    return make


def pair_cases(name: str, batch: int, ours: Builder, reference: Builder, reference_name: str) -> list[BenchCase]:
    """``name/inference`` and ``name/train-step`` for one (ours, reference) encoder pair."""
    return [
        BenchCase(f"{name}/{kind}", "images", batch, ours=wrap(ours), reference=wrap(reference), reference_name=reference_name)
        for kind, wrap in (("inference", inference), ("train-step", finetune))
    ]


# ----------------------------------------------------------------------------- SatMAE


def _satmae_config(quick: bool) -> dict[str, Any]:
    if quick:
        return {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 4, "channel_embed": 16,
                "decoder_embed_dim": 32, "decoder_depth": 1, "decoder_num_heads": 4, "decoder_channel_embed": 8}
    return {"img_size": 96, "patch_size": 8, "embed_dim": 768, "depth": 12, "num_heads": 12, "channel_embed": 256,
            "decoder_embed_dim": 512, "decoder_depth": 8, "decoder_num_heads": 16, "decoder_channel_embed": 128}


def _satmae_mae(quick: bool, batch: int, device: torch.device) -> Step:
    from polyfm.geo.models.satmae import SatMAE

    cfg = _satmae_config(quick)
    model = SatMAE(**cfg).to(device).train()
    x = _rand(batch, 10, cfg["img_size"], cfg["img_size"], device=device)
    return _train_step(model, lambda: model.forward_mae(x)["loss"], device)


def _official_satmae_mae(quick: bool, batch: int, device: torch.device) -> Step:
    from rshf.satmae.model import MaskedAutoencoderGroupChannelViT  # test-only reference (requirements-test-nodeps.txt)

    cfg = _satmae_config(quick)
    ref = MaskedAutoencoderGroupChannelViT({**cfg, "in_chans": 10, "mlp_ratio": 4, "norm_pix_loss": False,
                                            "channel_groups": ((0, 1, 2, 6), (3, 4, 5, 7), (8, 9))}).to(device).train()
    x = _rand(batch, 10, cfg["img_size"], cfg["img_size"], device=device)
    return _train_step(ref, lambda: ref(x, 0.75)[0], device)


def _official_satmae_encoder_module(quick: bool) -> Any:
    """rshf's ``GroupChannelsVisionTransformer`` (rshf is untyped: the result is an nn.Module with ``forward_features``)."""
    from rshf.satmae.model import GroupChannelsVisionTransformer  # test-only reference

    cfg = _satmae_config(quick)
    torch.manual_seed(0)
    return GroupChannelsVisionTransformer(
        global_pool=True, channel_embed=cfg["channel_embed"], img_size=cfg["img_size"], patch_size=cfg["patch_size"], in_chans=10,
        embed_dim=cfg["embed_dim"], depth=cfg["depth"], num_heads=cfg["num_heads"], mlp_ratio=4, qkv_bias=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-6), num_classes=0)


def _official_satmae_encoder(quick: bool, batch: int, device: torch.device) -> Net:
    ref = _official_satmae_encoder_module(quick).to(device)
    size = _satmae_config(quick)["img_size"]
    return Net(ref, ref.forward_features, _rand(batch, 10, size, size, device=device))


def _satmae_encoder(quick: bool, batch: int, device: torch.device) -> Net:
    """Ours with the official encoder's weights (its random init), global pooling as there."""
    from polyfm.geo.models.satmae import SatMAE

    cfg = {**_satmae_config(quick), "decoder_depth": 0}
    model = SatMAE(**cfg, global_pool=True)
    try:
        model.load_state(_official_satmae_encoder_module(quick).state_dict(), source="official SatMAE encoder")
    except ImportError:  # reference not installed: our own init, the step costs the same
        pass
    size = cfg["img_size"]
    model = model.to(device)
    return Net(model, model.forward_features, _rand(batch, 10, size, size, device=device))


def _plain_vit_same_tokens(quick: bool, batch: int, device: torch.device) -> Net:
    """timm ViT, same width/depth/heads and pooling (mean of patch tokens, fc_norm), one
    10-channel patch embedding, and an image of grid (h, 3h) so its token count equals
    SatMAE's 3 groups x h x h."""
    from timm.models.vision_transformer import VisionTransformer

    cfg = _satmae_config(quick)
    size, patch = cfg["img_size"], cfg["patch_size"]
    model = VisionTransformer(img_size=(size, 3 * size), patch_size=patch, in_chans=10, num_classes=0, embed_dim=cfg["embed_dim"],
                              depth=cfg["depth"], num_heads=cfg["num_heads"], global_pool="avg", qkv_bias=True,
                              norm_layer=partial(nn.LayerNorm, eps=1e-6)).to(device)
    return Net(model, model, _rand(batch, 10, size, 3 * size, device=device))


# ----------------------------------------------------------------------------- SoftCon


def _softcon_vit_dims(quick: bool) -> dict[str, Any]:
    return {"img_size": 28, "embed_dim": 64, "depth": 2, "num_heads": 2} if quick else {"img_size": 224, "embed_dim": 384, "depth": 12, "num_heads": 6}


def _official_softcon_vit_module(quick: bool) -> nn.Module:
    """DINOv2's ViT as ``vit_small`` builds it (the parity tests' reference), 13 channels."""
    from dinov2.layers import MemEffAttention, NestedTensorBlock  # test-only reference (requirements-test-nodeps.txt)
    from dinov2.models.vision_transformer import DinoVisionTransformer

    torch.manual_seed(0)
    model: nn.Module = DinoVisionTransformer(patch_size=14, in_chans=13, mlp_ratio=4, block_chunks=0, init_values=1e-5,
                                             block_fn=partial(NestedTensorBlock, attn_class=MemEffAttention), **_softcon_vit_dims(quick))
    for p in model.parameters():  # DINOv2 leaves cls/mask tokens at zero until trained; give every weight a value
        p.data.normal_(0, 0.02)
    return model


def _official_softcon_vit(quick: bool, batch: int, device: torch.device) -> Net:
    ref = _official_softcon_vit_module(quick).to(device)
    size = _softcon_vit_dims(quick)["img_size"]
    return Net(ref, ref, _rand(batch, 13, size, size, device=device))


def _softcon_vit(quick: bool, batch: int, device: torch.device) -> Net:
    from polyfm.geo.models.softcon import SoftConViT

    dims = _softcon_vit_dims(quick)
    model = SoftConViT(size="small", in_chans=13, **dims)
    try:
        model.load_state(_official_softcon_vit_module(quick).state_dict(), source="DINOv2 ViT")
    except ImportError:
        pass
    model = model.to(device)
    return Net(model, model, _rand(batch, 13, dims["img_size"], dims["img_size"], device=device))


def _softcon_rn50(quick: bool, batch: int, device: torch.device) -> Net:
    from polyfm.geo.models.softcon import SoftConResNet50

    torch.manual_seed(0)
    model = SoftConResNet50(in_chans=13).to(device)
    size = 32 if quick else 224
    return Net(model, model, _rand(batch, 13, size, size, device=device))


def _torchvision_rn50(quick: bool, batch: int, device: torch.device) -> Net:
    """torchvision's resnet50 as the SoftCon demo builds it, with our model's weights."""
    import torchvision

    ref = torchvision.models.resnet50()
    ref.conv1 = nn.Conv2d(13, 64, kernel_size=7, stride=2, padding=3, bias=False)
    ref.fc = nn.Identity()
    ours = _softcon_rn50(quick, batch, torch.device("cpu"))
    ref.load_state_dict(ours.module.state_dict())
    return Net(ref.to(device), ref, ours.x.to(device))


def _softcon_pretrain(quick: bool, batch: int, device: torch.device, soft: bool) -> Step:
    from polyfm.core.pretrain import InfoNCE
    from polyfm.geo.models.softcon import SoftConViT
    from polyfm.geo.objectives import SoftConObjective, random_views

    size = 28 if quick else 224
    dims: dict[str, Any] = {"embed_dim": 64, "depth": 2, "num_heads": 2} if quick else {}
    model = SoftConViT(size="small", in_chans=13, img_size=size, **dims).to(device)
    x = _rand(batch, 13, size, size, device=device)
    labels = _rand(batch, 9, device=device, seed=1)
    if soft:
        objective = SoftConObjective(model.feature_dim).to(device)
        both = nn.ModuleList([model, objective])
        return _train_step(both, lambda: objective(model, {"input": x, "labels": labels})["loss"], device)
    projector = nn.Sequential(nn.Linear(model.feature_dim, model.feature_dim), nn.GELU(), nn.Linear(model.feature_dim, 128)).to(device)
    info = InfoNCE(0.1, projector=projector)
    both = nn.ModuleList([model, projector])

    def loss() -> torch.Tensor:
        v1, v2 = random_views(x)
        value: torch.Tensor = info(model, {"view1": v1, "view2": v2})["loss"]
        return value

    return _train_step(both, loss, device)


# ----------------------------------------------------------------------------- GeoTIFF chips

S2_BANDS = ["B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B10", "B11", "B12"]
_SCENES: dict[tuple[int, int], tuple[tempfile.TemporaryDirectory[str], list[Path]]] = {}


def write_scenes(files: int, size: int) -> list[Path]:
    """``files`` 13-band uint16 GeoTIFFs of ``size`` x ``size`` px (10 m, UTM 33N, side by side),
    written once per process into a temporary folder removed at exit."""
    if (files, size) not in _SCENES:
        import rasterio
        from rasterio.transform import from_origin

        folder = tempfile.TemporaryDirectory(prefix="polyfm-geo-bench-")
        rng = np.random.default_rng(0)
        paths = []
        for i in range(files):
            path = Path(folder.name) / f"scene_{i:02d}.tif"
            transform = from_origin(500_000 + i * (size + 64) * 10, 5_000_000, 10, 10)
            with rasterio.open(path, "w", driver="GTiff", width=size, height=size, count=len(S2_BANDS), dtype="uint16",
                               crs="EPSG:32633", transform=transform, tiled=True, blockxsize=256, blockysize=256) as dst:
                dst.write(rng.integers(0, 10_000, (len(S2_BANDS), size, size), dtype=np.uint16))
                dst.descriptions = tuple(S2_BANDS)
            paths.append(path)
        _SCENES[(files, size)] = (folder, paths)
    return _SCENES[(files, size)][1]


@dataclass(frozen=True)
class ChipConfig:
    files: int
    scene: int
    chip: int
    chips: int
    batch: int


def _s2_normalization() -> Normalization:
    normalization = resolve_normalization("softcon-vits14-s2", S2_BANDS)
    if normalization is None:  # a registered weight name always resolves to its statistics
        raise RuntimeError("softcon-vits14-s2 has no normalisation in its meta")
    return normalization


def _chips_ours(cfg: ChipConfig, device: torch.device) -> Step:
    from polyfm.geo.data import chip_loader, raster_dataset

    dataset = raster_dataset([str(p) for p in write_scenes(cfg.files, cfg.scene)], bands=S2_BANDS)
    loader = chip_loader(dataset, cfg.chip, "random", length=cfg.chips, batch_size=cfg.batch, normalization=_s2_normalization())
    return lambda: [batch["input"].to(device) for batch in loader]


def _chips_torchgeo(cfg: ChipConfig, device: torch.device) -> Step:
    from torch.utils.data import DataLoader
    from torchgeo.datasets import RasterDataset, stack_samples
    from torchgeo.samplers import RandomGeoSampler

    class Scenes(RasterDataset):
        filename_glob = "scene_*.tif"
        all_bands = tuple(S2_BANDS)

    dataset = Scenes(paths=[str(p) for p in write_scenes(cfg.files, cfg.scene)], bands=S2_BANDS)
    sampler = RandomGeoSampler(dataset, size=cfg.chip, length=cfg.chips, generator=torch.Generator().manual_seed(0))
    loader = DataLoader(dataset, sampler=sampler, batch_size=cfg.batch, collate_fn=stack_samples)
    normalization = _s2_normalization()
    return lambda: [normalization(batch["image"].float()).to(device) for batch in loader]


# ----------------------------------------------------------------------------- cases


def cases(quick: bool) -> list[BenchCase]:
    mae_batch = 4 if quick else 64
    enc_batch = 16 if quick else 64
    con_batch = 16 if quick else 64
    rn_batch = 4 if quick else 32
    chips = ChipConfig(files=2, scene=512, chip=64, chips=64, batch=16) if quick else ChipConfig(files=8, scene=512, chip=120, chips=1024, batch=32)
    return [
        BenchCase("geo/satmae/pretrain-step", "images", mae_batch,
                  ours=partial(_satmae_mae, quick, mae_batch), reference=partial(_official_satmae_mae, quick, mae_batch),
                  reference_name="official SatMAE MaskedAutoencoderGroupChannelViT (rshf copy)"),
        *pair_cases("geo/satmae/encoder", enc_batch, partial(_satmae_encoder, quick, enc_batch),
                    partial(_official_satmae_encoder, quick, enc_batch),
                    "official SatMAE GroupChannelsVisionTransformer (rshf copy), same weights"),
        *pair_cases("geo/satmae/encoder-vs-plain-vit", enc_batch, partial(_satmae_encoder, quick, enc_batch),
                    partial(_plain_vit_same_tokens, quick, enc_batch), "timm ViT, same width/depth and token count (3 x grid)"),
        *pair_cases("geo/softcon/vit", con_batch, partial(_softcon_vit, quick, con_batch), partial(_official_softcon_vit, quick, con_batch),
                    "official DINOv2 DinoVisionTransformer (vit_small build), same weights"),
        *pair_cases("geo/softcon/rn50", rn_batch, partial(_softcon_rn50, quick, rn_batch), partial(_torchvision_rn50, quick, rn_batch),
                    "torchvision resnet50 (13-band conv1, fc=Identity), same weights"),
        BenchCase("geo/softcon/pretrain-step", "images", con_batch,
                  ours=partial(_softcon_pretrain, quick, con_batch, soft=True),
                  reference=partial(_softcon_pretrain, quick, con_batch, soft=False),
                  reference_name="hard-target InfoNCE, same ViT and views"),
        BenchCase("geo/geotiff-chips", "chips", chips.chips, ours=partial(_chips_ours, chips), reference=partial(_chips_torchgeo, chips),
                  reference_name=f"torchgeo RasterDataset + RandomGeoSampler + stack_samples, same files, {chips.chip} px chips, same normalisation"),
    ]
