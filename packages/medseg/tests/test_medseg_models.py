"""The MONAI networks in the encoder contract: parity with MONAI, blocks, heads, checkpoints."""

from __future__ import annotations

import json
import re
import zipfile

import monai.networks.nets as monai_nets
import pytest
import torch

from polyfm.core.errors import CheckpointError
from polyfm.medseg.models import MODELS, UNETR, BasicUNet, DynUNet, MedNeXt, SegResNet, SwinUNETR, UNet

TINY = {
    "unet": (UNet, monai_nets.UNet, {"channels": (4, 8, 16), "strides": (2, 2), "num_res_units": 1}),
    "basic_unet": (BasicUNet, monai_nets.BasicUNet, {"features": (4, 4, 8, 8, 16, 4)}),
    "dynunet": (
        DynUNet,
        monai_nets.DynUNet,
        {"kernel_size": [3, 3, 3], "strides": [1, 2, 2], "upsample_kernel_size": [2, 2], "filters": [4, 8, 16]},
    ),
    "segresnet": (SegResNet, monai_nets.SegResNet, {"init_filters": 8, "blocks_down": (1, 1, 2), "blocks_up": (1, 1), "norm": ("group", {"num_groups": 4})}),
    # every argument our S default would set otherwise (residual blocks, kernel 3; MONAI's plain class: none, 7)
    "mednext": (MedNeXt, monai_nets.MedNeXt, {"init_filters": 4, "kernel_size": 3, "use_residual_connection": True, "blocks_down": (1, 1, 1, 1), "blocks_bottleneck": 1, "blocks_up": (1, 1, 1, 1)}),
    "swin_unetr": (SwinUNETR, monai_nets.SwinUNETR, {"feature_size": 12, "depths": (1, 1, 1, 1)}),
    "unetr": (UNETR, monai_nets.UNETR, {"img_size": 64, "feature_size": 8, "hidden_size": 48, "mlp_dim": 96, "num_heads": 4}),
}


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("name", list(TINY))
def test_medseg_model_matches_monai(name: str, spatial_dims: int) -> None:
    if (name, spatial_dims) == ("swin_unetr", 3):
        pytest.skip("3D SwinUNETR parity runs in test_medseg_swin_unetr_btcv_bundle_matches_monai_in_3d (a bundle, 64x64x32)")
    ours_cls, monai_cls, kwargs = TINY[name]
    torch.manual_seed(0)
    ours = ours_cls(spatial_dims=spatial_dims, in_channels=1, out_channels=3, **kwargs).eval()
    reference = monai_cls(spatial_dims=spatial_dims, in_channels=1, out_channels=3, **kwargs).eval()
    assert list(ours.state_dict()) == list(reference.state_dict())  # MONAI's keys, so bundles load as is
    reference.load_state_dict(ours.state_dict())
    size = 64 if name in ("swin_unetr", "unetr") else 32  # Swin: a 2-voxel bottleneck (64 = 2 * 32); UNETR: img_size
    x = torch.randn(1 if spatial_dims == 3 else 2, 1, *([size] * spatial_dims))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(x))
        features = ours.forward_features(x)
    assert features.shape == (len(x), ours.feature_dim)
    assert MODELS[name] is ours_cls


VARIANTS = [  # other valid configurations than TINY's: MONAI's options that change layers or the forward
    ("unet", {"act": ("leakyrelu", {"negative_slope": 0.2}), "norm": "batch", "adn_ordering": "AN", "bias": False, "up_kernel_size": 1}),
    ("basic_unet", {"upsample": "nontrainable"}),
    ("basic_unet", {"upsample": "pixelshuffle"}),
    ("dynunet", {"res_block": True, "trans_bias": True, "deep_supervision": True, "deep_supr_num": 1}),
    ("segresnet", {"upsample_mode": "deconv", "act": "prelu", "norm_name": "group", "num_groups": 4}),
    ("mednext", {"encoder_expansion_ratio": (2, 3, 4, 4), "decoder_expansion_ratio": (4, 4, 3, 2), "bottleneck_expansion_ratio": 4,
                 "deep_supervision": True, "global_resp_norm": True, "use_residual_connection": False, "kernel_size": 5}),
    ("swin_unetr", {"use_v2": True, "downsample": "mergingv2", "patch_norm": True, "qkv_bias": False, "mlp_ratio": 2.0}),
    ("unetr", {"proj_type": "perceptron", "res_block": False, "conv_block": False, "qkv_bias": True, "norm_name": "batch"}),
]


@pytest.mark.parametrize(("name", "variant"), VARIANTS, ids=[f"{n}-{i}" for i, (n, _) in enumerate(VARIANTS)])
def test_medseg_model_variants_match_monai(name: str, variant: dict) -> None:
    ours_cls, monai_cls, kwargs = TINY[name]
    kwargs = {**kwargs, **variant}
    if name == "segresnet":
        kwargs.pop("norm")  # norm_name/num_groups: MONAI's older spelling, as renalStructures_CECT_segmentation uses
    torch.manual_seed(0)
    ours = ours_cls(spatial_dims=2, in_channels=2, out_channels=3, **kwargs).eval()
    reference = monai_cls(spatial_dims=2, in_channels=2, out_channels=3, **kwargs).eval()
    assert list(ours.state_dict()) == list(reference.state_dict())
    reference.load_state_dict(ours.state_dict())
    x = torch.randn(2, 2, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(x))
    blocks, params = ours.block_names(), [n for n, _ in ours.named_parameters()]
    assert all(any(n.startswith(b + ".") for b in blocks) for n in params)  # freeze-k and LLRD see every weight


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


@pytest.mark.parametrize("variant", ["S", "B", "M", "L"])
def test_medseg_mednext_variants_are_monais_presets(variant: str) -> None:
    """variant="B" builds exactly monai.networks.nets.MedNeXtB (same layers, same init under one seed);
    a smaller width overrides the preset and nothing else."""
    torch.manual_seed(0)
    ours = MedNeXt(variant, spatial_dims=2, out_channels=3, kernel_size=5)
    torch.manual_seed(0)
    reference = getattr(monai_nets, f"MedNeXt{variant}")(spatial_dims=2, out_channels=3, kernel_size=5)
    ours_state, reference_state = ours.state_dict(), reference.state_dict()
    assert list(ours_state) == list(reference_state)
    assert all(torch.equal(ours_state[k], reference_state[k]) for k in ours_state)
    assert ours.feature_dim == 32 * 16 and MODELS["mednext"] is MedNeXt
    narrow = MedNeXt(variant, spatial_dims=2, init_filters=4)
    assert narrow.config["init_filters"] == 4 and narrow.config["blocks_down"] == ours.config["blocks_down"]
    if variant == "S":  # one forward on the full-width preset (the others are the same code, wider)
        x = torch.randn(1, 1, 32, 32)
        reference.load_state_dict(ours_state)
        with torch.no_grad():
            torch.testing.assert_close(ours.eval()(x), reference.eval()(x))


def test_medseg_mednext_deep_supervision_trains_and_refuses_bad_arguments() -> None:
    """MedNeXt's deep supervision returns coarser outputs (not stacked as DynUNet's): the task's loss
    resizes the target for each, weights 1, 1/2, ..., and the gradient reaches every head."""
    from polyfm.medseg.tasks import VolumeSegmentation

    torch.manual_seed(0)
    model = MedNeXt(spatial_dims=3, out_channels=5, deep_supervision=True, **{k: v for k, v in TINY["mednext"][2].items() if k != "kernel_size"})
    task = VolumeSegmentation(model, num_classes=3, roi_size=[32, 32, 32]).train()
    batch = {"input": torch.randn(1, 1, 32, 32, 32), "target": torch.randint(0, 3, (1, 1, 32, 32, 32))}
    outputs = task.model(batch["input"])
    assert [tuple(o.shape[2:]) for o in outputs] == [(32, 32, 32), (16, 16, 16), (8, 8, 8), (4, 4, 4), (2, 2, 2)]
    loss = task.training_step(batch, 0)
    loss.backward()
    assert task.model.out_blocks[0].conv_out.weight.grad is not None and task.model.out_0.conv_out.weight.grad is not None
    assert all(o.shape[1] == 3 for o in outputs)
    with torch.no_grad():
        assert task.eval().infer(torch.randn(1, 1, 48, 32, 32)).shape == (1, 3, 48, 32, 32)  # sliding window, eval: one output
    from polyfm.core.adaptation import Adaptation

    lora = VolumeSegmentation(MedNeXt(spatial_dims=2, out_channels=3, **TINY["mednext"][2]), num_classes=3, adaptation=Adaptation(mode="lora"))
    grouped = [m for m in lora.model.modules() if isinstance(m, torch.nn.Conv2d) and m.groups > 1]
    assert grouped and not any(hasattr(m, "lora_A") for m in grouped)  # PEFT cannot adapt depthwise convolutions
    assert any("lora_A" in n for n, _ in lora.model.named_parameters())
    assert torch.isfinite(lora.training_step({"input": torch.randn(1, 1, 32, 32), "target": torch.randint(0, 3, (1, 1, 32, 32))}, 0))
    with pytest.raises(ValueError, match="variant='XL'"):
        MedNeXt("XL")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="one value per level"):
        MedNeXt(encoder_expansion_ratio=[2, 3])
    with pytest.raises(ValueError, match="as many decoder levels"):
        MedNeXt(blocks_up=(1, 1, 1))


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


@pytest.mark.parametrize(
    ("cls", "network_def"),
    [
        (UNet, {"_target_": "UNet", "spatial_dims": 3, "in_channels": 1, "out_channels": 2, "channels": [4, 8, 16], "strides": [2, 2]}),
        (SwinUNETR, {"_target_": "SwinUNETR", "spatial_dims": 2, "in_channels": 1, "out_channels": 3, "depths": [1, 1, 1, 1]}),
        (MedNeXt, {"_target_": "MedNeXt", "spatial_dims": 2, "in_channels": 1, "out_channels": 3, "init_filters": 4}),
    ],
    ids=["unet", "swin_unetr", "mednext"],
)
def test_medseg_bundle_network_def_uses_monai_defaults(tmp_path, cls: type, network_def: dict) -> None:
    """A network_def leaves out what MONAI defaults (UNet num_res_units=0, SwinUNETR feature_size=24), where
    polyfm's classes default otherwise (2 and 48, for the recipes): the bundle means MONAI's."""
    torch.manual_seed(10)
    reference = getattr(monai_nets, network_def["_target_"])(**{k: v for k, v in network_def.items() if k != "_target_"}).eval()
    bundle = tmp_path / "bundle"
    _write_bundle(bundle, reference, network_def)
    model = cls.from_pretrained(bundle).eval()
    x = torch.randn(1, 1, *([64] * network_def["spatial_dims"]))
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), atol=1e-5, rtol=1e-5)


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
    assert spec.files["model_swinvit.pt"][1] == "md5:c8d9deb6cbbd66839bc8dced6010103f"  # checked on fetch
    assert spec.meta["intensity"]["a_min"] == -1000.0


def test_medseg_offline_fetch_names_the_url(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("POLYFM_CACHE", str(tmp_path))
    monkeypatch.setenv("POLYFM_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="model_swinvit.pt"):
        SwinUNETR.from_pretrained("swin_unetr_ssl")


# ----------------------------------------------------------------------------- checkpoint and bundle variants


def _pediatric_like_bundle(folder, reference) -> None:
    """pediatric_abdominal_ct_segmentation's layout: configs/inference.yaml with @references and a
    $ expression, weights in models/dynunet_FT.pt (no model.pt), other networks in other configs."""
    import yaml

    (folder / "models").mkdir(parents=True)
    (folder / "configs").mkdir()
    torch.save(reference.state_dict(), folder / "models" / "dynunet_FT.pt")
    inference = {
        "input_channels": 1, "output_channels": 4, "spatial_size": [32, 32, 32], "spatial_dims": "$len(@spatial_size)",
        "network_def": {
            "_target_": "monai.networks.nets.DynUNet", "spatial_dims": "@spatial_dims", "in_channels": "@input_channels",
            "out_channels": "@output_channels", "kernel_size": [3, 3, 3, 3], "strides": [1, 2, 2, [2, 2, 1]],
            "upsample_kernel_size": [2, 2, [2, 2, 1]], "filters": [4, 8, 16, 16], "norm_name": "instance",
            "deep_supervision": False, "res_block": True,
        },
        "network": "$@network_def.to(@device)",
    }  # fmt: skip
    (folder / "configs" / "inference.yaml").write_text(yaml.safe_dump(inference))
    segresnet = {"network_def": {"_target_": "monai.networks.nets.SegResNet", "init_filters": 16, "in_channels": "@input_channels"}, "input_channels": 1}
    (folder / "configs" / "inference_segresnet.yaml").write_text(yaml.safe_dump(segresnet))
    (folder / "configs" / "metadata.json").write_text(json.dumps({"version": "0.4.4", "monai_version": "1.3.0"}))


def test_medseg_bundle_yaml_with_references_loads_dynunet(tmp_path) -> None:
    torch.manual_seed(4)
    kwargs = {"kernel_size": [3, 3, 3, 3], "strides": [1, 2, 2, [2, 2, 1]], "upsample_kernel_size": [2, 2, [2, 2, 1]],
              "filters": [4, 8, 16, 16], "norm_name": "instance", "res_block": True}  # fmt: skip
    reference = monai_nets.DynUNet(spatial_dims=3, in_channels=1, out_channels=4, **kwargs).eval()
    bundle = tmp_path / "pediatric_abdominal_ct_segmentation"
    _pediatric_like_bundle(bundle, reference)
    with pytest.raises(CheckpointError, match=r"inference.yaml: network_def sets spatial_dims='\$len\(@spatial_size\)'.*spatial_dims=\.\.\."):
        DynUNet.from_pretrained(bundle)  # polyfm does not evaluate bundle code: it asks for the value
    model = DynUNet.from_pretrained(bundle, spatial_dims=3).eval()  # @references resolved from the yaml
    assert model.config["out_channels"] == 4 and model.config["res_block"] is True
    x = torch.randn(1, 1, 32, 32, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), atol=1e-5, rtol=1e-5)
    with pytest.raises(CheckpointError, match=r"declares no UNet network \(network_def in inference.yaml: DynUNet.*polyfm.medseg.models.DynUNet.from_pretrained"):
        UNet.from_pretrained(bundle)
    (bundle / "models" / "other.pt").write_bytes((bundle / "models" / "dynunet_FT.pt").read_bytes())
    with pytest.raises(CheckpointError, match=r"several weight files \(dynunet_FT.pt, other.pt\)"):
        DynUNet.from_pretrained(bundle, spatial_dims=3)


def test_medseg_segresnet_bundle_zip_matches_monai(tmp_path, monkeypatch) -> None:
    """brats_mri_segmentation's network_def (4 MR channels, 3 regions), released as a zip."""
    monkeypatch.setenv("POLYFM_CACHE", str(tmp_path / "cache"))
    network_def = {"_target_": "SegResNet", "blocks_down": [1, 2, 2, 4], "blocks_up": [1, 1, 1], "init_filters": 8,
                   "in_channels": 4, "out_channels": 3, "dropout_prob": 0.2}  # fmt: skip
    torch.manual_seed(5)
    reference = monai_nets.SegResNet(**{k: v for k, v in network_def.items() if not k.startswith("_")}).eval()
    bundle = tmp_path / "brats_mri_segmentation"
    _write_bundle(bundle, reference, network_def)
    (bundle / "configs" / "metadata.json").write_text("{}")
    archive = tmp_path / "brats_mri_segmentation_v0.5.2.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for file in bundle.rglob("*"):
            zf.write(file, file.relative_to(tmp_path))
    model = SegResNet.from_pretrained(archive).eval()
    x = torch.randn(1, 4, 32, 32, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), atol=1e-5, rtol=1e-5)
        assert model.bottleneck_features(x).shape == (1, 64, 4, 4, 2) and model.feature_dim == 64
    assert model.block_names()[-1] == "conv_final.2" and model.head_names() == ["conv_final.2"]


def test_medseg_swin_unetr_btcv_bundle_matches_monai_in_3d(tmp_path) -> None:
    """swin_unetr_btcv_segmentation's network_def (img_size, removed from MONAI in 1.5, use_checkpoint), narrower."""
    network_def = {"_target_": "SwinUNETR", "spatial_dims": 3, "img_size": 96, "in_channels": 1, "out_channels": 14,
                   "feature_size": 12, "use_checkpoint": False}  # fmt: skip
    torch.manual_seed(9)
    reference = monai_nets.SwinUNETR(**{k: v for k, v in network_def.items() if k not in ("_target_", "img_size")}).eval()
    bundle = tmp_path / "swin_unetr_btcv_segmentation"
    _write_bundle(bundle, reference, network_def)
    model = SwinUNETR.from_pretrained(bundle).eval()
    x = torch.randn(1, 1, 64, 64, 32)  # the bench's Swin patch: a 2x2x1 bottleneck
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), atol=1e-5, rtol=1e-5)


def test_medseg_dynunet_deep_supervision_checkpoint_loads_without_heads(tmp_path, caplog) -> None:
    kwargs = {"spatial_dims": 3, "in_channels": 1, "out_channels": 3, **TINY["dynunet"][2]}
    torch.manual_seed(6)
    reference = monai_nets.DynUNet(**kwargs, deep_supervision=True, deep_supr_num=1).eval()  # trained with deep supervision
    path = tmp_path / "model.pt"
    torch.save({"state_dict": reference.state_dict(), "epoch": 3}, path)
    x = torch.randn(1, 1, 32, 32, 32)
    with caplog.at_level("INFO", logger="polyfm.medseg.models.dynunet"):
        plain = DynUNet.from_pretrained(path, **kwargs).eval()  # inference without the training-only heads
    assert "dropped 4 deep-supervision head tensors" in caplog.text
    supervised = DynUNet.from_pretrained(path, **kwargs, deep_supervision=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(x), reference(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(supervised(x), reference(x), atol=1e-5, rtol=1e-5)


def test_medseg_swinvit_ssl_weights_load_into_v2_like_monai(tmp_path, caplog) -> None:
    depths = (1, 1, 1, 1)
    path = tmp_path / "model_swinvit.pt"
    torch.save(_official_swinvit_checkpoint(12, depths, with_heads=True), path)
    with caplog.at_level("INFO", logger="polyfm.medseg.models.base"):
        ours = SwinUNETR.from_pretrained(path, feature_size=12, depths=depths, out_channels=3, use_v2=True).eval()
    assert "swinViT.layers1c" in caplog.text and "decoder1" in caplog.text  # what stays fresh is said
    reference = monai_nets.SwinUNETR(in_channels=1, out_channels=3, feature_size=12, depths=depths, use_v2=True).eval()
    reference.load_from(torch.load(path, weights_only=True))
    loaded = [k for k in reference.state_dict() if k.startswith("swinViT.") and not re.match(r"swinViT\.layers\dc\.", k)]
    assert len(loaded) > 20 and any(k.startswith("swinViT.layers4c.") for k in ours.state_dict())
    for key in loaded:
        torch.testing.assert_close(ours.state_dict()[key], reference.state_dict()[key], msg=key)


def _nnunet_checkpoint(features, kernels, strides, classes=3, network="PlainConvUNet", seed=8) -> dict:
    """A random nnU-Net v2 checkpoint_final.pth in dynamic-network-architectures' layout (PlainConvUNet, 3D,
    conv biases, instance norms, every module also under its all_modules / decoder.encoder alias)."""
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=generator) * 0.3

    w: dict[str, torch.Tensor] = {}

    def stacked(prefix, c_in, c_out, kernel):
        for c in range(2):
            conv = {"weight": rand(c_out, c_in if c == 0 else c_out, *kernel), "bias": rand(c_out)}
            norm = {"weight": 1 + rand(c_out), "bias": rand(c_out)}
            for name, value in conv.items():
                w[f"{prefix}.convs.{c}.conv.{name}"] = w[f"{prefix}.convs.{c}.all_modules.0.{name}"] = value
            for name, value in norm.items():
                w[f"{prefix}.convs.{c}.norm.{name}"] = w[f"{prefix}.convs.{c}.all_modules.1.{name}"] = value

    n, c_in = len(features), 1
    for s in range(n):
        stacked(f"encoder.stages.{s}.0", c_in, features[s], kernels[s])
        c_in = features[s]
    for d in range(n - 1):
        below, skip = features[n - 1 - d], features[n - 2 - d]
        w[f"decoder.transpconvs.{d}.weight"], w[f"decoder.transpconvs.{d}.bias"] = rand(below, skip, *strides[n - 1 - d]), rand(skip)
        stacked(f"decoder.stages.{d}", 2 * skip, skip, kernels[n - 2 - d])
        w[f"decoder.seg_layers.{d}.weight"], w[f"decoder.seg_layers.{d}.bias"] = rand(classes, skip, 1, 1, 1), rand(classes)
    w |= {f"decoder.encoder.{k[len('encoder.'):]}": v for k, v in w.items() if k.startswith("encoder.")}
    arch = {"n_stages": n, "features_per_stage": features, "conv_op": "torch.nn.modules.conv.Conv3d", "kernel_sizes": kernels,
            "strides": strides, "n_conv_per_stage": [2] * n, "n_conv_per_stage_decoder": [2] * (n - 1), "conv_bias": True,
            "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d", "norm_op_kwargs": {"eps": 1e-05, "affine": True},
            "dropout_op": None, "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}}  # fmt: skip
    plans = {"configurations": {"3d_fullres": {"patch_size": [32, 32, 16], "architecture": {
        "network_class_name": f"dynamic_network_architectures.architectures.unet.{network}", "arch_kwargs": arch}},
        "3d_cascade_fullres": {"inherits_from": "3d_fullres"}}}  # fmt: skip
    return {"network_weights": w, "optimizer_state": {}, "current_epoch": 1000, "trainer_name": "nnUNetTrainer",
            "init_args": {"plans": plans, "configuration": "3d_cascade_fullres", "fold": 0, "device": torch.device("cpu")},
            "inference_allowed_mirroring_axes": (0, 1, 2)}  # fmt: skip


def _nnunet_forward(w: dict, x: torch.Tensor, n: int, strides: list) -> list[torch.Tensor]:
    """PlainConvUNet's forward written from dynamic-network-architectures (conv with bias -> instance norm ->
    LeakyReLU 0.01, strided first conv per stage, transposed conv, cat(up, skip)); full-resolution output first."""
    f = torch.nn.functional

    def stacked(prefix, x, stride):
        for c in range(2):
            weight = w[f"{prefix}.convs.{c}.conv.weight"]
            x = f.conv3d(x, weight, w[f"{prefix}.convs.{c}.conv.bias"], stride=stride if c == 0 else 1, padding=[(k - 1) // 2 for k in weight.shape[2:]])
            x = f.instance_norm(x, weight=w[f"{prefix}.convs.{c}.norm.weight"], bias=w[f"{prefix}.convs.{c}.norm.bias"], eps=1e-5)
            x = f.leaky_relu(x, 0.01)
        return x

    skips = []
    for s in range(n):
        x = stacked(f"encoder.stages.{s}.0", x, strides[s])
        skips.append(x)
    outputs = []
    for d in range(n - 1):
        x = f.conv_transpose3d(x, w[f"decoder.transpconvs.{d}.weight"], w[f"decoder.transpconvs.{d}.bias"], stride=strides[n - 1 - d])
        x = stacked(f"decoder.stages.{d}", torch.cat([x, skips[n - 2 - d]], 1), 1)
        outputs.append(f.conv3d(x, w[f"decoder.seg_layers.{d}.weight"], w[f"decoder.seg_layers.{d}.bias"]))
    return outputs[::-1]


def test_medseg_nnunet_plain_unet_loads_as_dynunet(tmp_path, caplog) -> None:
    features, kernels, strides = [4, 8, 16, 16], [[3, 3, 3]] * 4, [[1, 1, 1], [2, 2, 2], [2, 2, 1], [2, 2, 2]]
    checkpoint = _nnunet_checkpoint(features, kernels, strides)
    path = tmp_path / "checkpoint_final.pth"
    torch.save(checkpoint, path)
    x = torch.randn(2, 1, 32, 32, 16)
    with torch.no_grad():
        expected = _nnunet_forward(checkpoint["network_weights"], x, 4, strides)
        with caplog.at_level("INFO", logger="polyfm.medseg.nnunet"):
            model = DynUNet.from_pretrained(path).eval()  # the architecture comes from the checkpoint
        assert "dropped 14 nnU-Net convolution biases" in caplog.text  # 2 per block, 4 encoder + 3 decoder blocks
        assert model.config["strides"] == strides and model.config["filters"] == features and model.config["out_channels"] == 3
        torch.testing.assert_close(model(x), expected[0], atol=1e-5, rtol=1e-5)  # measured 5e-6 (outputs up to 3.9)
        supervised = DynUNet.from_pretrained(path, deep_supervision=True, deep_supr_num=2).train()
        stacked = supervised(x)  # MONAI: (B, 1 + heads, C, *S), the heads interpolated to full size
        for i in range(3):
            reference = torch.nn.functional.interpolate(expected[i], size=x.shape[2:]) if i else expected[0]
            torch.testing.assert_close(stacked[:, i], reference, atol=1e-5, rtol=1e-5)
    with pytest.raises(CheckpointError, match=r"an nnU-Net checkpoint \(nnUNetTrainer.*DynUNet.from_pretrained.*not UNet"):
        UNet.from_pretrained(path)


def test_medseg_nnunet_checkpoints_dynunet_cannot_hold_are_refused_by_name(tmp_path) -> None:
    path = tmp_path / "checkpoint_final.pth"
    torch.save(_nnunet_checkpoint([4, 8, 16], [[3, 3, 3]] * 3, [[1, 1, 1], [2, 2, 2], [2, 2, 2]], network="ResidualEncoderUNet"), path)
    with pytest.raises(CheckpointError, match=r"checkpoint_final.pth: an nnU-Net checkpoint \(nnUNetTrainer\).*ResidualEncoderUNet.*nnUNetv2_predict"):
        DynUNet.from_pretrained(path)
    anisotropic = [[1, 3, 3], [3, 3, 3], [3, 3, 3]]  # the usual MR plan: in-plane kernels at full resolution
    torch.save(_nnunet_checkpoint([4, 8, 16], anisotropic, [[1, 1, 1], [1, 2, 2], [2, 2, 2]]), path)
    with pytest.raises(CheckpointError, match=r"decoder stage 1 uses kernel \[1, 3, 3\].*deeper stage's \[3, 3, 3\]"):
        DynUNet.from_pretrained(path)


@pytest.mark.parametrize("name", ["unet", "swin_unetr", "mednext"])
def test_medseg_task_checkpoint_loads_into_the_network(tmp_path, name: str) -> None:
    """polyfm fit writes {"state_dict": {"model.<network key>": ...}}; from_pretrained takes the network
    out (UNet's own keys start with model. too; SwinUNETR's must not be mistaken for SSL weights)."""
    from polyfm.core.adaptation import Adaptation
    from polyfm.medseg.tasks import VolumeSegmentation

    ours_cls, _, kwargs = TINY[name]
    torch.manual_seed(7)
    task = VolumeSegmentation(ours_cls(spatial_dims=2, in_channels=1, out_channels=3, **kwargs), num_classes=4).eval()
    path = tmp_path / "epoch=3-step=40.ckpt"
    torch.save({"state_dict": task.state_dict(), "epoch": 3, "pytorch-lightning_version": "2.6.6"}, path)
    loaded = ours_cls.from_pretrained(path, spatial_dims=2, in_channels=1, out_channels=4, **kwargs).eval()
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), task.model(x))
    lora = VolumeSegmentation(ours_cls(spatial_dims=2, in_channels=1, out_channels=3, **kwargs), num_classes=4, adaptation=Adaptation(mode="lora"))
    torch.save({"state_dict": lora.state_dict()}, path)
    with pytest.raises(CheckpointError, match=r"LoRA adapters.*merge_lora"):
        ours_cls.from_pretrained(path, spatial_dims=2, in_channels=1, out_channels=4, **kwargs)


def test_medseg_unetr_checkpoint_from_older_monai_loads(tmp_path, caplog) -> None:
    """research-contributions' UNETR/BTCV layout ({"epoch", "best_acc", "state_dict"}), saved by a MONAI that
    built cross-attention in every ViT layer (1.3/1.4: extra cross_attn.*) or none (before: no norm_cross_attn)."""
    kwargs = {"spatial_dims": 3, "in_channels": 1, "out_channels": 3, **TINY["unetr"][2]}
    torch.manual_seed(11)
    reference = monai_nets.UNETR(**kwargs).eval()
    state = {k: v for k, v in reference.state_dict().items() if ".norm_cross_attn." not in k or not k.startswith("vit.blocks.0.")}
    for i in range(12):
        state |= {f"vit.blocks.{i}.cross_attn.{n}.weight": torch.randn(48, 48) for n in ("to_q", "to_k", "to_v", "out_proj")}
    path = tmp_path / "UNETR_model_best_acc.pth"
    torch.save({"epoch": 500, "best_acc": 0.81, "state_dict": state}, path)
    with caplog.at_level("INFO", logger="polyfm.medseg.models.unetr"):
        model = UNETR.from_pretrained(path, **kwargs).eval()
    assert "dropped 48 unused cross-attention tensors" in caplog.text and "norm_cross_attn for 2" in caplog.text
    x = torch.randn(1, 1, 64, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), atol=1e-5, rtol=1e-5)
        assert model.bottleneck_features(x).shape == (1, 48, 4, 4, 4) and model.forward_features(x).shape == (1, 48)


def test_medseg_nnunet_checkpoint_fine_tunes_for_another_class_count(tmp_path, caplog) -> None:
    """nnU-Net's own fine-tuning (-pretrained_weights) skips the .seg_layers.; here the class-specific layers of
    another class count stay fresh and everything else loads, through from_pretrained(out_channels=...) and through
    a recipe's VolumeSegmentation(pretrained=...), deep supervision included (its skip_layers alias the heads)."""
    from polyfm.medseg.tasks import VolumeSegmentation

    path = tmp_path / "checkpoint_final.pth"
    torch.save(_nnunet_checkpoint([4, 8, 16], [[3, 3, 3]] * 3, [[1, 1, 1], [2, 2, 2], [2, 2, 2]], classes=3), path)
    source = DynUNet.from_pretrained(path)  # 3 classes, as trained
    encoder_keys = [k for k in source.state_dict() if k.startswith(("input_block.", "downsamples.", "bottleneck.", "upsamples."))]
    for deep_supervision in (False, True):
        with caplog.at_level("INFO", logger="polyfm.medseg.models.base"):
            model = DynUNet.from_pretrained(path, out_channels=5, deep_supervision=deep_supervision)
        assert "output_block.conv.conv.weight" in caplog.text and "keep their fresh initialisation" in caplog.text
        task = VolumeSegmentation(DynUNet(**{**source.config, "deep_supervision": deep_supervision}), num_classes=5, pretrained=str(path))
        for network in (model, task.model):
            assert network.output_block.conv.conv.weight.shape[0] == 5
            for key in encoder_keys:
                torch.testing.assert_close(network.state_dict()[key], source.state_dict()[key], msg=key)
        if deep_supervision:  # MONAI's skip layers still point at the (fresh, 5-class) supervision heads
            assert task.model.skip_layers.next_layer.super_head is task.model.deep_supervision_heads[0]
            assert task.model.train()(torch.randn(1, 1, 16, 16, 16)).shape == (1, 2, 5, 16, 16, 16)
        caplog.clear()


def test_medseg_swinvit_ssl_weights_at_full_size_load_into_v2(tmp_path) -> None:
    """The released configuration (feature_size 48, depths 2, 2, 2, 2) into use_v2=True, against MONAI's load_from."""
    path = tmp_path / "model_swinvit.pt"
    torch.save(_official_swinvit_checkpoint(48, (2, 2, 2, 2), with_heads=True), path)
    ours = SwinUNETR.from_pretrained(path, out_channels=3, use_v2=True)  # feature_size 48 is our default
    reference = monai_nets.SwinUNETR(in_channels=1, out_channels=3, feature_size=48, use_v2=True)
    reference.load_from(torch.load(path, weights_only=True))
    loaded = [k for k in reference.state_dict() if k.startswith("swinViT.") and not re.match(r"swinViT\.layers\dc\.", k)]
    assert len(loaded) > 100
    for key in loaded:
        torch.testing.assert_close(ours.state_dict()[key], reference.state_dict()[key], msg=key)
