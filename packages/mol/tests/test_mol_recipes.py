"""The YAML recipes parse and run through `polyfm fit` (LightningCLI) on small generated data."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import polyfm.mol
from polyfm.mol.samples import sample_smiles
from polyfm.mol.tokenizers import SmilesTokenizer

RECIPES = Path(polyfm.mol.__file__).parent / "recipes"


def test_mol_every_recipe_parses_and_matches_the_builtin_tokenizer():
    names = sorted(p.name for p in RECIPES.glob("*.yaml"))
    assert {
        "finetune-chemberta-esol.yaml",
        "finetune-unimol-tox21.yaml",
        "pretrain-chemberta-mlm.yaml",
        "pretrain-chemberta-mtr.yaml",
        "pretrain-unimol.yaml",
        "finetune-chemberta2-esol.yaml",
    } <= set(names)
    tokenizer = SmilesTokenizer.builtin()
    for name in names:
        config = yaml.safe_load((RECIPES / name).read_text())
        assert config["data"]["class_path"].startswith("polyfm.mol.data.")
        model = config["model"]["init_args"].get("encoder") or config["model"]["init_args"]["model"]
        if model["class_path"].endswith("ChemBERTa") and not model["init_args"].get("pretrained"):
            assert model["init_args"]["vocab_size"] == len(tokenizer)
        objective = config["model"]["init_args"].get("objective", {})
        if objective.get("class_path", "").endswith("MaskedLanguageModelling"):
            assert objective["init_args"]["mask_id"] == tokenizer.mask_token_id
            assert sorted(objective["init_args"]["special_ids"]) == sorted(tokenizer.all_special_ids)


@pytest.mark.parametrize(
    ("recipe", "overrides"),
    [
        (
            "finetune-chemberta-esol.yaml",
            ["--model.init_args.encoder.init_args.hidden_size=32", "--model.init_args.encoder.init_args.num_hidden_layers=1"],
        ),
        (
            "pretrain-unimol.yaml",
            [
                "--model.init_args.model.init_args.encoder_layers=1",
                "--model.init_args.model.init_args.embed_dim=32",
                "--model.init_args.model.init_args.attention_heads=4",
                "--data.init_args.remove_hs=true",
            ],
        ),
    ],
)
def test_mol_recipe_fast_dev_run(tmp_path: Path, recipe: str, overrides: list[str]) -> None:
    (tmp_path / "mol").mkdir()
    molecules = sample_smiles()[::40]  # varied scaffolds
    (tmp_path / "mol" / "esol_500.csv").write_text(
        "smiles,logSolubility\n" + "".join(f"{s},{-len(s) / 10:.2f}\n" for s in molecules)
    )
    (tmp_path / "mol" / "qm9_500.csv").write_text("smiles,mu\n" + "".join(f"{s},1.0\n" for s in molecules))
    command = [
        sys.executable,
        "-m",
        "polyfm.core.cli",
        "fit",
        "--config",
        str(RECIPES / recipe),
        "--trainer.fast_dev_run=true",
        "--trainer.accelerator=cpu",
        "--trainer.enable_progress_bar=false",
        "--data.init_args.batch_size=8",
        *overrides,
    ]
    env = {**os.environ, "POLYFM_DATA_DIR": str(tmp_path), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
