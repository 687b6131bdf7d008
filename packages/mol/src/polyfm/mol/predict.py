"""From a fine-tuned task to predictions for a CSV of SMILES, and a parity plot.

table = predict_csv(task, "new_molecules.csv", featuriser=datamodule.featuriser)
parity_plot(table["logSolubility"], table["pred_logSolubility"], "parity.png")
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from polyfm.mol.data import Featuriser, MoleculeDataset, parse_label, read_molecule_csv


@torch.no_grad()
def predict_smiles(
    task: torch.nn.Module, smiles: Sequence[str], featuriser: Featuriser, batch_size: int = 64, rows: Sequence[int] | None = None
) -> np.ndarray:
    """Predictions ``(n, T)`` of a Regression task (original units) or probabilities of a
    Classification task, for canonical SMILES featurised like the training data."""
    rows = list(rows) if rows is not None else list(range(1, len(smiles) + 1))
    featurise = featuriser.prepare(list(smiles), rows)
    dataset = MoleculeDataset(list(smiles), np.zeros((len(smiles), 0), np.float32), [f"row {r}" for r in rows], featurise)
    collate = featuriser.collate()
    device = next(task.parameters()).device
    task.eval()
    outputs = []
    for start in range(0, len(dataset), batch_size):
        batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        inputs = {k: v.to(device) for k, v in batch["input"].items()}
        out = task(inputs)
        if getattr(task, "multilabel", None) is True:
            out = torch.sigmoid(out)
        elif hasattr(task, "num_classes"):
            out = out.softmax(-1)
        outputs.append(out.float().cpu())
    return torch.cat(outputs).numpy()


def predict_csv(
    task: torch.nn.Module,
    csv_path: str | os.PathLike[str],
    featuriser: Featuriser,
    smiles_column: str = "smiles",
    target_names: Sequence[str] | None = None,
    skip_invalid: bool = False,
    delimiter: str | None = None,
) -> Any:
    """A DataFrame with the input columns and one ``pred_<target>`` column per output.
    Columns that hold numbers (empty cells: NaN) come back as floats, the others (names,
    identifiers) as text. Invalid SMILES stop with their rows unless ``skip_invalid``
    (then they get no row)."""
    import pandas as pd

    table = read_molecule_csv(csv_path, smiles_column, target_columns=[], skip_invalid=skip_invalid, delimiter=delimiter)
    predictions = predict_smiles(task, table.smiles, featuriser, rows=table.rows)
    names = list(
        target_names
        or getattr(task, "target_names", None)
        or getattr(task, "class_names", None)
        or [f"y{i}" for i in range(predictions.shape[1])]
    )
    frame = pd.DataFrame({"row": table.rows, "smiles": table.input_smiles, "canonical_smiles": table.smiles})
    for name, cells in table.other_columns.items():
        frame[name] = _numbers_or_text(cells)
    for j in range(predictions.shape[1]):
        frame[f"pred_{names[j] if j < len(names) else j}"] = predictions[:, j]
    return frame


def _numbers_or_text(cells: Sequence[str]) -> Any:
    try:
        return np.array([parse_label(c) for c in cells], dtype=np.float64)
    except ValueError:  # a column of names or identifiers
        return list(cells)


def parity_plot(
    true: Sequence[float], predicted: Sequence[float], path: str | os.PathLike[str], title: str = "", unit: str = ""
) -> Path:
    """Predicted against measured, with the identity line, RMSE and R^2 in the corner."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    y, p = np.asarray(true, float), np.asarray(predicted, float)
    keep = np.isfinite(y) & np.isfinite(p)
    y, p = y[keep], p[keep]
    rmse = float(np.sqrt(np.mean((y - p) ** 2)))
    r2 = float(1 - np.sum((y - p) ** 2) / max(np.sum((y - y.mean()) ** 2), 1e-12))
    low, high = float(min(y.min(), p.min())), float(max(y.max(), p.max()))
    margin = 0.05 * (high - low or 1.0)
    figure, axis = plt.subplots(figsize=(4.2, 4.2), dpi=120)
    axis.plot([low - margin, high + margin], [low - margin, high + margin], color="0.6", lw=1, ls="--")
    axis.scatter(y, p, s=14, alpha=0.75, edgecolors="none")
    axis.set_xlim(low - margin, high + margin)
    axis.set_ylim(low - margin, high + margin)
    axis.set_xlabel(f"measured {unit}".strip())
    axis.set_ylabel(f"predicted {unit}".strip())
    axis.set_title(title, fontsize=10)
    axis.text(0.04, 0.96, f"n={len(y)}  RMSE={rmse:.2f}  R²={r2:.2f}", transform=axis.transAxes, va="top", fontsize=9)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
    return path
