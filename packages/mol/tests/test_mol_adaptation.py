"""Every adaptation mode of the engine works with both encoders."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch

from polyfm.core.adaptation import Adaptation
from polyfm.core.tasks import OptimConfig, Regression
from polyfm.mol.data import MoleculeDataModule
from polyfm.mol.models import ChemBERTa, UniMol
from polyfm.mol.samples import write_sample_csv
from polyfm.mol.tokenizers import SmilesTokenizer


@pytest.fixture(scope="module")
def sample_csv(tmp_path_factory):
    return str(write_sample_csv(tmp_path_factory.mktemp("mol") / "samples.csv", limit=48))


def encoder(kind):
    if kind == "chemberta":
        return ChemBERTa(
            vocab_size=len(SmilesTokenizer.builtin()),
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=70,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
    return UniMol(
        encoder_layers=2,
        embed_dim=32,
        ffn_embed_dim=64,
        attention_heads=4,
        num_kernels=16,
        dropout=0.0,
        emb_dropout=0.0,
        attention_dropout=0.0,
        pretraining_heads=False,
        final_head_layer_norm=False,
    )


@pytest.mark.parametrize("kind", ["chemberta", "unimol"])
@pytest.mark.parametrize("mode", ["linear", "freeze", "lora", "full"])
def test_adaptation_modes(kind, mode, sample_csv):
    L.seed_everything(0)
    dm = MoleculeDataModule(
        sample_csv, model=kind, split="random", batch_size=16, tokenizer=None, max_length=64, remove_hs=True, mmff=False
    )
    enc = encoder(kind)
    start = copy.deepcopy(enc.state_dict())
    adaptation = Adaptation(mode=mode, freeze_blocks=2, lora_rank=4, layer_decay=0.8 if mode == "full" else 1.0)
    task = Regression(enc, num_targets=1, adaptation=adaptation, optim=OptimConfig(lr=1e-2, warmup_steps=0))
    L.Trainer(
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        accelerator="cpu",
    ).fit(task, dm)
    blocks = enc.block_names()
    changed = {k for k, v in task.encoder.state_dict().items() if k in start and not torch.equal(v, start[k])}

    def in_blocks(name, names):
        return any(name == b or name.startswith(b + ".") for b in names)

    if mode == "linear":
        assert not changed
    elif mode == "freeze":
        assert changed and not any(in_blocks(k, blocks[:2]) for k in changed)
    elif mode == "lora":
        lora = [n for n, p in task.encoder.named_parameters() if "lora_" in n]
        assert lora and all(p.requires_grad == ("lora_" in n) for n, p in task.encoder.named_parameters())
        base = {k.replace(".base_layer", ""): v for k, v in task.encoder.state_dict().items() if "lora_" not in k}
        assert all(torch.equal(base[k], v) for k, v in start.items() if k in base)
    else:
        assert any(in_blocks(k, blocks[:1]) for k in changed)
