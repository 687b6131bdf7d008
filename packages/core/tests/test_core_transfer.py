"""Cross-domain trunks: blocks from a timm ViT (SatMAE/SoftCon layout) or RoBERTa
(ChemBERTa layout) compute exactly what they computed in their source model."""

from __future__ import annotations

import pytest
import torch

from polyfm.core import Adaptation, Classification
from polyfm.core.errors import CheckpointError
from polyfm.core.transfer import PatchTransformer, trunk_config


def test_vit_blocks_from_a_timm_vit_match_the_source():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    vit = timm.models.vision_transformer.VisionTransformer(img_size=32, patch_size=8, in_chans=13, embed_dim=64, depth=3, num_heads=4, num_classes=0)
    vit.eval()
    state = {f"model.{k}": v for k, v in vit.state_dict().items()}  # SatMAE-style wrapper prefix
    config = trunk_config(state, head_dim=16)
    assert config == {"embed_dim": 64, "depth": 3, "num_heads": 4, "mlp_ratio": 4.0, "post_norm": False, "layer_scale": False}
    trunk = PatchTransformer(input_kind="image", in_channels=1, patch_size=16, **config)  # a spectrogram adapter
    loaded = trunk.load_trunk(state, source="satmae.pth")
    assert len(loaded) == 3 * 12
    trunk.eval()
    tokens = torch.randn(2, 17, 64)
    with torch.no_grad():
        expected = vit.blocks(tokens)
        ours = tokens
        for block in trunk.blocks:
            ours = block(ours)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    # the new adapter runs end to end on a log-mel-sized input and trains through the engine
    task = Classification(trunk, 5, adaptation=Adaptation(mode="freeze", freeze_blocks=3))
    assert task(torch.randn(2, 1, 64, 96)).shape == (2, 5)


def test_roberta_layers_from_chemberta_match_the_source():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.RobertaConfig(vocab_size=50, hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96, layer_norm_eps=1e-12)
    roberta = transformers.RobertaForMaskedLM(config).eval()
    state = roberta.state_dict()
    built = trunk_config(state, head_dim=12)
    assert built["post_norm"] and built["depth"] == 2 and built["mlp_ratio"] == 2.0
    trunk = PatchTransformer(input_kind="series", in_channels=3, patch_size=8, norm_eps=1e-12, **built).eval()
    trunk.load_trunk(state, source="ChemBERTa-77M-MLM")
    hidden = torch.randn(2, 9, 48)
    with torch.no_grad():
        expected = hidden
        for layer in roberta.roberta.encoder.layer:
            out = layer(expected)
            expected = out[0] if isinstance(out, tuple) else out
        ours = hidden
        for block in trunk.blocks:
            ours = block(ours)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    assert trunk.forward_features(torch.randn(2, 64, 3)).shape == (2, 48)  # time-series patches in


def test_mismatched_trunk_names_the_key_and_shapes():
    source = PatchTransformer(embed_dim=32, depth=2, num_heads=4).state_dict()
    trunk = PatchTransformer(embed_dim=64, depth=2, num_heads=4)
    with pytest.raises(CheckpointError, match=r"blocks\.0\..* has shape \(.*32.*\) but the trunk expects"):
        trunk.load_trunk(source, source="geo.pth")
    with pytest.raises(CheckpointError, match="has 2 transformer blocks; this trunk needs 4"):
        PatchTransformer(embed_dim=32, depth=4, num_heads=4).load_trunk(source, source="geo.pth")
    with pytest.raises(CheckpointError, match="No transformer blocks recognised"):
        trunk.load_trunk({"conv1.weight": torch.zeros(1)}, source="rn50.pth")
