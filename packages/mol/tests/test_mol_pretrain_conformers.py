"""Uni-Mol pretraining on several conformers per molecule (``MoleculePretrainDataModule(num_conformers=K)``):
one conformer drawn per molecule and epoch, seeded and resumable, the fine-tuning data's conformers."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from polyfm.core.errors import ConfigError
from polyfm.core.pretrain import Pretraining
from polyfm.core.tasks import OptimConfig
from polyfm.mol.data import ConformerDrawSampler, ConformerSet, MoleculeDataModule, MoleculePretrainDataModule
from polyfm.mol.models import UniMol
from polyfm.mol.objectives import UniMolPretraining
from polyfm.mol.samples import sample_smiles

K = 3
SMILES = list(sample_smiles()[::20][:12])


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("pretrain-conformers") / "cache")


def data(cache: str, num_conformers: int = K, **kwargs) -> MoleculePretrainDataModule:
    options = {"model": "unimol", "remove_hs": True, "mmff": False, "conformer_cache": cache, "conformer_timeout": 2,
               "batch_size": 4, "val_fraction": 0.25, **kwargs}  # fmt: skip
    dm = MoleculePretrainDataModule(smiles=SMILES, num_conformers=num_conformers, **options)
    dm.setup()
    return dm


def coordinates(batch: dict, row: int) -> np.ndarray:
    tokens = batch["input"]["src_tokens"][row]
    return batch["input"]["src_coord"][row][tokens != 0].numpy()  # [PAD] is 0 in the official dictionary


def test_training_draws_one_conformer_per_molecule_and_epoch(cache) -> None:
    dm = data(cache)
    n = len(dm.train_set)
    assert all(isinstance(dm.train_set.featurise(i), ConformerSet) and len(dm.train_set.featurise(i)) == K for i in range(n))
    loader = dm.train_dataloader()
    assert isinstance(loader.sampler, ConformerDrawSampler)
    draws = [loader.sampler.draws(epoch) for epoch in range(4)]
    assert any(not np.array_equal(draws[0], d) for d in draws[1:])  # a new draw each epoch
    assert all(np.array_equal(d, ConformerDrawSampler(n, K, dm.seed).draws(e)) for e, d in enumerate(draws))  # seeded
    loader.sampler.set_epoch(2)
    order = [code // K for code in loader.sampler]
    batch = next(iter(loader))
    assert "conformer_molecule" not in batch and len(batch["input"]["src_tokens"]) == len(batch["meta"])  # one row per molecule
    for row, molecule in enumerate(order[: len(batch["meta"])]):
        expected = dm.train_set.featurise(molecule)[int(draws[2][molecule])]["src_coord"]
        np.testing.assert_array_equal(coordinates(batch, row), expected)
        assert batch["meta"][row] == dm.train_set.meta[molecule]


def test_the_conformers_are_the_fine_tuning_ones(cache, tmp_path: Path) -> None:
    dm = data(cache)
    path = tmp_path / "molecules.csv"
    path.write_text("smiles,y\n" + "".join(f"{s},1\n" for s in SMILES))
    finetune = MoleculeDataModule(str(path), model="unimol", split="random", split_fractions=(1.0, 0.0, 0.0), remove_hs=True,
                                  mmff=False, conformer_cache=cache, conformer_timeout=2, num_conformers=K)  # fmt: skip
    finetune.setup()
    by_smiles = {finetune.train_set.smiles[i]: finetune.train_set.featurise(i) for i in range(len(finetune.train_set))}
    single = data(cache, num_conformers=1)
    assert single.train_set.smiles == dm.train_set.smiles
    for i, smiles in enumerate(dm.train_set.smiles):
        ours = dm.train_set.featurise(i)
        for c in range(K):
            np.testing.assert_array_equal(ours[c]["src_coord"], by_smiles[smiles][c]["src_coord"])
        np.testing.assert_array_equal(ours[0]["src_coord"], single.train_set.featurise(i)["src_coord"])  # conformer 0: the K=1 one


def test_training_draws_resume_mid_epoch(cache) -> None:
    loader = data(cache).train_dataloader()
    loader.sampler.set_epoch(1)
    batches = iter(loader)
    next(batches)
    state = loader.state_dict()
    rest = list(batches)
    resumed = data(cache).train_dataloader()  # a new process: new objects, the same seed
    resumed.load_state_dict(state)
    resumed.sampler.set_epoch(1)
    again = list(resumed)
    assert len(again) == len(rest) >= 1
    for a, b in zip(again, rest, strict=True):
        assert a["meta"] == b["meta"] and torch.equal(a["input"]["src_coord"], b["input"]["src_coord"])


def test_validation_holds_one_fixed_conformer_per_molecule(cache) -> None:
    dm = data(cache)
    first = list(dm.val_dataloader())
    again = list(data(cache).val_dataloader())
    assert sum(len(b["meta"]) for b in first) == len(dm.val_set)
    for a, b in zip(first, again, strict=True):
        assert "conformer_molecule" not in a and a["meta"] == b["meta"] and torch.equal(a["input"]["src_coord"], b["input"]["src_coord"])
    # another seed draws other conformers
    other = torch.cat([b["input"]["src_coord"].flatten() for b in data(cache, seed=1).val_dataloader()])
    assert not torch.equal(other, torch.cat([b["input"]["src_coord"].flatten() for b in first]))


def test_one_conformer_is_the_path_unchanged_and_2d_is_the_last(cache) -> None:
    single = data(cache, num_conformers=1)
    assert not isinstance(single.train_dataloader().sampler, ConformerDrawSampler)
    assert not isinstance(single.train_set.featurise(0), ConformerSet)
    with_2d = data(cache, num_conformers=K, conformer_2d=True)
    last = with_2d.train_set.featurise(0)[K - 1]["src_coord"][1:-1]
    assert np.allclose(last[:, 2], 0.0) and not np.allclose(with_2d.train_set.featurise(0)[0]["src_coord"][1:-1][:, 2], 0.0)


def test_pretraining_runs_on_drawn_conformers(cache, tmp_path: Path) -> None:
    dm = data(cache)
    L.seed_everything(0)
    model = UniMol(encoder_layers=1, embed_dim=16, ffn_embed_dim=32, attention_heads=2, num_kernels=8)
    module = Pretraining(model, UniMolPretraining(), OptimConfig(lr=1e-3, warmup_steps=1))
    seen: list[int] = []

    class Epochs(L.Callback):
        def on_train_epoch_start(self, trainer, pl_module) -> None:
            seen.append(trainer.train_dataloader.sampler.epoch)

    trainer = L.Trainer(default_root_dir=tmp_path, max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", num_sanity_val_steps=0, callbacks=[Epochs()])  # fmt: skip
    trainer.fit(module, dm)
    assert seen == [0, 1]  # Lightning moves the sampler to each epoch's draws
    metrics = trainer.validate(module, dm, verbose=False)[0]
    assert all(np.isfinite(v) for v in metrics.values()) and metrics


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"model": "chemberta", "num_conformers": 2}, "for model='unimol'"),
        ({"model": "unimol", "conformer_2d": True}, "needs num_conformers >= 2"),
        ({"model": "unimol", "num_conformers": 0}, "num_conformers=0"),
    ],
)
def test_conformer_options_that_cannot_work_are_refused(options, message) -> None:
    with pytest.raises(ConfigError, match=message):
        MoleculePretrainDataModule(smiles=SMILES, **options)
