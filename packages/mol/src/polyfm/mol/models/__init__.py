"""Model families of polyfm.mol (the ``polyfm.models`` entry point)."""

from polyfm.mol.models.chemberta import ChemBERTa
from polyfm.mol.models.unimol import UniMol

MODELS: dict[str, type] = {"chemberta": ChemBERTa, "unimol": UniMol}

__all__ = ["MODELS", "ChemBERTa", "UniMol"]
