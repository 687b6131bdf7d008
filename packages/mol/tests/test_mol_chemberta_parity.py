"""ChemBERTa against transformers' RobertaForMaskedLM, from a hub-layout folder the test writes."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import RobertaConfig, RobertaForMaskedLM, RobertaTokenizerFast

from polyfm.core.errors import CheckpointError, DataError
from polyfm.mol.models.chemberta import ChemBERTa
from polyfm.mol.tokenizers import SmilesTokenizer, load_hub_tokenizer, load_tokenizer, split_smiles

SMILES = ["CCO", "Clc1ccc(Br)cc1", "C[C@@H](N)C(=O)O", "CC(=O)Oc1ccccc1C(=O)O"]


def write_hub_folder(folder, safetensors: bool = True):
    """A tiny ChemBERTa-2-like folder: vocab.json, empty merges.txt, config.json, weights."""
    vocab = SmilesTokenizer.builtin().vocab
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2 - Trained by `huggingface/tokenizers`\n")
    tokenizer = RobertaTokenizerFast.from_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    torch.manual_seed(0)
    config = RobertaConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=40,
        max_position_embeddings=130,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        type_vocab_size=1,
    )
    reference = RobertaForMaskedLM(config).eval()
    reference.save_pretrained(str(folder), safe_serialization=safetensors)
    return reference


@pytest.mark.parametrize("safetensors", [True, False])
def test_logits_and_hidden_state_match_roberta_for_masked_lm(tmp_path, safetensors):
    reference = write_hub_folder(tmp_path / "hub", safetensors)
    reference = RobertaForMaskedLM.from_pretrained(str(tmp_path / "hub")).eval()
    ours = ChemBERTa.from_pretrained(tmp_path / "hub").eval()
    tokenizer = load_hub_tokenizer(tmp_path / "hub")
    batch = tokenizer(SMILES)
    assert batch["attention_mask"].sum(1).tolist() == [
        len(s) + 2 for s in SMILES
    ]  # character-level, as ChemBERTa-2's hub files give
    with torch.no_grad():
        expected = reference(**batch, output_hidden_states=True)
        got = ours(batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(got["logits"], expected.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got["last_hidden_state"], expected.hidden_states[-1], atol=1e-5, rtol=1e-5)
    assert ours.lm_head.decoder.weight is ours.roberta.embeddings.word_embeddings.weight
    features = ours.forward_features(batch)
    torch.testing.assert_close(features, expected.hidden_states[-1][:, 0])


def test_hub_tokenizer_with_empty_merges_splits_characters_but_smiles_tokenizer_keeps_atoms(tmp_path):
    write_hub_folder(tmp_path / "hub")
    hub = load_hub_tokenizer(tmp_path / "hub")
    atomwise = load_tokenizer(tmp_path / "hub", kind="smiles")
    assert hub.tokenize("ClC[C@@H]") == ["C", "l", "C", "[", "C", "@", "@", "H", "]"]
    assert atomwise.tokenize("ClC[C@@H]") == ["Cl", "C", "[C@@H]"]
    ids = atomwise(["ClC[C@@H]"])["input_ids"][0].tolist()
    assert ids[0] == atomwise.bos_token_id and ids[-1] == atomwise.eos_token_id
    assert atomwise.decode(ids) == "ClC[C@@H]"


def test_smiles_tokenizer_unknown_and_bad_characters():
    tok = SmilesTokenizer.builtin()
    assert tok.tokenize("[Xe]") == ["[", "X", "e", "]"]  # not in the vocabulary: characters
    assert tok.unknown_count == 0
    assert tok.tokenize("[Zj]") == ["<unk>"] and tok.unknown_count == 1
    with pytest.raises(DataError, match="position 2"):
        split_smiles("CC&O")
    assert split_smiles("C%12CC%12") == ["C", "%12", "C", "C", "%12"]


def test_missing_config_and_wrong_shapes_are_clear(tmp_path):
    write_hub_folder(tmp_path / "hub")
    (tmp_path / "hub" / "config.json").rename(tmp_path / "config.bak")
    with pytest.raises(CheckpointError, match="config.json"):
        ChemBERTa.from_pretrained(tmp_path / "hub")
    (tmp_path / "config.bak").rename(tmp_path / "hub" / "config.json")
    with pytest.raises(CheckpointError, match="shape mismatch"):
        ChemBERTa.from_pretrained(tmp_path / "hub", hidden_size=64, num_attention_heads=4)


def _save_variant(folder, variant: str):
    """Hub folders of the checkpoint variants in the wild, weights written by hand so the file
    format is the one named: a bare RobertaModel (no ``roberta.`` prefix, with its pooler) in
    pytorch_model.bin, RobertaForSequenceClassification (``classifier.*``) in model.safetensors,
    and ChemBERTa-2 MTR (``regression.*`` head and ``norm_mean``/``norm_std`` buffers) in pytorch_model.bin."""
    from safetensors.torch import save_file
    from transformers import RobertaForSequenceClassification, RobertaModel

    config = RobertaConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=40,
                           max_position_embeddings=40, type_vocab_size=1, num_labels=3)  # fmt: skip
    torch.manual_seed(0)
    if variant == "bare":
        reference = RobertaModel(config).eval()
        state = reference.state_dict()
    elif variant == "classification":
        reference = RobertaForSequenceClassification(config).eval()
        state = reference.state_dict()
    else:  # MTR: the trunk of a RobertaForMaskedLM, plus DeepChem's regression head
        reference = RobertaForMaskedLM(config).eval()
        state = {k: v for k, v in reference.state_dict().items() if k.startswith("roberta.")}
        state |= {"regression.dense.weight": torch.randn(32, 32), "regression.dense.bias": torch.zeros(32)}
        state |= {"regression.out_proj.weight": torch.randn(5, 32), "regression.out_proj.bias": torch.zeros(5)}
        state |= {"norm_mean": torch.zeros(5), "norm_std": torch.ones(5)}
    folder.mkdir(parents=True)
    config.save_pretrained(str(folder))
    state = {k: v.contiguous() for k, v in state.items()}
    if variant == "classification":
        save_file(state, str(folder / "model.safetensors"))
    else:
        torch.save(state, folder / "pytorch_model.bin")
    return reference


@pytest.mark.parametrize("variant", ["bare", "classification", "mtr"])
def test_checkpoint_variants_load_and_match_transformers(tmp_path, variant):
    reference = _save_variant(tmp_path / variant, variant)
    with pytest.warns(UserWarning, match="lm_head is freshly initialised"):
        ours = ChemBERTa.from_pretrained(tmp_path / variant).eval()
    ids = torch.tensor([[0, 5, 6, 7, 8, 2, 1, 1], [0, 9, 10, 11, 12, 13, 14, 2]])
    mask = (ids != 1).long()
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
        got = ours(ids, mask)["last_hidden_state"]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.forward_features({"input_ids": ids, "attention_mask": mask}), expected[:, 0])
    assert ours.lm_head.decoder.weight is ours.roberta.embeddings.word_embeddings.weight
