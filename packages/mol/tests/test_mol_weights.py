"""The registry: names resolve to the cache folder, offline errors name the file and URL."""

from __future__ import annotations

import pytest
import torch

from polyfm.core.errors import CheckpointError
from polyfm.core.weights import get_weights, weights_dir
from polyfm.mol.models import ChemBERTa, UniMol
from polyfm.mol.models.unimol import UniMolDictionary
from polyfm.mol.weights import WEIGHTS


def test_registry_entries_point_at_the_hub():
    names = {spec.name for spec in WEIGHTS}
    assert {
        "chemberta-2-77m-mlm",
        "chemberta-2-77m-mtr",
        "chemberta-zinc-base-v1",
        "unimol-mol-all-h",
        "unimol-mol-no-h",
    } <= names
    unimol = get_weights("unimol-mol-all-h")
    assert (
        unimol.files["mol_pre_all_h_220816.pt"][0]
        == "https://huggingface.co/dptech/Uni-Mol-Models/resolve/main/mol_pre_all_h_220816.pt"
    )
    assert get_weights("chemberta-2-77m-mlm").primary_file == "config.json"


def test_offline_error_names_file_url_and_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("POLYFM_CACHE", str(tmp_path))
    monkeypatch.setenv("POLYFM_OFFLINE", "1")
    with pytest.raises(CheckpointError, match=r"mol_pre_no_h_220816\.pt.*huggingface\.co/dptech/Uni-Mol-Models"):
        UniMol.from_pretrained("unimol-mol-no-h")
    with pytest.raises(CheckpointError, match="DeepChem/ChemBERTa-77M-MLM"):
        ChemBERTa.from_pretrained("chemberta-2-77m-mlm")


def test_unimol_loads_by_name_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("POLYFM_CACHE", str(tmp_path))
    monkeypatch.setenv("POLYFM_OFFLINE", "1")
    spec = get_weights("unimol-mol-no-h")
    folder = weights_dir(spec)
    folder.mkdir(parents=True)
    small = {"encoder_layers": 1, "embed_dim": 16, "ffn_embed_dim": 32, "attention_heads": 4, "num_kernels": 8}
    torch.manual_seed(0)
    model = UniMol(**small)
    torch.save({"model": model.official_state_dict()}, folder / "mol_pre_no_h_220816.pt")
    UniMolDictionary.official().write(folder / "mol.dict.txt")
    loaded = UniMol.from_pretrained("unimol-mol-no-h", **small)
    assert loaded.lm_head is not None and loaded.encoder.final_head_layer_norm is not None
    assert torch.equal(loaded.gbf.mul.weight, model.gbf.mul.weight)
