"""UPerNet decoder: the pyramid pooling module's layout, batch-of-one training, the FPN-only variant."""

import pytest
import torch

from polyfm.core.errors import ConfigError
from polyfm.geo.models.segmentation import DenseSegmenter, PyramidPooling
from polyfm.geo.models.softcon import SoftConViT


def tiny_vit() -> SoftConViT:
    return SoftConViT(in_chans=13, img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2)


def test_pyramid_pooling_sits_on_the_coarsest_level_and_sees_the_whole_image():
    torch.manual_seed(0)
    model = DenseSegmenter(tiny_vit(), num_classes=3, decoder_channels=8).eval()
    lateral = model.decoder["lateral"]
    assert isinstance(lateral[3], PyramidPooling) and not any(isinstance(m, PyramidPooling) for m in list(lateral)[:3])
    assert [branch[0].output_size for branch in lateral[3].branches] == [1, 2, 3, 6]
    keys = model.state_dict()
    assert "decoder.lateral.3.branches.0.1.weight" in keys and "decoder.lateral.3.bottleneck.0.weight" in keys
    # the global branch alone: one corner of the coarse map changes every pooled value, so every output pixel
    ppm = lateral[3]
    x = torch.rand(1, 32, 4, 4)
    y = x.clone()
    y[..., 0, 0] += 5.0
    with torch.no_grad():
        global_a, global_b = ppm.branches[0](x), ppm.branches[0](y)
    assert not torch.allclose(global_a, global_b)


def test_a_batch_of_one_trains():
    # BatchNorm on a 1x1 pooled map of one image has one value per channel and refuses to train
    torch.manual_seed(0)
    model = DenseSegmenter(tiny_vit(), num_classes=3, decoder_channels=8).train()
    optimiser = torch.optim.SGD(model.parameters(), lr=0.1)
    x, target = torch.rand(1, 13, 16, 16), torch.randint(0, 3, (1, 16, 16))
    losses = []
    for _ in range(5):
        loss = torch.nn.functional.cross_entropy(model(x), target)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses


def test_fpn_only_variant_has_no_pooling_and_loads_its_own_checkpoints():
    torch.manual_seed(0)
    fpn = DenseSegmenter(tiny_vit(), num_classes=3, decoder_channels=8, pool_scales=())
    assert not any("branches" in k or "bottleneck" in k for k in fpn.state_dict())
    again = DenseSegmenter(tiny_vit(), num_classes=3, decoder_channels=8, pool_scales=())
    again.load_state_dict(fpn.state_dict())  # strict: same layout
    with pytest.raises(RuntimeError, match="lateral.3"):
        DenseSegmenter(tiny_vit(), num_classes=3, decoder_channels=8).load_state_dict(fpn.state_dict())
    with pytest.raises(ConfigError, match="pool_scales"):
        DenseSegmenter(tiny_vit(), num_classes=3, pool_scales=(0, 2))
