"""Every Python block of docs/mol.md runs as written, on real ESOL molecules (one epoch, a
40-molecule slice of the file, one conformer process, so it stays fast)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pandas as pd
import pytest

DOC = Path(__file__).resolve().parents[3] / "docs" / "mol.md"
DATA = os.environ.get("POLYFM_DATA_DIR")
pytestmark = [
    pytest.mark.skipif(not DOC.is_file(), reason="docs/mol.md is not beside this checkout"),
    pytest.mark.skipif(not DATA, reason="POLYFM_DATA_DIR is not set"),
]
# only what makes it quick; everything else runs as the page shows it
SPEED = {"max_epochs=30": "max_epochs=1, enable_progress_bar=False", "conformer_workers=2": "conformer_workers=1"}


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)


def test_mol_docs_every_python_block_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    esol = Path(DATA or "") / "mol" / "esol_500.csv"
    lines = esol.read_text().splitlines()
    (tmp_path / "esol.csv").write_text("\n".join(lines[:41]) + "\n")
    # new molecules as a user has them: a name column, a measured value here and there, a salt
    (tmp_path / "new_molecules.csv").write_text(
        "name,smiles,logSolubility\nethanol,CCO,1.1\naspirin,CC(=O)Oc1ccccc1C(=O)O,-1.72\ncaffeine,Cn1cnc2c1c(=O)n(C)c(=O)n2C,\n"
        "table salt,[Na+].[Cl-],\n"
    )
    blocks = python_blocks()
    assert blocks, "docs/mol.md has no python block"
    for block in blocks:
        for slow, quick in SPEED.items():
            block = block.replace(slow, quick)
        exec(compile(block, str(DOC), "exec"), {"__name__": "docs_mol"})
    table = pd.read_csv(tmp_path / "predictions.csv", keep_default_na=False)
    assert list(table.columns)[:4] == ["row", "smiles", "canonical_smiles", "name"]
    assert table["name"].tolist() == ["ethanol", "aspirin", "caffeine", "table salt"]
    assert table["pred_logSolubility"].notna().all()
    assert (tmp_path / "parity.png").read_bytes()[:4] == b"\x89PNG"
