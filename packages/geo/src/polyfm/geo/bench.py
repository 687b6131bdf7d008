"""Benchmarks (``polyfm bench``): SatMAE pretraining against the official implementation and
against a plain timm ViT of the same size and token count (the cost of the group-channel
design), and SoftCon training throughput against hard-target InfoNCE on the same encoder.

Each step is one optimiser step (forward, backward, AdamW). ``quick`` uses tiny models
for a CPU smoke run; the full sizes are ViT-B/8 at 96 px (SatMAE) and ViT-S/14 at 224 px
(SoftCon).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import nn

from polyfm.core.bench import BenchCase

Step = Callable[[], object]


def _train_step(module: nn.Module, loss_fn: Callable[[], torch.Tensor], device: torch.device) -> Step:
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-4)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step() -> object:
        with autocast:
            loss = loss_fn()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss

    return step


def _satmae_config(quick: bool) -> dict[str, int]:
    if quick:
        return {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 4, "channel_embed": 16,
                "decoder_embed_dim": 32, "decoder_depth": 1, "decoder_num_heads": 4, "decoder_channel_embed": 8}
    return {"img_size": 96, "patch_size": 8, "embed_dim": 768, "depth": 12, "num_heads": 12, "channel_embed": 256,
            "decoder_embed_dim": 512, "decoder_depth": 8, "decoder_num_heads": 16, "decoder_channel_embed": 128}


def _satmae_mae(quick: bool, batch: int, device: torch.device) -> Step:
    from polyfm.geo.models.satmae import SatMAE

    cfg = _satmae_config(quick)
    model = SatMAE(**cfg).to(device).train()
    x = torch.rand(batch, 10, cfg["img_size"], cfg["img_size"], device=device)
    return _train_step(model, lambda: model.forward_mae(x)["loss"], device)


def _official_satmae_mae(quick: bool, batch: int, device: torch.device) -> Step:
    from rshf.satmae.model import MaskedAutoencoderGroupChannelViT  # test-only reference (requirements-test-nodeps.txt)

    cfg = _satmae_config(quick)
    ref = MaskedAutoencoderGroupChannelViT({**cfg, "in_chans": 10, "mlp_ratio": 4, "norm_pix_loss": False,
                                            "channel_groups": ((0, 1, 2, 6), (3, 4, 5, 7), (8, 9))}).to(device).train()
    x = torch.rand(batch, 10, cfg["img_size"], cfg["img_size"], device=device)
    return _train_step(ref, lambda: ref(x, 0.75)[0], device)


def _satmae_encoder(quick: bool, batch: int, device: torch.device) -> Step:
    from polyfm.geo.models.satmae import SatMAE

    cfg = {**_satmae_config(quick), "decoder_depth": 0}
    model = SatMAE(**cfg).to(device).train()
    head = nn.Linear(cfg["embed_dim"], 10).to(device)
    x = torch.rand(batch, 10, cfg["img_size"], cfg["img_size"], device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    both = nn.ModuleList([model, head])
    return _train_step(both, lambda: nn.functional.cross_entropy(head(model.forward_features(x)), y), device)


def _plain_vit_same_tokens(quick: bool, batch: int, device: torch.device) -> Step:
    """timm ViT, same width/depth/heads, one 10-channel patch embedding, and an image of
    grid (h, 3h) so its token count equals SatMAE's 3 groups x h x h."""
    from timm.models.vision_transformer import VisionTransformer

    cfg = _satmae_config(quick)
    size, patch = cfg["img_size"], cfg["patch_size"]
    model = VisionTransformer(img_size=(size, 3 * size), patch_size=patch, in_chans=10, num_classes=10, embed_dim=cfg["embed_dim"],
                              depth=cfg["depth"], num_heads=cfg["num_heads"], global_pool="avg", qkv_bias=True,
                              norm_layer=partial(nn.LayerNorm, eps=1e-6)).to(device).train()
    x = torch.rand(batch, 10, size, 3 * size, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    return _train_step(model, lambda: nn.functional.cross_entropy(model(x), y), device)


def _softcon(quick: bool, batch: int, device: torch.device, soft: bool) -> Step:
    from polyfm.core.pretrain import InfoNCE
    from polyfm.geo.models.softcon import SoftConViT
    from polyfm.geo.objectives import SoftConObjective, random_views

    size = 28 if quick else 224
    model = SoftConViT(size="small", in_chans=13, img_size=size, **({"embed_dim": 64, "depth": 2, "num_heads": 2} if quick else {})).to(device)
    x = torch.rand(batch, 13, size, size, device=device)
    labels = torch.rand(batch, 9, device=device)
    if soft:
        objective = SoftConObjective(model.feature_dim).to(device)
        both = nn.ModuleList([model, objective])
        return _train_step(both, lambda: objective(model, {"input": x, "labels": labels})["loss"], device)
    projector = nn.Sequential(nn.Linear(model.feature_dim, model.feature_dim), nn.GELU(), nn.Linear(model.feature_dim, 128)).to(device)
    info = InfoNCE(0.1, projector=projector)
    both = nn.ModuleList([model, projector])

    def loss() -> torch.Tensor:
        v1, v2 = random_views(x)
        return info(model, {"view1": v1, "view2": v2})["loss"]

    return _train_step(both, loss, device)


def cases(quick: bool) -> list[BenchCase]:
    mae_batch = 4 if quick else 64
    vit_batch = 4 if quick else 64
    con_batch = 8 if quick else 64
    return [
        BenchCase("geo/satmae/pretrain-step", "images", mae_batch,
                  ours=partial(_satmae_mae, quick, mae_batch), reference=partial(_official_satmae_mae, quick, mae_batch),
                  reference_name="official SatMAE MaskedAutoencoderGroupChannelViT (rshf copy)"),
        BenchCase("geo/satmae/encoder-step-vs-plain-vit", "images", vit_batch,
                  ours=partial(_satmae_encoder, quick, vit_batch), reference=partial(_plain_vit_same_tokens, quick, vit_batch),
                  reference_name="timm ViT, same width/depth and token count (3 x grid)"),
        BenchCase("geo/softcon/train-step", "images", con_batch,
                  ours=lambda device: _softcon(quick, con_batch, device, soft=True),
                  reference=lambda device: _softcon(quick, con_batch, device, soft=False),
                  reference_name="hard-target InfoNCE, same ViT-S/14 and views"),
    ]
