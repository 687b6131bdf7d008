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
``{"input_ids", "attention_mask"}`` tensors, framed as transformers' RoBERTa tokenizer
frames them: ``cls_token ... sep_token`` (``<s> ... </s>`` in a RoBERTa vocabulary;
ChemBERTa-2's released files name the BERT-style ``[CLS]``/``[SEP]``/``[PAD]`` of
DeepChem's SMILES vocabulary instead, in ``tokenizer_config.json``).
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
# roles -> token, the two conventions found in released vocabularies: RoBERTa's, and the
# BERT-style one of DeepChem's SMILES vocabulary (ChemBERTa-2: [PAD]=0, [UNK]=11, [CLS]=12, ...)
ROBERTA_SPECIALS = {"cls_token": "<s>", "sep_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>", "mask_token": "<mask>"}
BERT_SPECIALS = {"cls_token": "[CLS]", "sep_token": "[SEP]", "pad_token": "[PAD]", "unk_token": "[UNK]", "mask_token": "[MASK]"}

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


def _read_json_object(path: Path, missing: str) -> dict[str, Any]:
    if not path.exists():
        raise DataError(missing, path=path)
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"not valid JSON: {exc}", path=path) from exc
    if not isinstance(value, dict):
        raise DataError("expected a JSON object.", path=path)
    return value


def _convention(vocab: dict[str, int]) -> dict[str, str]:
    """RoBERTa's special names when the vocabulary has them all, else the BERT-style ones."""
    return next((c for c in (ROBERTA_SPECIALS, BERT_SPECIALS) if all(t in vocab for t in c.values())), ROBERTA_SPECIALS)


def _special_tokens_beside(folder: Path, vocab: dict[str, int]) -> tuple[dict[str, str] | None, int | None]:
    """Special-token roles and ``model_max_length`` from the hub files next to a vocab.json;
    tokens added there (``added_tokens_decoder``, ``added_tokens.json``) join ``vocab`` in place."""
    config: dict[str, Any] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the latter wins, as in transformers
        if (folder / name).exists():
            config.update(_read_json_object(folder / name, ""))
    added = {str(v["content"]): int(k) for k, v in (config.get("added_tokens_decoder") or {}).items() if isinstance(v, dict)}
    if (folder / "added_tokens.json").exists():
        added.update({str(k): int(v) for k, v in _read_json_object(folder / "added_tokens.json", "").items()})
    for token, index in added.items():
        vocab.setdefault(token, index)
    named = {role: config[role] for role in ROBERTA_SPECIALS if config.get(role) is not None}
    named = {role: str(v["content"] if isinstance(v, dict) else v) for role, v in named.items()}
    specials = None
    if named:
        specials = {**_convention(vocab), **named}
        absent = {role: token for role, token in specials.items() if token not in vocab}
        if absent:
            raise DataError(
                f"names special tokens {absent} that are neither in vocab.json nor added tokens.",
                path=folder / "tokenizer_config.json",
            )
    limit = config.get("model_max_length") or config.get("max_len")
    return specials, int(limit) if isinstance(limit, int | float) and limit < 1e9 else None


class SmilesTokenizer:
    """Atom-wise SMILES tokenizer over a token -> id vocabulary.

    ``special_tokens`` maps the roles ``cls_token, sep_token, pad_token, unk_token, mask_token``
    to tokens of the vocabulary (what ``tokenizer_config.json`` names); without it the RoBERTa
    names (``<s>, </s>, <pad>, <unk>, <mask>``) are used, else the BERT-style ones
    (``[CLS], [SEP], [PAD], [UNK], [MASK]``). The ids are read from the vocabulary, not assumed.
    Inputs are framed ``cls ... sep``, as transformers' RoBERTa tokenizer frames them."""

    def __init__(self, vocab: dict[str, int], model_max_length: int = 512, special_tokens: dict[str, str] | None = None) -> None:
        roles = special_tokens or _convention(vocab)
        missing = {role: token for role, token in roles.items() if token not in vocab}
        if missing or set(roles) != set(ROBERTA_SPECIALS):
            raise DataError(
                f"the vocabulary lacks the special tokens {missing or sorted(set(ROBERTA_SPECIALS) - set(roles))}; "
                "it needs RoBERTa's <s>, </s>, <pad>, <unk>, <mask>, or [CLS], [SEP], [PAD], [UNK], [MASK], "
                "or a tokenizer_config.json naming cls_token, sep_token, pad_token, unk_token and mask_token."
            )
        self.vocab = dict(vocab)
        self.special_tokens = dict(roles)
        self.ids_to_tokens = {i: t for t, i in self.vocab.items()}
        self.model_max_length = model_max_length
        ids = {role: self.vocab[token] for role, token in roles.items()}
        self.cls_token_id, self.sep_token_id = ids["cls_token"], ids["sep_token"]
        self.pad_token_id, self.unk_token_id, self.mask_token_id = ids["pad_token"], ids["unk_token"], ids["mask_token"]
        # what starts and ends every input (RoBERTa's cls and sep; <s> and </s> in its vocabulary)
        self.bos_token_id, self.eos_token_id = self.cls_token_id, self.sep_token_id
        extra = [self.vocab[t] for t in (*SPECIAL_TOKENS, MASK_TOKEN, *BERT_SPECIALS.values()) if t in self.vocab]
        self.all_special_ids = sorted({*ids.values(), *extra})
        self.unknown_count = 0  # tokens mapped to the unknown token so far (a vocabulary gap, reported in logs)
        self.truncated_count = 0

    @classmethod
    def from_vocab_file(cls, path: str | os.PathLike[str], model_max_length: int = 512) -> SmilesTokenizer:
        """A ``vocab.json``; the ``tokenizer_config.json`` / ``special_tokens_map.json`` /
        ``added_tokens.json`` beside it, when present, give the special tokens and added ids."""
        path = Path(path)
        vocab = _read_json_object(path, "vocabulary file not found (ChemBERTa releases it as vocab.json).")
        if not all(isinstance(v, int) for v in vocab.values()):
            raise DataError("expected a JSON object mapping tokens to integer ids.", path=path)
        specials, limit = _special_tokens_beside(path.parent, vocab)
        return cls(vocab, min(model_max_length, limit or model_max_length), specials)

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

    def inspect(self, smiles: Sequence[str]) -> list[tuple[int, str]]:
        """Per SMILES: its length in tokens (with the framing tokens) and the atom-wise tokens
        that become the unknown token (joined; "" when the vocabulary covers it)."""
        unk = self.special_tokens["unk_token"]
        out = []
        for s in smiles:
            pieces = [(t, self.tokenize(t) if t not in self.vocab else [t]) for t in split_smiles(s)]
            unknown = "".join(t for t, got in pieces if got == [unk] and t != unk)
            out.append((sum(len(got) for _, got in pieces) + 2, unknown))
        return out

    def tokenize(self, smiles: str) -> list[str]:
        pieces: list[str] = []
        for token in split_smiles(smiles):
            if token in self.vocab:
                pieces.append(token)
            elif all(ch in self.vocab for ch in token):  # what the hub BPE would emit
                pieces.extend(token)
            else:
                pieces.append(self.special_tokens["unk_token"])
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
        unk = self.special_tokens["unk_token"]
        return "".join(self.ids_to_tokens.get(int(i), unk) for i in ids if int(i) not in special)

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
    """transformers' RobertaTokenizerFast from a hub folder, called like :class:`SmilesTokenizer`.

    The ids are transformers' own. What it does silently is reported: a byte-level BPE with
    an empty ``merges.txt`` (ChemBERTa-2's release) drops every character that is not a
    token of ``vocab.json`` (``Cl`` -> ``C``, ``[C@@H]`` -> ``C``); such inputs are counted
    (``lossy_count``) and :meth:`lost_characters` names what was dropped."""

    def __init__(self, folder: str | os.PathLike[str], model_max_length: int = 512) -> None:
        from transformers import AutoTokenizer, RobertaTokenizerFast

        folder = Path(folder)
        named_class = (folder / "tokenizer_config.json").exists() and "tokenizer_class" in _read_json_object(
            folder / "tokenizer_config.json", ""
        )
        if (folder / "tokenizer.json").exists() or named_class or (folder / "config.json").exists():
            self.tokenizer = AutoTokenizer.from_pretrained(str(folder))
        elif (folder / "vocab.json").exists() and (folder / "merges.txt").exists():
            # ChemBERTa v1's tokenizer_config.json names no class; without config.json AutoTokenizer cannot tell
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
        self.lossy_count = 0  # inputs of which the tokenizer dropped characters

    def __len__(self) -> int:
        return len(self.tokenizer)

    def tokenize(self, smiles: str) -> list[str]:
        return self.tokenizer.tokenize(smiles)

    def _lost(self, smiles: str, ids: Sequence[int]) -> str:
        """What of ``smiles`` the ids do not spell: the BPE only drops characters (or maps
        them to the unknown token), so the kept text is a subsequence of the input."""
        special = set(self.all_special_ids)
        tokens = self.tokenizer.convert_ids_to_tokens([i for i in ids if i not in special])  # a list for a list of ids
        kept = self.tokenizer.convert_tokens_to_string([tokens] if isinstance(tokens, str) else tokens)
        lost: list[str] = []
        position = 0
        for ch in smiles:
            if position < len(kept) and kept[position] == ch:
                position += 1
            elif not ch.isspace():
                lost.append(ch)
        return "".join(lost)

    def lost_characters(self, smiles: str) -> str:
        """The characters of ``smiles`` that the tokens do not carry ("" when nothing is lost)."""
        return self._lost(smiles, self.tokenizer(smiles, add_special_tokens=False)["input_ids"])

    def inspect(self, smiles: Sequence[str]) -> list[tuple[int, str]]:
        """Per SMILES, in one batched encoding: its length in tokens (with the framing tokens)
        and the characters the tokens do not carry."""
        encoded = self.tokenizer(list(smiles), add_special_tokens=True)["input_ids"]
        return [(len(ids), self._lost(s, ids)) for s, ids in zip(smiles, encoded, strict=True)]

    def __call__(self, smiles: Sequence[str] | str, max_length: int | None = None, **_: Any) -> dict[str, torch.Tensor]:
        batch = [smiles] if isinstance(smiles, str) else list(smiles)
        max_length = max_length or self.model_max_length
        full = self.tokenizer(batch, add_special_tokens=True)["input_ids"]
        self.lossy_count += sum(bool(self._lost(s, ids)) for s, ids in zip(batch, full, strict=True))
        self.truncated_count += sum(len(ids) > max_length for ids in full)
        # transformers' truncation=True: the first max_length - 1 ids, then the closing token
        encoded = [ids if len(ids) <= max_length else [*ids[: max_length - 1], ids[-1]] for ids in full]
        return pad_encoded(encoded, self.pad_token_id)


def load_hub_tokenizer(folder: str | os.PathLike[str], model_max_length: int = 512) -> HubTokenizer:
    return HubTokenizer(folder, model_max_length)


def load_tokenizer(
    source: str | os.PathLike[str] | None, kind: str = "hub", model_max_length: int = 512
) -> SmilesTokenizer | HubTokenizer:
    """``source``: a hub folder, a ``vocab.json``, a registered ChemBERTa weights name
    (``chemberta-2-77m-mlm``: its cached folder), or None for the built-in atom-wise vocabulary.
    ``kind``: ``"hub"`` (the released tokenizer as is) or ``"smiles"`` (atom-wise over its vocab.json)."""
    if source is None:
        return SmilesTokenizer.builtin(model_max_length)
    path = Path(source).expanduser()
    if not path.exists():
        from polyfm.core.weights import fetch_weights, get_weights, list_weights

        if str(source) not in {spec.name for spec in list_weights()}:
            raise DataError(
                "tokenizer not found: give a hub folder, a vocab.json, a registered ChemBERTa weights name "
                "(`polyfm weights list`), or none for the built-in vocabulary.",
                path=path,
            )
        path = fetch_weights(get_weights(str(source)))  # offline: the error names the file, its URL and the folder
    if path.is_file():
        return SmilesTokenizer.from_vocab_file(path, model_max_length)
    if kind == "smiles":
        return SmilesTokenizer.from_vocab_file(path / "vocab.json", model_max_length)
    if kind != "hub":
        raise DataError(f"tokenizer kind must be 'hub' or 'smiles', got {kind!r}")
    return HubTokenizer(path, model_max_length)
