"""Pretraining objectives through polyfm.core.pretrain.Pretraining: the loss falls."""

from __future__ import annotations

import lightning as L
import numpy as np
import torch

from polyfm.core.pretrain import Pretraining
from polyfm.core.tasks import OptimConfig
from polyfm.mol.data import MoleculePretrainDataModule, descriptor_names
from polyfm.mol.models import ChemBERTa, UniMol
from polyfm.mol.objectives import MaskedLanguageModelling, MultiTaskRegression, UniMolPretraining
from polyfm.mol.samples import sample_smiles
from polyfm.mol.tokenizers import SmilesTokenizer

SMILES = list(sample_smiles()[::12][:96])


def tiny_chemberta(tokenizer):
    return ChemBERTa(
        vocab_size=len(tokenizer),
        hidden_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=96,
        max_position_embeddings=70,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )


def tiny_unimol():
    return UniMol(
        encoder_layers=2,
        embed_dim=48,
        ffn_embed_dim=96,
        attention_heads=4,
        num_kernels=16,
        dropout=0.0,
        emb_dropout=0.0,
        attention_dropout=0.0,
    )


def fixed_loss(objective, model, batch, seed=123):
    torch.manual_seed(seed)  # same masks before and after training
    with torch.no_grad():
        loss = float(objective(model.eval(), batch)["loss"])
    model.train()
    return loss


def pretrain(model, objective, dm, steps):
    module = Pretraining(model, objective, OptimConfig(lr=3e-3, warmup_steps=3, weight_decay=0.0))
    L.Trainer(
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        accelerator="cpu",
    ).fit(module, dm)
    return module


def test_chemberta_mlm_loss_falls():
    L.seed_everything(0)
    tokenizer = SmilesTokenizer.builtin(64)
    dm = MoleculePretrainDataModule(smiles=SMILES, model="chemberta", max_length=64, batch_size=32, val_fraction=0.0)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    model = tiny_chemberta(tokenizer)
    objective = MaskedLanguageModelling.for_tokenizer(tokenizer)
    corrupted, labels = objective.mask(batch["input"]["input_ids"], batch["input"]["attention_mask"])
    chosen = labels != -100
    assert chosen.any(1).all() and not chosen[:, 0].any()  # every molecule has targets; <s> never masked
    before = fixed_loss(objective, model, batch)
    pretrain(model, objective, dm, 40)
    after = fixed_loss(objective, model, batch)
    assert after < 0.7 * before, (before, after)


def test_chemberta_mtr_on_rdkit_descriptors_loss_falls():
    L.seed_everything(0)
    tokenizer = SmilesTokenizer.builtin(64)
    dm = MoleculePretrainDataModule(
        smiles=SMILES, model="chemberta", targets="descriptors", max_length=64, batch_size=32, val_fraction=0.0
    )
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert batch["target"].shape == (32, len(descriptor_names())) and len(descriptor_names()) > 190
    finite = batch["target"][~torch.isnan(batch["target"])]
    assert finite.abs().max() <= 10.0 and abs(float(finite.mean())) < 0.5  # standardised with train statistics
    model = tiny_chemberta(tokenizer)
    objective = MultiTaskRegression(model.feature_dim, batch["target"].shape[1], dropout=0.0)
    before = fixed_loss(objective, model, batch)
    pretrain(model, objective, dm, 60)
    after = fixed_loss(objective, model, batch)
    assert after < 0.75 * before, (before, after)


def test_unimol_masking_and_noise_follow_the_paper():
    L.seed_everything(0)
    dm = MoleculePretrainDataModule(
        smiles=SMILES[:16], model="unimol", remove_hs=True, mmff=False, batch_size=16, val_fraction=0.0
    )
    dm.setup()
    batch = next(iter(dm.train_dataloader()))["input"]
    model = tiny_unimol()
    objective = UniMolPretraining(leave_unmasked_prob=0.0, random_token_prob=0.0)
    noisy, target = objective.corrupt(model, batch)
    d = model.dictionary
    atoms = ~torch.isin(batch["src_tokens"], torch.tensor([d.pad, d.bos, d.eos]))
    assert not (target & ~atoms).any() and target.any(1).all()
    assert (noisy["src_tokens"][target] == d.mask).all() and torch.equal(
        noisy["src_tokens"][~target], batch["src_tokens"][~target]
    )
    moved = (noisy["src_coord"] - batch["src_coord"]).abs()
    assert torch.equal(moved[~target], torch.zeros_like(moved[~target])) and moved[target].max() <= 1.0
    np.testing.assert_allclose(
        torch.cdist(noisy["src_coord"][0], noisy["src_coord"][0])[atoms[0]][:, atoms[0]],
        noisy["src_distance"][0][atoms[0]][:, atoms[0]],
        atol=1e-5,
    )


def test_unimol_pretraining_loss_falls():
    L.seed_everything(0)
    dm = MoleculePretrainDataModule(
        smiles=SMILES[:48], model="unimol", remove_hs=True, mmff=False, batch_size=16, val_fraction=0.0
    )
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    model = tiny_unimol()
    objective = UniMolPretraining()
    torch.manual_seed(0)
    parts = objective(model, batch)
    assert all(torch.isfinite(v) for v in parts.values())
    before = fixed_loss(objective, model, batch)
    pretrain(model, objective, dm, 40)
    after = fixed_loss(objective, model, batch)
    assert after < 0.7 * before, (before, after)


def test_unimol_pretraining_outputs_do_not_depend_on_the_padding_of_the_batch():
    """The denoised coordinates follow the official code since its padding fix (Uni-Mol #211):
    padded positions (at the origin) take no part, [CLS] and [SEP] count as atoms."""
    from polyfm.mol.conformers import ConformerSettings, collate_unimol, embed_smiles, unimol_features

    torch.manual_seed(0)
    model = tiny_unimol().eval()
    feats = []
    for smi in ("CCO", "CC(=O)Nc1ccc(O)cc1"):
        conf = embed_smiles(smi, ConformerSettings(remove_hs=True, mmff=False))
        feats.append(unimol_features(conf.atoms, conf.coordinates, model.dictionary))
    with torch.no_grad():
        alone = model(**collate_unimol(feats[:1], model.padding_idx), features_only=False)
        padded = model(**collate_unimol(feats, model.padding_idx), features_only=False)
    n = len(feats[0]["src_tokens"])
    for key in ("coord", "encoder_rep", "logits"):
        torch.testing.assert_close(padded[key][0, :n], alone[key][0], atol=1e-5, rtol=1e-5, msg=key)
    torch.testing.assert_close(padded["distance"][0, :n, :n], alone["distance"][0], atol=1e-5, rtol=1e-5)
    # the update by hand: sum_j (x_j - x_i) * w_ij / n over the n real tokens
    inputs = collate_unimol(feats[:1], model.padding_idx)
    with torch.no_grad():
        out = model.encoder(
            model.embed_tokens(inputs["src_tokens"]), model.pair_bias(inputs["src_distance"], inputs["src_edge_type"]), None
        )
        weights = model.pair2coord_proj(out["delta_pair"])[0, ..., 0]
    x = inputs["src_coord"][0]
    expected = x + ((x[None, :, :] - x[:, None, :]) * weights[..., None]).sum(1) / n
    torch.testing.assert_close(alone["coord"][0], expected, atol=1e-5, rtol=1e-5)
