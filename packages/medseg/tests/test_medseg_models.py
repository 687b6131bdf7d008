"""The MONAI networks in the encoder contract: parity with MONAI, blocks, heads, checkpoints."""

from __future__ import annotations

import json
import zipfile

import monai.networks.nets as monai_nets
import pytest
import torch

from polyfm.core.errors import CheckpointError
from polyfm.medseg.models import MODELS, BasicUNet, DynUNet, SwinUNETR, UNet

TINY = {
    "unet": (UNet, monai_nets.UNet, {"channels": (4, 8, 16), "strides": (2, 2), "num_res_units": 1}),
    "basic_unet": (BasicUNet, monai_nets.BasicUNet, {"features": (4, 4, 8, 8, 16, 4)}),
    "dynunet": (
        DynUNet,
        monai_nets.DynUNet,
        {"kernel_size": [3, 3, 3], "strides": [1, 2, 2], "upsample_kernel_size": [2, 2], "filters": [4, 8, 16]},
    ),
    "swin_unetr": (SwinUNETR, monai_nets.SwinUNETR, {"feature_size": 12, "depths": (1, 1, 1, 1)}),
}


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("name", list(TINY))
def test_medseg_model_matches_monai(name: str, spatial_dims: int) -> None:
    if (name, spatial_dims) == ("swin_unetr", 3):
        pytest.skip("3D SwinUNETR parity runs in test_medseg_swinvit_ssl_weights_load_like_monai_load_from")
    ours_cls, monai_cls, kwargs = TINY[name]
    torch.manual_seed(0)
    ours = ours_cls(spatial_dims=spatial_dims, in_channels=1, out_channels=3, **kwargs).eval()
    reference = monai_cls(spatial_dims=spatial_dims, in_channels=1, out_channels=3, **kwargs).eval()
    assert list(ours.state_dict()) == list(reference.state_dict())  # MONAI's keys, so bundles load as is
    reference.load_state_dict(ours.state_dict())
    size = 64 if name == "swin_unetr" else 32  # SwinUNETR's instance norm needs a 2-voxel bottleneck: 64 = 2 * 32
    x = torch.randn(1 if spatial_dims == 3 else 2, 1, *([size] * spatial_dims))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(x))
        features = ours.forward_features(x)
    assert features.shape == (len(x), ours.feature_dim)
    assert MODELS[name] is ours_cls


@pytest.mark.parametrize("name", list(TINY))
def test_medseg_blocks_cover_the_network_in_order(name: str) -> None:
    ours_cls, _, kwargs = TINY[name]
    model = ours_cls(spatial_dims=2, in_channels=1, out_channels=3, **kwargs)
    blocks = model.block_names()
    params = [n for n, _ in model.named_parameters()]
    assert all(model.block_index(n) < len(blocks) and any(n.startswith(b + ".") for b in blocks) for n in params)
    assert len(set(blocks)) == len(blocks)
    # the first block takes the image, the heads come last
    first_conv = next(p for n, p in model.named_parameters() if n.startswith(blocks[0] + ".") and p.ndim == 4)
    assert first_conv.shape[1] == 1
    assert blocks[-len(model.head_names()):] == model.head_names()


@pytest.mark.parametrize("name", list(TINY))
def test_medseg_reset_head_keeps_the_rest(name: str) -> None:
    ours_cls, _, kwargs = TINY[name]
    model = ours_cls(spatial_dims=2, in_channels=1, out_channels=5, **kwargs).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    heads = tuple(h + "." for h in model.head_names())
    model.reset_head(2)
    after = model.state_dict()
    assert model.num_outputs == 2 and model(torch.randn(1, 1, 64, 64)).shape[1] == 2
    kept = [k for k in before if not k.startswith(heads) and ".super_head." not in k]
    assert kept and all(torch.equal(before[k], after[k]) for k in kept)


def test_medseg_dynunet_deep_supervision_heads_follow_reset() -> None:
    model = DynUNet(spatial_dims=2, out_channels=5, deep_supervision=True, deep_supr_num=1, **TINY["dynunet"][2])
    model.reset_head(2)
    model.train()
    out = model(torch.randn(2, 1, 32, 32))
    assert out.shape == (2, 2, 2, 32, 32)  # (batch, heads, classes, H, W)


def _official_swinvit_checkpoint(feature_size: int, depths: tuple[int, ...], with_heads: bool) -> dict:
    """A random Swin-ViT saved the way research-contributions released model_swinvit.pt."""
    from monai.networks.nets.swin_unetr import SwinTransformer

    torch.manual_seed(1)
    swin = SwinTransformer(
        in_chans=1, embed_dim=feature_size, window_size=(7, 7, 7), patch_size=(2, 2, 2), depths=depths, num_heads=(3, 6, 12, 24)
    )
    state = {}
    for key, value in swin.state_dict().items():
        key = key.replace(".mlp.linear1.", ".mlp.fc1.").replace(".mlp.linear2.", ".mlp.fc2.")
        state[f"module.{key}"] = torch.randn_like(value.float()).to(value.dtype) if value.is_floating_point() else value
    if with_heads:
        dim = 16 * feature_size
        state |= {
            "module.rotation_head.weight": torch.randn(4, dim),
            "module.rotation_head.bias": torch.randn(4),
            "module.contrastive_head.weight": torch.randn(512, dim),
            "module.contrastive_head.bias": torch.randn(512),
        }
    return {"epoch": 100, "state_dict": state}


@pytest.mark.parametrize("with_heads", [False, True])
def test_medseg_swinvit_ssl_weights_load_like_monai_load_from(tmp_path, with_heads: bool) -> None:
    depths = (1, 1, 1, 1)
    checkpoint = _official_swinvit_checkpoint(12, depths, with_heads)
    path = tmp_path / "model_swinvit.pt"
    torch.save(checkpoint, path)

    ours = SwinUNETR.from_pretrained(path, feature_size=12, depths=depths, out_channels=4).eval()
    reference = monai_nets.SwinUNETR(in_channels=1, out_channels=4, feature_size=12, depths=depths).eval()
    reference.load_from(torch.load(path, weights_only=True))  # MONAI's own loader for this file
    ours_swin = {k: v for k, v in ours.state_dict().items() if k.startswith("swinViT.")}
    ref_swin = {k: v for k, v in reference.state_dict().items() if k.startswith("swinViT.")}
    assert ours_swin.keys() == ref_swin.keys()
    for key in ref_swin:
        torch.testing.assert_close(ours_swin[key], ref_swin[key], msg=key)
    x = torch.rand(1, 1, 64, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours.swin_features(x), reference.swinViT(x, True)[4])


def test_medseg_swinvit_ssl_wrong_size_gives_a_readable_diff(tmp_path) -> None:
    path = tmp_path / "model_swinvit.pt"
    torch.save(_official_swinvit_checkpoint(12, (1, 1, 1, 1), False), path)
    with pytest.raises(CheckpointError) as info:
        SwinUNETR.from_pretrained(path, feature_size=24, depths=(1, 1, 1, 1))
    message = str(info.value)
    assert "shape mismatch" in message and "swinViT.layers1.0.blocks.0.attn.qkv.weight: (72, 24) vs (36, 12)" in message
    assert "feature_size=12" in message and "depths=(1, 1, 1, 1)" in message
    with pytest.raises(CheckpointError) as info:
        SwinUNETR.from_pretrained(path, feature_size=12, depths=(2, 2, 2, 2))
    assert "missing from the checkpoint" in str(info.value) and "swinViT.layers1.0.blocks.1" in str(info.value)


def _write_bundle(folder, model, network_def: dict) -> None:
    (folder / "models").mkdir(parents=True)
    (folder / "configs").mkdir()
    torch.save(model.state_dict(), folder / "models" / "model.pt")
    (folder / "configs" / "inference.json").write_text(json.dumps({"network_def": network_def, "network": "$@network_def.to(@device)"}))


def test_medseg_monai_bundle_folder_and_zip_load(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("POLYFM_CACHE", str(tmp_path / "cache"))
    network_def = {"_target_": "UNet", "spatial_dims": 3, "in_channels": 1, "out_channels": 2,
                   "channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 2, "norm": "batch"}  # fmt: skip
    torch.manual_seed(3)
    reference = monai_nets.UNet(**{k: v for k, v in network_def.items() if not k.startswith("_")}).eval()
    bundle = tmp_path / "spleen_ct_segmentation"
    _write_bundle(bundle, reference, network_def)
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        expected = reference(x)
        from_folder = UNet.from_pretrained(bundle).eval()  # the network comes from configs/inference.json
        torch.testing.assert_close(from_folder(x), expected)
    archive = tmp_path / "spleen_ct_segmentation_v0.5.3.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for file in bundle.rglob("*"):
            zf.write(file, file.relative_to(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(UNet.from_pretrained(archive).eval()(x), expected)


def test_medseg_bundle_with_another_architecture_names_the_keys(tmp_path) -> None:
    path = tmp_path / "model.pt"
    torch.save(monai_nets.BasicUNet(spatial_dims=3, features=(4, 4, 8, 8, 16, 4)).state_dict(), path)
    with pytest.raises(CheckpointError) as info:
        UNet.from_pretrained(path, channels=(4, 8, 16), strides=(2, 2))
    assert "conv_0.conv_0.conv.weight" in str(info.value) and "model.0" in str(info.value)


def test_medseg_weights_registry() -> None:
    from polyfm.core.weights import get_weights
    from polyfm.medseg.weights import WEIGHTS

    names = {spec.name for spec in WEIGHTS}
    assert {"swin_unetr_ssl", "spleen_ct_segmentation", "swin_unetr_btcv_segmentation"} <= names
    spec = get_weights("swin_unetr_ssl")
    assert spec.files["model_swinvit.pt"][0].startswith("https://github.com/Project-MONAI/")
    assert spec.meta["intensity"]["a_min"] == -1000.0


def test_medseg_offline_fetch_names_the_url(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("POLYFM_CACHE", str(tmp_path))
    monkeypatch.setenv("POLYFM_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="model_swinvit.pt"):
        SwinUNETR.from_pretrained("swin_unetr_ssl")
