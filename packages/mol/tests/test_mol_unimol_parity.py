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
