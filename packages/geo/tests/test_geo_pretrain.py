"""Pretraining objectives through polyfm.core.pretrain.Pretraining, and the demo kit."""

from __future__ import annotations

import torch

from polyfm.core.data import DictDataModule, TensorDictDataset
from polyfm.core.pretrain import Pretraining
from polyfm.core.tasks import OptimConfig
from polyfm.geo.bands import Normalization
from polyfm.geo.models.satmae import SatMAE
from polyfm.geo.objectives import SatMAEObjective, SoftConObjective
from polyfm.geo.samples import demo_kit, synthetic_dataset
from polyfm.geo.weights import WEIGHTS

META = next(w for w in WEIGHTS if w.family == "satmae").meta
KEEP = [1, 2, 3, 4, 5, 6, 7, 8, 11, 12]  # B1, B9, B10 dropped, as SatMAE does


class Chips(DictDataModule):
    def __init__(self, n: int = 64, size: int = 16, with_fractions: bool = False) -> None:
        super().__init__(batch_size=16)
        data = synthetic_dataset(n, size=size, seed=11)
        norm = Normalization.from_meta({**META["normalization"], "quantize": False})
        self.x = norm(torch.from_numpy(data["images"][:, KEEP].astype("float32")))
        self.fractions = torch.from_numpy(data["fractions"]).float()
        self.with_fractions = with_fractions

    def build(self):
        class _WithLabels(TensorDictDataset):
            def __getitem__(inner, i):  # noqa: N805
                return {"input": self.x[i], "labels": self.fractions[i]}

        ds = _WithLabels(self.x, self.fractions) if self.with_fractions else TensorDictDataset(self.x, torch.zeros(len(self.x)))
        return ds, ds, None


def _fit_losses(module, dm, trainer_factory, epochs):
    dm.setup()
    batch = next(iter(dm.val_dataloader()))
    objective, model = module.objective, module.model
    torch.manual_seed(0)
    with torch.no_grad():
        before = objective(model, batch)["loss"].item()
    trainer_factory(epochs=epochs).fit(module, dm)
    torch.manual_seed(0)
    with torch.no_grad():
        after = objective(model, batch)["loss"].item()
    return before, after


def test_satmae_mae_loss_falls(trainer_factory):
    torch.manual_seed(0)
    model = SatMAE(img_size=16, patch_size=4, embed_dim=48, channel_embed=16, depth=2, num_heads=4,
                   decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=4, decoder_channel_embed=8)
    module = Pretraining(model, SatMAEObjective(), OptimConfig(lr=2e-3, weight_decay=0.0))
    before, after = _fit_losses(module, Chips(), trainer_factory, epochs=6)
    assert after < 0.6 * before, (before, after)


def test_satmae_pp_multiscale_loss_falls(trainer_factory):
    torch.manual_seed(0)
    model = SatMAE(img_size=8, patch_size=4, embed_dim=48, channel_embed=16, depth=1, num_heads=4,
                   decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=4, decoder_channel_embed=8, multiscale=True)
    module = Pretraining(model, SatMAEObjective(), OptimConfig(lr=2e-3, weight_decay=0.0))
    before, after = _fit_losses(module, Chips(n=32, size=32), trainer_factory, epochs=5)  # 32 px chips: x4 target, 8 px input
    assert after < 0.7 * before, (before, after)


def test_softcon_pretraining_through_the_engine(trainer_factory):
    from polyfm.geo.models.softcon import SoftConViT

    torch.manual_seed(0)
    model = SoftConViT(in_chans=10, img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2, bands=META["bands"])
    module = Pretraining(model, SoftConObjective(feature_dim=32, projection_dim=16, mask_ratio=0.25), OptimConfig(lr=2e-3, weight_decay=0.0))
    before, after = _fit_losses(module, Chips(with_fractions=True), trainer_factory, epochs=4)
    assert after < before, (before, after)
    assert any("projector" in n for n, _ in module.named_parameters())  # the projector trains with the model


def test_demo_kit_quick_pretrains_and_finetunes(trainer_factory):
    kit = demo_kit(None, quick=True)
    encoder = kit.make_encoder()
    trainer_factory(epochs=kit.pretrain_epochs).fit(kit.make_pretraining(encoder), kit.make_pretrain_data())
    from polyfm.core.adaptation import Adaptation

    task = kit.make_task(encoder, Adaptation())
    data = kit.make_finetune_data(1.0, 0)
    trainer = trainer_factory(epochs=kit.finetune_epochs)
    trainer.fit(task, data)
    result = trainer.test(task, data, verbose=False)[0]
    assert result[kit.metric] > 2.0 / 9, result  # chance is 1/9
