"""SatMAE / SatMAE++ against the official code (rshf ships a copy of sustainlab-group/SatMAE)."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from polyfm.core.errors import CheckpointError, ConfigError
from polyfm.geo.models.satmae import SatMAE, SatMAETemporal, sincos_2d

rshf_satmae = pytest.importorskip("rshf.satmae.model")

TINY = dict(img_size=32, patch_size=8, embed_dim=64, channel_embed=16, depth=2, num_heads=4,
            decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=4, decoder_channel_embed=8)


def official_mae():
    cfg = dict(in_chans=10, patch_size=8, img_size=32, channel_groups=((0, 1, 2, 6), (3, 4, 5, 7), (8, 9)), embed_dim=64,
               channel_embed=16, depth=2, num_heads=4, mlp_ratio=4, decoder_embed_dim=32, decoder_depth=1,
               decoder_num_heads=4, decoder_channel_embed=8, norm_pix_loss=False)
    return rshf_satmae.MaskedAutoencoderGroupChannelViT(cfg).eval()


def official_finetune(num_classes=5):
    return rshf_satmae.GroupChannelsVisionTransformer(
        global_pool=True, channel_embed=16, img_size=32, patch_size=8, in_chans=10, embed_dim=64, depth=2, num_heads=4,
        mlp_ratio=4, qkv_bias=True, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_classes=num_classes).eval()


def test_sincos_matches_official():
    ref = rshf_satmae.get_2d_sincos_pos_embed(48, 4, cls_token=True)
    assert torch.allclose(sincos_2d(48, 4), torch.from_numpy(ref), atol=1e-12)


@pytest.mark.parametrize("spatial_mask", [False, True])
def test_mae_matches_official(spatial_mask):
    ref = official_mae()
    ref.spatial_mask = spatial_mask
    ours = SatMAE(**TINY, spatial_mask=spatial_mask).eval()
    assert set(ours.state_dict()) - set(ref.state_dict()) == {"channel_cls_embed", "fc_norm.weight", "fc_norm.bias"}
    assert set(ref.state_dict()) <= set(ours.state_dict())
    ours.load_state_dict(ref.state_dict(), strict=False)
    x = torch.rand(2, 10, 32, 32)
    torch.manual_seed(0)
    loss, pred, mask = ref(x, 0.75)
    torch.manual_seed(0)
    out = ours.forward_mae(x, 0.75)
    assert torch.equal(out["mask"], mask)
    torch.testing.assert_close(out["pred"], pred)
    torch.testing.assert_close(out["loss"], loss)


def test_pretrain_checkpoint_loads_and_interpolates(tmp_path):
    ref = official_mae()
    # as MAE's misc.save_model writes it: with the optimizer state and the argparse Namespace
    import argparse

    args = argparse.Namespace(model="mae_vit_base_patch16", input_size=32, grouped_bands=[[0, 1, 2, 6]], blr=1e-4)
    optimizer = torch.optim.AdamW(ref.parameters())
    torch.save({"model": ref.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 199, "scaler": {"scale": 65536.0}, "args": args},
               tmp_path / "pretrain-vit-base-e199.pth")
    full = SatMAE.from_pretrained(tmp_path / "pretrain-vit-base-e199.pth", num_heads=4, decoder_num_heads=4)
    assert full.decoder_depth == 1 and full.img_size == 32
    torch.testing.assert_close(full.blocks[1].mlp.fc2.weight, ref.blocks[1].mlp.fc2.weight)
    big = SatMAE.from_pretrained(tmp_path / "pretrain-vit-base-e199.pth", num_heads=4, img_size=64, decoder_depth=0,
                                 pos_interpolation="bicubic")
    assert big.pos_embed.shape == (1, 1 + 64, 48) and not hasattr(big, "decoder_embed")
    # bicubic: the same table as MAE/DeiT's interpolate_pos_embed (the copy rshf ships with ScaleMAE)
    from rshf.scalemae.model import interpolate_pos_embed

    class _Target:
        patch_embed = type("P", (), {"num_patches": 64})()
        pos_embed = torch.zeros(1, 65, 48)

    checkpoint = {"pos_embed": ref.state_dict()["pos_embed"].clone()}
    interpolate_pos_embed(_Target(), checkpoint)
    torch.testing.assert_close(big.pos_embed.data, checkpoint["pos_embed"])
    assert big.forward_features(torch.rand(1, 10, 64, 64)).shape == (1, 64)


def test_finetuned_checkpoint_matches_official(tmp_path):
    ref = official_finetune()
    for p in ref.parameters():
        p.data.normal_(0, 0.05)
    torch.save({"model": ref.state_dict()}, tmp_path / "finetune-vit-base-e7.pth")
    ours = SatMAE.from_pretrained(tmp_path / "finetune-vit-base-e7.pth", num_heads=4).eval()
    x = torch.rand(2, 10, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours.forward_features(x), ref.forward_features(x), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(ours(x), ref.head(ref.forward_features(x)), atol=1e-5, rtol=1e-4)


def test_wrong_checkpoint_is_refused(tmp_path):
    torch.save({"model": {"conv1.weight": torch.zeros(64, 13, 7, 7)}}, tmp_path / "rn50.pth")
    with pytest.raises(CheckpointError, match="patch_embed.0.proj.weight"):
        SatMAE.from_pretrained(tmp_path / "rn50.pth")


def test_satmae_pp_multiscale_loss():
    model = SatMAE(**TINY, multiscale=True)
    x = torch.rand(2, 10, 32, 32)
    up = [torch.rand(2, 10, 64, 64), torch.rand(2, 10, 128, 128)]
    out = model.forward_mae(x, imgs_up=up)
    assert torch.allclose(out["loss"], 0.6 * out["mse"] + 0.4 * out["l1"])
    out["loss"].backward()
    assert model.up_block2.proj_out.weight.grad is not None
    assert {"proj_up_conv.weight", "up_block1.up_conv.weight", "up_block2.res_block.conv1.weight"} <= set(model.state_dict())


def test_temporal_variant_runs_and_round_trips(tmp_path):
    model = SatMAETemporal(img_size=32, patch_size=8, embed_dim=448, depth=1, num_heads=4, decoder_embed_dim=256,
                           decoder_depth=1, decoder_num_heads=4)
    images = torch.rand(2, 3, 3, 32, 32)
    timestamps = torch.tensor([[[2, 0, 10], [3, 5, 12], [4, 11, 9]]] * 2)
    out = model.forward_mae(images, timestamps)
    assert out["pred"].shape == (2, 3 * 16, 8 * 8 * 3) and out["mask"].sum() == 2 * 36
    torch.save({"model": {k: v for k, v in model.state_dict().items() if not k.startswith("fc_norm.")}}, tmp_path / "temporal.pth")
    loaded = SatMAETemporal.from_pretrained(tmp_path / "temporal.pth", num_heads=4, decoder_num_heads=4)
    assert loaded.forward_features({"images": images, "timestamps": timestamps}).shape == (2, 448)
    # at another image size the fixed sin-cos tables are regenerated for the new grid
    bigger = SatMAETemporal.from_pretrained(tmp_path / "temporal.pth", num_heads=4, decoder_num_heads=4, img_size=48)
    assert torch.equal(bigger.pos_embed.data, sincos_2d(448 - 384, 6).float()[None])
    big_input = {"images": torch.rand(1, 3, 3, 48, 48), "timestamps": timestamps[:1]}
    with torch.no_grad():  # the 32 px model fed 48 px computes the same code on the fly
        torch.testing.assert_close(loaded.eval().forward_features(big_input), bigger.eval().forward_features(big_input))
    # a fine-tuned file in models_vit_temporal.py's layout: fc_norm and head, no norm, no decoder
    finetuned = SatMAETemporal(img_size=32, patch_size=8, embed_dim=448, depth=1, num_heads=4, decoder_depth=0, num_classes=62)
    state = {k: v for k, v in finetuned.state_dict().items() if not k.startswith("norm.")}
    torch.save({"model": state}, tmp_path / "finetune_fmow_temporal.pth")
    loaded = SatMAETemporal.from_pretrained(tmp_path / "finetune_fmow_temporal.pth", num_heads=4).eval()
    assert loaded.fc_norm is not None and loaded.head.out_features == 62
    torch.testing.assert_close(loaded({"images": images, "timestamps": timestamps}), finetuned.eval()({"images": images, "timestamps": timestamps}))


def test_satmae_pp_upsample_block_matches_official():
    official = pytest.importorskip("rshf.satmaepp.model")
    from polyfm.geo.models.satmae import UpsampleBlock

    ref = official.UpsampleBlock(40, 10).eval()
    ours = UpsampleBlock(40, 10).eval()
    assert set(ours.state_dict()) == set(ref.state_dict())
    for p in ref.parameters():
        p.data.normal_(0, 0.1)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 40, 8, 8)
    with torch.no_grad():
        for a, b in zip(ours(x), ref(x), strict=True):
            torch.testing.assert_close(a, b)


def test_dense_features_feed_the_segmentation_decoder():
    from polyfm.geo.models.segmentation import DenseSegmenter
    from polyfm.geo.models.softcon import SoftConResNet50

    satmae = SatMAE(**{**TINY, "decoder_depth": 0})
    assert satmae.forward_dense(torch.rand(2, 10, 32, 32)).shape == (2, 64, 4, 4)
    for encoder, channels in ((satmae, 10), (SoftConResNet50(in_chans=13), 13)):
        model = DenseSegmenter(encoder, num_classes=5, decoder_channels=16)
        assert model(torch.rand(2, channels, 32, 32)).shape == (2, 5, 32, 32)
        assert model.block_names()[-1] == "decoder" and model.block_names()[0].startswith("encoder.")


def test_cls_pooled_finetuned_checkpoint(tmp_path):
    ref = rshf_satmae.GroupChannelsVisionTransformer(
        global_pool=False, channel_embed=16, img_size=32, patch_size=8, in_chans=10, embed_dim=64, depth=1, num_heads=4,
        mlp_ratio=4, qkv_bias=True, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_classes=3).eval()
    for p in ref.parameters():
        p.data.normal_(0, 0.05)
    torch.save({"model": ref.state_dict()}, tmp_path / "ft-cls.pth")
    ours = SatMAE.from_pretrained(tmp_path / "ft-cls.pth", num_heads=4).eval()
    assert ours.fc_norm is None
    x = torch.rand(2, 10, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours.forward_features(x), ref.forward_features(x), atol=1e-5, rtol=1e-4)


def _official_finetune_load(model, checkpoint_model):
    """main_finetune.py's loading, step by step: keys of another shape are deleted *before*
    interpolate_pos_embed, so a pos_embed of another grid is dropped and the model keeps
    its own sin-cos table; then a non-strict load."""
    from rshf.scalemae.model import interpolate_pos_embed

    checkpoint_model = dict(checkpoint_model)
    state_dict = model.state_dict()
    for k in ["pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "head.weight", "head.bias"]:
        if k in checkpoint_model and checkpoint_model[k].shape != state_dict[k].shape:
            del checkpoint_model[k]

    class _Grouped:  # interpolate_pos_embed reads model.patch_embed.num_patches (model.patch_embed[0] for groups)
        patch_embed = type("P", (), {"num_patches": model.patch_embed[0].num_patches})()
        pos_embed = model.pos_embed

    interpolate_pos_embed(_Grouped(), checkpoint_model)
    model.load_state_dict(checkpoint_model, strict=False)
    return model


def _official_finetune_at(img_size, num_classes=5, global_pool=True):
    return rshf_satmae.GroupChannelsVisionTransformer(
        global_pool=global_pool, channel_embed=16, img_size=img_size, patch_size=8, in_chans=10, embed_dim=64, depth=2, num_heads=4,
        mlp_ratio=4, qkv_bias=True, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_classes=num_classes).eval()


@pytest.mark.parametrize("img_size", [48, 120])
def test_pretrain_checkpoint_at_another_size_matches_official_finetuning(tmp_path, img_size):
    """A 32 px pretraining file fine-tuned at another size: main_finetune.py's model carries the
    sin-cos code of the new grid; ours regenerates it (not a bicubic resize of the old code)."""
    torch.manual_seed(0)
    ref_mae = official_mae()
    for p in ref_mae.blocks.parameters():
        p.data.normal_(0, 0.05)
    torch.save({"model": ref_mae.state_dict()}, tmp_path / "pretrain.pth")
    ref = _official_finetune_load(_official_finetune_at(img_size), ref_mae.state_dict())
    ours = SatMAE.from_pretrained(tmp_path / "pretrain.pth", num_heads=4, img_size=img_size, decoder_depth=0).eval()
    torch.testing.assert_close(ours.pos_embed.data, ref.pos_embed.data, atol=1e-6, rtol=0)
    x = torch.rand(2, 10, img_size, img_size)
    with torch.no_grad():
        torch.testing.assert_close(ours.forward_features(x), ref.forward_features(x), atol=1e-5, rtol=1e-5)
        # the 32 px model fed a larger input computes the same code on the fly
        small = SatMAE.from_pretrained(tmp_path / "pretrain.pth", num_heads=4, decoder_depth=0).eval()
        torch.testing.assert_close(small.forward_features(x), ref.forward_features(x), atol=1e-5, rtol=1e-5)


def test_finetuned_checkpoint_at_another_size(tmp_path):
    """A fine-tuned file whose position table was learned: "sincos" reproduces main_finetune.py
    (the learned table is dropped for the new grid's code); "auto" keeps the learned table,
    resized as MAE's interpolate_pos_embed does."""
    from rshf.scalemae.model import interpolate_pos_embed

    torch.manual_seed(1)
    ref32 = _official_finetune_at(32)
    for p in ref32.parameters():
        p.data.normal_(0, 0.05)
    torch.save({"model": ref32.state_dict()}, tmp_path / "finetune.pth")
    ref = _official_finetune_load(_official_finetune_at(48), ref32.state_dict())
    x = torch.rand(2, 10, 48, 48)
    official = SatMAE.from_pretrained(tmp_path / "finetune.pth", num_heads=4, img_size=48, pos_interpolation="sincos").eval()
    with torch.no_grad():
        torch.testing.assert_close(official.forward_features(x), ref.forward_features(x), atol=1e-5, rtol=1e-5)
    kept = SatMAE.from_pretrained(tmp_path / "finetune.pth", num_heads=4, img_size=48).eval()

    class _Target:
        patch_embed = type("P", (), {"num_patches": 36})()
        pos_embed = torch.zeros(1, 37, 48)

    checkpoint = {"pos_embed": ref32.pos_embed.data.clone()}
    interpolate_pos_embed(_Target(), checkpoint)
    torch.testing.assert_close(kept.pos_embed.data, checkpoint["pos_embed"])
    with pytest.raises(ConfigError, match="pos_interpolation"):
        SatMAE(**TINY, pos_interpolation="nearest")
    with pytest.raises(CheckpointError, match=r"finetune.pth was trained with 8 px patches, this model has patch_size=16"):
        SatMAE.from_pretrained(tmp_path / "finetune.pth", num_heads=4, patch_size=16)
    with pytest.raises(ConfigError, match="divisible by num_heads 5"):
        SatMAE.from_pretrained(tmp_path / "finetune.pth", num_heads=5)


def test_plain_rgb_vit_checkpoint_is_refused_clearly(tmp_path):
    """SatMAE's fMoW-RGB fmow_pretrain.pth is a plain MAE ViT (models_mae.py layout)."""
    from timm.models.vision_transformer import VisionTransformer

    vit = VisionTransformer(img_size=32, patch_size=16, embed_dim=64, depth=1, num_heads=4, num_classes=0)
    state = {**vit.state_dict(), "mask_token": torch.zeros(1, 1, 32), "decoder_embed.weight": torch.zeros(32, 64)}
    torch.save({"model": state}, tmp_path / "fmow_pretrain.pth")
    for cls in (SatMAE, SatMAETemporal):
        with pytest.raises(CheckpointError, match=r"fmow_pretrain.pth is a plain ViT checkpoint .*timm"):
            cls.from_pretrained(tmp_path / "fmow_pretrain.pth")


def test_vit_large_shaped_release_layout_infers_heads_and_matches_official(tmp_path):
    """pretrain-vit-large-e199.pth's shapes (width 1024, 16 heads, channel code 256, decoder 512 /
    16 heads / code 128, 96 px, patch 8), one block each: nothing passed but the file."""
    import argparse

    cfg = dict(in_chans=10, patch_size=8, img_size=96, channel_groups=((0, 1, 2, 6), (3, 4, 5, 7), (8, 9)), embed_dim=1024,
               channel_embed=256, depth=1, num_heads=16, mlp_ratio=4, decoder_embed_dim=512, decoder_depth=1,
               decoder_num_heads=16, decoder_channel_embed=128, norm_pix_loss=False)
    torch.manual_seed(0)
    ref = rshf_satmae.MaskedAutoencoderGroupChannelViT(cfg).eval()
    torch.save({"model": ref.state_dict(), "epoch": 199, "args": argparse.Namespace(model="mae_vit_large_patch16")},
               tmp_path / "pretrain-vit-large-e199.pth")
    ours = SatMAE.from_pretrained(tmp_path / "pretrain-vit-large-e199.pth").eval()
    assert (ours.embed_dim, ours.img_size, ours.patch_size, ours.blocks[0].attn.num_heads) == (1024, 96, 8, 16)
    assert ours.decoder_blocks[0].attn.num_heads == 16
    x = torch.rand(1, 10, 96, 96)
    with torch.no_grad():
        torch.manual_seed(1)
        loss, pred, mask = ref(x, 0.75)
        torch.manual_seed(1)
        out = ours.forward_mae(x, 0.75)
    assert torch.equal(out["mask"], mask)
    torch.testing.assert_close(out["pred"], pred, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["loss"], loss, atol=1e-6, rtol=1e-5)
