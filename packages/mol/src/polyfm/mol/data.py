"""Molecule tables (the MoleculeNet CSV layout, or SD files), splits, datasets and DataModules.

A CSV has a SMILES column and one or more target columns; an empty cell is a missing
label (NaN, masked out of losses and metrics by the tasks). Every SMILES is parsed and
canonicalised with RDKit; invalid ones (empty, unparsable) stop the run with their row
numbers unless ``skip_invalid=True``, in which case they are skipped, counted and logged.
Salts and mixtures are kept whole by default (counted), or reduced to their largest
fragment (``fragments="largest"``), or refused (``fragments="error"``).

Rows are numbered as data rows, from 1 (the header is not a row); the error messages also
give the line of the file. SD files (``.sdf``, ``.sdf.gz``) are read with RDKit: each record's
properties are the columns, its SMILES comes from the record's structure, records are numbered
from 1 and named by their title line, and the record's own coordinates are kept (Uni-Mol's
``conformers="from_file"``).
"""

from __future__ import annotations

import logging
import math
import os
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from numpy.typing import NDArray
from torch.utils.data import Dataset

from polyfm.core.data import DictDataModule, EpochSeededSampler, ResumableDataLoader, check_fold, fold_indices
from polyfm.core.errors import ConfigError, DataError
from polyfm.mol.descriptors import ReleasedNormalisation, released_normalisation

log = logging.getLogger(__name__)

SplitKind = Literal["scaffold", "scaffold_balanced", "random", "stratified"]
FragmentPolicy = Literal["keep", "largest", "error"]
DuplicatePolicy = Literal["keep", "first", "error"]
ConformerSource = Literal["etkdg", "from_file"]


# ----------------------------------------------------------------------------- reading


@dataclass
class MoleculeTable:
    """Parsed molecules of one CSV. ``rows`` are 1-based data-row numbers in the file."""

    smiles: list[str]
    input_smiles: list[str]
    rows: list[int]
    targets: NDArray[Any]  # (n, T) float32, NaN = missing
    target_names: list[str]
    path: Path | None = None
    skipped: list[tuple[int, str, str]] = field(default_factory=list)  # (row, smiles, reason)
    mixtures: int = 0
    fragments_stripped: int = 0
    # the file's other columns (neither SMILES nor targets), as written, for the kept rows
    other_columns: dict[str, list[str]] = field(default_factory=dict)
    # SD files only: each record's title line, and its own coordinates (polyfm.mol.conformers.Conformer)
    titles: list[str] | None = None
    conformers: list[Any] | None = None
    # rows (CSV) or records (SD file) of each molecule found more than once, by canonical SMILES
    duplicates: list[list[int]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.smiles)

    @property
    def from_sdf(self) -> bool:
        return self.titles is not None

    def meta(self) -> list[str]:
        """What a batch says about each molecule (named in NaN-loss errors): ``row N: SMILES``,
        or for an SD file ``record N 'title': SMILES``."""
        if self.titles is not None:
            return [f"{name}: {s}" for name, s in zip(self.record_names() or [], self.input_smiles, strict=True)]
        return [f"row {r}: {s}" for r, s in zip(self.rows, self.input_smiles, strict=True)]

    def record_names(self) -> list[str] | None:
        """An SD file's records as errors name them (``record N 'title'``, the title being the
        record's ``_Name`` when it has one); None for a CSV, whose rows errors name by number."""
        if self.titles is None:
            return None
        return [record_label(r, t) for r, t in zip(self.rows, self.titles, strict=True)]

    def subset(self, indices: Sequence[int] | NDArray[Any]) -> MoleculeTable:
        """The rows at ``indices`` (positions in this table), targets kept."""
        idx = [int(i) for i in indices]
        return MoleculeTable(
            [self.smiles[i] for i in idx],
            [self.input_smiles[i] for i in idx],
            [self.rows[i] for i in idx],
            self.targets[idx],
            list(self.target_names),
            path=self.path,
            other_columns={name: [cells[i] for i in idx] for name, cells in self.other_columns.items()},
            titles=None if self.titles is None else [self.titles[i] for i in idx],
            conformers=None if self.conformers is None else [self.conformers[i] for i in idx],
        )

    def summary(self) -> str:
        where = self.path.name if self.path else "table"
        return (
            f"{where}: {len(self)} molecules, {len(self.target_names)} targets, {int(np.isnan(self.targets).sum())} missing labels, "
            f"{len(self.skipped)} invalid {'records' if self.from_sdf else 'SMILES'} skipped, {self.mixtures} salts/mixtures ({self.fragments_stripped} reduced to the largest fragment)"
        )


def record_label(record: int, title: str) -> str:
    """``record 3 'aspirin'``; ``record 3`` for a record without a title (``_Name``)."""
    return f"record {record} {title!r}" if title else f"record {record}"


def parse_smiles(smiles: str, fragments: FragmentPolicy = "keep", canonicalize: bool = True) -> tuple[str, bool, str]:
    """``(smiles_out, is_mixture, error)``: error is "" when the SMILES is usable."""
    from rdkit import Chem, rdBase

    rdBase.DisableLog("rdApp.*")
    text = smiles.strip()
    if not text:
        return "", False, "empty SMILES"
    mol = Chem.MolFromSmiles(text)
    if mol is None:
        return "", False, _why_smiles_unparsable(text)
    if mol.GetNumAtoms() == 0:
        return "", False, "no atoms"
    mixture = len(Chem.GetMolFrags(mol)) > 1
    if mixture and fragments == "error":
        return "", True, "salt or mixture (several fragments); pass fragments='keep' or 'largest'"
    if mixture and fragments == "largest":
        from rdkit.Chem.MolStandardize import rdMolStandardize

        mol = rdMolStandardize.LargestFragmentChooser().choose(mol)
    return (Chem.MolToSmiles(mol) if canonicalize or (mixture and fragments == "largest") else text), mixture, ""


def _why_smiles_unparsable(text: str) -> str:
    """RDKit's reason for refusing a SMILES (``MolFromSmiles`` itself only returns None)."""
    from rdkit import Chem

    mol = Chem.MolFromSmiles(text, sanitize=False)
    if mol is None:
        return "RDKit cannot parse it (not SMILES syntax: an unclosed ring or bracket, or an unknown element?)"
    try:
        Chem.SanitizeMol(mol)
    except ValueError as exc:  # RDKit's MolSanitizeException: valence, aromaticity, kekulisation
        return f"RDKit cannot sanitise it ({' '.join(str(exc).split())})"
    return "RDKit cannot parse it"


_FLOAT32_MAX = float(np.finfo(np.float32).max)


def json_list(values: Sequence[Any]) -> str:
    """``[a, b]`` as a command-line list value."""
    import json

    return json.dumps(list(values))


def parse_label(value: str) -> float:
    """A label cell as a float; empty cells and ``nan``/``NA``/``none``/``null`` are missing (NaN)."""
    value = value.strip()
    if value == "" or value.lower() in ("nan", "na", "n/a", "none", "null"):
        return math.nan
    return float(value)


def _header(path: Path, delimiter: str | None) -> tuple[str, list[str]]:
    """The delimiter (given, or told by the header: tab for .tsv, else the first of comma, tab,
    semicolon and ``|`` found in the header; SMILES never contain these) and the column names as written."""
    import csv

    try:
        with path.open(encoding="utf-8-sig", newline="") as handle:
            first = handle.readline()
    except UnicodeDecodeError as exc:
        raise DataError(f"not a UTF-8 text file: {exc}", path=path) from exc
    if delimiter is None:
        found = [d for d in (",", "\t", ";", "|") if d in first]
        delimiter = "\t" if path.suffix.lower() == ".tsv" and "\t" in first else (found[0] if found else ",")
    return delimiter, next(csv.reader([first], delimiter=delimiter), [])


def _record_lines(path: Path, delimiter: str, count: int) -> list[int]:
    """The file line each of the ``count`` data rows starts on. pandas skips blank lines and
    quoted cells may span lines, so ``row + 1`` is not always the line; it is the fall-back
    when the file cannot be read the same way twice."""
    import csv

    lines: list[int] = []
    try:
        with path.open(encoding="utf-8-sig", newline="") as handle:
            reader = csv.reader(handle, delimiter=delimiter)
            end = 0
            for record in reader:
                start, end = end + 1, reader.line_num
                if any(cell.strip() for cell in record):  # what pandas keeps (skip_blank_lines)
                    lines.append(start)
    except (csv.Error, UnicodeDecodeError):
        lines = []
    data_lines = lines[1:]  # the header's first
    return data_lines if len(data_lines) == count else [i + 2 for i in range(count)]


def _did_you_mean(name: str, columns: Sequence[str]) -> str:
    close = [c for c in columns if c.strip().lower() == name.strip().lower()]
    return f" Did you mean {close[0]!r}?" if close else ""


def _existing_file(path: str | os.PathLike[str]) -> Path:
    path = Path(os.path.expandvars(os.fspath(path))).expanduser()  # recipes write $POLYFM_DATA_DIR/...
    if "$" in str(path):
        raise DataError("the path names an environment variable that is not set (e.g. POLYFM_DATA_DIR).", path=path)
    if not path.exists():
        raise DataError("file not found.", path=path)
    return path


def is_sd_file(path: str | os.PathLike[str]) -> bool:
    """``.sdf`` / ``.sdf.gz`` (also ``.sd``): read as SD files, everything else as CSV."""
    name = os.fspath(path).lower()
    return name.endswith((".sdf", ".sdf.gz", ".sd", ".sd.gz"))


def input_stem(path: str | os.PathLike[str]) -> str:
    """The file's name without its data suffixes (``screen.sdf.gz`` -> ``screen``), to name outputs after it."""
    name = Path(os.path.expandvars(os.fspath(path))).name
    for suffix in (".sdf.gz", ".sd.gz", ".csv.gz", ".tsv.gz"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def read_molecules(
    path: str | os.PathLike[str],
    smiles_column: str = "smiles",
    target_columns: Sequence[str] | None = None,
    canonicalize: bool = True,
    skip_invalid: bool = False,
    fragments: FragmentPolicy = "keep",
    delimiter: str | None = None,
    duplicates: DuplicatePolicy = "keep",
) -> MoleculeTable:
    """An SD file (by its suffix, :func:`read_molecule_sdf`) or a CSV (:func:`read_molecule_csv`)."""
    if is_sd_file(path):
        return read_molecule_sdf(path, target_columns, canonicalize, skip_invalid, fragments, smiles_column, duplicates)
    return read_molecule_csv(path, smiles_column, target_columns, canonicalize, skip_invalid, fragments, delimiter, duplicates)


def read_molecule_csv(
    path: str | os.PathLike[str],
    smiles_column: str = "smiles",
    target_columns: Sequence[str] | None = None,
    canonicalize: bool = True,
    skip_invalid: bool = False,
    fragments: FragmentPolicy = "keep",
    delimiter: str | None = None,
    duplicates: DuplicatePolicy = "keep",
) -> MoleculeTable:
    """Read a MoleculeNet-style CSV. ``target_columns=None`` takes every column but the SMILES one.
    ``delimiter=None`` tells it from the header (comma, tab, semicolon or ``|``). ``duplicates``:
    molecules found on several rows (the same canonical SMILES) are kept and logged (``"keep"``),
    reduced to their first row (``"first"``), or refused (``"error"``); see :func:`find_duplicates`."""
    import pandas as pd

    path = _existing_file(path)
    delimiter, header = _header(path, delimiter)
    repeated = sorted({c for c in header if header.count(c) > 1})
    if repeated:  # pandas would rename them silently (y, y.1)
        where = {c: [i + 1 for i, h in enumerate(header) if h == c] for c in repeated}
        raise DataError(f"column names repeat in the header: {where} (name -> column numbers). Rename them.", path=path)
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, sep=delimiter, encoding="utf-8-sig")
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise DataError(f"not a readable CSV: {exc}", path=path) from exc
    if smiles_column not in frame.columns:
        raise DataError(
            f"no SMILES column {smiles_column!r}; columns are {list(frame.columns)} (delimiter {delimiter!r}).{_did_you_mean(smiles_column, frame.columns)} "
            "Pass smiles_column=...",
            path=path,
        )
    names = [c for c in frame.columns if c != smiles_column] if target_columns is None else list(target_columns)
    absent = [c for c in names if c not in frame.columns]
    if absent:
        hints = "".join(_did_you_mean(c, frame.columns) for c in absent)
        raise DataError(f"target columns {absent} are not in the file; columns are {list(frame.columns)}.{hints}", path=path)
    lines = _record_lines(path, delimiter, len(frame))
    targets = np.full((len(frame), len(names)), np.nan, dtype=np.float32)
    for j, name in enumerate(names):
        for i, raw in enumerate(frame[name].tolist()):
            try:
                value = parse_label(raw)
            except ValueError:
                raise DataError(
                    f"(line {lines[i]}) target {raw!r} is not a number. Fix the value, or leave the cell empty for a missing label.",
                    path=path,
                    row=i + 1,
                    key=name,
                ) from None
            if abs(value) > _FLOAT32_MAX:  # 'inf', or beyond float32: it would make every loss Inf
                raise DataError(
                    f"(line {lines[i]}) target {raw!r} is not a finite float32 number. Fix the value, or leave the cell empty "
                    "for a missing label.",
                    path=path,
                    row=i + 1,
                    key=name,
                )
            targets[i, j] = value
    table = MoleculeTable([], [], [], targets, names, path=path)
    keep: list[int] = []
    for i, raw in enumerate(frame[smiles_column].tolist()):
        smiles, mixture, error = parse_smiles(raw, fragments, canonicalize)
        if error:
            table.skipped.append((i + 1, raw, error))
            continue
        table.mixtures += int(mixture)
        table.fragments_stripped += int(mixture and fragments == "largest")
        table.smiles.append(smiles)
        table.input_smiles.append(raw)
        table.rows.append(i + 1)
        keep.append(i)
    if table.skipped and not skip_invalid:
        shown = "; ".join(f"row {r} (line {lines[r - 1]}) {s!r}: {why}" for r, s, why in table.skipped[:10])
        more = f" and {len(table.skipped) - 10} more" if len(table.skipped) > 10 else ""
        raise DataError(
            f"{len(table.skipped)} invalid SMILES in column {smiles_column!r}: {shown}{more}. Fix them, or pass skip_invalid=True "
            "to skip them (they are counted and logged).",
            path=path,
        )
    table.targets = targets[keep]
    for name in frame.columns:
        if name != smiles_column and name not in names:
            cells = frame[name].tolist()
            table.other_columns[name] = [cells[i] for i in keep]
    if not len(table):
        raise DataError("no valid molecule in the file.", path=path)
    table = find_duplicates(table, duplicates, [f"row {r} (line {lines[r - 1]})" for r in table.rows])
    if table.skipped:
        log.warning("%s: skipped %d invalid SMILES (rows %s)", path, len(table.skipped), [r for r, _, _ in table.skipped[:20]])
    if table.mixtures:
        log.info(
            "%s: %d salts/mixtures (%s)",
            path,
            table.mixtures,
            "largest fragment kept" if fragments == "largest" else "kept whole",
        )
    return table


def read_molecule_sdf(
    path: str | os.PathLike[str],
    target_columns: Sequence[str] | None = None,
    canonicalize: bool = True,
    skip_invalid: bool = False,
    fragments: FragmentPolicy = "keep",
    smiles_column: str = "smiles",
    duplicates: DuplicatePolicy = "keep",
) -> MoleculeTable:
    """Read an SD file (``.sdf``, or gzipped ``.sdf.gz``) with RDKit's ``SDMolSupplier``.

    Each record's SMILES is RDKit's SMILES of its structure (hydrogens implicit), then treated
    as a CSV's SMILES (``fragments``, ``canonicalize``). Its properties (``> <name>`` fields)
    are the columns: ``target_columns=None`` takes every property but one named
    ``smiles_column``; a property a record lacks is a missing label. Records are numbered from
    1 (``rows``) and named by their title line (``titles``). Records RDKit cannot parse stop
    the run with their number, title and RDKit's reason, unless ``skip_invalid``. ``conformers``
    holds each record's own coordinates with every hydrogen (those the file leaves implicit
    are placed by RDKit), for Uni-Mol's ``conformers="from_file"``."""
    import gzip

    from rdkit import Chem, rdBase

    from polyfm.mol.conformers import Conformer

    rdBase.DisableLog("rdApp.*")
    path = _existing_file(path)
    try:
        data = gzip.decompress(path.read_bytes()) if path.name.lower().endswith(".gz") else path.read_bytes()
    except (OSError, EOFError) as exc:  # gzip.BadGzipFile is an OSError
        raise DataError(f"not a readable gzip file ({exc}): give a gzipped SD file, or name a plain one .sdf", path=path) from exc
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"not a UTF-8 text file: {exc}. Convert it first (e.g. iconv -f latin1 -t utf-8).", path=path) from exc
    supplier = Chem.SDMolSupplier()  # a fresh one per file: SetData on a used supplier keeps stale state
    supplier.SetData(text, sanitize=True, removeHs=False)  # hydrogens kept: they carry the file's 3D positions
    titles: list[str] = []
    rows: list[int] = []
    input_smiles: list[str] = []
    smiles_out: list[str] = []
    properties: list[dict[str, str]] = []
    conformers: list[Any] = []
    skipped: list[tuple[int, str, str]] = []
    mixtures = stripped = 0
    for index in range(len(supplier)):
        record, item = index + 1, supplier.GetItemText(index)
        title = item.split("\n", 1)[0].strip()
        mol = supplier[index]
        if mol is None:
            skipped.append((record, title, _why_unparsable(item)))
            continue
        if mol.GetNumAtoms() == 0:
            skipped.append((record, title, "no atoms"))
            continue
        raw = Chem.MolToSmiles(Chem.RemoveHs(mol))
        smiles, mixture, error = parse_smiles(raw, fragments, canonicalize)
        if error:
            skipped.append((record, title, error))
            continue
        mixtures += int(mixture)
        stripped += int(mixture and fragments == "largest")
        titles.append(title)
        rows.append(record)
        input_smiles.append(raw)
        smiles_out.append(smiles)
        properties.append({name: mol.GetProp(name) for name in mol.GetPropNames()})
        conformers.append(_record_conformer(mol, smiles if mixture and fragments == "largest" else None, Conformer))
    if skipped and not skip_invalid:
        shown = "; ".join(f"{record_label(r, t)}: {why}" for r, t, why in skipped[:10])
        more = f" and {len(skipped) - 10} more" if len(skipped) > 10 else ""
        raise DataError(
            f"{len(skipped)} of {len(supplier)} records are not usable molecules (record numbers from 1, title (_Name) in quotes): "
            f"{shown}{more}. Fix them, or pass skip_invalid=True to skip them (they are counted and logged).",
            path=path,
        )
    if not rows:
        raise DataError(f"no valid molecule in the file ({len(supplier)} records read).", path=path)
    found: list[str] = []
    for record_properties in properties:
        found.extend(name for name in record_properties if name not in found)
    names = [c for c in found if c != smiles_column] if target_columns is None else list(target_columns)
    absent = [c for c in names if c not in found]
    if absent:
        hints = "".join(_did_you_mean(c, found) for c in absent)
        raise DataError(f"target properties {absent} are in no record; the records' properties are {found}.{hints}", path=path)
    targets = np.full((len(rows), len(names)), np.nan, dtype=np.float32)
    for i, record_properties in enumerate(properties):
        for j, name in enumerate(names):
            raw_value = record_properties.get(name, "")
            try:
                value = parse_label(raw_value)
                problem = "is not a finite float32 number" if abs(value) > _FLOAT32_MAX else ""
            except ValueError:
                problem = "is not a number"
            if problem:
                raise DataError(
                    f"{record_label(rows[i], titles[i])}: target {raw_value!r} {problem}. Fix the value, or leave the property "
                    "out of the record for a missing label.",
                    path=path,
                    key=name,
                )
            targets[i, j] = value
    table = MoleculeTable(smiles_out, input_smiles, rows, targets, names, path=path, skipped=skipped, mixtures=mixtures,
                          fragments_stripped=stripped, titles=titles, conformers=conformers)  # fmt: skip
    for name in found:
        if name not in names:
            table.other_columns[name] = [record_properties.get(name, "") for record_properties in properties]
    table = find_duplicates(table, duplicates, table.record_names() or [])
    if skipped:
        log.warning("%s: skipped %d invalid records (records %s)", path, len(skipped), [r for r, _, _ in skipped[:20]])
    if mixtures:
        log.info("%s: %d salts/mixtures (%s)", path, mixtures, "largest fragment kept" if fragments == "largest" else "kept whole")
    return table


def find_duplicates(table: MoleculeTable, policy: DuplicatePolicy, names: Sequence[str]) -> MoleculeTable:
    """Molecules on several rows (records), by canonical SMILES: ``table.duplicates`` lists their
    row (record) numbers. ``"keep"``: all kept, logged with their rows, since copies weigh twice and
    a random split can put one in training and another in the test set (scaffold splits and folds
    keep them together); ``"first"``: each molecule's first row only; ``"error"``: a
    :class:`DataError` naming the file and the rows. ``names``: how errors name each molecule."""
    if policy not in ("keep", "first", "error"):
        raise ConfigError(f"duplicates={policy!r}: use 'keep' (kept and logged), 'first' (first row only) or 'error'.")
    where: dict[str, list[int]] = defaultdict(list)
    for i, smiles in enumerate(table.smiles):
        where[smiles].append(i)
    repeated = [indices for indices in where.values() if len(indices) > 1]
    table.duplicates = [[table.rows[i] for i in indices] for indices in repeated]
    if not repeated:
        return table

    def differ(indices: list[int]) -> bool:
        labels = table.targets[indices]
        return not all(np.array_equal(labels[0], other, equal_nan=True) for other in labels[1:])

    conflicting = sum(differ(indices) for indices in repeated)
    shown = "; ".join(
        f"{table.smiles[indices[0]]!r} at {', '.join(names[i] for i in indices)}{' (labels differ)' if differ(indices) else ''}"
        for indices in repeated[:10]
    ) + (f" and {len(repeated) - 10} more" if len(repeated) > 10 else "")
    unit = "records" if table.from_sdf else "rows"
    summary = (f"{len(repeated)} molecules appear on more than one {unit[:-1]} (the same canonical SMILES, "
               f"{sum(map(len, repeated))} {unit}; {conflicting} with different labels): {shown}")  # fmt: skip
    if policy == "error":
        raise DataError(
            f"{summary}. Remove or merge the copies, or pass duplicates='first' (each molecule's first {unit[:-1]}) or "
            "duplicates='keep' (all of them).",
            path=table.path,
        )
    if policy == "keep":
        log.warning("%s: %s. Kept: each copy counts in training and evaluation, and a random split can put copies on both "
                    "sides (scaffold splits keep them together); duplicates='first' keeps one, 'error' refuses them.",
                    table.path, summary)  # fmt: skip
        return table
    keep = sorted(indices[0] for indices in where.values())
    reduced = table.subset(keep)
    reduced.skipped, reduced.mixtures, reduced.fragments_stripped = table.skipped, table.mixtures, table.fragments_stripped
    reduced.duplicates = table.duplicates
    log.info("%s: %s. Kept each molecule's first %s (%d dropped).", table.path, summary, unit[:-1], len(table) - len(keep))
    return reduced


def _why_unparsable(item: str) -> str:
    """RDKit's reason for refusing one SD record (the supplier itself only returns None)."""
    from rdkit import Chem

    mol = Chem.MolFromMolBlock(item, sanitize=False, removeHs=False)
    if mol is None:
        return "RDKit cannot read its mol block (header, counts, atom or bond lines)"
    try:
        Chem.SanitizeMol(mol)
    except ValueError as exc:  # RDKit's MolSanitizeException: valence, aromaticity, kekulisation
        return f"RDKit cannot sanitise it ({exc})"
    return "RDKit cannot parse it"


def _record_conformer(mol: Any, largest_fragment: str | None, conformer_type: Any) -> Any:
    """The record's atoms (every hydrogen) and coordinates; ``largest_fragment``: keep only the
    fragment with that SMILES (``fragments="largest"``)."""
    from rdkit import Chem

    with_hydrogens = Chem.AddHs(mol, addCoords=True)  # only the implicit ones are added, placed from the heavy atoms
    added = with_hydrogens.GetNumAtoms() - mol.GetNumAtoms()
    if largest_fragment is not None:
        pieces = Chem.GetMolFrags(with_hydrogens, asMols=True)
        matching = [p for p in pieces if Chem.MolToSmiles(Chem.RemoveHs(p)) == largest_fragment]
        with_hydrogens = matching[0] if matching else max(pieces, key=lambda p: p.GetNumHeavyAtoms())
    is_3d = mol.GetNumConformers() > 0 and mol.GetConformer().Is3D()
    coordinates = (
        with_hydrogens.GetConformer().GetPositions().astype(np.float32) if mol.GetNumConformers() else np.zeros((0, 3), np.float32)
    )
    return conformer_type(
        [atom.GetSymbol() for atom in with_hydrogens.GetAtoms()],
        coordinates,
        is_3d,
        f"{added} hydrogens placed by RDKit" if added else "",
    )


# ----------------------------------------------------------------------------- splits


def _counts(n: int, fractions: Sequence[float]) -> tuple[int, int]:
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise ConfigError(f"split fractions must be three non-negative numbers summing to 1, got {list(fractions)}.")
    n_train = int(round(fractions[0] * n))
    n_val = int(round(fractions[1] * n))
    return n_train, n_val


def murcko_scaffold(smiles: str, include_chirality: bool = False) -> str:
    from rdkit import Chem
    from rdkit.Chem.Scaffolds import MurckoScaffold

    mol = Chem.MolFromSmiles(smiles)
    if mol is None:
        return ""
    scaffold: str = MurckoScaffold.MurckoScaffoldSmiles(mol=mol, includeChirality=include_chirality)  # type: ignore[no-untyped-call]  # unannotated in RDKit's stubs
    return scaffold


def scaffold_split(
    smiles: Sequence[str], fractions: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0, balanced: bool = False
) -> tuple[NDArray[Any], NDArray[Any], NDArray[Any]]:
    """Bemis-Murcko scaffold split: no scaffold is shared between splits.

    Default (DeepChem's): scaffold sets from largest to smallest fill train, then
    validation, then test, deterministically. ``balanced=True`` (chemprop's): sets larger
    than half the test size go to train first, the rest in a seeded random order."""
    n_train, n_val = _counts(len(smiles), fractions)
    groups: dict[str, list[int]] = defaultdict(list)
    for i, s in enumerate(smiles):
        groups[murcko_scaffold(s)].append(i)
    sets = list(groups.values())
    if balanced:
        big = [s for s in sets if len(s) > (len(smiles) - n_train - n_val) / 2]
        small = [s for s in sets if len(s) <= (len(smiles) - n_train - n_val) / 2]
        rng = np.random.default_rng(seed)
        rng.shuffle(big)
        rng.shuffle(small)
        sets = big + small
    else:
        sets.sort(key=lambda s: (-len(s), s[0]))
    train: list[int] = []
    val: list[int] = []
    test: list[int] = []
    for group in sets:
        if len(train) + len(group) <= n_train:
            train.extend(group)
        elif len(val) + len(group) <= n_val:
            val.extend(group)
        else:
            test.extend(group)
    return np.sort(train), np.sort(val), np.sort(test)


def random_split(
    n: int, fractions: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0
) -> tuple[NDArray[Any], NDArray[Any], NDArray[Any]]:
    n_train, n_val = _counts(n, fractions)
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[:n_train]), np.sort(order[n_train : n_train + n_val]), np.sort(order[n_train + n_val :])


def stratified_split(
    labels: NDArray[Any], fractions: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0, bins: int = 5
) -> tuple[NDArray[Any], NDArray[Any], NDArray[Any]]:
    """Each stratum keeps the split fractions. Strata: the class of a single binary/integer
    target, the quantile bin of a continuous one, or (multi-task) the first task's; missing
    labels form their own stratum."""
    labels = np.asarray(labels, dtype=np.float64)
    first = labels if labels.ndim == 1 else labels[:, 0]
    observed = first[~np.isnan(first)]
    if observed.size and np.all(observed == np.round(observed)) and len(np.unique(observed)) <= 20:
        strata = np.where(np.isnan(first), -1.0, first)
    else:
        edges = np.nanquantile(first, np.linspace(0, 1, bins + 1)[1:-1]) if observed.size else np.array([])
        strata = np.where(np.isnan(first), -1.0, np.searchsorted(edges, first, side="right").astype(float))
    rng = np.random.default_rng(seed)
    parts: tuple[list[int], list[int], list[int]] = ([], [], [])
    for value in np.unique(strata):
        members = np.flatnonzero(strata == value)
        members = members[rng.permutation(len(members))]
        n_train, n_val = _counts(len(members), fractions)
        parts[0].extend(members[:n_train])
        parts[1].extend(members[n_train : n_train + n_val])
        parts[2].extend(members[n_train + n_val :])
    return np.sort(parts[0]), np.sort(parts[1]), np.sort(parts[2])


def check_fold_options(fold: int | None, num_folds: int, split: str) -> None:
    """Fold options that are wrong whatever the data: refused when the module is built."""
    if fold is None:
        return
    check_fold(fold, num_folds, "MoleculeDataModule")
    if split == "stratified":
        raise ConfigError(
            f"MoleculeDataModule(fold={fold}, split='stratified'): cross-validation folds are dealt by scaffold "
            "(split='scaffold', the default) or one molecule at a time (split='random'); pass one of those."
        )


def molecule_fold(
    table: MoleculeTable, fold: int, num_folds: int, split: str = "scaffold", seed: int = 0
) -> tuple[NDArray[Any], NDArray[Any], NDArray[Any]]:
    """``(train, held_out, held_out)`` indices of cross-validation fold ``fold``: molecules dealt
    into ``num_folds`` folds by :func:`polyfm.core.data.fold_indices`, whole Bemis-Murcko
    scaffolds at a time unless ``split="random"`` (acyclic molecules share the empty scaffold)."""
    check_fold_options(fold, num_folds, split)
    groups = None if split == "random" else [murcko_scaffold(s) for s in table.smiles]
    where = table.path or "the molecules"
    if groups is not None and len(set(groups)) < num_folds:
        raise ConfigError(
            f"{where}: the {len(table)} molecules have {len(set(groups))} Bemis-Murcko scaffold(s), fewer than num_folds={num_folds}; "
            f"a scaffold is never split across folds, so use num_folds <= {len(set(groups))}, or split='random'."
        )
    try:
        train, held_out = fold_indices(len(table), num_folds, fold, groups=groups, seed=seed)
    except ConfigError as exc:  # too few molecules for the folds: name the file
        raise ConfigError(f"{where}: {exc}") from None
    log.info("fold %d of %d (%s): %d molecules train, %d held out%s", fold, num_folds, where, len(train), len(held_out),
             "" if groups is None else f" ({len({groups[i] for i in held_out})} of {len(set(groups))} scaffolds)")  # fmt: skip
    return train, held_out, held_out


def split_indices(
    kind: SplitKind, smiles: Sequence[str], targets: NDArray[Any], fractions: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0
) -> tuple[NDArray[Any], NDArray[Any], NDArray[Any]]:
    if kind == "scaffold":
        return scaffold_split(smiles, fractions, seed)
    if kind == "scaffold_balanced":
        return scaffold_split(smiles, fractions, seed, balanced=True)
    if kind == "random":
        return random_split(len(smiles), fractions, seed)
    if kind == "stratified":
        return stratified_split(targets, fractions, seed)
    raise ConfigError(f"unknown split {kind!r}: use scaffold, scaffold_balanced, random or stratified.")


# ----------------------------------------------------------------------------- descriptors (ChemBERTa-2 MTR)


def descriptor_names() -> list[str]:
    from rdkit.Chem import Descriptors

    return [name for name, _ in Descriptors.descList]


def compute_descriptors(smiles: Sequence[str], names: Sequence[str] | None = None) -> NDArray[Any]:
    """RDKit 2D descriptors per molecule: all of ``rdkit.Chem.Descriptors.descList`` (~210), or
    ``names`` in that order; non-finite values become NaN (masked in the MTR loss)."""
    from rdkit import Chem, rdBase
    from rdkit.Chem import Descriptors

    rdBase.DisableLog("rdApp.*")
    table = dict(Descriptors.descList)
    unknown = [n for n in names or () if n not in table]
    if unknown:
        raise ConfigError(f"RDKit has no descriptor {', '.join(unknown)} (rdkit.Chem.Descriptors.descList).")
    functions = list(table.values()) if names is None else [table[n] for n in names]
    out = np.full((len(smiles), len(functions)), np.nan, dtype=np.float64)
    for i, s in enumerate(smiles):
        mol = Chem.MolFromSmiles(s)
        if mol is None:
            continue
        for j, fn in enumerate(functions):
            try:
                out[i, j] = float(fn(mol))
            except (ValueError, ZeroDivisionError, RuntimeError, OverflowError):
                pass
    out[~np.isfinite(out)] = np.nan
    return out


@dataclass
class DescriptorScaler:
    """Standardise descriptors with training statistics; values are clipped to +-``clip``
    standard deviations so heavy-tailed descriptors (Ipc, BertzCT) cannot dominate."""

    mean: NDArray[Any]
    std: NDArray[Any]
    clip: float = 10.0

    @classmethod
    def fit(cls, values: NDArray[Any], clip: float = 10.0) -> DescriptorScaler:
        with np.errstate(all="ignore"):
            # log-compress magnitudes first: several descriptors span many orders of magnitude
            compressed = np.sign(values) * np.log1p(np.abs(values))
            mean = np.nan_to_num(np.nanmean(compressed, axis=0))
            std = np.nan_to_num(np.nanstd(compressed, axis=0), nan=1.0)
        std[std < 1e-8] = 1.0
        return cls(mean.astype(np.float32), std.astype(np.float32), clip)

    def transform(self, values: NDArray[Any]) -> NDArray[Any]:
        with np.errstate(all="ignore"):
            compressed = np.sign(values) * np.log1p(np.abs(values))
        scaled: NDArray[Any] = np.clip((compressed - self.mean) / self.std, -self.clip, self.clip).astype(np.float32)
        return scaled


# ----------------------------------------------------------------------------- datasets


class MoleculeDataset(Dataset[dict[str, Any]]):
    """Items ``{"features": <model input of one molecule>, "target": (T,), "meta": "row N: SMILES"}``.

    ``featurise(i)`` gives the per-molecule input (SMILES string for ChemBERTa, Uni-Mol
    arrays); the collate function turns a list of them into the batch input."""

    def __init__(self, smiles: Sequence[str], targets: NDArray[Any], meta: Sequence[str], featurise: Callable[[int], Any]) -> None:
        self.smiles, self.targets, self.meta, self.featurise = (
            list(smiles),
            np.asarray(targets, np.float32),
            list(meta),
            featurise,
        )

    def __len__(self) -> int:
        return len(self.smiles)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"features": self.featurise(index), "target": torch.from_numpy(self.targets[index]), "meta": self.meta[index]}


class ChemBERTaCollate:
    """Tokenises a batch of SMILES (padding to the longest)."""

    def __init__(self, tokenizer: Any, max_length: int) -> None:
        self.tokenizer, self.max_length = tokenizer, max_length

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "input": self.tokenizer([it["features"] for it in items], max_length=self.max_length),
            "target": torch.stack([it["target"] for it in items]),
            "meta": [it["meta"] for it in items],
        }


class UniMolCollate:
    """Right-pads Uni-Mol inputs. Molecules with several conformers (:class:`ConformerSet`, the
    evaluation and prediction path of ``num_conformers > 1``) put each conformer in a row of the
    input, molecule after molecule, and ``batch["conformer_molecule"]`` gives each row's molecule
    (its place in ``target`` and ``meta``), for the tasks of :mod:`polyfm.mol.tasks` to average."""

    def __init__(self, pad_idx: int) -> None:
        self.pad_idx = pad_idx

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        from polyfm.mol.conformers import collate_unimol

        batch = {"target": torch.stack([it["target"] for it in items]), "meta": [it["meta"] for it in items]}
        if not any(isinstance(it["features"], ConformerSet) for it in items):
            return {"input": collate_unimol([it["features"] for it in items], self.pad_idx), **batch}
        rows: list[dict[str, NDArray[Any]]] = []
        owner: list[int] = []
        for position, item in enumerate(items):
            features = item["features"]
            each = [features[c] for c in range(len(features))] if isinstance(features, ConformerSet) else [features]
            rows.extend(each)
            owner.extend([position] * len(each))
        return {"input": collate_unimol(rows, self.pad_idx), **batch, "conformer_molecule": torch.tensor(owner, dtype=torch.long)}


class ConformerSet:
    """One molecule's conformers as Uni-Mol inputs, featurised when asked for (K sets of pair
    matrices per molecule would multiply the memory by K). Every conformer keeps the same atoms
    when the molecule is cropped to ``max_atoms`` (one seed per molecule)."""

    def __init__(self, conformers: Sequence[Any], dictionary: Any, max_atoms: int, seed: int) -> None:
        self.conformers, self.dictionary, self.max_atoms, self.seed = list(conformers), dictionary, max_atoms, seed

    def __len__(self) -> int:
        return len(self.conformers)

    def __getitem__(self, index: int) -> dict[str, NDArray[Any]]:
        from polyfm.mol.conformers import unimol_features

        conformer = self.conformers[index]
        return unimol_features(conformer.atoms, conformer.coordinates, self.dictionary, self.max_atoms, seed=self.seed)


class ConformerDraws(Dataset[dict[str, Any]]):
    """Training items with one conformer each: index ``i * K + c`` is conformer ``c`` of item ``i``
    of ``dataset`` (whose features are :class:`ConformerSet` of ``K``). :class:`ConformerDrawSampler`
    picks ``c``; the choice travels in the index, so DataLoader workers need no epoch of their own."""

    def __init__(self, dataset: Dataset[dict[str, Any]], per_molecule: int) -> None:
        self.dataset, self.per_molecule = dataset, per_molecule

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]  # torch's Dataset declares no __len__; ours are sized

    def __getitem__(self, index: int) -> dict[str, Any]:
        molecule, conformer = divmod(int(index), self.per_molecule)
        item = dict(self.dataset[molecule])
        item["features"] = item["features"][conformer]
        return item


class ConformerDrawSampler(EpochSeededSampler):
    """The training order of :class:`polyfm.core.data.EpochSeededSampler` (a function of
    (seed, epoch), so resumed runs, mid-epoch too, see what uninterrupted ones do), each molecule
    with one of its ``per_molecule`` conformers drawn uniformly from a generator seeded by
    (seed, epoch): a new draw each epoch, the same draws on every run with that seed. Yields
    ``molecule * per_molecule + conformer`` for :class:`ConformerDraws`."""

    def __init__(self, length: int, per_molecule: int, seed: int = 0) -> None:
        super().__init__(length, seed)
        self.per_molecule = per_molecule

    def draws(self, epoch: int) -> NDArray[Any]:
        """The conformer each molecule gets in ``epoch`` (by molecule, not by position in the
        order, so leaving the first batches out on a resume changes none of the others)."""
        return np.random.default_rng([self.seed, epoch, 0x434F4E46]).integers(0, self.per_molecule, self.length)

    def __iter__(self) -> Iterator[int]:
        chosen = self.draws(self.epoch)
        order: Iterator[int] = super().__iter__()
        return iter([i * self.per_molecule + int(chosen[i]) for i in order])


def conformer_draw_loader(module: DictDataModule, dataset: Dataset[Any], num_conformers: int) -> ResumableDataLoader:
    """The training loader of a data module whose molecules each hold ``num_conformers``
    conformers (:class:`ConformerSet`): one conformer per molecule and epoch, drawn by
    :class:`ConformerDrawSampler` from (``module.seed``, epoch), resumable mid-epoch. Shared by
    fine-tuning (:class:`MoleculeDataModule`) and pretraining (:class:`MoleculePretrainDataModule`)."""
    return ResumableDataLoader(
        ConformerDraws(dataset, num_conformers),
        batch_size=module.batch_size,
        sampler=ConformerDrawSampler(len(dataset), num_conformers, module.seed),  # type: ignore[arg-type]  # a sized Dataset
        num_workers=module.num_workers,
        pin_memory=module.pin_memory,
        persistent_workers=module.persistent_workers,
        collate_fn=module.collate_fn,
        drop_last=False,
    )


def fixed_conformer_draws(dataset: Dataset[Any], num_conformers: int, seed: int) -> Dataset[Any]:
    """``dataset`` with one conformer per molecule drawn once from ``seed`` (the same every
    epoch, so validation losses compare across epochs), in the dataset's order."""
    from torch.utils.data import Subset

    length = len(dataset)  # type: ignore[arg-type]  # torch's Dataset declares no __len__; ours are sized
    chosen = np.random.default_rng([seed, 0x56414C]).integers(0, num_conformers, length)
    return Subset(ConformerDraws(dataset, num_conformers), [i * num_conformers + int(chosen[i]) for i in range(length)])


# ----------------------------------------------------------------------------- featurisers


def indexed(featurise: Callable[[int], Any], indices: Sequence[int]) -> Callable[[int], Any]:
    """``featurise`` of a subset: item ``k`` is molecule ``indices[k]``."""
    return lambda k: featurise(indices[k])


def check_atoms_left(atom_counts: Sequence[int], smiles: Sequence[str], named: Sequence[str], path: str | os.PathLike[str] | None) -> None:
    """H2, [H+]: without hydrogens nothing is left (unimol_tools would give NaN coordinates)."""
    empty = [f"{named[i]} {smiles[i]!r}" for i, count in enumerate(atom_counts) if not count]
    if empty:
        raise DataError(
            f"{len(empty)} molecules have no atoms left once hydrogens are removed (remove_hs=True): {', '.join(empty[:10])}. "
            "Drop them from the file, or use a model with hydrogens (remove_hs=False).",
            path=path,
        )


class Featuriser:
    """Turns SMILES into one model's inputs, and says how to collate them."""

    def prepare(self, smiles: Sequence[str], rows: Sequence[int], conformers: Sequence[Any] | None = None,
                names: Sequence[str] | None = None, path: str | os.PathLike[str] | None = None) -> Callable[[int], Any]:  # fmt: skip
        """``featurise(i)`` for molecule ``i``; ``conformers``: an SD file's own coordinates
        (``MoleculeTable.conformers``), used by featurisers that ask for them. ``names`` and
        ``path`` are for errors: how each molecule is named (``MoleculeTable.record_names()``,
        default ``row N``) and the file it comes from."""
        raise NotImplementedError  # pragma: no cover - abstract

    def collate(self) -> Callable[[list[dict[str, Any]]], dict[str, Any]]:  # pragma: no cover - abstract
        raise NotImplementedError


class ChemBERTaFeaturiser(Featuriser):
    """SMILES strings, tokenised per batch. ``tokenizer``: a hub folder, a vocab.json, or None
    for the built-in atom-wise vocabulary; ``tokenizer_kind``: ``hub`` or ``smiles``."""

    def __init__(self, tokenizer: str | None = None, tokenizer_kind: str = "hub", max_length: int = 128) -> None:
        from polyfm.mol.tokenizers import load_tokenizer

        self.tokenizer = load_tokenizer(tokenizer, tokenizer_kind, model_max_length=max_length)
        self.max_length = max_length
        self.truncated_rows: list[int] = []
        # rows of which the tokenizer dropped characters (hub) or used the unknown token (atom-wise)
        self.lossy_rows: list[int] = []

    def prepare(self, smiles: Sequence[str], rows: Sequence[int], conformers: Sequence[Any] | None = None,
                names: Sequence[str] | None = None, path: str | os.PathLike[str] | None = None) -> Callable[[int], Any]:  # fmt: skip
        from polyfm.mol.tokenizers import HubTokenizer

        seen = self.tokenizer.inspect(smiles)  # (length in tokens, what the vocabulary lacks) per SMILES
        too_long = [r for (length, _), r in zip(seen, rows, strict=True) if length > self.max_length]
        if too_long:
            log.warning(
                "%d SMILES are longer than max_length=%d tokens and are truncated (rows %s)",
                len(too_long),
                self.max_length,
                too_long[:20],
            )
        self.truncated_rows = too_long
        lost = [(r, s, dropped) for (_, dropped), s, r in zip(seen, smiles, rows, strict=True) if dropped]
        self.lossy_rows = [r for r, _, _ in lost]
        if lost:
            row, example, dropped = lost[0]
            hub = isinstance(self.tokenizer, HubTokenizer)
            log.warning(
                "%d of %d SMILES %s the vocabulary lacks (rows %s; row %d %r: %r). %s",
                len(lost),
                len(smiles),
                "lose characters that" if hub else "have atom-wise tokens, now the unknown token, that",
                self.lossy_rows[:20],
                row,
                example,
                dropped,
                "This is what transformers does with these files; tokenizer_kind='smiles' keeps atoms whole."
                if hub
                else "Their embedding is that of the unknown token.",
            )
        values = list(smiles)
        return values.__getitem__

    def collate(self) -> ChemBERTaCollate:
        return ChemBERTaCollate(self.tokenizer, self.max_length)


class UniMolFeaturiser(Featuriser):
    """ETKDG conformers (cached on disk, parallel) turned into Uni-Mol inputs.

    ``max_atoms_policy``: ``"crop"`` keeps a seeded random subset of ``max_atoms`` atoms
    (what unimol_tools does, counted and logged), ``"error"`` refuses such molecules.
    ``conformers="from_file"`` uses an SD file's own 3D coordinates instead of ETKDG
    (hydrogens as on the ETKDG path: all of them, or none with ``remove_hs``).
    ``num_conformers > 1``: ``featurise(i)`` is a :class:`ConformerSet` of that many conformers
    (:func:`polyfm.mol.conformers.generate_conformer_sets`); repeated geometries are kept and
    counted in ``repeated_conformer_rows`` (row -> distinct conformers)."""

    def __init__(
        self,
        dictionary: str | None = None,
        remove_hs: bool = False,
        max_atoms: int = 256,
        max_atoms_policy: Literal["crop", "error"] = "crop",
        conformer_seed: int = 42,
        mmff: bool = True,
        conformer_cache: str | None = None,
        conformer_workers: int = 1,
        conformer_timeout: int = 10,
        conformers: ConformerSource = "etkdg",
        num_conformers: int = 1,
        conformer_2d: bool = False,
    ) -> None:
        from polyfm.mol.models.unimol import UniMolDictionary

        if conformers not in ("etkdg", "from_file"):
            raise ConfigError(f"conformers={conformers!r}: use 'etkdg' (generated) or 'from_file' (an SD file's own 3D coordinates).")
        check_conformer_options(num_conformers, conformer_2d, conformers)
        self.conformer_source = conformers
        self.num_conformers, self.conformer_2d = num_conformers, conformer_2d
        # rows of molecules whose conformers repeat a geometry -> how many distinct ones they have
        self.repeated_conformer_rows: dict[int, int] = {}

        self.dictionary = UniMolDictionary.official() if dictionary is None else UniMolDictionary.load(dictionary)
        self.remove_hs, self.max_atoms, self.max_atoms_policy = remove_hs, max_atoms, max_atoms_policy
        self.conformer_seed, self.mmff = conformer_seed, mmff
        self.conformer_cache, self.conformer_workers, self.conformer_timeout = (
            conformer_cache,
            conformer_workers,
            conformer_timeout,
        )
        self.fallback_2d_rows: list[int] = []
        self.cropped_rows: list[int] = []
        # rows (records) with elements the dictionary lacks -> those elements (read as [UNK])
        self.unknown_atom_rows: dict[int, list[str]] = {}

    def prepare(self, smiles: Sequence[str], rows: Sequence[int], conformers: Sequence[Any] | None = None,
                names: Sequence[str] | None = None, path: str | os.PathLike[str] | None = None) -> Callable[[int], Any]:  # fmt: skip
        from polyfm.mol.conformers import ConformerSettings, generate_conformers, unimol_features

        named = list(names) if names is not None else [f"row {r}" for r in rows]
        if self.num_conformers > 1:
            return self.prepare_sets(smiles, rows, named, names is not None, path)
        if self.conformer_source == "from_file":
            conformers = self.file_conformers(conformers, rows, named, path)
            self.fallback_2d_rows = []
        else:
            settings = ConformerSettings(
                seed=self.conformer_seed, remove_hs=self.remove_hs, mmff=self.mmff, timeout=self.conformer_timeout
            )
            conformers, report = generate_conformers(smiles, settings, self.conformer_cache, self.conformer_workers)
            self.fallback_2d_rows = [rows[i] for i in report.fallback_2d]
        check_atoms_left([len(conf.atoms) for conf in conformers], smiles, named, path)
        self.note_unknown_atoms([conf.atoms for conf in conformers], smiles, rows, named, path)
        features = []
        self.cropped_rows = []
        for i, conf in enumerate(conformers):
            if len(conf.atoms) > self.max_atoms:
                self.too_many_atoms(len(conf.atoms), smiles[i], rows[i], named[i] if names is not None else None, path)
            features.append(
                unimol_features(conf.atoms, conf.coordinates, self.dictionary, self.max_atoms, seed=self.conformer_seed + i)
            )
        if self.cropped_rows:
            log.warning(
                "%d molecules exceed max_atoms=%d and were cropped to a random subset of atoms (rows %s)",
                len(self.cropped_rows),
                self.max_atoms,
                self.cropped_rows[:20],
            )
        if self.fallback_2d_rows:
            log.warning(
                "%d molecules use 2D coordinates (ETKDG failed): rows %s", len(self.fallback_2d_rows), self.fallback_2d_rows[:20]
            )
        return features.__getitem__

    def prepare_sets(self, smiles: Sequence[str], rows: Sequence[int], named: Sequence[str], by_name: bool,
                     path: str | os.PathLike[str] | None) -> Callable[[int], Any]:  # fmt: skip
        """``num_conformers`` ETKDG conformers per molecule (the last one 2D with ``conformer_2d``),
        featurised per draw (:class:`ConformerSet`)."""
        from polyfm.mol.conformers import ConformerSettings, generate_conformer_sets

        settings = ConformerSettings(seed=self.conformer_seed, remove_hs=self.remove_hs, mmff=self.mmff, timeout=self.conformer_timeout)
        sets, report = generate_conformer_sets(smiles, self.num_conformers, settings, self.conformer_cache, self.conformer_workers,
                                               add_2d=self.conformer_2d)  # fmt: skip
        self.fallback_2d_rows = [rows[i] for i in report.fallback_2d]
        self.repeated_conformer_rows = {rows[i]: report.distinct[i] for i in report.repeated}
        check_atoms_left([len(confs[0].atoms) for confs in sets], smiles, named, path)
        self.note_unknown_atoms([confs[0].atoms for confs in sets], smiles, rows, named, path)
        features = []
        self.cropped_rows = []
        for i, confs in enumerate(sets):
            atoms = len(confs[0].atoms)  # the same atoms in every conformer of a molecule
            if atoms > self.max_atoms:
                self.too_many_atoms(atoms, smiles[i], rows[i], named[i] if by_name else None, path)
            features.append(ConformerSet(confs, self.dictionary, self.max_atoms, self.conformer_seed + i))
        log.info("%d molecules x %d conformers (%s), %d conformers from the cache", len(smiles), self.num_conformers,
                 f"{self.num_conformers - 1} ETKDG + 1 2D" if self.conformer_2d else "ETKDG", report.from_cache)  # fmt: skip
        if self.repeated_conformer_rows:
            log.warning(
                "%d of %d molecules have fewer than %d distinct conformers (the ETKDG seeds gave the same geometry, as for "
                "rigid or small molecules); the repeats are kept, each counting once in the draws and the average: "
                "rows (distinct conformers) %s",
                len(self.repeated_conformer_rows),
                len(smiles),
                self.num_conformers,
                list(self.repeated_conformer_rows.items())[:20],
            )
        if self.cropped_rows:
            log.warning("%d molecules exceed max_atoms=%d and were cropped to a random subset of atoms (rows %s)",
                        len(self.cropped_rows), self.max_atoms, self.cropped_rows[:20])  # fmt: skip
        if self.fallback_2d_rows:
            log.warning("%d molecules use 2D coordinates for at least one ETKDG seed (ETKDG failed): rows %s",
                        len(self.fallback_2d_rows), self.fallback_2d_rows[:20])  # fmt: skip
        return features.__getitem__

    def note_unknown_atoms(self, atoms: Sequence[Sequence[str]], smiles: Sequence[str], rows: Sequence[int],
                           named: Sequence[str], path: str | os.PathLike[str] | None) -> None:  # fmt: skip
        """Elements the dictionary lacks become ``[UNK]``, as in the official code and unimol_tools
        (their ``Dictionary.index``); counted in ``unknown_atom_rows`` and logged with the rows, since
        a released model has one embedding for all of them (Pt, Cu, Mg, Xe ... in mol.dict.txt)."""
        known = set(self.dictionary.indices)
        self.unknown_atom_rows = {}
        first = -1
        for i, each in enumerate(atoms):
            missing = sorted({atom for atom in each if atom not in known})
            if missing:
                self.unknown_atom_rows[rows[i]] = missing
                first = i if first < 0 else first
        if self.unknown_atom_rows:
            elements = sorted({e for found in self.unknown_atom_rows.values() for e in found})
            log.warning(
                "%s: %d of %d molecules hold elements the Uni-Mol dictionary lacks (%s); they are read as [UNK], as the "
                "official code does (rows %s; e.g. %s %r). Pass a dictionary with them to learn them apart.",
                path or "molecules",
                len(self.unknown_atom_rows),
                len(atoms),
                ", ".join(elements),
                list(self.unknown_atom_rows)[:20],
                named[first],
                smiles[first],
            )

    def too_many_atoms(self, atoms: int, smiles: str, row: int, name: str | None, path: str | os.PathLike[str] | None) -> None:
        """A molecule over ``max_atoms``: an error (``max_atoms_policy="error"``) or counted as cropped."""
        if self.max_atoms_policy == "error":
            message = (f"{smiles!r} has {atoms} atoms{'' if self.remove_hs else ' (with hydrogens)'}, more than "
                       f"max_atoms={self.max_atoms}. Raise max_atoms, use remove_hs=True, or max_atoms_policy='crop'.")  # fmt: skip
            # a CSV row goes in DataError's own "file, row N" place; an SD record is named with its title
            if name is None:
                raise DataError(message, path=path, row=row)
            raise DataError(f"{name}: {message}", path=path)
        self.cropped_rows.append(row)

    def file_conformers(self, conformers: Sequence[Any] | None, rows: Sequence[int], names: Sequence[str] | None = None,
                        path: str | os.PathLike[str] | None = None) -> list[Any]:  # fmt: skip
        """An SD file's coordinates, hydrogens removed for no-H models; 2D records refused
        (flat coordinates would reach the model as if they were a geometry)."""
        from polyfm.mol.conformers import Conformer

        if conformers is None:
            raise ConfigError(
                "conformers='from_file' takes each molecule's 3D coordinates from an SD file, and this input has none "
                "(a CSV or a list of SMILES): give an .sdf / .sdf.gz file, or use conformers='etkdg'."
            )
        flat = [i for i, conformer in enumerate(conformers) if not conformer.is_3d]
        if flat:
            shown = "" if names is None else f" ({'; '.join(names[i] for i in flat[:10])}{' ...' if len(flat) > 10 else ''})"
            raise DataError(
                f"conformers='from_file' needs 3D coordinates, and {len(flat)} records have 2D ones (records {[rows[i] for i in flat[:20]]})"
                f"{shown}: give a file with 3D conformers, or use conformers='etkdg' to generate them.",
                path=path,
            )
        placed = [rows[i] for i, conformer in enumerate(conformers) if conformer.message]
        if placed and not self.remove_hs:
            log.info("%d records had implicit hydrogens; RDKit placed them from the heavy atoms (records %s)", len(placed), placed[:20])
        if not self.remove_hs:
            return list(conformers)
        kept = []
        for conformer in conformers:
            heavy = [i for i, atom in enumerate(conformer.atoms) if atom != "H"]
            kept.append(Conformer([conformer.atoms[i] for i in heavy], conformer.coordinates[heavy], True))
        return kept

    def collate(self) -> UniMolCollate:
        return UniMolCollate(self.dictionary.pad)


def check_conformer_options(num_conformers: int, conformer_2d: bool, conformers: str = "etkdg", model: str = "unimol") -> None:
    """The multi-conformer options that are wrong whatever the data."""
    if num_conformers < 1:
        raise ConfigError(f"num_conformers={num_conformers}: give 1 (one ETKDG conformer) or more (Uni-Mol's protocol: 11).")
    if num_conformers == 1 and not conformer_2d:
        return
    if model != "unimol":
        raise ConfigError(f"num_conformers / conformer_2d are for model='unimol' (3D input); {model} reads SMILES only: leave them unset.")
    if conformers == "from_file":
        raise ConfigError(f"num_conformers={num_conformers} with conformers='from_file': an SD file gives one conformer per "
                          "record; use num_conformers=1, or conformers='etkdg' to generate several.")  # fmt: skip
    if conformer_2d and num_conformers < 2:
        raise ConfigError("conformer_2d=True makes the last of num_conformers the 2D one, so it needs num_conformers >= 2 "
                          "(the official Uni-Mol data: num_conformers=11, 10 ETKDG + 1 2D).")  # fmt: skip


def check_hydrogens(task: Any, featuriser: Featuriser) -> None:
    """Released Uni-Mol weights were trained with every hydrogen (``unimol-mol-all-h``) or none
    (``unimol-mol-no-h``): feeding the other kind runs, but on inputs the model never saw
    (unimol_tools picks the checkpoint from ``remove_hs``, so it cannot happen there)."""
    from polyfm.mol.models.unimol import UniMol

    if not isinstance(featuriser, UniMolFeaturiser) or not isinstance(task, torch.nn.Module):
        return
    model = task if isinstance(task, UniMol) else next((m for m in task.modules() if isinstance(m, UniMol)), None)
    if model is None or model.hydrogens is None or model.hydrogens != featuriser.remove_hs:
        return
    kind, fix = ("with all hydrogens", "false") if model.hydrogens else ("without hydrogens", "true")
    raise ConfigError(
        f"the Uni-Mol weights were pretrained {kind}, but the data has remove_hs={featuriser.remove_hs}: pass "
        f"remove_hs={fix.capitalize()} (--data.init_args.remove_hs={fix}), or the other released weights "
        f"({'unimol-mol-no-h' if model.hydrogens else 'unimol-mol-all-h'})."
    )


def make_featuriser(model: str, **options: Any) -> Featuriser:
    if model == "chemberta":
        keys: tuple[str, ...] = ("tokenizer", "tokenizer_kind", "max_length")
        return ChemBERTaFeaturiser(**{k: v for k, v in options.items() if k in keys})
    if model == "unimol":
        keys = (
            "dictionary",
            "remove_hs",
            "max_atoms",
            "max_atoms_policy",
            "conformer_seed",
            "mmff",
            "conformer_cache",
            "conformer_workers",
            "conformer_timeout",
            "conformers",
            "num_conformers",
            "conformer_2d",
        )
        return UniMolFeaturiser(**{k: v for k, v in options.items() if k in keys})
    raise ConfigError(f"unknown model {model!r}: use chemberta or unimol.")


# ----------------------------------------------------------------------------- DataModules


class MoleculeDataModule(DictDataModule):
    """Property prediction from a MoleculeNet-style CSV or an SD file (``.sdf``, ``.sdf.gz``:
    ``csv_path`` and ``predict_path`` take either, told by the suffix), for ChemBERTa or Uni-Mol.

    Batches: ``{"input": dict of tensors, "target": (B, T) float with NaN for missing,
    "meta": ["row N: SMILES", ...]}``. After ``setup()``: ``table``, ``split`` (indices
    into the table), ``target_names``, ``num_tasks``, ``target_mean``/``target_std``
    (training split, NaN-aware). ``predict_path``: a CSV of new molecules for ``predict``
    (default: the test split); ``polyfm.mol.predict.MoleculePredictionWriter`` writes the results.
    ``conformers="from_file"`` (Uni-Mol, SD files) feeds each record's own 3D coordinates instead of ETKDG's.
    ``num_conformers=K`` (Uni-Mol, ETKDG): K conformers per molecule (seeds ``conformer_seed`` + 0..K-1;
    with ``conformer_2d`` the last is RDKit's 2D coordinates, the official 10 + 1), one drawn per molecule
    and epoch in training (:class:`ConformerDrawSampler`), all K in each evaluation and prediction batch
    for :mod:`polyfm.mol.tasks` to average per molecule (other tasks are refused).

    Cross-validation (``fold`` 0 .. ``num_folds`` - 1, ``polyfm cv``): with ``fold`` set it takes
    precedence over ``split_fractions``. Molecules are dealt into ``num_folds`` folds by
    :func:`polyfm.core.data.fold_indices` (``seed`` breaks ties), whole Bemis-Murcko scaffolds at a
    time for ``split="scaffold"`` / ``"scaffold_balanced"`` (both the same here), one by one for
    ``split="random"``; ``"stratified"`` is refused. Fold ``k`` is the validation and the test
    split, the other folds the training split."""

    def __init__(
        self,
        csv_path: str,
        model: Literal["chemberta", "unimol"] = "chemberta",
        smiles_column: str = "smiles",
        target_columns: list[str] | None = None,
        split: SplitKind = "scaffold",
        split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
        canonicalize: bool = True,
        skip_invalid: bool = False,
        fragments: FragmentPolicy = "keep",
        delimiter: str | None = None,
        duplicates: DuplicatePolicy = "keep",
        tokenizer: str | None = None,
        tokenizer_kind: Literal["hub", "smiles"] = "hub",
        max_length: int = 128,
        dictionary: str | None = None,
        remove_hs: bool = False,
        max_atoms: int = 256,
        max_atoms_policy: Literal["crop", "error"] = "crop",
        conformer_seed: int = 42,
        mmff: bool = True,
        conformer_cache: str | None = None,
        conformer_workers: int = 1,
        conformer_timeout: int = 10,
        conformers: ConformerSource = "etkdg",
        num_conformers: int = 1,
        conformer_2d: bool = False,
        batch_size: int = 32,
        num_workers: int = 0,
        label_fraction: float = 1.0,
        seed: int = 0,
        predict_path: str | None = None,
        fold: int | None = None,
        num_folds: int = 5,
    ) -> None:
        check_fold_options(fold, num_folds, split)
        check_conformer_options(num_conformers, conformer_2d, conformers, model)
        self.featuriser = make_featuriser(
            model,
            tokenizer=tokenizer,
            tokenizer_kind=tokenizer_kind,
            max_length=max_length,
            dictionary=dictionary,
            remove_hs=remove_hs,
            max_atoms=max_atoms,
            max_atoms_policy=max_atoms_policy,
            conformer_seed=conformer_seed,
            mmff=mmff,
            conformer_cache=conformer_cache,
            conformer_workers=conformer_workers,
            conformer_timeout=conformer_timeout,
            conformers=conformers,
            num_conformers=num_conformers,
            conformer_2d=conformer_2d,
        )
        self.num_conformers = num_conformers
        if conformers == "from_file" and model != "unimol":
            raise ConfigError(f"conformers='from_file' is for model='unimol' (3D input); {model} reads SMILES only: leave conformers unset.")
        super().__init__(
            batch_size=batch_size,
            num_workers=num_workers,
            label_fraction=label_fraction,
            seed=seed,
            collate_fn=self.featuriser.collate(),
        )
        self.csv_path, self.model, self.smiles_column, self.target_columns = csv_path, model, smiles_column, target_columns
        self.split_kind, self.split_fractions = split, tuple(split_fractions)
        self.fold, self.num_folds = fold, num_folds
        self.canonicalize, self.skip_invalid, self.fragments, self.delimiter = canonicalize, skip_invalid, fragments, delimiter
        if duplicates not in ("keep", "first", "error"):  # before reading anything
            raise ConfigError(f"duplicates={duplicates!r}: use 'keep' (kept and logged), 'first' (first row only) or 'error'.")
        self.duplicates = duplicates
        self.table: MoleculeTable | None = None
        self.split: tuple[NDArray[Any], NDArray[Any], NDArray[Any]] | None = None
        self.predict_path = predict_path
        # what `predict` ran on (new molecules, or the test split), for MoleculePredictionWriter
        self.predict_table: MoleculeTable | None = None

    def read(self) -> MoleculeTable:
        if self.table is None:
            self.table = read_molecules(
                self.csv_path,
                self.smiles_column,
                self.target_columns,
                self.canonicalize,
                self.skip_invalid,
                self.fragments,
                self.delimiter,
                self.duplicates,
            )
            if self.fold is None:
                self.split = split_indices(self.split_kind, self.table.smiles, self.table.targets, self.split_fractions, self.seed)
            else:
                self.split = molecule_fold(self.table, self.fold, self.num_folds, self.split_kind, self.seed)
            log.info(self.table.summary())
        return self.table

    @property
    def target_names(self) -> list[str]:
        return self.read().target_names

    @property
    def num_tasks(self) -> int:
        return len(self.target_names)

    def target_statistics(self) -> tuple[list[float], list[float]]:
        """NaN-aware mean and std of each target on the training split (for Regression)."""
        table = self.read()
        assert self.split is not None
        train = table.targets[self.split[0]]
        with np.errstate(all="ignore"):
            mean = np.nan_to_num(np.nanmean(train, axis=0))
            std = np.nan_to_num(np.nanstd(train, axis=0), nan=1.0)
        std[std < 1e-8] = 1.0
        return mean.astype(float).tolist(), std.astype(float).tolist()

    @property
    def target_mean(self) -> list[float]:
        return self.target_statistics()[0]

    @property
    def target_std(self) -> list[float]:
        return self.target_statistics()[1]

    def build(self) -> tuple[MoleculeDataset, MoleculeDataset, MoleculeDataset]:
        table = self.read()
        assert self.split is not None
        featurise = self.featuriser.prepare(table.smiles, table.rows, table.conformers, table.record_names(), table.path)
        meta = table.meta()

        def subset(indices: NDArray[Any]) -> MoleculeDataset:
            idx = indices.tolist()
            return MoleculeDataset(
                [table.smiles[i] for i in idx], table.targets[idx], [meta[i] for i in idx], indexed(featurise, idx)
            )

        if not len(self.split[0]):
            raise ConfigError(
                f"{table.path}: the {self.split_kind} split left no training molecules (one scaffold covers "
                f"{len(self.split[2])} of {len(table)}); use split='random' or 'scaffold_balanced', or more varied data."
            )
        return subset(self.split[0]), subset(self.split[1]), subset(self.split[2])

    def setup(self, stage: str | None = None) -> None:
        if self.trainer is not None:  # before the conformers are generated
            check_hydrogens(self.trainer.lightning_module, self.featuriser)
        if self.trainer is not None and self.num_conformers > 1:
            self.check_conformer_task(self.trainer.lightning_module)
        super().setup(stage)
        if stage == "fit" and self.trainer is not None:
            self.check_task(self.trainer.lightning_module)

    def check_conformer_task(self, task: Any) -> None:
        """With several conformers an evaluation batch holds K rows per molecule; a task that
        does not average them by molecule would score conformers, or fail on the shapes."""
        if not getattr(task, "averages_conformers", False):
            raise ConfigError(
                f"num_conformers={self.num_conformers} needs a task that averages each molecule's conformers: "
                f"{type(task).__name__} does not. Use polyfm.mol.tasks.MoleculeRegression or MoleculeClassification "
                "(same arguments as polyfm.core.tasks' Regression / Classification), or num_conformers=1."
            )

    def train_dataloader(self) -> Any:
        """One conformer per molecule and draw (:class:`ConformerDrawSampler`) with ``num_conformers > 1``."""
        if self.num_conformers == 1 or self.train_set is None:
            return super().train_dataloader()
        return conformer_draw_loader(self, self.train_set, self.num_conformers)

    def check_task(self, task: Any) -> None:
        """A recipe's task names its targets and their statistics; fitting it to another CSV's
        columns would train the head on the wrong scale (or fail with a bare shape error)."""
        head = getattr(task, "head", None)
        linears = [m for m in head.modules() if isinstance(m, torch.nn.Linear)] if isinstance(head, torch.nn.Module) else []
        if not linears or getattr(task, "multilabel", True) is False:  # not one output per target column
            return
        outputs = linears[-1].out_features
        names = getattr(task, "target_names", None) or getattr(task, "class_names", None)
        wanted = self.target_names
        if outputs == len(wanted) and (names is None or list(names) == wanted):
            return
        is_regression = hasattr(task, "target_mean")
        fixes = [f"--model.init_args.{'num_targets' if is_regression else 'num_classes'}={len(wanted)}"]
        if is_regression:
            mean, std = self.target_statistics()
            fixes += [
                f"--model.init_args.target_names='{json_list(wanted)}'",
                f"--model.init_args.target_mean='{json_list([round(m, 4) for m in mean])}'",
                f"--model.init_args.target_std='{json_list([round(s, 4) for s in std])}'",
            ]
        elif names is not None:
            fixes.append(f"--model.init_args.class_names='{json_list(wanted)}'")
        raise ConfigError(
            f"{self.table.path if self.table else self.csv_path}: the data has {len(wanted)} target columns {wanted}, but the "
            f"model predicts {outputs} output(s){f' named {list(names)}' if names else ''}. Set the task for these columns "
            f"(statistics from the training split): {' '.join(fixes)}"
        )

    def train_smiles(self) -> list[str]:
        """Canonical SMILES of the molecules the model is trained on: the training split (fold),
        after ``label_fraction``. Read from the data each call, never part of the module's state."""
        from torch.utils.data import Subset

        if self.train_set is None:
            self.setup()
        train = self.train_set
        if isinstance(train, Subset):
            return [train.dataset.smiles[i] for i in train.indices]  # type: ignore[attr-defined]  # a Subset of a MoleculeDataset
        return list(train.smiles)  # type: ignore[union-attr]  # a MoleculeDataset once set up

    def predict_dataloader(self) -> Any:
        """The molecules of ``predict_path`` (a CSV or SD file of new molecules; every other
        column or property kept), else the test split."""
        if self.predict_path is None:
            table = self.read()
            assert self.split is not None
            self.predict_table = table.subset(self.split[2])
            return self.test_dataloader()
        table = read_molecules(
            self.predict_path, self.smiles_column, [], self.canonicalize, self.skip_invalid, self.fragments, self.delimiter
        )
        featurise = self.featuriser.prepare(table.smiles, table.rows, table.conformers, table.record_names(), table.path)
        self.predict_table = table
        return self._loader(MoleculeDataset(table.smiles, table.targets, table.meta(), featurise), False)

    def train_labels(self) -> list[Any] | None:
        table = self.read()
        assert self.split is not None
        train = table.targets[self.split[0]]
        if train.shape[1] == 1 and np.all(np.isin(train[~np.isnan(train)], (0.0, 1.0))):
            return [int(v) if not np.isnan(v) else -1 for v in train[:, 0]]
        return None


class MoleculePretrainDataModule(DictDataModule):
    """Unlabelled molecules for pretraining: SMILES from a CSV column, an SD file, or a list.

    ``targets="descriptors"`` adds ChemBERTa-2's MTR targets: RDKit descriptors computed on
    the fly at setup and standardised with the training split's statistics. With
    ``descriptors_from`` (a released MTR checkpoint: ``chemberta-2-77m-mtr`` or a hub folder) the
    targets are that checkpoint's descriptors in its order, standardised with its
    ``norm_mean``/``norm_std`` as upstream does (NaN/Inf -> 0, no log, no clipping), so continued
    pretraining optimises the released objective. A random ``val_fraction`` is held out.

    ``num_conformers=K`` (Uni-Mol; with ``conformer_2d`` the last is the 2D one, the official
    10 + 1) generates K conformers per molecule as :class:`MoleculeDataModule` does (the same
    seeds and cache entries) and trains on one per molecule and epoch
    (:func:`conformer_draw_loader`: seeded by ``seed`` and the epoch, resumable mid-epoch, what the
    official ``ConformerSampleDataset`` does). Validation takes one conformer per molecule drawn
    once from ``seed`` (:func:`fixed_conformer_draws`), so its loss costs what K=1 costs and
    compares across epochs."""

    def __init__(
        self,
        csv_path: str | None = None,
        smiles: list[str] | None = None,
        model: Literal["chemberta", "unimol"] = "chemberta",
        smiles_column: str = "smiles",
        targets: Literal["none", "descriptors"] = "none",
        descriptors_from: str | None = None,
        val_fraction: float = 0.1,
        skip_invalid: bool = True,
        tokenizer: str | None = None,
        tokenizer_kind: Literal["hub", "smiles"] = "hub",
        max_length: int = 128,
        dictionary: str | None = None,
        remove_hs: bool = False,
        max_atoms: int = 256,
        conformer_seed: int = 42,
        mmff: bool = True,
        conformer_cache: str | None = None,
        conformer_workers: int = 1,
        conformer_timeout: int = 10,
        num_conformers: int = 1,
        conformer_2d: bool = False,
        batch_size: int = 32,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        if (csv_path is None) == (smiles is None):
            raise ConfigError("MoleculePretrainDataModule needs exactly one of csv_path or smiles.")
        check_conformer_options(num_conformers, conformer_2d, "etkdg", model)
        self.num_conformers = num_conformers
        self.featuriser = make_featuriser(
            model,
            tokenizer=tokenizer,
            tokenizer_kind=tokenizer_kind,
            max_length=max_length,
            dictionary=dictionary,
            remove_hs=remove_hs,
            max_atoms=max_atoms,
            conformer_seed=conformer_seed,
            mmff=mmff,
            conformer_cache=conformer_cache,
            conformer_workers=conformer_workers,
            conformer_timeout=conformer_timeout,
            num_conformers=num_conformers,
            conformer_2d=conformer_2d,
        )
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed, collate_fn=self.featuriser.collate())
        self.csv_path, self.smiles_list, self.smiles_column = csv_path, smiles, smiles_column
        self.targets, self.val_fraction, self.skip_invalid = targets, val_fraction, skip_invalid
        if descriptors_from is not None and targets != "descriptors":
            raise ConfigError(f"descriptors_from={descriptors_from!r} needs targets='descriptors' (got {targets!r}).")
        self.descriptors_from = descriptors_from
        self.scaler: DescriptorScaler | ReleasedNormalisation | None = None
        if descriptors_from is not None:  # read now: a wrong checkpoint fails before any molecule is parsed
            self.scaler = released_normalisation(descriptors_from)

    def molecules(self) -> tuple[list[str], list[int]]:
        if self.csv_path is not None:
            table = read_molecules(self.csv_path, self.smiles_column, target_columns=[], skip_invalid=self.skip_invalid)
            return table.smiles, table.rows
        kept: list[str] = []
        rows: list[int] = []
        bad: list[tuple[int, str, str]] = []
        for i, s in enumerate(self.smiles_list or []):
            canonical, _, error = parse_smiles(s)
            if error:
                bad.append((i + 1, s, error))
            else:
                kept.append(canonical)
                rows.append(i + 1)
        if bad and not self.skip_invalid:
            shown = "; ".join(f"entry {i} {text!r}: {why}" for i, text, why in bad[:10]) + (" ..." if len(bad) > 10 else "")
            raise DataError(f"{len(bad)} invalid SMILES in the list (entries from 1): {shown}. Fix them, or pass skip_invalid=True "
                            "to skip them (counted and logged).")  # fmt: skip
        if bad:
            log.warning("skipped %d invalid SMILES of %d", len(bad), len(bad) + len(kept))
        return kept, rows

    @property
    def descriptor_names(self) -> list[str]:
        """The target columns: the released checkpoint's descriptors, or all of RDKit's."""
        if isinstance(self.scaler, ReleasedNormalisation):
            return list(self.scaler.names)
        return descriptor_names()

    @property
    def num_descriptors(self) -> int:
        return len(self.descriptor_names)

    def build(self) -> tuple[MoleculeDataset, MoleculeDataset, MoleculeDataset]:
        smiles, rows = self.molecules()
        n_val = int(round(self.val_fraction * len(smiles))) if len(smiles) > 1 else 0
        order = np.random.default_rng(self.seed).permutation(len(smiles))
        train_idx, val_idx = np.sort(order[n_val:]), np.sort(order[:n_val])
        if self.targets == "descriptors" and isinstance(self.scaler, ReleasedNormalisation):
            targets = self.scaler.transform(compute_descriptors(smiles, self.scaler.names))
        elif self.targets == "descriptors":
            values = compute_descriptors(smiles)
            self.scaler = DescriptorScaler.fit(values[train_idx])
            targets = self.scaler.transform(values)
        else:
            targets = np.zeros((len(smiles), 0), dtype=np.float32)
        featurise = self.featuriser.prepare(smiles, rows)
        meta = [f"row {r}: {s}" for r, s in zip(rows, smiles, strict=True)]

        def subset(indices: NDArray[Any]) -> MoleculeDataset:
            idx = indices.tolist()
            return MoleculeDataset(
                [smiles[i] for i in idx], targets[idx], [meta[i] for i in idx], indexed(featurise, idx)
            )

        val = subset(val_idx) if n_val else subset(train_idx)
        return subset(train_idx), val, val

    def setup(self, stage: str | None = None) -> None:
        if self.trainer is not None:  # before the conformers are generated
            check_hydrogens(self.trainer.lightning_module, self.featuriser)
        super().setup(stage)

    def train_dataloader(self) -> Any:
        """One conformer per molecule and epoch with ``num_conformers > 1`` (:func:`conformer_draw_loader`)."""
        if self.num_conformers == 1 or self.train_set is None:
            return super().train_dataloader()
        return conformer_draw_loader(self, self.train_set, self.num_conformers)

    def val_dataloader(self) -> Any:
        if self.num_conformers == 1 or self.val_set is None:
            return super().val_dataloader()
        return self._loader(fixed_conformer_draws(self.val_set, self.num_conformers, self.seed), False)

    def test_dataloader(self) -> Any:
        if self.num_conformers == 1 or self.val_set is None:
            return super().test_dataloader()
        held_out = self.test_set if self.test_set is not None else self.val_set
        return self._loader(fixed_conformer_draws(held_out, self.num_conformers, self.seed), False)
