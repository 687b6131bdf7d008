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


# ----------------------------------------------------------------------------- released ViT-L layouts, temporal variant


def _meta_official_mae_large():
    """The group-channel MAE of pretrain-vit-large-e199.pth (1024 wide, 24 blocks, 16 heads; decoder
    512 / 8 blocks / 16 heads; codes 256 / 128; 96 px, patch 8) as the official class lays it out,
    on the meta device: every key and shape, no memory (its numpy sin-cos init cannot run on meta
    and is skipped: only the layout is under test here)."""

    class _Layout(rshf_satmae.MaskedAutoencoderGroupChannelViT):
        def initialize_weights(self):
            pass

    cfg = dict(in_chans=10, patch_size=8, img_size=96, channel_groups=((0, 1, 2, 6), (3, 4, 5, 7), (8, 9)), embed_dim=1024,
               channel_embed=256, depth=24, num_heads=16, mlp_ratio=4, decoder_embed_dim=512, decoder_depth=8,
               decoder_num_heads=16, decoder_channel_embed=128, norm_pix_loss=False)
    with torch.device("meta"):
        return _Layout(cfg)


def test_satmae_large_full_release_layout_is_inferred_and_loads_strictly():
    """ViT-L/8 at full depth: width 1024 -> 16 heads, 24 blocks, decoder 512/8, all from the keys;
    every official key and shape loads strictly into the model built from them (the numbers of a
    1024-wide block are checked against the official class in the one-block test above)."""
    from polyfm.geo.models.satmae import infer_satmae_config

    state = _meta_official_mae_large().state_dict()
    cfg = infer_satmae_config(state, "pretrain-vit-large-e199.pth")
    assert {k: cfg[k] for k in ("embed_dim", "depth", "num_heads", "patch_size", "img_size", "channel_embed")} == {
        "embed_dim": 1024, "depth": 24, "num_heads": 16, "patch_size": 8, "img_size": 96, "channel_embed": 256}
    assert (cfg["decoder_embed_dim"], cfg["decoder_depth"], cfg["decoder_num_heads"], cfg["decoder_channel_embed"]) == (512, 8, 16, 128)
    with torch.device("meta"):
        ours = SatMAE(**cfg)
    ours.load_state(state, source="pretrain-vit-large-e199.pth")  # strict: a missing, extra or reshaped key raises
    assert len(ours.blocks) == 24 and ours.blocks[23].attn.num_heads == 16 and len(ours.decoder_blocks) == 8
    # the fine-tuned release (finetune-vit-large-e7.pth): the encoder keys, fc_norm and the 62-class head, no decoder
    encoder = {k: v for k, v in state.items() if not k.startswith(("decoder_", "mask_token"))}
    finetuned = {**encoder, "fc_norm.weight": torch.empty(1024, device="meta"), "fc_norm.bias": torch.empty(1024, device="meta"),
                 "head.weight": torch.empty(62, 1024, device="meta"), "head.bias": torch.empty(62, device="meta"),
                 "channel_cls_embed": torch.empty(1, 1, 256, device="meta")}
    cfg = infer_satmae_config(finetuned, "finetune-vit-large-e7.pth")
    assert (cfg["depth"], cfg["num_heads"], cfg["decoder_depth"], cfg["num_classes"], cfg["global_pool"]) == (24, 16, 0, 62, True)
    with torch.device("meta"):
        SatMAE(**cfg).load_state(finetuned, source="finetune-vit-large-e7.pth")


def _time_code(width: int, timestamps: torch.Tensor) -> torch.Tensor:
    """models_mae_temporal.py's code of each frame: get_1d_sincos_pos_embed_from_grid_torch(width, field)
    for year, month and hour (float64 frequencies, as np.float there), concatenated: (B*3, 3*width)."""
    omega = 1.0 / 10000 ** (torch.arange(width // 2, dtype=torch.float64) / (width / 2.0))
    fields = []
    for i in range(3):
        out = torch.einsum("m,d->md", timestamps.reshape(-1, 3)[:, i].float().double(), omega)
        fields.append(torch.cat([out.sin(), out.cos()], dim=1))
    return torch.cat(fields, dim=1).float()


class _OfficialTemporal(torch.nn.Module):
    """models_mae_temporal.py's modules under its key names, built from the timm parts it uses
    (PatchEmbed, Block, LayerNorm eps 1e-6) with the official sin-cos tables (rshf's copy of
    util/pos_embed.py); ``decoder=False`` + ``num_classes``: models_vit_temporal.py's layout
    (fc_norm and head, no norm: deleted there under global pooling)."""

    def __init__(self, img=32, patch=8, dim=448, depth=2, heads=4, dec=256, dec_depth=1, dec_heads=4, decoder=True, num_classes=0):
        super().__init__()
        from timm.models.vision_transformer import Block, PatchEmbed

        grid, norm = img // patch, partial(torch.nn.LayerNorm, eps=1e-6)
        table = lambda width: torch.from_numpy(rshf_satmae.get_2d_sincos_pos_embed(width, grid, cls_token=True)).float()[None]  # noqa: E731
        self.patch_embed = PatchEmbed(img, patch, 3, dim)
        self.cls_token = torch.nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = torch.nn.Parameter(table(dim - 384), requires_grad=False)
        self.blocks = torch.nn.ModuleList(Block(dim, heads, 4.0, qkv_bias=True, norm_layer=norm) for _ in range(depth))
        if decoder:
            self.norm = norm(dim)
            self.decoder_embed = torch.nn.Linear(dim, dec)
            self.mask_token = torch.nn.Parameter(torch.zeros(1, 1, dec))
            self.decoder_pos_embed = torch.nn.Parameter(table(dec - 192), requires_grad=False)
            self.decoder_blocks = torch.nn.ModuleList(Block(dec, dec_heads, 4.0, qkv_bias=True, norm_layer=norm) for _ in range(dec_depth))
            self.decoder_norm = norm(dec)
            self.decoder_pred = torch.nn.Linear(dec, patch * patch * 3)
        else:
            self.fc_norm = norm(dim)
            self.head = torch.nn.Linear(dim, num_classes)
        for name, p in self.named_parameters():
            if "pos_embed" not in name:
                p.data.normal_(0, 0.05)

    def tokens(self, imgs, timestamps):
        x = torch.cat([self.patch_embed(imgs[:, t]) for t in range(3)], dim=1)
        per = x.shape[1] // 3
        code = _time_code(128, timestamps).reshape(-1, 3, 1, 384).expand(-1, -1, per, -1).reshape(x.shape[0], -1, 384)
        return x, code, per

    def mae(self, imgs, timestamps, ratio, same_mask=False):
        """models_mae_temporal.py's forward: (loss, pred, mask); the caller seeds torch's RNG."""
        x, code, per = self.tokens(imgs, timestamps)
        n, length, d = x.shape
        x = x + torch.cat([self.pos_embed[:, 1:].repeat(n, 3, 1), code], dim=-1)
        keep = int(length * (1 - ratio))
        noise = torch.rand(n, length)
        if same_mask:  # per frame: the same shuffle; all frames' kept tokens first, then all discarded
            shuffle = torch.argsort(torch.rand(n, per), dim=1)
            frames = [shuffle + t * per for t in range(3)]
            cut = int(per * (1 - ratio))
            ids_shuffle = torch.cat([f[:, :cut] for f in frames] + [f[:, cut:] for f in frames], dim=1)
        else:
            ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        x = torch.gather(x, 1, ids_shuffle[:, :keep, None].repeat(1, 1, d))
        mask = torch.ones(n, length)
        mask[:, :keep] = 0
        mask = torch.gather(mask, 1, ids_restore)
        x = torch.cat([self.cls_token.expand(n, -1, -1), x], dim=1)
        for block in self.blocks:
            x = block(x)
        x = self.decoder_embed(self.norm(x))
        full = torch.cat([x[:, 1:], self.mask_token.repeat(n, length + 1 - x.shape[1], 1)], dim=1)
        full = torch.gather(full, 1, ids_restore[..., None].repeat(1, 1, x.shape[2]))
        x = torch.cat([x[:, :1], full], dim=1)
        dcode = _time_code(64, timestamps).reshape(-1, 3, 1, 192).expand(-1, -1, per, -1).reshape(n, -1, 192)
        dcode = torch.cat([torch.zeros(n, 1, 192), dcode], dim=1)
        dpos = torch.cat([self.decoder_pos_embed[:, :1], self.decoder_pos_embed[:, 1:].repeat(1, 3, 1)], dim=1).expand(n, -1, -1)
        x = x + torch.cat([dpos, dcode], dim=-1)
        for block in self.decoder_blocks:
            x = block(x)
        pred = self.decoder_pred(self.decoder_norm(x))[:, 1:]
        p = self.patch_embed.patch_size[0]
        h, w = imgs.shape[-2] // p, imgs.shape[-1] // p
        target = torch.cat([torch.einsum("nchpwq->nhwpqc", imgs[:, t].reshape(n, 3, h, p, w, p)).reshape(n, h * w, -1) for t in range(3)], dim=1)
        loss = (((pred - target) ** 2).mean(-1) * mask).sum() / mask.sum()
        return loss, pred, mask

    def features(self, imgs, timestamps):
        """models_vit_temporal.py's forward_features with global pooling, then the head."""
        x, code, _ = self.tokens(imgs, timestamps)
        n = x.shape[0]
        code = torch.cat([torch.zeros(n, 1, 384), code], dim=1)
        x = torch.cat([self.cls_token.expand(n, -1, -1), x], dim=1)
        pos = torch.cat([self.pos_embed[:, :1], self.pos_embed[:, 1:].repeat(1, 3, 1)], dim=1).expand(n, -1, -1)
        x = x + torch.cat([pos, code], dim=-1)
        for block in self.blocks:
            x = block(x)
        return self.head(self.fc_norm(x[:, 1:].mean(dim=1)))


TIMESTAMPS = torch.tensor([[[14, 0, 10], [15, 5, 12], [16, 11, 9]], [[0, 3, 23], [0, 3, 23], [7, 8, 0]]])  # (year - 2002, month - 1, hour)


@pytest.mark.parametrize("same_mask", [False, True])
def test_temporal_mae_matches_the_official_layout_and_encoding(tmp_path, same_mask):
    """A file in models_mae_temporal.py's layout ({'model', 'epoch', 'args'}) loads with nothing but
    the file (plus heads), and the MAE step equals the official computation: same mask under the
    same seed (same_mask too: the official code draws and drops an (N, L) noise first), pred and
    loss to 1e-5."""
    import argparse

    torch.manual_seed(0)
    ref = _OfficialTemporal().eval()
    torch.save({"model": ref.state_dict(), "epoch": 49, "args": argparse.Namespace(model="mae_vit_large_patch16")}, tmp_path / "temporal.pth")
    ours = SatMAETemporal.from_pretrained(tmp_path / "temporal.pth", num_heads=4, decoder_num_heads=4, same_mask=same_mask).eval()
    assert (ours.patch_size, ours.pos_embed.shape, ours.decoder_pos_embed.shape) == (8, (1, 17, 64), (1, 17, 64))
    images = torch.rand(2, 3, 3, 32, 32)
    with torch.no_grad():
        torch.manual_seed(3)
        loss, pred, mask = ref.mae(images, TIMESTAMPS, 0.75, same_mask=same_mask)
        torch.manual_seed(3)
        out = ours.forward_mae(images, TIMESTAMPS, 0.75)
    assert torch.equal(out["mask"], mask)
    if same_mask:  # the same locations hidden in all three frames
        assert torch.equal(mask[:, :16], mask[:, 16:32]) and torch.equal(mask[:, :16], mask[:, 32:])
    torch.testing.assert_close(out["pred"], pred, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["loss"], loss, atol=1e-6, rtol=1e-5)


def test_temporal_finetuned_file_matches_the_official_forward(tmp_path):
    """models_vit_temporal.py's fine-tuned layout (learned position table, fc_norm, head, no norm, no
    decoder): the CLS token gets the table's first row and zero time codes, tokens are mean-pooled."""
    torch.manual_seed(1)
    ref = _OfficialTemporal(decoder=False, num_classes=62).eval()
    ref.pos_embed.data += 0.05 * torch.randn_like(ref.pos_embed)  # fine-tuning learns the table, its CLS row too
    torch.save({"model": ref.state_dict()}, tmp_path / "finetune_temporal.pth")
    ours = SatMAETemporal.from_pretrained(tmp_path / "finetune_temporal.pth", num_heads=4).eval()
    assert ours.decoder_depth == 0 and ours.head is not None and ours.head.out_features == 62
    images = torch.rand(2, 3, 3, 32, 32)
    with torch.no_grad():
        expected = ref.features(images, TIMESTAMPS)
        torch.testing.assert_close(ours({"images": images, "timestamps": TIMESTAMPS}), expected, atol=1e-5, rtol=1e-5)
        # the dates matter well above that tolerance: other dates move the logits
        moved = (ours({"images": images, "timestamps": torch.zeros_like(TIMESTAMPS)}) - expected).abs().max()
    assert moved > 1e-2  # 0.11 measured


def test_temporal_large_release_layout_is_inferred_and_loads_strictly():
    """The temporal ViT-L/16 (1024 wide, 24 blocks, 16 heads, 224 px; decoder 512 / 8 blocks), pretraining
    and fine-tuned layouts, on the meta device: read from the keys, every key and shape loaded strictly."""
    from polyfm.geo.models.satmae import infer_temporal_config

    with torch.device("meta"):
        pretrain = _OfficialTemporal(img=224, patch=16, dim=1024, depth=24, heads=16, dec=512, dec_depth=8, dec_heads=16).state_dict()
        finetune = _OfficialTemporal(img=224, patch=16, dim=1024, depth=24, heads=16, decoder=False, num_classes=62).state_dict()
    for state, decoder, classes in ((pretrain, 8, 0), (finetune, 0, 62)):
        cfg = infer_temporal_config(state)
        assert {k: cfg[k] for k in ("embed_dim", "depth", "num_heads", "patch_size", "img_size", "decoder_depth")} == {
            "embed_dim": 1024, "depth": 24, "num_heads": 16, "patch_size": 16, "img_size": 224, "decoder_depth": decoder}
        assert cfg.get("num_classes", 0) == classes
        with torch.device("meta"):
            model = SatMAETemporal(**cfg)
        model.load_state(state)  # strict
        assert model.pos_embed.shape == (1, 197, 640) and len(model.blocks) == 24
