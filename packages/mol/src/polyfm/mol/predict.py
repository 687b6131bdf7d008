"""From a fine-tuned task to predictions for a CSV of SMILES or an SD file, the writer
``polyfm predict`` uses (:class:`MoleculePredictionWriter`), and a parity plot.

table = predict_csv(task, "new_molecules.csv", featuriser=datamodule.featuriser)
parity_plot(table["logSolubility"], table["pred_logSolubility"], "parity.png")
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from polyfm.core.errors import ConfigError
from polyfm.core.predict import PredictionFileWriter
from polyfm.mol.data import Featuriser, MoleculeDataset, MoleculeTable, input_stem, parse_label, read_molecules

log = logging.getLogger(__name__)


@torch.no_grad()
def predict_smiles(
    task: torch.nn.Module,
    smiles: Sequence[str],
    featuriser: Featuriser,
    batch_size: int = 64,
    rows: Sequence[int] | None = None,
    conformers: Sequence[Any] | None = None,
    names: Sequence[str] | None = None,
    path: str | os.PathLike[str] | None = None,
) -> NDArray[Any]:
    """Predictions ``(n, T)`` of a Regression task (original units) or probabilities of a
    Classification task, for canonical SMILES featurised like the training data
    (``conformers``: an SD file's coordinates, for Uni-Mol's ``conformers="from_file"``;
    ``names``/``path``: how errors name the molecules and their file)."""
    rows = list(rows) if rows is not None else list(range(1, len(smiles) + 1))
    featurise = featuriser.prepare(list(smiles), rows, conformers, names, path)
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
        if "conformer_molecule" in batch:  # num_conformers > 1: each molecule's mean output (probability), as the tasks do
            from polyfm.mol.tasks import molecule_mean

            out = molecule_mean(out.float(), batch["conformer_molecule"], len(batch["target"]))
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
    train_smiles: Sequence[str] | None = None,
) -> Any:
    """A DataFrame with the input columns and one ``pred_<target>`` column per output.
    Columns that hold numbers (empty cells: NaN) come back as floats, the others (names,
    identifiers) as text. Invalid SMILES stop with their rows unless ``skip_invalid``
    (then they get no row). An SD file (``.sdf``, ``.sdf.gz``) is read the same way, its
    properties as the columns and its rows named ``record, title``. ``train_smiles`` (e.g.
    ``datamodule.train_smiles()``) adds the ``train_similarity`` column (:func:`train_similarity`)."""
    table = read_molecules(csv_path, smiles_column, target_columns=[], skip_invalid=skip_invalid, delimiter=delimiter)
    predictions = predict_smiles(task, table.smiles, featuriser, rows=table.rows, conformers=table.conformers,
                                 names=table.record_names(), path=table.path)  # fmt: skip
    frame = prediction_frame(table, predictions, output_names(task, predictions.shape[1], target_names))
    if train_smiles is not None:
        add_train_similarity(frame, train_similarity(table.smiles, train_smiles))
    return frame


def add_train_similarity(frame: Any, values: NDArray[Any]) -> None:
    """The ``train_similarity`` column last; an input column of that name is kept as ``input_train_similarity``."""
    if "train_similarity" in frame.columns:
        log.warning("the input's column 'train_similarity' clashes with the predictions' own; it is written as 'input_train_similarity'")
        frame.rename(columns={"train_similarity": "input_train_similarity"}, inplace=True)
    frame["train_similarity"] = values


def morgan_fingerprints(smiles: Sequence[str]) -> list[Any]:
    """Morgan (ECFP4-like: radius 2, 2048 bits) bit vectors of canonical SMILES."""
    from rdkit import Chem, rdBase
    from rdkit.Chem import rdFingerprintGenerator

    rdBase.DisableLog("rdApp.*")
    generator = rdFingerprintGenerator.GetMorganGenerator(radius=2, fpSize=2048)
    fingerprints = []
    for i, s in enumerate(smiles):
        mol = Chem.MolFromSmiles(s)
        if mol is None:  # the readers only pass on SMILES RDKit parsed; this would be a bug, not bad input
            raise ValueError(f"molecule {i + 1} {s!r}: RDKit cannot parse it for its fingerprint")
        fingerprints.append(generator.GetFingerprint(mol))
    return fingerprints


def train_similarity(smiles: Sequence[str], train_smiles: Sequence[str]) -> NDArray[Any]:
    """Applicability domain: each molecule's highest Tanimoto similarity (Morgan radius 2,
    2048 bits) to any training molecule; 1.0 for a training molecule itself, low values flag
    predictions made far from what the model has seen."""
    from rdkit import DataStructs

    if not len(train_smiles):
        raise ConfigError("train_similarity needs training molecules, and the training split is empty.")
    reference = morgan_fingerprints(train_smiles)
    return np.array([max(DataStructs.BulkTanimotoSimilarity(fp, reference)) for fp in morgan_fingerprints(smiles)], dtype=np.float64)


def output_names(task: torch.nn.Module, count: int, fallback: Sequence[str] | None = None) -> list[str]:
    """The task's target or class names, else ``fallback`` (e.g. the data's target columns)
    when it has one per output, else ``y0, y1, ...``."""
    for names in (getattr(task, "target_names", None), getattr(task, "class_names", None), fallback):
        if names and len(names) == count:
            return list(names)
    return [f"y{i}" for i in range(count)]


def prediction_frame(table: MoleculeTable, predictions: NDArray[Any], names: Sequence[str], spreads: NDArray[Any] | None = None) -> Any:
    """``row, smiles, canonical_smiles`` (an SD file: ``record, title, smiles, ...``), the
    table's targets and other columns as read, then one ``pred_<name>`` column per output,
    each followed by ``pred_<name>_std`` when ``spreads`` (an ensemble's) is given."""
    import pandas as pd

    if len(predictions) != len(table):
        raise ValueError(f"{len(predictions)} predictions for {len(table)} molecules of {table.path}.")
    first = {"record": table.rows, "title": table.titles} if table.titles is not None else {"row": table.rows}
    frame = pd.DataFrame({**first, "smiles": table.input_smiles, "canonical_smiles": table.smiles})
    for j, name in enumerate(table.target_names):
        frame[_free_name(frame, name)] = [float(str(v)) for v in table.targets[:, j]]  # -5.84, not float32's -5.840000152587891
    for name, cells in table.other_columns.items():
        frame[_free_name(frame, name)] = _numbers_or_text(cells)
    for j in range(predictions.shape[1]):
        frame[f"pred_{names[j]}"] = predictions[:, j]
        if spreads is not None:
            frame[f"pred_{names[j]}_std"] = spreads[:, j]
    return frame


class MoleculePredictionWriter(PredictionFileWriter):
    """Writes what ``polyfm predict`` (``trainer.predict``) returns on a ``MoleculeDataModule``
    to one CSV: the molecules' rows (for an SD file: ``record`` and ``title``), SMILES and other
    columns, then ``pred_<target>`` (Regression, original units) or probabilities
    (Classification). With an ensemble (``--ckpt_path a.ckpt,b.ckpt``) each mean has its spread
    across the checkpoints beside it, ``pred_<target>_std``. ``output``: the CSV to write;
    default ``<default_root_dir>/predictions/<input file>.csv`` (``<input>_test.csv`` for the
    test split).

    ``train_similarity=True`` adds a ``train_similarity`` column (applicability domain): each
    molecule's highest Tanimoto similarity (Morgan radius 2, 2048 bits) to the data module's
    training molecules (:meth:`polyfm.mol.data.MoleculeDataModule.train_smiles`), computed when
    the predictions are written."""

    one_process = True  # one table of every molecule: a process would only see its share

    def __init__(self, output: str | None = None, train_similarity: bool = False) -> None:
        super().__init__(output=output, write_interval="batch")
        self.train_similarity = train_similarity
        self.means: list[torch.Tensor] = []
        self.spreads: list[torch.Tensor] = []

    def reset(self) -> None:
        self.means, self.spreads = [], []

    def write_on_batch_end(self, trainer: Any, pl_module: Any, prediction: Any, batch_indices: Sequence[int] | None,
                           batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:  # fmt: skip
        if dataloader_idx:
            raise ConfigError(f"{type(self).__name__} writes one predict dataloader's molecules; this run has several.")
        if isinstance(prediction, dict):
            key = "prediction" if "prediction" in prediction else "probabilities"
            if key not in prediction:
                raise ConfigError(f"{type(self).__name__}: the task's predict_step returned {sorted(prediction)}, with neither "
                                  "'prediction' (Regression) nor 'probabilities' (Classification)")  # fmt: skip
            self.means.append(prediction[key].detach().float().cpu())
            if f"{key}_std" in prediction:
                self.spreads.append(prediction[f"{key}_std"].detach().float().cpu())
        else:
            self.means.append(torch.as_tensor(prediction).detach().float().cpu())

    def finish(self, trainer: Any, pl_module: Any) -> None:
        data = trainer.datamodule
        table = getattr(data, "predict_table", None)
        if table is None:
            raise ConfigError(f"{type(self).__name__} needs a polyfm.mol.data.MoleculeDataModule (its predict_table names the rows).")
        if not self.means:
            return
        values = torch.cat(self.means).numpy()
        spreads = torch.cat(self.spreads).numpy() if len(self.spreads) == len(self.means) else None
        frame = prediction_frame(table, values, self.output_names(trainer, pl_module, values.shape[1]), spreads)
        if self.train_similarity:
            # from the data each time, not kept in the data module's state: ensemble members must agree on that state
            add_train_similarity(frame, train_similarity(table.smiles, data.train_smiles()))
        source = data.predict_path or data.csv_path
        path = self.output_file(trainer, f"{input_stem(source)}{'' if data.predict_path else '_test'}.csv")
        self.write_table(path, frame)

    def output_names(self, trainer: Any, module: Any, count: int) -> list[str]:
        """The task's (or the data's) target names; a single-label classifier's classes are
        ``0..C-1`` unless the task names them (the data has one column for all of them)."""
        if getattr(module, "multilabel", None) is False and not getattr(module, "class_names", None):
            return [str(i) for i in range(count)]
        return self.class_names(trainer, module, count, default=lambda i: f"y{i}")


def _free_name(frame: Any, name: str) -> str:
    """``name``, or ``input_<name>`` when the output already has that column (an SD file's
    ``smiles`` or ``title`` property, a CSV's ``row`` column): overwriting it would lose one."""
    if name not in frame.columns:
        return name
    log.warning("the input's column %r clashes with the predictions' own; it is written as %r", name, f"input_{name}")
    return f"input_{name}"


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
