"""SoftCon backbones against the official DINOv2 code and torchvision (as the SoftCon demo builds them)."""

from __future__ import annotations

from functools import partial

import pytest
import torch
import torchvision

from polyfm.core.pretrain import Pretraining
from polyfm.core.tasks import OptimConfig
from polyfm.geo.models.softcon import SoftConResNet50, SoftConViT, expand_rgb_kernel
from polyfm.geo.objectives import SoftConObjective

dinov2_vit = pytest.importorskip("dinov2.models.vision_transformer")


def official_vit(in_chans=13):
    model = dinov2_vit.vit_small(patch_size=14, img_size=224, in_chans=in_chans, block_chunks=0, init_values=1e-5).eval()
    for p in model.parameters():
        p.data.normal_(0, 0.05)
    return model


def test_vits14_matches_dinov2(tmp_path):
    ref = official_vit()
    torch.save(ref.state_dict(), tmp_path / "B13_vits14_softcon.pth")
    ours = SoftConViT.from_pretrained(tmp_path / "B13_vits14_softcon.pth").eval()
    assert set(ours.state_dict()) == set(ref.state_dict())
    x = torch.randn(2, 13, 224, 224)
    masks = torch.rand(2, 256) < 0.3
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(ours.forward_features(x, masks=masks), ref.forward_features(x, masks=masks)["x_norm_clstoken"], atol=1e-5, rtol=1e-4)


def test_b2_sar_vit_and_module_prefix(tmp_path):
    ref = official_vit(in_chans=2)
    torch.save({"model": {f"module.{k}": v for k, v in ref.state_dict().items()}}, tmp_path / "B2_vits14_softcon.pth")
    ours = SoftConViT.from_pretrained(tmp_path / "B2_vits14_softcon.pth").eval()
    assert ours.bands == ["VV", "VH"]
    x = torch.randn(1, 2, 112, 112)  # another size: position table interpolated on the fly, as DINOv2 does
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("size", [(112, 112), (98, 154), (518, 518)])
def test_vit_at_other_sizes_matches_dinov2_interpolation(tmp_path, size):
    """Other input sizes (BigEarthNet 120 -> 112, EuroSAT, non-square crops, DINOv2's 518): the
    position table is resized with DINOv2's scale-factor bicubic (no antialias), not timm's."""
    ref = official_vit(in_chans=13)
    torch.save(ref.state_dict(), tmp_path / "B13_vits14_softcon.pth")
    ours = SoftConViT.from_pretrained(tmp_path / "B13_vits14_softcon.pth").eval()
    x = torch.randn(1, 13, *size)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=1e-5)
        if size == (112, 112):  # built for 112 px: the stored table is the one DINOv2 computes on the fly
            small = SoftConViT.from_pretrained(tmp_path / "B13_vits14_softcon.pth", img_size=112).eval()
            assert small.pos_embed.shape == (1, 65, 384)
            torch.testing.assert_close(small(x), ref(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("builder", ["vit_small_patch14_dinov2", "vit_base_patch14_dinov2"])
def test_vit_matches_torchgeo_build_of_the_softcon_weights(tmp_path, builder):
    """torchgeo 0.8 builds the SoftCon ViTs (ViTSmall14/ViTBase14_DINOv2_Weights.*_SOFTCON) as timm
    DINOv2 models at 224 px and loads the '_enc.pth' files (no mask_token) non-strictly."""
    import torchgeo.models

    ref = getattr(torchgeo.models, builder)(None, in_chans=2, img_size=224, num_classes=0, depth=2).eval()  # 2 blocks: fast
    for p in ref.parameters():
        p.data.normal_(0, 0.05)
    torch.save(ref.state_dict(), tmp_path / f"B2_{builder}_softcon_enc.pth")
    ours = SoftConViT.from_pretrained(tmp_path / f"B2_{builder}_softcon_enc.pth").eval()
    assert ours.bands == ["VV", "VH"] and ours.feature_dim == ref.num_features
    x = torch.randn(1, 2, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=1e-5)


def test_rn50_matches_softcon_demo(tmp_path):
    ref = torchvision.models.resnet50()
    ref.conv1 = torch.nn.Conv2d(13, 64, kernel_size=7, stride=2, padding=3, bias=False)
    ref.fc = torch.nn.Identity()
    ref.eval()
    torch.save(ref.state_dict(), tmp_path / "B13_rn50_softcon.pth")
    ours = SoftConResNet50.from_pretrained(tmp_path / "B13_rn50_softcon.pth").eval()
    x = torch.randn(1, 13, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x))
    assert [f.shape[1] for f in ours.forward_pyramid(x)] == [256, 512, 1024, 2048]


def test_continual_init_from_rgb_keeps_rgb_response():
    rgb = torch.randn(8, 3, 7, 7)
    expanded = expand_rgb_kernel(rgb, ["B2", "B3", "B4", "B8", "B11"])
    # B4/B3/B2 take R/G/B, NIR and SWIR take the red kernel (nearest wavelength), scaled by 3/5
    torch.testing.assert_close(expanded[:, 2], rgb[:, 0] * 0.6)
    torch.testing.assert_close(expanded[:, 0], rgb[:, 2] * 0.6)
    torch.testing.assert_close(expanded[:, 4], rgb[:, 0] * 0.6)
    # on an input whose bands are equal, the summed kernel is 3/C times C copies: the RGB scale
    assert expanded.sum(1).abs().mean() < 2 * rgb.sum(1).abs().mean()
    reference = torchvision.models.resnet50().state_dict()
    model = SoftConResNet50.from_imagenet(reference, ["B2", "B3", "B4", "B8", "B11", "VV"])
    assert model.conv1.weight.shape == (64, 6, 7, 7)


def test_softcon_loss_falls_vit():
    torch.manual_seed(0)
    model = SoftConViT(size="small", in_chans=13, img_size=28, embed_dim=32, depth=2, num_heads=2)
    objective = SoftConObjective(feature_dim=32, projection_dim=16, mask_ratio=0.25)
    module = Pretraining(model, objective, OptimConfig(lr=3e-3, weight_decay=0.0, scheduler="constant"))
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=3e-3)
    # scenes of 4 land-cover types: label vectors alike within a type
    kind = torch.arange(16) % 4
    labels = torch.nn.functional.one_hot(kind, 9).float() * 0.8 + 0.2 * torch.rand(16, 9)
    x = torch.randn(4, 13, 28, 28)[kind] + 0.3 * torch.randn(16, 13, 28, 28)
    targets = objective.soft.soft_targets(labels)
    floor = -(targets * targets.clamp_min(1e-12).log()).sum(-1).mean().item()  # entropy: the loss cannot go below it
    losses = []
    for _ in range(30):
        out = objective(model, {"input": x, "labels": labels})
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    start, end = sum(losses[:3]) / 3 - floor, sum(losses[-3:]) / 3 - floor
    assert end < 0.5 * start, (start, end)
    assert out["positives_per_anchor"] > 1.0  # soft targets: several positives per anchor


def test_continual_init_from_dinov2_rgb():
    rgb = official_vit(in_chans=3)
    model = SoftConViT.from_dinov2(rgb.state_dict(), bands=["B2", "B3", "B4", "B8", "VV"], size="small")
    torch.testing.assert_close(model.patch_embed.proj.weight[:, 2], rgb.patch_embed.proj.weight[:, 0] * 3 / 5)
    torch.testing.assert_close(model.blocks[3].ls1.gamma, rgb.blocks[3].ls1.gamma)
    assert model(torch.randn(1, 5, 56, 56)).shape == (1, 384)


@pytest.mark.parametrize("size", [224, 112])
def test_vitb14_matches_dinov2(tmp_path, size):
    """SoftCon ViT-B/14 (B13_vitb14_softcon.pth): DINOv2's own ViT-B build (768 wide, 12 heads, LayerScale
    1e-5, no registers), two of its twelve blocks to stay fast; width 768 -> 'base' -> 12 heads from the file."""
    from dinov2.layers import MemEffAttention, NestedTensorBlock

    ref = dinov2_vit.DinoVisionTransformer(patch_size=14, img_size=224, in_chans=13, embed_dim=768, depth=2, num_heads=12, mlp_ratio=4,
                                           block_fn=partial(NestedTensorBlock, attn_class=MemEffAttention), block_chunks=0,
                                           init_values=1e-5).eval()
    for p in ref.parameters():
        p.data.normal_(0, 0.05)
    torch.save(ref.state_dict(), tmp_path / "B13_vitb14_softcon.pth")
    ours = SoftConViT.from_pretrained(tmp_path / "B13_vitb14_softcon.pth").eval()
    assert (ours.feature_dim, len(ours.blocks), ours.blocks[0].attn.num_heads) == (768, 2, 12)
    assert set(ours.state_dict()) == set(ref.state_dict())
    x = torch.randn(1, 13, size, size)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=1e-4)


def test_b2_rn50_registered_name_loads_with_its_sar_meta(tmp_path, monkeypatch):
    """softcon-rn50-s1 (B2_rn50_softcon.pth, a torchvision ResNet-50 with a 2-channel conv1) from the
    cache: VV/VH bands and the SSL4EO-S12 S1 ±2σ statistics from the weight's meta, outputs equal to
    torchvision's build of the same file."""
    from polyfm.geo.weights import SSL4EO_S1_MEAN, SSL4EO_S1_STD

    monkeypatch.setenv("POLYFM_CACHE", str(tmp_path))
    monkeypatch.setenv("POLYFM_OFFLINE", "1")
    ref = torchvision.models.resnet50()
    ref.conv1 = torch.nn.Conv2d(2, 64, kernel_size=7, stride=2, padding=3, bias=False)
    ref.fc = torch.nn.Identity()
    ref.eval()
    folder = tmp_path / "weights" / "softcon-rn50-s1"
    folder.mkdir(parents=True)
    torch.save(ref.state_dict(), folder / "B2_rn50_softcon.pth")
    ours = SoftConResNet50.from_pretrained("softcon-rn50-s1").eval()
    assert ours.bands == ["VV", "VH"] and ours.conv1.in_channels == 2
    norm = ours.input_normalization()
    assert norm is not None and norm.kind == "sigma2" and list(norm.mean) == SSL4EO_S1_MEAN and list(norm.std) == SSL4EO_S1_STD
    x = torch.randn(2, 2, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x))
    # inputs with the bands the other way round are mapped by name, not by position
    ours.adapt_bands(["VH", "VV"])
    with torch.no_grad():
        torch.testing.assert_close(ours(x.flip(1)), ref(x), atol=1e-4, rtol=1e-4)  # another summation order in conv1
