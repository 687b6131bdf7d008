"""The released ChemBERTa tokenizer layouts, written here with small vocabularies, against
transformers' own tokenizers on the same files: ChemBERTa-2 (``DeepChem/ChemBERTa-77M-MLM``:
DeepChem's BERT-style SMILES vocabulary in vocab.json, empty merges.txt, [CLS]/[SEP]/[PAD] named
in tokenizer_config.json, <s> and </s> added after the vocabulary) and ChemBERTa v1
(``seyonec/ChemBERTa-zinc-base-v1``: byte-level BPE, vocab.json + merges.txt, a
tokenizer_config.json that names no class)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, RobertaTokenizerFast

from polyfm.core.errors import DataError
from polyfm.mol.data import ChemBERTaFeaturiser
from polyfm.mol.models.chemberta import ChemBERTa
from polyfm.mol.tokenizers import SmilesTokenizer, load_tokenizer, split_smiles

# stereo, charges, brackets, isotopes, %nn ring closures, salts, aromatic lowercase, cis/trans
SMILES = [
    "CCO",
    "ClC[C@@H](N)O",
    "C[C@H](N)C(=O)[O-]",
    "CC(=O)Oc1ccccc1C(=O)O",
    "[Na+].[Cl-]",
    "CC[NH3+].[Cl-]",
    "C%10CCCCC%10",
    "c1ccc2[nH]ccc2c1",
    "O=[N+]([O-])c1ccc(Br)cc1",
    "F/C=C/F",
    "F\\C=C/F",
    "[2H]C([2H])([2H])O",
    "[13CH4]",
    "CC#N",
    "c1ccsc1",
    "C[Si](C)(C)C",
    "[Xe]",
    "OCC3OC(OCC2OC(OC(C#N)c1ccccc1)C(O)C(O)C2O)C(O)C(O)C3O",
]

_BERT_SPECIALS = ["[PAD]", *(f"[unused{i}]" for i in range(1, 11)), "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
_ATOMS = ["c", "C", "(", ")", "O", "1", "2", "=", "N", ".", "n", "3", "F", "Cl", "-", "#", "Br", "[C@@H]", "[C@H]"]
_ATOMS += ["[O-]", "[N+]", "[nH]", "%10", "s", "S", "[Na+]", "[Cl-]", "/", "\\", "4", "5", "6", "I", "P", "o", "[NH3+]"]


def real_smiles() -> list[str]:
    folder = os.environ.get("POLYFM_DATA_DIR")
    if not folder:
        return []
    import pandas as pd

    out: list[str] = []
    for name in ("esol_500.csv", "tox21_500.csv", "qm9_500.csv"):
        path = Path(folder) / "mol" / name
        if path.exists():
            out += pd.read_csv(path)["smiles"].astype(str).tolist()[:200]
    return out


def write_chemberta2_folder(folder: Path) -> dict[str, int]:
    """vocab.json, empty merges.txt and tokenizer_config.json as DeepChem/ChemBERTa-77M-MLM releases them."""
    vocab = {t: i for i, t in enumerate([*_BERT_SPECIALS, *_ATOMS])}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, indent=2))
    (folder / "merges.txt").write_text("#version: 0.2\n")

    def entry(token: str, normalized: bool) -> dict[str, object]:
        return {
            "content": token,
            "lstrip": token == "[MASK]",
            "normalized": normalized,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }

    decoder = {str(vocab[t]): entry(t, False) for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")}
    decoder[str(len(vocab))] = entry("<s>", True)
    decoder[str(len(vocab) + 1)] = entry("</s>", True)
    config = {
        "add_prefix_space": False,
        "added_tokens_decoder": decoder,
        "bos_token": "<s>",
        "clean_up_tokenization_spaces": False,
        "cls_token": "[CLS]",
        "eos_token": "</s>",
        "errors": "replace",
        "mask_token": "[MASK]",
        "max_len": 512,
        "model_max_length": 512,
        "pad_token": "[PAD]",
        "sep_token": "[SEP]",
        "tokenizer_class": "RobertaTokenizer",
        "unk_token": "[UNK]",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return vocab


def write_chemberta1_folder(folder: Path) -> None:
    """A byte-level BPE trained here on SMILES, saved as vocab.json + merges.txt, and the
    class-less tokenizer_config.json of seyonec/ChemBERTa-zinc-base-v1 (no config.json)."""
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        SMILES * 20, vocab_size=300, min_frequency=2, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    )
    folder.mkdir(parents=True, exist_ok=True)
    bpe.save_model(str(folder))
    (folder / "tokenizer_config.json").write_text(json.dumps({"max_len": 512}))


def test_chemberta2_hub_tokenizer_equals_transformers_and_reports_dropped_characters(tmp_path, caplog):
    vocab = write_chemberta2_folder(tmp_path / "c2")
    reference = AutoTokenizer.from_pretrained(str(tmp_path / "c2"))
    ours = load_tokenizer(tmp_path / "c2")
    smiles = SMILES + real_smiles()
    lossy = 0
    for s in smiles:
        assert ours([s])["input_ids"][0].tolist() == reference(s)["input_ids"], s
        # empty merges: every character is its own token when vocab.json has it, else dropped
        expected = "".join(ch for ch in s if ch not in vocab)
        assert ours.lost_characters(s) == expected, s
        lossy += bool(expected)
    assert ours.lossy_count == lossy and lossy >= 8
    assert ours.lost_characters("ClC[C@@H](N)O") == "l[@@H]"
    # padding, framing and truncation as transformers does them
    batch = ours(SMILES[:4], max_length=8)
    expected = reference(SMILES[:4], truncation=True, max_length=8, padding=True, return_tensors="pt")
    assert torch.equal(batch["input_ids"], expected["input_ids"])
    assert torch.equal(batch["attention_mask"], expected["attention_mask"])
    assert ours.truncated_count == sum(len(reference(s)["input_ids"]) > 8 for s in SMILES[:4]) == 3
    featuriser = ChemBERTaFeaturiser(str(tmp_path / "c2"), "hub", max_length=16)
    with caplog.at_level(logging.WARNING):
        featuriser.prepare(SMILES, list(range(1, len(SMILES) + 1)))
    assert featuriser.lossy_rows == [i + 1 for i, s in enumerate(SMILES) if any(ch not in vocab for ch in s)]
    assert "lose characters" in caplog.text and "tokenizer_kind='smiles'" in caplog.text
    assert featuriser.truncated_rows == [i + 1 for i, s in enumerate(SMILES) if len(reference(s)["input_ids"]) > 16]
    assert len(SMILES) in featuriser.truncated_rows


def test_chemberta2_atomwise_tokenizer_reads_the_bert_style_specials(tmp_path, caplog):
    vocab = write_chemberta2_folder(tmp_path / "c2")
    reference = AutoTokenizer.from_pretrained(str(tmp_path / "c2"))
    ours = load_tokenizer(tmp_path / "c2", kind="smiles")
    assert (
        (ours.cls_token_id, ours.sep_token_id, ours.pad_token_id, ours.unk_token_id, ours.mask_token_id)
        == (
            reference.cls_token_id,
            reference.sep_token_id,
            reference.pad_token_id,
            reference.unk_token_id,
            reference.mask_token_id,
        )
        == (12, 13, 0, 11, 14)
    )
    assert len(ours) == len(reference)  # <s> and </s> added after the vocabulary
    assert set(reference.all_special_ids) <= set(ours.all_special_ids)
    compared = 0
    for s in SMILES + real_smiles():
        ids = ours([s], max_length=512)["input_ids"][0].tolist()
        tokens = split_smiles(s)
        # atom-wise tokens; those missing from the vocabulary become [UNK] (DeepChem's SmilesTokenizer)
        assert ids == [12, *(vocab.get(t, 11) for t in tokens), 13], s
        if all(len(t) == 1 and t in vocab for t in tokens):  # here both tokenizers must agree
            assert ids == reference(s)["input_ids"], s
            compared += 1
    assert compared >= 3
    long = "C" * 40
    assert ours([long], max_length=10)["input_ids"][0].tolist() == reference(long, truncation=True, max_length=10)["input_ids"]
    assert ours.truncated_count == 1
    seen = ours.inspect(["ClC[C@@H](N)O", "[Xe]C[Mg+2]"])
    assert seen == [(9, ""), (5, "[Xe][Mg+2]")]
    batch = ours(["CCO", "ClC[C@@H](N)O"])
    assert batch["input_ids"][0, -1].item() == 0 and batch["attention_mask"][0, -1].item() == 0  # [PAD] = 0
    featuriser = ChemBERTaFeaturiser(str(tmp_path / "c2" / "vocab.json"), "smiles", max_length=64)
    with caplog.at_level(logging.WARNING):
        featuriser.prepare(["CCO", "[Xe]C", "C[Si](C)(C)C"], [1, 2, 3])
    assert featuriser.lossy_rows == [2, 3] and "unknown token" in caplog.text and "'[Xe]'" in caplog.text


def test_chemberta2_layout_with_a_special_token_missing_names_the_file(tmp_path):
    write_chemberta2_folder(tmp_path / "c2")
    config = json.loads((tmp_path / "c2" / "tokenizer_config.json").read_text())
    config["mask_token"] = "[MSK]"
    (tmp_path / "c2" / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(DataError, match=r"tokenizer_config\.json.*\[MSK\]"):
        load_tokenizer(tmp_path / "c2", kind="smiles")
    with pytest.raises(DataError, match=r"\[CLS\], \[SEP\], \[PAD\]"):
        SmilesTokenizer({"C": 0, "O": 1})


def test_chemberta1_bpe_folder_without_config_json_equals_transformers(tmp_path):
    write_chemberta1_folder(tmp_path / "c1")
    reference = RobertaTokenizerFast.from_pretrained(str(tmp_path / "c1"))
    ours = load_tokenizer(tmp_path / "c1")
    assert ours.model_max_length == 512
    for s in SMILES + real_smiles():
        assert ours([s])["input_ids"][0].tolist() == reference(s)["input_ids"], s
        assert ours.lost_characters(s) == "", s  # byte-level BPE with its full alphabet drops nothing
    assert ours.lossy_count == 0
    long = "C" * 40 + "O" * 40
    assert ours([long], max_length=10)["input_ids"][0].tolist() == reference(long, truncation=True, max_length=10)["input_ids"]
    assert ours.truncated_count == 1


def test_inputs_longer_than_the_position_embeddings_are_refused_clearly():
    model = ChemBERTa(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
                      max_position_embeddings=12)  # fmt: skip
    assert model.max_tokens == 10
    model(torch.full((1, 10), 5))
    with pytest.raises(DataError, match=r"11 tokens.*10.*max_length=10"):
        model(torch.full((1, 11), 5))
