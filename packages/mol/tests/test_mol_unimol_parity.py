"""Uni-Mol against unimol_tools' UniMolModel with the same random weights (no download:
unimol_tools is given the checkpoint and dict.txt this test writes)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from polyfm.core.errors import CheckpointError
from polyfm.mol.conformers import ConformerSettings, collate_unimol, embed_smiles, unimol_features
from polyfm.mol.models.unimol import UniMol, UniMolDictionary

unimol_tools_unimol = pytest.importorskip(
    "unimol_tools.models.unimol", reason="unimol-tools (requirements-test-nodeps.txt) not installed"
)
from unimol_tools.data.conformer import coords2unimol, inner_smi2coords  # noqa: E402
from unimol_tools.data.dictionary import Dictionary as ToolsDictionary  # noqa: E402

SMILES = ["CCO", "c1ccccc1O", "CC(=O)Nc1ccc(O)cc1", "C1CCC2CCCCC2C1"]


@pytest.fixture(scope="module")
def official_dict(tmp_path_factory):
    path = tmp_path_factory.mktemp("dict") / "dict.txt"
    return UniMolDictionary.official().write(path)


@pytest.fixture(scope="module")
def pair(tmp_path_factory, official_dict):
    """Our full-size model (the unimol_tools molecule architecture) and unimol_tools' model
    loaded from the checkpoint ours wrote."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("ckpt")
    # unimol_tools numbers its specials differently ([CLS],[UNK],[PAD],[SEP] first); build ours
    # on its symbol order so the same token ids mean the same rows in both models
    tools_dict = ToolsDictionary.load(str(official_dict))
    tools_dict.add_symbol("[MASK]", is_special=True)
    ours = UniMol(dictionary=list(tools_dict.symbols), final_head_layer_norm=False).eval()
    with torch.no_grad():  # non-trivial kernels and pair affines
        ours.gbf.mul.weight.normal_(1.0, 0.2)
        ours.gbf.bias.weight.normal_(0.0, 0.2)
    ckpt = folder / "mol_pre_all_h_220816.pt"
    torch.save({"model": ours.official_state_dict()}, ckpt)
    (folder / "dict.txt").write_text(official_dict.read_text())
    theirs = unimol_tools_unimol.UniMolModel(
        output_dim=1, data_type="molecule", pretrained_model_path=str(ckpt), pretrained_dict_path=str(folder / "dict.txt")
    ).eval()
    return ours, theirs, tools_dict, ckpt


@pytest.mark.parametrize("remove_hs", [False, True])
def test_cls_representation_matches_unimol_tools(pair, remove_hs):
    ours, theirs, tools_dict, _ = pair
    settings = ConformerSettings(seed=42, remove_hs=remove_hs)
    feats = []
    for smi in SMILES:
        conf = embed_smiles(smi, settings)
        assert conf.is_3d
        mine = unimol_features(conf.atoms, conf.coordinates, ours.dictionary, remove_hs=False)
        ref = coords2unimol(conf.atoms, conf.coordinates, tools_dict, remove_hs=False)
        for key in mine:  # same featurisation
            np.testing.assert_allclose(mine[key], ref[key], atol=1e-5, err_msg=key)
        feats.append(mine)
    batch = collate_unimol(feats, ours.padding_idx)  # padded batch of different sizes
    with torch.no_grad():
        ref = theirs(**batch, return_repr=True)
        got = ours.forward_features(batch)
    assert got.shape == (len(SMILES), 512)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def test_conformers_match_unimol_tools_generator():
    for smi in SMILES:
        ours = embed_smiles(smi, ConformerSettings(seed=42, remove_hs=True))
        atoms, coords, _ = inner_smi2coords(smi, seed=42, remove_hs=True)
        assert list(atoms) == ours.atoms
        np.testing.assert_allclose(coords, ours.coordinates, atol=1e-4)


def test_official_dictionary_order(official_dict):
    d = UniMolDictionary.load(official_dict)
    assert (d.pad, d.bos, d.eos, d.unk, d.mask, len(d)) == (0, 1, 2, 3, 30, 31)


def test_from_pretrained_reads_official_layout(tmp_path, official_dict):
    torch.manual_seed(1)
    model = UniMol(encoder_layers=2, embed_dim=32, ffn_embed_dim=64, attention_heads=4).eval()
    torch.save({"model": model.official_state_dict(), "args": {"encoder_layers": 2}}, tmp_path / "mol_pre_no_h_220816.pt")
    (tmp_path / "dict.txt").write_text(official_dict.read_text())
    loaded = UniMol.from_pretrained(
        tmp_path / "mol_pre_no_h_220816.pt", encoder_layers=2, embed_dim=32, ffn_embed_dim=64, attention_heads=4
    ).eval()
    conf = embed_smiles("CCN", ConformerSettings(remove_hs=True))
    batch = collate_unimol([unimol_features(conf.atoms, conf.coordinates, loaded.dictionary)], loaded.padding_idx)
    with torch.no_grad():
        torch.testing.assert_close(loaded.forward_features(batch), model.forward_features(batch))
    with pytest.raises(CheckpointError, match="does not fit"):
        UniMol.from_pretrained(
            tmp_path / "mol_pre_no_h_220816.pt", encoder_layers=3, embed_dim=32, ffn_embed_dim=64, attention_heads=4
        )


# single atoms, ions and zwitterions, an element missing from the dictionary ([UNK]), a salt
UNUSUAL = ["C", "O", "[NH4+].[Cl-]", "C[N+](C)(C)CC(=O)[O-]", "[Xe]", "C[Se]C", "[Na+].[O-]c1ccccc1"]


@pytest.mark.parametrize("remove_hs", [False, True])
def test_unusual_molecules_match_unimol_tools(pair, remove_hs):
    ours, theirs, tools_dict, _ = pair
    feats = []
    for smi in UNUSUAL:
        atoms, coords, _ = inner_smi2coords(smi, seed=42, remove_hs=remove_hs)
        conf = embed_smiles(smi, ConformerSettings(seed=42, remove_hs=remove_hs))
        assert conf.atoms == list(atoms)
        np.testing.assert_allclose(conf.coordinates, coords, atol=1e-4, err_msg=smi)
        mine = unimol_features(conf.atoms, conf.coordinates, ours.dictionary)
        ref = coords2unimol(atoms, coords, tools_dict, remove_hs=False)
        for key in mine:
            np.testing.assert_allclose(mine[key], ref[key], atol=1e-5, err_msg=f"{smi} {key}")
        feats.append(mine)
    assert ours.dictionary.unk in feats[UNUSUAL.index("[Xe]")]["src_tokens"]
    batch = collate_unimol(feats, ours.padding_idx)
    with torch.no_grad():
        ref = theirs(**batch, return_repr=True)
        got = ours.forward_features(batch)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def test_unimol_tools_finetuned_checkpoint_loads_key_for_key(pair, tmp_path):
    """unimol_tools saves fine-tuned models as {'model_state_dict': ...} with a classification_head."""
    ours, theirs, tools_dict, _ = pair
    state = theirs.state_dict()
    trunk = {k for k in state if not k.startswith("classification_head.")}
    assert trunk == {k for k in ours.state_dict() if not k.startswith(("lm_head.", "pair2coord_proj.", "dist_head."))}
    torch.save({"model_state_dict": state}, tmp_path / "model_0.pth")
    loaded = UniMol.from_pretrained(tmp_path / "model_0.pth", dictionary=list(tools_dict.symbols)).eval()
    assert loaded.lm_head is None
    for key in trunk:
        assert torch.equal(loaded.state_dict()[key], state[key]), key
    conf = embed_smiles("CC(=O)Nc1ccc(O)cc1", ConformerSettings(remove_hs=True))
    batch = collate_unimol([unimol_features(conf.atoms, conf.coordinates, loaded.dictionary)], loaded.padding_idx)
    with torch.no_grad():
        torch.testing.assert_close(loaded.forward_features(batch), theirs(**batch, return_repr=True), atol=1e-4, rtol=1e-4)


def _official_keys(layers: int) -> set[str]:
    """Parameter names of the released molecule checkpoints (unimol/models/unimol.py with
    masked token/coord/dist losses and the delta-pair norm loss, i.e. every head)."""

    def pair(prefix: str) -> list[str]:
        return [f"{prefix}.weight", f"{prefix}.bias"]

    keys = ["embed_tokens.weight", "gbf.means.weight", "gbf.stds.weight", "gbf.mul.weight", "gbf.bias.weight"]
    keys += pair("gbf_proj.linear1") + pair("gbf_proj.linear2")
    keys += pair("encoder.emb_layer_norm") + pair("encoder.final_layer_norm") + pair("encoder.final_head_layer_norm")
    for i in range(layers):
        for name in ("self_attn.in_proj", "self_attn.out_proj", "self_attn_layer_norm", "fc1", "fc2", "final_layer_norm"):
            keys += pair(f"encoder.layers.{i}.{name}")
    keys += ["lm_head.weight", "lm_head.bias"] + pair("lm_head.dense") + pair("lm_head.layer_norm")
    keys += pair("pair2coord_proj.linear1") + pair("pair2coord_proj.linear2")
    keys += pair("dist_head.dense") + pair("dist_head.layer_norm") + pair("dist_head.out_proj")
    return set(keys)


def test_official_checkpoint_with_training_state_loads_key_for_key(tmp_path, official_dict):
    """A unicore checkpoint: args as an argparse.Namespace, optimizer history and extra state
    with numpy scalars, beside {'model': ...}; read with weights_only=True."""
    import argparse

    small = {"encoder_layers": 2, "embed_dim": 32, "ffn_embed_dim": 64, "attention_heads": 4}
    torch.manual_seed(3)
    model = UniMol(**small).eval()
    state = model.official_state_dict()
    assert set(state) == _official_keys(2)
    checkpoint = {
        "args": argparse.Namespace(arch="unimol_base", encoder_layers=2, delta_pair_repr_norm_loss=0.01, seed=1),
        "model": state,
        "optimizer_history": [{"criterion_name": "UniMolLoss", "optimizer_name": "FP16Optimizer", "num_updates": 10}],
        "extra_state": {"epoch": 3, "best": np.float64(1.25), "val_loss": np.float32(0.5)},
        "last_optimizer_state": {"state": {}, "param_groups": [{"lr": 1e-4}]},
    }
    torch.save(checkpoint, tmp_path / "mol_pre_all_h_220816.pt")
    (tmp_path / "mol.dict.txt").write_text(official_dict.read_text())
    loaded = UniMol.from_pretrained(tmp_path, **small).eval()  # the folder: the one .pt and mol.dict.txt
    assert loaded.lm_head is not None and loaded.encoder.final_head_layer_norm is not None
    for key, value in state.items():
        assert torch.equal(loaded.state_dict()[key], value), key
