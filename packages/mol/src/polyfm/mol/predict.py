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
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info

from polyfm.core.errors import ConfigError
from polyfm.mol.data import Featuriser, MoleculeDataset, MoleculeTable, parse_label, read_molecule_csv


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
    table = read_molecule_csv(csv_path, smiles_column, target_columns=[], skip_invalid=skip_invalid, delimiter=delimiter)
    predictions = predict_smiles(task, table.smiles, featuriser, rows=table.rows)
    return prediction_frame(table, predictions, output_names(task, predictions.shape[1], target_names))


def output_names(task: torch.nn.Module, count: int, fallback: Sequence[str] | None = None) -> list[str]:
    """The task's target or class names, else ``fallback`` (e.g. the data's target columns)
    when it has one per output, else ``y0, y1, ...``."""
    for names in (getattr(task, "target_names", None), getattr(task, "class_names", None), fallback):
        if names and len(names) == count:
            return list(names)
    return [f"y{i}" for i in range(count)]


def prediction_frame(table: MoleculeTable, predictions: np.ndarray, names: Sequence[str]) -> Any:
    """``row, smiles, canonical_smiles``, the table's targets and other columns as read, then
    one ``pred_<name>`` column per output."""
    import pandas as pd

    if len(predictions) != len(table):
        raise ValueError(f"{len(predictions)} predictions for {len(table)} molecules of {table.path}.")
    frame = pd.DataFrame({"row": table.rows, "smiles": table.input_smiles, "canonical_smiles": table.smiles})
    for j, name in enumerate(table.target_names):
        frame[name] = [float(str(v)) for v in table.targets[:, j]]  # -5.84, not float32's -5.840000152587891
    for name, cells in table.other_columns.items():
        frame[name] = _numbers_or_text(cells)
    for j in range(predictions.shape[1]):
        frame[f"pred_{names[j]}"] = predictions[:, j]
    return frame


class PredictionWriter(BasePredictionWriter):
    """Writes what ``polyfm predict`` (``trainer.predict``) returns on a ``MoleculeDataModule``
    to a CSV: the molecules' rows, SMILES and other columns, then ``pred_<target>`` (Regression,
    original units) or probabilities (Classification). Default file:
    ``<default_root_dir>/predictions/<input file>.csv`` (``<input>_test.csv`` for the test split)."""

    def __init__(self, output: str | None = None) -> None:
        super().__init__(write_interval="epoch")
        self.output = output
        self.written: Path | None = None

    def write_on_epoch_end(self, trainer: Any, pl_module: Any, predictions: Sequence[Any], batch_indices: Sequence[Any]) -> None:
        if trainer.world_size > 1:  # each rank would hold its own shard of the rows
            raise ConfigError("PredictionWriter writes from one process: run predict with --trainer.devices=1.")
        data = trainer.datamodule
        table = getattr(data, "predict_table", None)
        if table is None:
            raise ConfigError("PredictionWriter needs a polyfm.mol.data.MoleculeDataModule (its predict_table names the rows).")
        outputs = [p.get("prediction", p.get("probabilities")) if isinstance(p, dict) else p for p in predictions]
        if outputs and isinstance(outputs[0], list):  # several predict dataloaders: Lightning nests them
            raise ConfigError("PredictionWriter expects one predict dataloader.")
        values = torch.cat([o.float().cpu() for o in outputs]).numpy()
        frame = prediction_frame(table, values, output_names(pl_module, values.shape[1], data.target_names))
        if self.output is not None:
            path = Path(self.output)
        else:
            source = Path(os.path.expandvars(str(data.predict_path or data.csv_path)))
            path = Path(trainer.default_root_dir) / "predictions" / f"{source.stem}{'' if data.predict_path else '_test'}.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(path.name + ".tmp")
        frame.to_csv(temporary, index=False)
        temporary.replace(path)  # a reader never sees half a file
        self.written = path
        rank_zero_info(f"wrote {len(frame)} predictions to {path}")


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
