"""polyfm.mol: ChemBERTa and Uni-Mol for molecular property prediction.

Import light: the model classes load transformers/RDKit only when first used.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__all__ = [
    "ChemBERTa",
    "UniMol",
    "UniMolDictionary",
    "SmilesTokenizer",
    "MoleculeDataModule",
    "read_molecule_csv",
    "read_molecule_sdf",
    "read_molecules",
    "MoleculePredictionWriter",
    "MoleculeRegression",
    "MoleculeClassification",
    "scaffold_split",
    "generate_conformers",
]

_WHERE = {
    "ChemBERTa": "polyfm.mol.models.chemberta",
    "UniMol": "polyfm.mol.models.unimol",
    "UniMolDictionary": "polyfm.mol.models.unimol",
    "SmilesTokenizer": "polyfm.mol.tokenizers",
    "MoleculeDataModule": "polyfm.mol.data",
    "read_molecule_csv": "polyfm.mol.data",
    "read_molecule_sdf": "polyfm.mol.data",
    "read_molecules": "polyfm.mol.data",
    "MoleculePredictionWriter": "polyfm.mol.predict",
    "MoleculeRegression": "polyfm.mol.tasks",
    "MoleculeClassification": "polyfm.mol.tasks",
    "scaffold_split": "polyfm.mol.data",
    "generate_conformers": "polyfm.mol.conformers",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'polyfm.mol' has no attribute {name!r}")
