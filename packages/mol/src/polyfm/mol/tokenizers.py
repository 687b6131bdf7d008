"""SMILES tokenizers for ChemBERTa.

* The hub tokenizers as released (ChemBERTa v1's byte-level BPE, ``vocab.json`` +
  ``merges.txt``; ChemBERTa-2's files of the same names) load with transformers'
  ``RobertaTokenizerFast``: :func:`load_hub_tokenizer`.
* :class:`SmilesTokenizer`: atom-wise tokenisation with the usual SMILES regular
  expression (bracket atoms, two-letter halogens, ring-bond numbers ``%nn`` as single
  tokens) over a ``vocab.json`` (ChemBERTa-2's 591-token vocabulary, or the built-in one
  for models trained from scratch). ChemBERTa-2's released ``merges.txt`` is empty, so
  its hub tokenizer splits ``Cl`` into ``C`` + ``l`` and ``[C@@H]`` into characters (a
  known complaint on the hub); the atom-wise tokenizer keeps them whole when the
  vocabulary has them, and falls back to characters (counted) when it does not.

Both are called the same way: ``tok(list_of_smiles, max_length=...)`` returns
``{"input_ids", "attention_mask"}`` tensors, RoBERTa style (``<s> ... </s>``, ``<pad>``).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from polyfm.core.errors import DataError

log = logging.getLogger(__name__)

SMILES_PATTERN = re.compile(r"(\[[^\]]+\]|Br|Cl|Si|Se|se|As|%\d{2}|[BCNOPSFIbcnops]|\(|\)|\.|=|#|-|\+|\\|/|:|~|@|\?|>|\*|\$|\d)")
SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>")
MASK_TOKEN = "<mask>"

# Tokens of the built-in vocabulary (scratch models): organic-subset atoms, bonds, branches,
# ring closures and the bracket atoms frequent in MoleculeNet.
_BUILTIN_TOKENS = (
    "C", "c", "N", "n", "O", "o", "S", "s", "P", "p", "F", "Cl", "Br", "I", "B", "b", "Si", "Se", "se", "As",
    "(", ")", "[", "]", ".", "=", "#", "-", "+", "\\", "/", ":", "~", "@", "?", ">", "*", "$",
    *(str(i) for i in range(10)), *(f"%{i}" for i in range(10, 20)),
    "[C@H]", "[C@@H]", "[C@]", "[C@@]", "[nH]", "[NH]", "[NH2]", "[NH3+]", "[NH+]", "[NH2+]", "[N+]", "[N-]", "[n+]",
    "[O-]", "[OH]", "[O+]", "[S-]", "[S+]", "[SH]", "[s+]", "[P+]", "[PH]", "[Na+]", "[K+]", "[Li+]", "[Cl-]", "[Br-]",
    "[I-]", "[Ca+2]", "[Mg+2]", "[Zn+2]", "[Fe+2]", "[Fe+3]", "[Cu+2]", "[Al+3]", "[H]", "[2H]", "[13C]", "[Si]", "[Se]",
    "[se]", "[B-]", "[Sn]", "[Hg]", "[Pt]", "[Co]", "[Ni]", "[Cr]", "[Mn]", "[Au]", "[Ag]", "[Gd]", "[Ti]", "[Zr]",
    "[CH2]", "[CH]", "[C-]", "[c-]", "[cH-]", "[C+]", "[N@+]", "[N@@+]", "[S@]", "[S@@]", "[P@]", "[P@@]", "[As]",
    # single letters, so a character-level fallback (and the hub's byte-level BPE) covers any bracket atom
    *"ABCDEFGHIKLMNOPRSTUVWXYZabcdefghiklmnoprstuy",
)  # fmt: skip


def split_smiles(smiles: str) -> list[str]:
    """Atom-wise tokens; raises on characters the SMILES grammar does not have."""
    tokens = SMILES_PATTERN.findall(smiles)
    if "".join(tokens) != smiles:
        rebuilt = 0
        for token in tokens:
            position = smiles.find(token, rebuilt)
            if position != rebuilt:
                break
            rebuilt += len(token)
        raise DataError(
            f"SMILES {smiles!r} has a character no SMILES token covers at position {rebuilt} ({smiles[rebuilt : rebuilt + 5]!r})."
        )
    return tokens


class SmilesTokenizer:
    """Atom-wise SMILES tokenizer over a RoBERTa-style vocabulary (``<s>=0, <pad>=1, </s>=2, <unk>=3``
    in the released vocabularies; the ids are read from the file, not assumed)."""

    def __init__(self, vocab: dict[str, int], model_max_length: int = 512) -> None:
        missing = [t for t in (*SPECIAL_TOKENS, MASK_TOKEN) if t not in vocab]
        if missing:
            raise DataError(
                f"the vocabulary lacks the special tokens {missing}; a RoBERTa vocabulary needs <s>, <pad>, </s>, <unk>, <mask>."
            )
        self.vocab = dict(vocab)
        self.ids_to_tokens = {i: t for t, i in self.vocab.items()}
        self.model_max_length = model_max_length
        self.bos_token_id, self.pad_token_id = self.vocab["<s>"], self.vocab["<pad>"]
        self.eos_token_id, self.unk_token_id, self.mask_token_id = self.vocab["</s>"], self.vocab["<unk>"], self.vocab[MASK_TOKEN]
        self.all_special_ids = [self.vocab[t] for t in (*SPECIAL_TOKENS, MASK_TOKEN)]
        self.unknown_count = 0  # tokens mapped to <unk> so far (a vocabulary gap, reported in logs)
        self.truncated_count = 0

    @classmethod
    def from_vocab_file(cls, path: str | os.PathLike[str], model_max_length: int = 512) -> SmilesTokenizer:
        path = Path(path)
        if not path.exists():
            raise DataError("vocabulary file not found (ChemBERTa releases it as vocab.json).", path=path)
        try:
            vocab = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise DataError(f"not a JSON token->id mapping: {exc}", path=path) from exc
        if not isinstance(vocab, dict) or not all(isinstance(v, int) for v in vocab.values()):
            raise DataError("expected a JSON object mapping tokens to integer ids.", path=path)
        return cls(vocab, model_max_length)

    @classmethod
    def builtin(cls, model_max_length: int = 512) -> SmilesTokenizer:
        tokens = [*SPECIAL_TOKENS, *dict.fromkeys(_BUILTIN_TOKENS), MASK_TOKEN]
        return cls({t: i for i, t in enumerate(tokens)}, model_max_length)

    def save_vocabulary(self, path: str | os.PathLike[str]) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.vocab, indent=0), encoding="utf-8")
        return path

    def __len__(self) -> int:
        return max(self.vocab.values()) + 1

    def tokenize(self, smiles: str) -> list[str]:
        pieces: list[str] = []
        for token in split_smiles(smiles):
            if token in self.vocab:
                pieces.append(token)
            elif all(ch in self.vocab for ch in token):  # what the hub BPE would emit
                pieces.extend(token)
            else:
                pieces.append("<unk>")
                self.unknown_count += 1
        return pieces

    def encode(self, smiles: str, max_length: int | None = None) -> list[int]:
        max_length = max_length or self.model_max_length
        ids = [self.vocab.get(t, self.unk_token_id) for t in self.tokenize(smiles)]
        if len(ids) > max_length - 2:
            self.truncated_count += 1
            ids = ids[: max_length - 2]
        return [self.bos_token_id, *ids, self.eos_token_id]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        special = set(self.all_special_ids) if skip_special_tokens else set()
        return "".join(self.ids_to_tokens.get(int(i), "<unk>") for i in ids if int(i) not in special)

    def __call__(self, smiles: Sequence[str] | str, max_length: int | None = None, **_: Any) -> dict[str, torch.Tensor]:
        batch = [smiles] if isinstance(smiles, str) else list(smiles)
        encoded = [self.encode(s, max_length) for s in batch]
        return pad_encoded(encoded, self.pad_token_id)


def pad_encoded(encoded: Sequence[Sequence[int]], pad_id: int) -> dict[str, torch.Tensor]:
    length = max(len(e) for e in encoded)
    ids = torch.full((len(encoded), length), pad_id, dtype=torch.long)
    mask = torch.zeros(len(encoded), length, dtype=torch.long)
    for i, e in enumerate(encoded):
        ids[i, : len(e)] = torch.as_tensor(e, dtype=torch.long)
        mask[i, : len(e)] = 1
    return {"input_ids": ids, "attention_mask": mask}


class HubTokenizer:
    """transformers' RobertaTokenizerFast from a hub folder, called like :class:`SmilesTokenizer`."""

    def __init__(self, folder: str | os.PathLike[str], model_max_length: int = 512) -> None:
        from transformers import AutoTokenizer, RobertaTokenizerFast

        folder = Path(folder)
        if (folder / "tokenizer.json").exists() or (folder / "tokenizer_config.json").exists():
            self.tokenizer = AutoTokenizer.from_pretrained(str(folder))
        elif (folder / "vocab.json").exists() and (folder / "merges.txt").exists():
            self.tokenizer = RobertaTokenizerFast.from_pretrained(str(folder))
        else:
            raise DataError(
                "no tokenizer files (tokenizer.json, or vocab.json + merges.txt) in the ChemBERTa folder.", path=folder
            )
        self.model_max_length = min(
            model_max_length, getattr(self.tokenizer, "model_max_length", model_max_length) or model_max_length
        )
        self.pad_token_id = self.tokenizer.pad_token_id
        self.mask_token_id = self.tokenizer.mask_token_id
        self.all_special_ids = list(self.tokenizer.all_special_ids)
        self.truncated_count = 0

    def __len__(self) -> int:
        return len(self.tokenizer)

    def tokenize(self, smiles: str) -> list[str]:
        return self.tokenizer.tokenize(smiles)

    def __call__(self, smiles: Sequence[str] | str, max_length: int | None = None, **_: Any) -> dict[str, torch.Tensor]:
        batch = [smiles] if isinstance(smiles, str) else list(smiles)
        max_length = max_length or self.model_max_length
        full = self.tokenizer(batch, add_special_tokens=True)["input_ids"]
        self.truncated_count += sum(len(ids) > max_length for ids in full)
        encoded = [ids if len(ids) <= max_length else [*ids[: max_length - 1], ids[-1]] for ids in full]
        return pad_encoded(encoded, self.pad_token_id)


def load_hub_tokenizer(folder: str | os.PathLike[str], model_max_length: int = 512) -> HubTokenizer:
    return HubTokenizer(folder, model_max_length)


def load_tokenizer(
    source: str | os.PathLike[str] | None, kind: str = "hub", model_max_length: int = 512
) -> SmilesTokenizer | HubTokenizer:
    """``source``: a hub folder, a ``vocab.json``, or None for the built-in atom-wise vocabulary.
    ``kind``: ``"hub"`` (the released tokenizer as is) or ``"smiles"`` (atom-wise over its vocab.json)."""
    if source is None:
        return SmilesTokenizer.builtin(model_max_length)
    path = Path(source)
    if path.is_file():
        return SmilesTokenizer.from_vocab_file(path, model_max_length)
    if kind == "smiles":
        return SmilesTokenizer.from_vocab_file(path / "vocab.json", model_max_length)
    if kind != "hub":
        raise DataError(f"tokenizer kind must be 'hub' or 'smiles', got {kind!r}")
    return HubTokenizer(path, model_max_length)
