"""Released checkpoints of ChemBERTa / ChemBERTa-2 (Hugging Face hub layout) and Uni-Mol
(``{'model': state_dict}`` + ``mol.dict.txt``). The hub publishes no sha256 for these files,
so they are recorded as unverified (``None``). The key layouts are ours, so no converter
is needed (``converter=None``)."""

from __future__ import annotations

from polyfm.core.weights import WeightSpec

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
            "pretraining": "multi-task regression on ~200 RDKit descriptors",
            "head": "regression.* (dropped; lm_head fresh)",
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
