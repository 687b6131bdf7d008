"""Self-supervised objectives: Volume Fusion and inpainting on the real CT, SwinUNETR's SSL recipe."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from polyfm.core.errors import ConfigError
from polyfm.medseg.models import SwinUNETR, UNet
from polyfm.medseg.objectives import MaskedVolumeInpainting, SwinSSL, VolumeFusion, aug_rand, rotate_batch


def real_ct() -> Path:
    if not os.environ.get("POLYFM_DATA_DIR"):
        pytest.skip("POLYFM_DATA_DIR is not set")
    return Path(os.environ["POLYFM_DATA_DIR"]) / "medseg" / "example_ct.nii.gz"


def test_medseg_volume_fusion_targets_match_the_mixture() -> None:
    torch.manual_seed(0)
    v1, v2 = torch.full((2, 1, 32, 32, 16), 1.0), torch.zeros(2, 1, 32, 32, 16)
    fused, k = VolumeFusion(num_classes=5, block_min=4, block_max=8).fuse(v1, v2)
    torch.testing.assert_close(fused, k.float() / 4)  # x = alpha v1 + (1 - alpha) v2 with alpha = k / K
    assert set(k.unique().tolist()) <= {0, 1, 2, 3, 4} and len(k.unique()) == 5
    assert 0.5 < float((k > 0).float().mean()) <= 0.75  # foreground ratio 0.7 of whole blocks


def test_medseg_objectives_refuse_the_wrong_head() -> None:
    model = UNet(spatial_dims=2, out_channels=3, channels=(4, 8), strides=(2,))
    with pytest.raises(ConfigError, match=r"out_channels=5.*reset_head\(5\)"):
        VolumeFusion()(model, {"input": torch.randn(2, 1, 16, 16)})


@pytest.mark.parametrize("objective_name", ["volume_fusion", "inpainting"])
def test_medseg_pretraining_lowers_loss_on_real_ct(objective_name: str, tmp_path) -> None:
    from polyfm.core.pretrain import Pretraining
    from polyfm.core.tasks import OptimConfig
    from polyfm.core.trainer import build_trainer
    from polyfm.medseg.data import VolumeFolderDataModule

    data = VolumeFolderDataModule(files=[str(real_ct())], roi_size=[32, 32, 16], num_samples=4, repeats=12, a_min=-175, a_max=250, batch_size=1)
    objective = VolumeFusion(block_min=4, block_max=12) if objective_name == "volume_fusion" else MaskedVolumeInpainting(block_size=4)
    torch.manual_seed(0)
    model = UNet(spatial_dims=3, out_channels=5 if objective_name == "volume_fusion" else 1, channels=(8, 16, 32), strides=(2, 2), num_res_units=1)
    data.setup()
    fixed = [data.train_dataloader().collate_fn([data.train_set[i]]) for i in range(2)]  # 8 crops, same fusion/masks before and after

    def held_loss() -> float:
        torch.manual_seed(123)
        model.eval()
        with torch.no_grad():
            return float(np.mean([float(objective(model, batch)["loss"]) for batch in fixed]))

    before = held_loss()
    trainer = build_trainer(max_steps=12, max_epochs=-1, default_root_dir=str(tmp_path), enable_progress_bar=False, enable_checkpointing=False, loggers=())
    trainer.fit(Pretraining(model, objective, OptimConfig(lr=3e-3, weight_decay=0.0)), datamodule=data)
    after = held_loss()
    assert after < 0.85 * before, (before, after)


def test_medseg_swin_ssl_recipe_learns_and_writes_the_official_layout(tmp_path) -> None:
    torch.manual_seed(0)
    x = torch.rand(4, 1, 64, 64)  # 2D keeps it fast; the recipe is the same in 3D
    x[:, :, 16:48, 20:40] += 1.0
    rotated, k = rotate_batch(x)
    assert torch.equal(rotated[0], x[0].rot90(int(k[0]), (1, 2)))
    dropped = aug_rand(x)
    assert 0.0 < float((dropped != x).float().mean()) < 0.75
    model = SwinUNETR(spatial_dims=2, feature_size=12, depths=(1, 1, 1, 1), out_channels=3)
    ssl = SwinSSL(dim=model.swin_dim, spatial_dims=2)
    optimizer = torch.optim.AdamW([*model.parameters(), *ssl.parameters()], lr=1e-3)
    losses = []
    for _ in range(12):
        out = ssl(model, {"input": x})
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        losses.append(float(out["loss"]))
    assert set(out) >= {"loss", "rotation", "contrastive", "reconstruction"}
    assert np.mean(losses[-3:]) < np.mean(losses[:3])
    # the pretrained Swin-ViT goes out in model_swinvit.pt's layout and comes back through from_pretrained
    torch.save({"state_dict": ssl.official_state_dict(model)}, tmp_path / "model_swinvit.pt")
    reloaded = SwinUNETR.from_pretrained(tmp_path / "model_swinvit.pt", spatial_dims=2, feature_size=12, depths=(1, 1, 1, 1), out_channels=3)
    for key, value in model.state_dict().items():
        if key.startswith("swinViT."):
            torch.testing.assert_close(reloaded.state_dict()[key], value)
