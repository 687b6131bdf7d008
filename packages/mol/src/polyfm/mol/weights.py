"""Released checkpoints of ChemBERTa / ChemBERTa-2 (Hugging Face hub layout) and Uni-Mol
(``{'model': state_dict}`` + ``mol.dict.txt``). The hub publishes no sha256 for these files,
so they are recorded as unverified (``None``). The key layouts are ours, so no converter
is needed (``converter=None``)."""

from __future__ import annotations

import os
from typing import Any

import torch

from polyfm.core.errors import CheckpointError
from polyfm.core.weights import WeightSpec, load_checkpoint_file, unwrap_state_dict

_HF = "https://huggingface.co/{repo}/resolve/main/{file}"


def _hub(repo: str, files: tuple[str, ...]) -> dict[str, tuple[str, str | None]]:
    return {name: (_HF.format(repo=repo, file=name), None) for name in files}


# config.json first: from_pretrained gets the folder (several files)
_CHEMBERTA2_FILES = (
    "config.json",
    "pytorch_model.bin",
    "vocab.json",
    "merges.txt",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
)
_CHEMBERTA1_FILES = (
    "config.json",
    "pytorch_model.bin",
    "vocab.json",
    "merges.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
)

WEIGHTS: list[WeightSpec] = [
    WeightSpec(
        name="chemberta-2-77m-mlm",
        family="chemberta",
        files=_hub("DeepChem/ChemBERTa-77M-MLM", _CHEMBERTA2_FILES),
        license="MIT",
        meta={
            "tokenizer": "hub files (vocab.json 591 tokens, empty merges.txt: character-level)",
            "pretraining": "MLM on PubChem-77M",
            "max_tokens": 512,
        },
        description="ChemBERTa-2 77M, masked language modelling (RoBERTa, hidden 384, 3 layers, 12 heads).",
    ),
    WeightSpec(
        name="chemberta-2-77m-mtr",
        family="chemberta",
        files=_hub("DeepChem/ChemBERTa-77M-MTR", _CHEMBERTA2_FILES),
        license="MIT",
        meta={
            "tokenizer": "hub files (vocab.json, empty merges.txt)",
            "pretraining": "multi-task regression on ~200 RDKit descriptors (norm_mean/norm_std in config.json)",
            "head": "regression.* (ChemBERTa drops it, lm_head fresh; MultiTaskRegression(pretrained=...) loads it)",
        },
        description="ChemBERTa-2 77M, multi-task regression pretraining.",
    ),
    WeightSpec(
        name="chemberta-zinc-base-v1",
        family="chemberta",
        files=_hub("seyonec/ChemBERTa-zinc-base-v1", _CHEMBERTA1_FILES),
        license="MIT",
        meta={"tokenizer": "byte-level BPE (vocab.json + merges.txt)", "pretraining": "MLM on ZINC 100k"},
        description="ChemBERTa v1 (RoBERTa, 6 layers, hidden 768) with its BPE tokenizer.",
    ),
    WeightSpec(
        name="unimol-mol-all-h",
        family="unimol",
        files=_hub("dptech/Uni-Mol-Models", ("mol_pre_all_h_220816.pt", "mol.dict.txt")),
        license="MIT",
        meta={
            "hydrogens": "all",
            "max_atoms": 256,
            "dictionary": "mol.dict.txt ([PAD]=0,[CLS]=1,[SEP]=2,[UNK]=3, [MASK] appended)",
            "conformers": "RDKit ETKDG + MMFF",
        },
        config={"encoder_layers": 15, "embed_dim": 512, "ffn_embed_dim": 2048, "attention_heads": 64},
        description="Uni-Mol molecular pretraining with all hydrogens (19M molecules).",
    ),
    WeightSpec(
        name="unimol-mol-no-h",
        family="unimol",
        files=_hub("dptech/Uni-Mol-Models", ("mol_pre_no_h_220816.pt", "mol.dict.txt")),
        license="MIT",
        meta={
            "hydrogens": "none (remove_hs=True)",
            "max_atoms": 256,
            "dictionary": "mol.dict.txt",
            "conformers": "RDKit ETKDG + MMFF",
        },
        config={"encoder_layers": 15, "embed_dim": 512, "ffn_embed_dim": 2048, "attention_heads": 64},
        description="Uni-Mol molecular pretraining without hydrogens.",
    ),
]


def check_architecture(source: str, family: str, checkpoint: dict[str, Any], model: dict[str, Any]) -> None:
    """Refuse to load ``source`` into a model whose shape-defining arguments differ, naming them
    (``pretrained=`` in a recipe: the arguments are the YAML's, not the checkpoint's)."""
    wrong = [k for k, v in checkpoint.items() if k in model and model[k] != v]
    if wrong:
        needed = ", ".join(f"{k}: {checkpoint[k]}" for k in wrong)
        built = ", ".join(f"{k}: {model[k]}" for k in wrong)
        raise CheckpointError(
            f"{source} is a {family} with {needed}; this one has {built}. Set those encoder arguments "
            "(init_args of the encoder in a recipe) to the checkpoint's values."
        )


def encoder_state_from_lightning(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The encoder's weights in a polyfm Lightning checkpoint: ``model.*`` of a ``Pretraining`` run
    (``pretrain-*.yaml``), ``encoder.*`` of a fine-tuning task; so a recipe can start from either."""
    state = unwrap_state_dict(load_checkpoint_file(path))
    for prefix in ("model.", "encoder."):
        inner = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if inner:
            return inner
    raise CheckpointError(
        f"{path} holds neither model.* (a Pretraining run) nor encoder.* (a fine-tuning task) weights; "
        f"its keys start with {sorted({k.split('.')[0] for k in state})[:8]}."
    )
