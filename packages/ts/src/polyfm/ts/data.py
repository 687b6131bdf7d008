"""Time series in: CSV/Parquet readers with checks, chronological splits, scaling, windows.

The layout is the ETT one: a timestamp column and one numeric column per channel.

    series = read_series("ETTh1.csv")                  # checked; Series(values, timestamps, ...)
    dm = ForecastDataModule("ETTh1.csv", context_length=512, horizon=96, label_fraction=0.05)

Bad input never passes silently. By default each of these raises a ``DataError`` naming
the file, the row and the column: a missing timestamp column, missing, unparsable or duplicated
timestamps, timestamps out of order, irregular steps, a change of the sampling step, gaps, non-numeric
cells, a repeated header name, empty cells (NaN, with the run they start), a series too short for the
split or the window. Where a handling makes
sense it can be asked for, and is then counted and logged (logger ``polyfm.ts``):

* ``on_duplicate="first"|"last"|"mean"``: keep one row per timestamp;
* ``on_gap="nan"``: insert the missing timestamps as empty rows (then ``on_missing`` applies);
* ``on_missing="interpolate"``: linear in time (edges: nearest value);
  ``on_missing="mask"``: keep them unobserved: the context gets ``past_observed_mask``
  (TTM's scaler ignores those points) and windows whose future has a gap are skipped;
* constant channels (zero variance on the train split) are kept with scale 1 and logged
  by default (``on_constant="keep"``), or refused (``"error"``), or dropped (``"drop"``).

Timestamps: pandas infers the format; a day-first file (``13/07/2016``) is read day-first
(logged), numeric timestamps need ``timestamp_format`` (epoch unit or strftime format), UTC
offsets become naive UTC, and complete calendar-step series (months, business days) are regular.
``freq`` (a pandas frequency) sets the step instead of inferring it: a calendar series with gaps is then
regular with ``on_gap="nan"``.

Scaling is a per-channel standard scaler fitted on the train split only (observed points); it is saved
in checkpoints and reused when predicting from one (``ForecastDataModule.state_dict``).
Batches are dicts: ``past_values (B, L, C)``, ``future_values (B, H, C_target)``, and when
relevant ``past_observed_mask``, ``freq_token (B,)``, ``future_known_values (B, H, C)``
(exogenous channels' known future; the target channels are zeroed), plus ``meta``
(``file@timestamp`` of each forecast origin).
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeAlias, cast

import numpy as np
import pandas as pd
import torch
from numpy.typing import NDArray
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Subset

from polyfm.core.data import DictDataModule, expand_paths
from polyfm.core.errors import ConfigError, DataError

log = logging.getLogger("polyfm.ts")

OnMissing = Literal["error", "interpolate", "mask"]
OnDuplicate = Literal["error", "first", "last", "mean"]
OnGap = Literal["error", "nan"]
OnConstant = Literal["keep", "error", "drop"]
# a fixed step (hourly, 15 minutes) or a calendar one (month end, business day); None without timestamps
Step: TypeAlias = pd.Timedelta | pd.DateOffset | None

# granite-tsfm's DEFAULT_FREQUENCY_MAPPING, by step length.
_FREQUENCY_TOKEN_BY_STEP = {
    pd.Timedelta(minutes=1): 1, pd.Timedelta(minutes=2): 2, pd.Timedelta(minutes=5): 3, pd.Timedelta(minutes=10): 4,
    pd.Timedelta(minutes=15): 5, pd.Timedelta(minutes=30): 6, pd.Timedelta(hours=1): 7, pd.Timedelta(days=1): 8,
    pd.Timedelta(weeks=1): 9,
}


def frequency_token(step: Step) -> int:
    """TTM's resolution token for a sampling step (0 = out of vocabulary, e.g. calendar months)."""
    return _FREQUENCY_TOKEN_BY_STEP.get(step, 0) if isinstance(step, pd.Timedelta) else 0


# ----------------------------------------------------------------------------- reading


@dataclass
class Series:
    """A checked multivariate series: ``values (T, C)`` float32 (NaN where unobserved)."""

    values: NDArray[Any]
    columns: list[str]
    timestamps: pd.DatetimeIndex | None
    step: Step
    source: str
    report: dict[str, int] = field(default_factory=dict)
    # on_missing="interpolate": each filled column's first observed data row (0-based), so a split
    # that would be filled only from later rows is refused instead of scaled on future values
    first_observed: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.values)

    @property
    def observed(self) -> NDArray[np.bool_]:
        observed: NDArray[np.bool_] = ~np.isnan(self.values)
        return observed

    def origin_label(self, row: int) -> str:
        return f"{self.source}@{self.timestamps[row]}" if self.timestamps is not None else f"{self.source}@row{row + 1}"

    def future_timestamps(self, after_row: int, horizon: int) -> pd.DatetimeIndex | NDArray[Any]:
        """Timestamps of the ``horizon`` steps after ``after_row`` (integer steps without timestamps)."""
        if self.timestamps is None or self.step is None:
            return np.arange(after_row + 1, after_row + 1 + horizon)
        return pd.date_range(self.timestamps[after_row] + self.step, periods=horizon, freq=self.step)


def _row_text(path: str, index: int) -> str:
    """1-based data row, and the file line for CSV (line 1 is the header)."""
    return f"data row {index + 1} (line {index + 2})" if path.lower().endswith((".csv", ".csv.gz", ".txt")) else f"data row {index + 1}"


def load_frame(path: str | Path) -> pd.DataFrame:
    path = Path(path)
    if not path.exists():
        raise DataError("file not found. Point the reader at a CSV or Parquet file with a timestamp column.", path=path)
    suffixes = "".join(path.suffixes).lower()
    try:
        if suffixes.endswith((".parquet", ".pq")):
            return pd.read_parquet(path)
        if suffixes.endswith((".csv", ".csv.gz", ".txt")):
            return _read_csv(path)
    except DataError:
        raise
    except (ValueError, OSError, pd.errors.ParserError) as exc:
        raise DataError(f"cannot be parsed as {path.suffix.lstrip('.')}: {exc}", path=path) from exc
    raise DataError(f"unsupported format {path.suffix!r}; use .csv or .parquet.", path=path)


def _read_csv(path: Path) -> pd.DataFrame:
    """pandas' reader, plus what spreadsheet exports need: ';'/tab/'|' separators (else one column named
    "date;HUFL;..."), a space after each separator, and Latin-1 text where UTF-8 fails."""
    options: dict[str, Any] = {"skipinitialspace": True}
    try:
        frame = pd.read_csv(path, **options)
    except UnicodeDecodeError:
        log.warning("%s: not UTF-8 text; read as Latin-1", path)
        options["encoding"] = "latin-1"
        frame = pd.read_csv(path, **options)
    header = str(frame.columns[0]) if len(frame.columns) == 1 else ""
    separator = next((sep for sep in (";", "\t", "|") if sep in header), None)
    if separator is not None:
        log.warning("%s: columns separated by %r", path, separator)
        frame = pd.read_csv(path, sep=separator, **options)
    if any(str(c).rpartition(".")[0] in frame.columns for c in frame.columns):  # pandas renames a repeated name 'a' to 'a.1'
        names = [str(c) for c in pd.read_csv(path, sep=separator or ",", header=None, nrows=1, **options).iloc[0]]
        repeated = next((c for c in names if names.count(c) > 1 and c != "nan"), None)  # "nan": empty header cells
        if repeated is not None:
            places = [i + 1 for i, c in enumerate(names) if c == repeated]
            raise DataError(f"the header names column {repeated!r} {len(places)} times (columns {places}); pandas would read the "
                            f"others as {repeated + '.1'!r}, ... Give each column its own name.", path=path, key=repeated)
    return frame


def _drop_row_counters(frame: pd.DataFrame, label: str, report: dict[str, int], keep: Sequence[str] = ()) -> pd.DataFrame:
    """A saved row index (pandas writes it as a header-less first column, read back as 'Unnamed: 0')
    is not a channel: dropped, logged and counted, unless selected in ``keep``. Other unnamed columns are data."""
    counters = []
    for column in frame.columns:
        values = frame[column]
        if column in keep:
            continue
        if str(column).startswith("Unnamed: ") and pd.api.types.is_integer_dtype(values.dtype) and len(values):
            start = int(values.iloc[0])
            if start in (0, 1) and np.array_equal(values.to_numpy(), np.arange(start, start + len(values))):
                counters.append(column)
    if counters:
        log.warning("%s: dropped the row-number column(s) %s (a saved index, not a channel)", label, counters)
        report["dropped_index_columns"] = len(counters)
    return frame.drop(columns=counters)


def _timestamps_from_index(frame: pd.DataFrame, timestamp_column: str | None, label: str) -> pd.DataFrame:
    """Parquet files and DataFrames often keep the time axis as a DatetimeIndex: make it the timestamp column."""
    if timestamp_column is None or timestamp_column in frame.columns or not isinstance(frame.index, pd.DatetimeIndex):
        return frame
    log.warning("%s: no column %r; timestamps taken from the DatetimeIndex %r", label, timestamp_column, frame.index.name)
    return frame.rename_axis(timestamp_column).reset_index()


def read_series(
    source: str | Path | pd.DataFrame,
    timestamp_column: str | None = "date",
    columns: Sequence[str] | None = None,
    on_missing: OnMissing = "error",
    on_duplicate: OnDuplicate = "error",
    on_gap: OnGap = "error",
    sort: bool = False,
    name: str | None = None,
    timestamp_format: str | None = None,
    freq: str | None = None,
) -> Series:
    """Read and check a series from a file or a DataFrame (see the module doc for the checks).

    ``columns`` selects the channels (default: every column but the timestamp). With
    ``timestamp_column=None`` the rows are taken as equally spaced steps. ``timestamp_format``
    is a strftime format (``"%d.%m.%Y %H:%M"``, ``"%Y%m%d"``) or, for numeric timestamps, the
    epoch unit (``"s"``, ``"ms"``, ``"us"``, ``"ns"``); by default pandas infers it. ``freq`` (a pandas
    frequency: ``"h"``, ``"15min"``, ``"MS"``, ``"B"``) is the sampling step the timestamps must follow (gaps in
    it handled by ``on_gap``); by default the step is inferred from the timestamps.
    """
    offset = parse_freq(freq)
    if isinstance(source, pd.DataFrame):
        frame, label = source.copy(), name or "<DataFrame>"
    else:
        frame, label = load_frame(source), name or str(source)
    if frame.empty:
        raise DataError("holds no rows.", path=label)
    report: dict[str, int] = {}

    timestamps: pd.DatetimeIndex | None = None
    frame = _timestamps_from_index(_drop_row_counters(frame, label, report, keep=columns or ()), timestamp_column, label)
    if timestamp_column is not None:
        if timestamp_column not in frame.columns:
            raise DataError(
                f"no timestamp column {timestamp_column!r}; columns are {list(frame.columns)}. "
                "Pass timestamp_column=<name> (or None for equally spaced rows).",
                path=label,
            )
        parsed = parse_timestamps(frame[timestamp_column], label, timestamp_column, timestamp_format, report)
        frame = frame.drop(columns=[timestamp_column])
        frame.index = pd.DatetimeIndex(parsed)

    selected = list(columns) if columns is not None else list(frame.columns)
    missing_cols = [c for c in selected if c not in frame.columns]
    if missing_cols:
        raise DataError(f"no column(s) {missing_cols}; columns are {list(frame.columns)}.", path=label)
    if not selected:
        raise DataError("has no channel columns besides the timestamp.", path=label)
    numeric = {}
    for column in selected:
        raw = frame[column]
        values = raw if pd.api.types.is_numeric_dtype(raw.dtype) and not pd.api.types.is_bool_dtype(raw.dtype) else pd.to_numeric(raw, errors="coerce")
        bad = np.flatnonzero(values.isna().to_numpy() & raw.notna().to_numpy())
        if len(bad):
            i = int(bad[0])
            ids = raw.nunique()
            if len(bad) == len(raw) and frame.index.has_duplicates and 1 < ids <= len(raw) // 2:
                raise DataError(  # several series stacked in one file (granite-tsfm's id_columns)
                    f"column {column!r} looks like a series id: the file stacks {ids} series (long format, e.g. "
                    f"{raw.iloc[0]!r}). polyfm reads one series per file: pass one of them as a DataFrame, e.g. "
                    f"df[df[{column!r}] == {raw.iloc[0]!r}], or pivot the file to one column per channel; "
                    f"ForecastDataModule(..., id_columns=[{column!r}]) windows every series.",
                    path=label, key=column,
                )
            raise DataError(
                f"{_row_text(label, i)}: value {raw.iloc[i]!r} is not numeric ({len(bad)} such cells in this column). "
                "Channels must be numbers; select numeric channels with columns=[...].",
                path=label, key=column,
            )
        numeric[column] = values.astype("float64")
    data = pd.DataFrame(numeric, index=frame.index)

    step: Step = None
    if timestamps is None and timestamp_column is not None:
        data, step, report = _check_time_axis(data, label, on_duplicate, on_gap, sort, report, offset)
        timestamps = pd.DatetimeIndex(data.index)

    values = data.to_numpy(dtype=np.float64, copy=True)
    first_observed: dict[str, int] = {}
    nan = np.isnan(values) | np.isinf(values)
    values[nan] = np.nan
    if nan.any():
        if on_missing == "error":
            row, col = (int(v) for v in np.argwhere(nan)[0])
            run = _run_length(nan[:, col], row)
            where = f", the first of a run of {run} to data row {row + run}" if run > 1 else ""
            raise DataError(
                f"{_row_text(label, row)}: empty or non-finite value{where} ({int(nan.sum())} in the file). "
                "Fill the gaps, or pass on_missing='interpolate' or 'mask'.",
                path=label, key=selected[col],
            )
        if on_missing == "interpolate":
            filled = data.where(~pd.DataFrame(nan, index=data.index, columns=data.columns))
            if timestamps is not None:
                filled = filled.interpolate(method="time", limit_direction="both")
            else:
                filled = filled.interpolate(limit_direction="both")
            values = filled.to_numpy(dtype=np.float64)
            first_observed = {c: int(np.argmin(nan[:, i])) for i, c in enumerate(selected) if nan[0, i]}
            report["interpolated_values"] = int(nan.sum())
            log.warning("%s: interpolated %d missing values (%s)", label, int(nan.sum()),
                        ", ".join(f"{c}: {int(n)}{_longest_run_text(nan[:, i])}" for i, (c, n) in enumerate(zip(selected, nan.sum(0))) if n))
            if np.isnan(values).any():
                bad_cols = [c for c, n in zip(selected, np.isnan(values).all(0)) if n]
                raise DataError(f"column(s) {bad_cols} have no value at all; drop them with columns=[...].", path=label)
        elif on_missing == "mask":
            report["masked_values"] = int(nan.sum())
            log.warning("%s: %d missing values kept as unobserved (masked)", label, int(nan.sum()))
        else:
            raise ConfigError(f"on_missing={on_missing!r}: use 'error', 'interpolate' or 'mask'.")
    return Series(values.astype(np.float32), selected, timestamps, step, label, report, first_observed)


def _run_length(missing: NDArray[np.bool_], row: int) -> int:
    """How many missing values in a row start at ``row``."""
    after = np.flatnonzero(~missing[row:])
    return int(after[0]) if len(after) else len(missing) - row


def _longest_run_text(missing: NDArray[np.bool_]) -> str:
    """', longest run 81 (data rows 101-181)' for the log: a long run interpolated is a straight line, worth seeing."""
    edges = np.diff(np.concatenate(([0], missing.astype(np.int8), [0])))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    longest = int(np.argmax(ends - starts))
    length = int(ends[longest] - starts[longest])
    return f", longest run {length} (data rows {starts[longest] + 1}-{ends[longest]})" if length > 1 else ""


EPOCH_UNITS = ("s", "ms", "us", "ns")


def parse_timestamps(raw: pd.Series, label: str, column: str, timestamp_format: str | None, report: dict[str, int]) -> pd.Series:
    """Timestamps as naive datetimes (time-zone aware ones converted to UTC), or a DataError naming the row."""
    numeric = pd.api.types.is_numeric_dtype(raw.dtype) and not pd.api.types.is_bool_dtype(raw.dtype)
    if timestamp_format in EPOCH_UNITS:
        if not numeric:
            raise DataError(f"timestamp_format={timestamp_format!r} is an epoch unit, but the column is not numeric "
                            f"(first value {raw.iloc[0]!r}); pass a strftime format instead.", path=label, key=column)
        return pd.to_datetime(raw, unit=timestamp_format, errors="coerce").pipe(_check_parsed, raw, label, column)
    if numeric and timestamp_format is None:
        # pandas would read 1467331200 as nanoseconds after 1970 and 20160701 likewise: never what a file means
        raise DataError(
            f"timestamp column holds numbers (first {raw.iloc[0]}), not dates. Pass timestamp_format='s' or 'ms' "
            "(epoch seconds/milliseconds), a strftime format such as '%Y%m%d', or timestamp_column=None for equally spaced rows.",
            path=label, key=column,
        )
    text = raw.astype(str) if numeric else raw
    parsed = _to_datetime(text, timestamp_format)
    if timestamp_format is None and parsed.isna().any():
        # "13/07/2016": the format inferred from the first row was month-first; a day-first file parses whole
        with warnings.catch_warnings():  # a speculative second reading: pandas' format-inference notes are noise here
            warnings.simplefilter("ignore", UserWarning)
            dayfirst = _to_datetime(text, None, dayfirst=True)
        if dayfirst.notna().all():
            log.warning("%s: timestamps are day-first (e.g. %r); read them so", label, raw.iloc[0])
            report["dayfirst_timestamps"] = 1
            parsed = dayfirst
    return _check_parsed(parsed, raw, label, column)


def _to_datetime(text: pd.Series, timestamp_format: str | None, dayfirst: bool = False) -> pd.Series:
    try:
        parsed = pd.to_datetime(text, format=timestamp_format, errors="coerce", dayfirst=dayfirst)
    except ValueError:  # mixed UTC offsets (local time across a DST change): compare them in UTC
        parsed = pd.to_datetime(text, format=timestamp_format, errors="coerce", dayfirst=dayfirst, utc=True)
    if getattr(parsed.dt, "tz", None) is not None:
        parsed = parsed.dt.tz_convert(None)
    return parsed


def _check_parsed(parsed: pd.Series, raw: pd.Series, label: str, column: str) -> pd.Series:
    bad = np.flatnonzero(parsed.isna().to_numpy())
    empty = bad[raw.iloc[bad].isna().to_numpy() | raw.iloc[bad].astype(str).str.strip().isin(["", "nan", "NaN", "NaT", "None"]).to_numpy()]
    if len(empty):  # a row without its timestamp cannot be placed in time
        i = int(empty[0])
        raise DataError(
            f"{_row_text(label, i)}: the timestamp is missing (an empty or NaT cell; {len(empty)} such rows). Fill it in, or remove those rows "
            "(the gap they leave is an error too, or empty rows with on_gap='nan').",
            path=label, key=column,
        )
    if len(bad):
        i = int(bad[0])
        raise DataError(
            f"{_row_text(label, i)}: timestamp {raw.iloc[i]!r} cannot be parsed ({len(bad)} such rows). Fix or remove them, "
            "or pass timestamp_format (a strftime format such as '%d.%m.%Y %H:%M').",
            path=label, key=column,
        )
    return parsed


def _calendar_step(index: pd.DatetimeIndex) -> pd.DateOffset | None:
    """The calendar frequency (month end, quarter start, business day, ...) of a complete index, if it has one."""
    from pandas.tseries.frequencies import to_offset
    from pandas.tseries.offsets import Tick

    with warnings.catch_warnings():  # pandas 3 announces a change of the return type (string -> offset)
        warnings.simplefilter("ignore", DeprecationWarning)
        inferred = pd.infer_freq(index)
    if inferred is None:
        return None
    offset = to_offset(inferred)
    return None if isinstance(offset, Tick) else offset


def parse_freq(freq: str | None) -> pd.DateOffset | None:
    """A pandas frequency alias as an offset, or a ConfigError saying what is accepted."""
    if freq is None:
        return None
    from pandas.tseries.frequencies import to_offset

    try:
        return to_offset(freq)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"freq={freq!r} is not a pandas frequency: use an alias such as 'h', '15min', 'D', 'W', 'MS' "
                          f"(month start), 'ME' (month end) or 'B' (business day) ({exc}).") from exc


def _step_of(offset: pd.DateOffset) -> Step:
    """Fixed steps (hours, minutes, days) as a Timedelta, as inferred steps are; calendar ones stay offsets."""
    from pandas.tseries.offsets import Tick

    return pd.Timedelta(offset) if isinstance(offset, Tick) else offset


def _check_on_grid(
    data: pd.DataFrame, label: str, offset: pd.DateOffset, on_gap: OnGap, report: dict[str, int]
) -> tuple[pd.DataFrame, Step, dict[str, int]]:
    """The timestamps against a given frequency: every one on its grid, gaps handled by ``on_gap``."""
    grid = pd.date_range(data.index[0], data.index[-1], freq=offset).as_unit("ns")
    off_grid = np.flatnonzero(~data.index.isin(grid))
    if len(off_grid):
        i = int(off_grid[0])
        raise DataError(f"{_row_text(label, i)}: timestamp {data.index[i]} is not on the {offset.freqstr!r} grid that freq asks for "
                        f"({len(off_grid)} such rows; the grid from the first timestamp {data.index[0]}). Give the series' own "
                        "frequency, or leave freq unset to infer it.", path=label)
    missing = len(grid) - len(data)
    if missing:
        i = int(np.flatnonzero(grid[: len(data)] != data.index)[0])
        if on_gap == "error":
            raise DataError(f"{_row_text(label, i)}: {data.index[i - 1]} is followed by {data.index[i]}, a gap in the "
                            f"{offset.freqstr!r} steps ({missing} missing timestamps in the file). Fill them, or pass on_gap='nan' "
                            "to insert empty rows.", path=label)
        data = data.reindex(grid)
        report["inserted_rows"] = missing
        log.warning("%s: inserted %d missing timestamps as empty rows", label, missing)
    return data, _step_of(offset), report


def _step_change(deltas: NDArray[np.int64], min_run: int = 10) -> tuple[tuple[int, int], tuple[int, int]] | None:
    """Where the rows switch from one regular step to another (each held for ``min_run`` steps or more): the two runs
    as (first, last) rows. A gap is one long step inside a run of equal ones, never a run of its own."""
    change = np.flatnonzero(np.diff(deltas)) + 1
    starts, ends = np.concatenate(([0], change)), np.concatenate((change, [len(deltas)]))
    long = ends - starts >= min_run
    runs = [(int(a), int(b)) for a, b in zip(starts[long], ends[long])]
    steps = [int(deltas[a]) for a, _ in runs]
    change_at = next((k for k, step in enumerate(steps) if step != steps[0]), None)
    # a stretch in another step that returns to the first one (every other row missing for a while) is gaps, not a change
    if change_at is None or steps[0] in steps[change_at:]:
        return None
    return runs[change_at - 1], runs[change_at]


def _alias(step: pd.Timedelta) -> str:
    from pandas.tseries.frequencies import to_offset

    return str(to_offset(step).freqstr)


def _check_time_axis(
    data: pd.DataFrame, label: str, on_duplicate: OnDuplicate, on_gap: OnGap, sort: bool, report: dict[str, int],
    offset: pd.DateOffset | None = None,
) -> tuple[pd.DataFrame, Step, dict[str, int]]:
    data.index = pd.DatetimeIndex(data.index).as_unit("ns")  # pandas may parse to s/us units
    index = data.index
    if not index.is_monotonic_increasing:
        if not sort:
            i = int(np.flatnonzero(np.diff(index.asi8) < 0)[0]) + 1
            raise DataError(
                f"{_row_text(label, i)}: timestamp {index[i]} comes before the previous row's {index[i - 1]}. "
                "Sort the file by time, or pass sort=True (if the file stacks several series, read one at a time).",
                path=label,
            )
        order = np.argsort(index.asi8, kind="stable")
        data = data.iloc[order]
        report["sorted"] = 1
        log.warning("%s: rows sorted by timestamp", label)
    duplicated = data.index.duplicated(keep="first")
    if duplicated.any():
        i = int(np.flatnonzero(duplicated)[0])
        if on_duplicate == "error":
            raise DataError(
                f"{_row_text(label, i)}: timestamp {data.index[i]} repeats the previous row ({int(duplicated.sum())} duplicates). "
                "Remove them, or pass on_duplicate='first', 'last' or 'mean' (if the file stacks several series, read one at a time).",
                path=label,
            )
        if on_duplicate == "mean":
            data = data.groupby(level=0, sort=True).mean()
        else:
            data = data[~data.index.duplicated(keep=on_duplicate)]
        report["duplicate_rows"] = int(duplicated.sum())
        log.warning("%s: %d duplicated timestamps resolved with '%s'", label, int(duplicated.sum()), on_duplicate)
    if offset is not None and len(data):
        return _check_on_grid(data, label, offset, on_gap, report)
    if len(data) < 2:
        return data, None, report
    deltas = np.diff(data.index.asi8)
    if len(data) >= 3 and (deltas != deltas[0]).any():
        calendar = _calendar_step(data.index)
        if calendar is not None:  # months, quarters, years, business days: regular, but not in fixed time
            return data, calendar, report
    step_ns = int(pd.Series(deltas).mode().iloc[0])
    step = pd.Timedelta(step_ns, unit="ns")
    irregular = np.flatnonzero(deltas % step_ns != 0)
    change = _step_change(deltas)
    if change is not None and (on_gap == "error" or len(irregular)):  # else reported as a gap or as off-grid steps: misleading
        (first, last), (new_first, new_last) = change
        old, new = (pd.Timedelta(int(deltas[i]), unit="ns") for i in (first, new_first))
        fine, coarse = sorted((old, new))
        raise DataError(
            f"{_row_text(label, new_first + 1)}: the sampling step changes from {old} (data rows {first + 1}-{last + 1}) to {new} "
            f"(data rows {new_first + 1}-{new_last + 1}); a series needs one step. Resample it to the coarser step (pandas: "
            f"df.resample({_alias(coarse)!r}).mean() on the timestamp index), or pass freq={_alias(fine)!r} with on_gap='nan' "
            "to keep the finer grid with the steps it lacks empty.",
            path=label,
        )
    if len(irregular):
        i = int(irregular[0]) + 1
        raise DataError(
            f"{_row_text(label, i)}: timestamp {data.index[i]} is off the regular {step} grid of the series "
            f"({len(irregular)} such steps; the steps around it: {', '.join(str(pd.Timedelta(int(d), unit='ns')) for d in deltas[i - 1:i + 2])}). "
            "Resample the series to a fixed step (e.g. pandas DataFrame.resample), or, if the rows follow a calendar "
            "frequency with gaps (months, business days), pass it as freq (e.g. freq='MS') with on_gap='nan'.",
            path=label,
        )
    gaps = np.flatnonzero(deltas > step_ns)
    if len(gaps):
        i = int(gaps[0]) + 1
        missing = int((deltas[gaps] // step_ns - 1).sum())
        if on_gap == "error":
            raise DataError(
                f"{_row_text(label, i)}: {data.index[i - 1]} is followed by {data.index[i]}, a gap in the {step} steps "
                f"({missing} missing timestamps in the file). Fill them, or pass on_gap='nan' to insert empty rows.",
                path=label,
            )
        data = data.reindex(pd.date_range(data.index[0], data.index[-1], freq=step).as_unit("ns"))
        report["inserted_rows"] = missing
        log.warning("%s: inserted %d missing timestamps as empty rows", label, missing)
    return data, step, report


# ----------------------------------------------------------------------------- splits and scaling


def split_borders(length: int, step: Step, split: str | Sequence[float] = "ett") -> tuple[int, int, int]:
    """End rows of train, validation and test.

    ``"ett"``: the ETT benchmark split, 12/4/4 months of 30 days (ETTh1: 8640/11520/14400 rows;
    15-minute ETTm: four times as many). Fractions ``(train, val, test)``: Informer's split
    of the whole series (e.g. ``(0.7, 0.1, 0.2)``).
    """
    if isinstance(split, str):
        if split != "ett":
            raise ConfigError(f"split={split!r}: use 'ett' or fractions (train, val, test).")
        if not isinstance(step, pd.Timedelta):
            raise ConfigError(f"the 'ett' split is by time and needs timestamps with a fixed step (got {step!r}); "
                              "use split fractions, e.g. [0.7, 0.1, 0.2].")
        month = int(pd.Timedelta(days=30) / step)
        borders = (12 * month, 16 * month, 20 * month)
        if length < borders[2]:
            raise DataError(f"has {length} rows; the ETT split (12/4/4 months of {step} steps) needs {borders[2]}. "
                            "Use split fractions for shorter series.")
        return borders
    if len(split) != 3 or not all(f >= 0 for f in split) or sum(split) > 1.0 + 1e-9:
        raise ConfigError(f"split fractions {split} must be three non-negative numbers summing to at most 1.")
    train, test = int(length * split[0]), int(length * split[2])
    val = int(length * (split[0] + split[1])) if sum(split) < 1.0 - 1e-9 else length - test
    end = val + test if sum(split) >= 1.0 - 1e-9 else int(length * sum(split))
    return train, val, min(end, length)


@dataclass
class StandardScaler:
    """Per-channel mean/std fitted on observed training points; constant channels get std 1."""

    mean: NDArray[Any]
    std: NDArray[Any]
    columns: list[str]

    @classmethod
    def fit(cls, values: NDArray[Any], columns: list[str], source: str = "", on_constant: OnConstant = "keep") -> StandardScaler:
        with np.errstate(invalid="ignore"), warnings.catch_warnings():  # an unobserved channel: named below, not as numpy's warning
            warnings.simplefilter("ignore", RuntimeWarning)
            mean = np.nanmean(values, axis=0)
            std = np.nanstd(values, axis=0)
        empty = [c for c, m in zip(columns, mean) if np.isnan(m)]
        if empty:
            raise DataError(f"channel(s) {empty} have no observed value in the train split: drop them (columns=[...]), or give "
                            "the train split rows where they are observed.", path=source or None)
        constant = [c for c, s in zip(columns, std) if s < 1e-8]
        if constant:
            if on_constant == "error":
                raise DataError(f"channel(s) {constant} are constant on the train split; drop them or pass on_constant='keep'.",
                                path=source or None)
            log.warning("%s: constant channel(s) %s on the train split: scaled with std 1", source, constant)
        std = np.where(std < 1e-8, 1.0, std)
        return cls(mean.astype(np.float32), std.astype(np.float32), list(columns))

    def transform(self, values: NDArray[Any]) -> NDArray[np.float32]:
        scaled: NDArray[np.float32] = ((values - self.mean) / self.std).astype(np.float32)
        return scaled

    def inverse(self, values: NDArray[Any] | torch.Tensor, channels: Sequence[int] | None = None) -> Any:
        mean, std = (self.mean, self.std) if channels is None else (self.mean[list(channels)], self.std[list(channels)])
        if isinstance(values, torch.Tensor):
            return values * torch.as_tensor(std, device=values.device) + torch.as_tensor(mean, device=values.device)
        return values * std + mean


def constant_channels(values: NDArray[Any], columns: list[str]) -> list[str]:
    with np.errstate(invalid="ignore"), warnings.catch_warnings():  # an unobserved channel is named by StandardScaler.fit
        warnings.simplefilter("ignore", RuntimeWarning)
        return [c for c, s in zip(columns, np.nanstd(values, axis=0)) if not s > 1e-8]


# ----------------------------------------------------------------------------- windows


class WindowDataset(Dataset[dict[str, Any]]):
    """(context, horizon) windows whose forecast origins are ``origins`` (row of the first future step)."""

    def __init__(
        self,
        series: Series,
        scaled: NDArray[Any],
        origins: NDArray[Any],
        context_length: int,
        horizon: int,
        target_indices: Sequence[int],
        exogenous_indices: Sequence[int] = (),
        freq_token: int | None = None,
        with_mask: bool = False,
    ):
        self.series, self.origins = series, np.asarray(origins, dtype=np.int64)
        observed = ~np.isnan(scaled)
        self.values = torch.from_numpy(np.nan_to_num(scaled, nan=0.0))
        self.observed = torch.from_numpy(observed)
        self.context_length, self.horizon = context_length, horizon
        self.targets = torch.as_tensor(list(target_indices), dtype=torch.long)
        self.exogenous = list(exogenous_indices)
        self.freq_token, self.with_mask = freq_token, with_mask

    def __len__(self) -> int:
        return len(self.origins)

    def __getitem__(self, index: int) -> dict[str, Any]:
        origin = int(self.origins[index])
        past = slice(origin - self.context_length, origin)
        future = slice(origin, origin + self.horizon)
        item: dict[str, Any] = {
            "past_values": self.values[past],
            "future_values": self.values[future][:, self.targets],
            "meta": self.series.origin_label(origin),
        }
        if self.with_mask:
            item["past_observed_mask"] = self.observed[past].float()
        if self.freq_token is not None:
            item["freq_token"] = torch.tensor(self.freq_token, dtype=torch.long)
        if self.exogenous:
            known = torch.zeros_like(self.values[future])
            known[:, self.exogenous] = self.values[future][:, self.exogenous]
            item["future_known_values"] = known
        return item


def window_origins(
    start: int, end: int, context_length: int, horizon: int, stride: int, inside: bool, observed: NDArray[Any] | None = None
) -> NDArray[Any]:
    """Forecast origins t with the future [t, t+H) inside [start, end) and the context [t-L, t) inside
    the split (``inside``, for training) or anywhere before it (evaluation, as the benchmarks do).
    With ``observed`` (targets' mask), windows whose future is not fully observed are left out."""
    first = start + context_length if inside else max(start, context_length)
    origins = np.arange(first, end - horizon + 1, stride)
    if observed is not None and len(origins):
        complete = np.lib.stride_tricks.sliding_window_view(observed.all(1), horizon)[origins].all(1)
        origins = origins[complete]
    return origins


# ----------------------------------------------------------------------------- the DataModule


@dataclass
class SeriesPart:
    """One series of a ForecastDataModule: checked values, split borders, train-fitted scaler."""

    series: Series
    borders: tuple[int, int, int]
    scaler: StandardScaler


class ForecastDataModule(DictDataModule):
    """Windows of a series with the standard chronological splits, scaled with train statistics.

    ``label_fraction`` (e.g. 0.05, 0.1) keeps that fraction for few-shot fine-tuning: the windows in
    the latest training rows (``fewshot_location="last"``, granite-tsfm's ``get_datasets`` selection)
    or a seeded uniform sample of windows (``"uniform"``). ``target_columns`` are forecast;
    ``exogenous_columns`` have a known future (TTM's exogenous mixer); other ``columns`` are past-only
    inputs. ``id_columns`` reads a long-format file of several series: each is split, scaled and
    few-shot-selected on its own, and the windows are concatenated in id order (granite-tsfm's
    ``id_columns``).

    The fitted scalers are the DataModule's ``state_dict``, which Lightning keeps in every checkpoint:
    predicting or testing from a checkpoint (``ckpt_path``) scales new data as the training data was,
    instead of refitting on the new file (see ``load_state_dict``). ``predict_mode="test"`` predicts every
    test window; ``"future"`` one window per series, its last ``context_length`` rows, for the ``horizon``
    steps after the data (timestamps continued at ``freq``, by default the step inferred from the data).
    """

    def __init__(
        self,
        path: str,
        context_length: int = 512,
        horizon: int = 96,
        timestamp_column: str | None = "date",
        columns: list[str] | None = None,
        target_columns: list[str] | None = None,
        exogenous_columns: list[str] | None = None,
        split: str | list[float] = "ett",
        train_stride: int = 1,
        eval_stride: int = 1,
        use_freq_token: bool = False,
        on_missing: OnMissing = "error",
        on_duplicate: OnDuplicate = "error",
        on_gap: OnGap = "error",
        on_constant: OnConstant = "keep",
        fewshot_location: Literal["last", "uniform"] = "last",
        batch_size: int = 64,
        num_workers: int = 0,
        label_fraction: float = 1.0,
        seed: int = 0,
        timestamp_format: str | None = None,
        id_columns: list[str] | None = None,
        freq: str | None = None,
        predict_mode: Literal["test", "future"] = "test",
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, label_fraction=label_fraction, seed=seed)
        self.timestamp_format, self.id_columns = timestamp_format, list(id_columns or [])
        parse_freq(freq)  # a wrong alias fails here, before any file is read
        if predict_mode not in ("test", "future"):
            raise ConfigError(f"predict_mode={predict_mode!r}: use 'test' (every test window, with the truth) or 'future' "
                              "(the horizon after the end of each series).")
        self.freq, self.predict_mode = freq, predict_mode
        self.saved_scaling: dict[str, Any] | None = None  # a checkpoint's scalers (load_state_dict), used instead of fitting
        if context_length < 1 or horizon < 1 or train_stride < 1 or eval_stride < 1:
            raise ConfigError("context_length, horizon and strides must be positive.")
        if fewshot_location not in ("last", "uniform"):
            raise ConfigError(f"fewshot_location={fewshot_location!r}: use 'last' or 'uniform'.")
        self.path, self.context_length, self.horizon = path, context_length, horizon
        self.timestamp_column, self.columns = timestamp_column, columns
        self.target_columns, self.exogenous_columns = target_columns, exogenous_columns or []
        self.split = split if isinstance(split, str) else tuple(split)
        self.train_stride, self.eval_stride, self.use_freq_token = train_stride, eval_stride, use_freq_token
        self.on_missing, self.on_duplicate, self.on_gap, self.on_constant = on_missing, on_duplicate, on_gap, on_constant
        self.fewshot_location = fewshot_location
        self.series: Series | None = None  # the series (and its scaler, borders) when there is one
        self.scaler: StandardScaler | None = None
        self.parts: list[SeriesPart] = []  # every series: one, or one per id with id_columns
        self.scalers: dict[str, StandardScaler] = {}  # by series source (the part of ``meta`` before '@')
        self.frame: pd.DataFrame | None = None
        self.series_ids: dict[str, dict[str, Any]] = {}  # series source -> its id values (with id_columns)
        self._prepared = False

    @classmethod
    def from_frame(cls, frame: pd.DataFrame, name: str = "<DataFrame>", **kwargs: Any) -> ForecastDataModule:
        """The same, over an in-memory DataFrame (``name`` labels it in errors and ``meta``)."""
        dm = cls(path=name, **kwargs)
        dm.frame = frame
        return dm

    # --- what a model needs to know

    def prepare(self) -> None:
        """Read, check, split and fit the scaler(s) (idempotent; ``setup`` calls it)."""
        if self._prepared:
            return
        source = self.frame if self.frame is not None else os.path.expandvars(self.path)  # "$POLYFM_DATA_DIR/ts/..." in recipes
        name = self.path if self.frame is not None else None
        if self.id_columns:
            all_series = self._read_grouped(source, name or str(source))
        else:
            all_series = [self._read(source, name)]
        columns = all_series[0].columns
        saved = self.saved_scaling
        if saved is not None:
            all_series = self._with_saved_columns(all_series, saved["columns"])
            columns = all_series[0].columns
        if saved is not None and self.predict_mode == "future":
            # the checkpoint's scaling and only the last window: no split, so a file of recent rows will do
            borders = [(len(series),) * 3 for series in all_series]
        else:
            borders = [split_borders(len(series), series.step, self.split) for series in all_series]
        constant = set() if saved is not None else {c for series, b in zip(all_series, borders) for c in constant_channels(series.values[: b[0]], series.columns)}
        if constant and self.on_constant == "drop":  # dropped from every series, so all keep the same channels
            keep = [i for i, c in enumerate(columns) if c not in constant]
            if not keep:
                raise DataError("every channel is constant on the train split.", path=all_series[0].source)
            dropped = [c for c in columns if c in constant]
            log.warning("%s: dropped %d constant channel(s) %s", self.path, len(dropped), dropped)
            all_series = [Series(s.values[:, keep], [columns[i] for i in keep], s.timestamps, s.step, s.source,
                                 {**s.report, "dropped_constant_channels": len(dropped)}, s.first_observed) for s in all_series]
            columns = all_series[0].columns
        elif constant:
            for series, b in zip(all_series, borders):
                if count := len(constant_channels(series.values[: b[0]], series.columns)):
                    series.report["constant_channels"] = count
        unknown = [c for c in [*(self.target_columns or []), *self.exogenous_columns] if c not in columns]
        if unknown:
            raise DataError(f"target/exogenous column(s) {unknown} are not among the channels {columns}.", path=all_series[0].source)
        exogenous = [columns.index(c) for c in self.exogenous_columns]
        if self.target_columns is not None:
            targets = [columns.index(c) for c in self.target_columns]
        else:
            targets = [i for i in range(len(columns)) if i not in exogenous]
        if set(targets) & set(exogenous) or not targets:
            raise ConfigError("target_columns must be non-empty and disjoint from exogenous_columns.")
        self.target_indices, self.exogenous_indices = sorted(targets), sorted(exogenous)
        needed = self.context_length + self.horizon
        self.parts = []
        for series, b in zip(all_series, borders):
            if saved is not None:
                self.parts.append(SeriesPart(series, b, self._saved_scaler(series, saved)))
                continue
            if b[0] < needed:
                raise DataError(
                    f"the train split has {b[0]} rows, fewer than context_length + horizon = {needed}. "
                    "Use a shorter context or horizon, or a longer series"
                    + (" (to forecast from a file of recent rows only, predict from a checkpoint: it holds the scaling)."
                       if self.predict_mode == "future" else "."),
                    path=series.source,
                )
            unobserved = {c: row for c, row in series.first_observed.items() if c in series.columns and row >= b[0]}
            if unobserved:  # interpolation filled the whole train split from later (validation/test) rows
                raise DataError(
                    f"channel(s) {sorted(unobserved)} have no observed value in the train split (data rows 1-{b[0]}); the "
                    f"first is at data row(s) {[row + 1 for row in unobserved.values()]}, so on_missing='interpolate' would "
                    "fill and scale the train split with later values. Drop them (columns=[...]) or use on_missing='mask'.",
                    path=series.source,
                )
            # one scaler per series, fitted on its own train split (granite-tsfm scales by id_columns too)
            scaler = StandardScaler.fit(series.values[: b[0]], series.columns, series.source, self.on_constant)
            self.parts.append(SeriesPart(series, b, scaler))
        self.scalers = {part.series.source: part.scaler for part in self.parts}
        if len(self.parts) == 1:
            self.series, self.borders, self.scaler = self.parts[0].series, self.parts[0].borders, self.parts[0].scaler
        self._prepared = True

    def _read(self, source: str | pd.DataFrame, name: str | None) -> Series:
        return read_series(source, self.timestamp_column, self.columns, self.on_missing, self.on_duplicate, self.on_gap,
                           name=name, timestamp_format=self.timestamp_format, freq=self.freq)

    # --- the scaling a checkpoint carries

    def _series_key(self, source: str) -> str:
        """A series' name in the saved scaling: its id values (``station=A``), or "" for a file of one series, so
        that the same series in another file (recent rows only) finds its scaler."""
        return ", ".join(f"{c}={v}" for c, v in self.series_ids.get(source, {}).items())

    def state_dict(self) -> dict[str, Any]:
        """The fitted scalers as plain lists (checkpoints are read with ``weights_only=True``):
        ``{"scaling": {"columns": [...], "series": {<id values or "">: {"mean": [...], "std": [...]}}}}``."""
        if not self._prepared:
            return {"scaling": self.saved_scaling} if self.saved_scaling is not None else {}
        return {"scaling": {
            "columns": list(self.parts[0].series.columns),
            "series": {self._series_key(part.series.source): {"mean": [float(v) for v in part.scaler.mean],
                                                              "std": [float(v) for v in part.scaler.std]} for part in self.parts},
        }}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Use a checkpoint's scalers from now on (Lightning calls this for ``ckpt_path``, after ``setup``):
        windows built with scalers fitted on this data are rebuilt, unless those are the same."""
        scaling = state_dict.get("scaling")
        if scaling is None:
            return
        columns, series = scaling.get("columns"), scaling.get("series")
        if not isinstance(columns, list) or not isinstance(series, dict) or not series or any(
                len(entry.get("mean", ())) != len(columns) or len(entry.get("std", ())) != len(columns) for entry in series.values()):
            raise ConfigError(f"the checkpoint's ForecastDataModule state is not a scaling of {columns} per series: "
                              "give a checkpoint written by polyfm fit with a ForecastDataModule.")
        if self._prepared and self.state_dict()["scaling"] == scaling:
            self.saved_scaling = scaling
            return  # resuming a fit on the same data: nothing changes
        self.saved_scaling = scaling
        self._prepared = False
        self.train_set = self.val_set = self.test_set = None

    def _with_saved_columns(self, all_series: list[Series], saved_columns: list[str]) -> list[Series]:
        """The series with the checkpoint's channels, or an error naming the difference."""
        columns = all_series[0].columns
        if columns == saved_columns:
            return all_series
        missing = [c for c in saved_columns if c not in columns]
        if not missing and self.on_constant == "drop":  # channels dropped as constant when the checkpoint was fitted
            keep = [columns.index(c) for c in saved_columns]
            return [Series(s.values[:, keep], list(saved_columns), s.timestamps, s.step, s.source, s.report, s.first_observed)
                    for s in all_series]
        extra = [c for c in columns if c not in saved_columns]
        raise DataError(
            f"the channels {columns} differ from those the checkpoint was trained and scaled with, {saved_columns} "
            f"(missing {missing}, extra {extra}{', other order' if not missing and not extra else ''}). "
            "Select and order them with columns=[...] (in a recipe: --data.init_args.columns=[...]).",
            path=all_series[0].source,
        )

    def _saved_scaler(self, series: Series, saved: dict[str, Any]) -> StandardScaler:
        key = self._series_key(series.source)
        entry = saved["series"].get(key)
        if entry is None:
            known = [k or "<the one series>" for k in saved["series"]]
            raise DataError(
                f"series {key or '<the one series>'} has no scaler in the checkpoint, which was fitted on {known[:6]}"
                f"{f' and {len(known) - 6} more' if len(known) > 6 else ''}. Predict the series it was trained on "
                "(with the same id_columns), or fine-tune on this one.",
                path=series.source,
            )
        return StandardScaler(np.asarray(entry["mean"], dtype=np.float32), np.asarray(entry["std"], dtype=np.float32),
                              list(series.columns))

    # --- forecasting past the end

    def future_dataset(self) -> FutureWindows:
        """One window per series: its last ``context_length`` rows, scaled (``predict_mode="future"``)."""
        self.prepare()
        if self.exogenous_indices:
            names = [self.parts[0].series.columns[i] for i in self.exogenous_indices]
            raise ConfigError(f"predict_mode='future' cannot know the future of the exogenous channels {names}: forecast with "
                              "polyfm.ts.forecast.forecast(model, history, scaler=dm.scaler, future_exogenous=...) instead.")
        for part in self.parts:
            if len(part.series) < self.context_length:
                raise DataError(f"has {len(part.series)} rows; forecasting past the end needs the last context_length = "
                                f"{self.context_length} rows.", path=part.series.source)
        token = (lambda part: frequency_token(part.series.step)) if self.use_freq_token else (lambda part: None)
        return FutureWindows([(part.series.source, part.scaler.transform(part.series.values[-self.context_length:]), token(part))
                              for part in self.parts], with_mask=self.on_missing == "mask")

    def future_timestamps(self, part: SeriesPart) -> pd.DatetimeIndex | NDArray[Any]:
        """The ``horizon`` timestamps after a series' last row, at its step (``freq``, or inferred when read);
        row numbers for a series without timestamps."""
        return part.series.future_timestamps(len(part.series) - 1, self.horizon)

    def _read_grouped(self, source: str | pd.DataFrame, label: str) -> list[Series]:
        """One checked series per value of ``id_columns`` (long format), in sorted id order as granite-tsfm;
        each is named ``file[id=value]`` in errors and ``meta`` (its rows are counted within the series)."""
        frame = source if isinstance(source, pd.DataFrame) else load_frame(source)
        frame = _drop_row_counters(frame, label, {}, keep=[*self.id_columns, *(self.columns or [])])
        frame = _timestamps_from_index(frame, self.timestamp_column, label)
        missing = [c for c in self.id_columns if c not in frame.columns]
        if missing:
            raise DataError(f"no id column(s) {missing}; columns are {list(frame.columns)}.", path=label)
        empty = np.flatnonzero(frame[self.id_columns].isna().any(axis=1).to_numpy())
        if len(empty):
            raise DataError(f"{_row_text(label, int(empty[0]))}: the series id is empty ({len(empty)} such rows).",
                            path=label, key=self.id_columns[0])
        series = []
        for key, group in frame.groupby(self.id_columns, sort=True):
            key = key if isinstance(key, tuple) else (key,)
            name = f"{label}[{', '.join(f'{c}={v}' for c, v in zip(self.id_columns, key))}]"
            self.series_ids[name] = dict(zip(self.id_columns, key))
            series.append(self._read(group.drop(columns=self.id_columns).reset_index(drop=True), name))
        return series

    def model_config(self) -> dict[str, Any]:
        """TTM channel settings matching these batches (pass them to ``TTM(...)``)."""
        self.prepare()
        n = len(self.parts[0].series.columns)
        all_targets = self.target_indices == list(range(n))
        return {
            "num_input_channels": n,
            "prediction_channel_indices": None if all_targets else self.target_indices,
            "exogenous_channel_indices": self.exogenous_indices or None,
        }

    @property
    def freq_token(self) -> int:
        """The first series' frequency token (each series' windows carry their own)."""
        self.prepare()
        return frequency_token(self.parts[0].series.step)

    def dataset(self, stage: Literal["train", "val", "test"], stride: int | None = None) -> WindowDataset | ConcatDataset[Any]:
        """The windows of ``stage``: one ``WindowDataset``, or their concatenation over the series (id order)."""
        self.prepare()
        windows = [self._windows(part, stage, stride) for part in self.parts]
        return windows[0] if len(windows) == 1 else ConcatDataset(windows)

    def calibration_windows(self) -> list[tuple[SeriesPart, WindowDataset]]:
        """Each series and its validation windows (``eval_stride`` apart), the calibration set of conformal prediction
        intervals (``polyfm.ts.predict``); possibly empty, the caller says how many it needs. Predicting past the end
        from a checkpoint uses no split, so the validation rows are those of ``split`` on the file."""
        self.prepare()
        calibration = []
        for part in self.parts:
            borders = part.borders
            if borders[0] == borders[1]:  # predict_mode="future" from a checkpoint: borders (len,)*3
                try:
                    borders = split_borders(len(part.series), part.series.step, self.split)
                except DataError as exc:  # e.g. the ETT split on a file of recent rows: no validation rows at all
                    raise ConfigError(f"{part.series.source}: prediction intervals are calibrated on the validation split, and "
                                      f"this series has none ({exc}). Predict from the file the model was fitted on, or use "
                                      "split fractions the series is long enough for.") from exc
            calibration.append((part, self._windows(part, "val", None, borders=borders, allow_empty=True)))
        return calibration

    def calibration_dataloader(self, windows: Sequence[WindowDataset] | None = None) -> DataLoader[Any]:
        """The validation windows of every series (``calibration_windows``, or ``windows`` from it) in one loader, in order."""
        windows = [w for w in (windows if windows is not None else [w for _, w in self.calibration_windows()]) if len(w)]
        if not windows:
            raise ConfigError(f"{self.path}: no validation window of context {self.context_length} + horizon {self.horizon} "
                              "to calibrate prediction intervals on: give the split a longer validation part.")
        return self._loader(windows[0] if len(windows) == 1 else ConcatDataset(windows), False)

    def _windows(self, part: SeriesPart, stage: Literal["train", "val", "test"], stride: int | None,
                 borders: tuple[int, int, int] | None = None, allow_empty: bool = False) -> WindowDataset:
        series, scaler, borders = part.series, part.scaler, borders or part.borders
        scaled = scaler.transform(series.values)
        start, end = {"train": (0, borders[0]), "val": (borders[0], borders[1]), "test": (borders[1], borders[2])}[stage]
        stride = stride or (self.train_stride if stage == "train" else self.eval_stride)
        target_observed = series.observed[:, self.target_indices] if self.on_missing == "mask" else None
        origins = window_origins(start, end, self.context_length, self.horizon, stride, stage == "train", target_observed)
        all_origins = origins
        if target_observed is not None:
            all_origins = window_origins(start, end, self.context_length, self.horizon, stride, stage == "train")
            if len(all_origins) > len(origins):
                log.warning("%s %s: skipped %d of %d windows whose future has missing targets", series.source, stage,
                            len(all_origins) - len(origins), len(all_origins))
                series.report[f"{stage}_windows_skipped"] = len(all_origins) - len(origins)
        if not len(origins) and not allow_empty:
            rows = max(0, end - start)
            if len(all_origins):
                why = (f"the future of each of its {len(all_origins)} windows has missing targets (on_missing='mask'): fill those "
                       "gaps, or use on_missing='interpolate'")
            elif rows < self.horizon:
                why = (f"it has {rows} rows, fewer than the horizon {self.horizon}: give it more rows (split fractions such as "
                       "[0.7, 0.1, 0.2], or a longer series) or use a shorter horizon")
            else:
                why = "the context of its first window would start before the first row: use a shorter context or a longer series"
            raise DataError(
                f"the {stage} split (data rows {start + 1}-{end}) yields no window of context {self.context_length} + horizon "
                f"{self.horizon}: {why}.",
                path=series.source,
            )
        return WindowDataset(
            series, scaled, origins, self.context_length, self.horizon, self.target_indices, self.exogenous_indices,
            frequency_token(series.step) if self.use_freq_token else None, with_mask=self.on_missing == "mask",
        )

    def build(self) -> tuple[Dataset[Any], Dataset[Any], Dataset[Any]]:
        return self.dataset("train"), self.dataset("val"), self.dataset("test")

    def _check_model(self) -> None:
        """Under a Trainer (recipes), refuse a TTM built for other channels or another horizon before the first
        batch, with the settings to change, instead of a shape error deep in the forward pass."""
        from polyfm.ts.forecast import check_model_fits_data  # forecast imports this module

        trainer = getattr(self, "trainer", None)
        model = getattr(getattr(trainer, "lightning_module", None), "model", None)
        if model is not None:
            check_model_fits_data(model, self)

    def setup(self, stage: str | None = None) -> None:
        if stage == "predict":
            return  # predict_dataloader builds the windows: after Lightning has loaded the checkpoint's scaling
        self._check_model()
        if self.train_set is not None:
            return
        train, self.val_set, self.test_set = self.build()
        if self.label_fraction < 1.0:  # per series, as granite-tsfm selects per id
            # dataset() builds one WindowDataset per series (concatenated for several); build() is typed as core's
            datasets = cast("list[WindowDataset]", train.datasets if isinstance(train, ConcatDataset) else [train])
            chosen, offset = [], 0
            for i, (part, windows) in enumerate(zip(self.parts, datasets)):
                picked = fewshot_indices(windows.origins, part.borders[0], self.context_length, self.label_fraction,
                                         self.fewshot_location, self.seed + i)
                chosen.append(offset + picked)
                offset += len(windows)
            train = Subset(train, np.concatenate(chosen).tolist())
        self.train_set = train


    def _built(self) -> None:
        if self.train_set is None:  # not set up yet, or a checkpoint's scaling arrived after setup
            self.setup("fit")

    def train_dataloader(self) -> DataLoader[Any]:
        self._built()
        return super().train_dataloader()

    def val_dataloader(self) -> DataLoader[Any] | list[Any]:
        self._built()
        return super().val_dataloader()

    def test_dataloader(self) -> DataLoader[Any]:
        self._built()
        return super().test_dataloader()

    def predict_dataloader(self) -> DataLoader[Any]:
        """The test windows (``predict_mode="test"``), or each series' last window (``"future"``)."""
        self._check_model()
        if self.predict_mode == "future":
            return self._loader(self.future_dataset(), False)
        return self.test_dataloader()


class FutureWindows(Dataset[dict[str, Any]]):
    """The last context of each series, for forecasting past the end: no ``future_values``;
    ``meta`` is ``<series>@future``."""

    def __init__(self, contexts: list[tuple[str, NDArray[Any], int | None]], with_mask: bool = False):
        self.contexts, self.with_mask = contexts, with_mask

    def __len__(self) -> int:
        return len(self.contexts)

    def __getitem__(self, index: int) -> dict[str, Any]:
        source, scaled, token = self.contexts[index]
        item: dict[str, Any] = {"past_values": torch.from_numpy(np.nan_to_num(scaled, nan=0.0)), "meta": f"{source}@future"}
        if self.with_mask:
            item["past_observed_mask"] = torch.from_numpy(~np.isnan(scaled)).float()
        if token is not None:
            item["freq_token"] = torch.tensor(token, dtype=torch.long)
        return item


def fewshot_indices(origins: NDArray[Any], train_rows: int, context_length: int, fraction: float, location: str = "last",
                    seed: int = 0) -> NDArray[Any]:
    """Indices (into ``origins``) of the few-shot training windows.

    ``"last"`` is granite-tsfm's ``get_datasets(fewshot_fraction=f, fewshot_location="last")``: the windows
    lying wholly in the last ``int(f * (train_rows - context_length)) + context_length`` training rows
    (at least the last window). ``"uniform"``: a seeded sample of ``round(f * windows)`` windows.
    """
    if not 0.0 < fraction <= 1.0:
        raise ConfigError(f"label_fraction must be in (0, 1], got {fraction}.")
    length = len(origins)
    if location == "last":
        first_origin = train_rows - int(fraction * (train_rows - context_length))
        kept = np.flatnonzero(np.asarray(origins) >= first_origin)
        if not len(kept):
            log.warning("label_fraction=%s keeps fewer training rows than one window: using the last window", fraction)
            kept = np.arange(length - 1, length)
        return kept
    count = max(1, int(round(length * fraction)))
    return np.sort(np.random.default_rng(seed).choice(length, size=count, replace=False))


# ----------------------------------------------------------------------------- pretraining on many series


def expand_sources(paths: Sequence[str | Path]) -> list[Path]:
    """Files as given, and the CSV/Parquet files inside folders (sorted)."""
    return expand_paths(paths, (".csv", ".parquet", ".pq"), "series files or folders of them")


def downsample(values: NDArray[Any], factor: int) -> NDArray[Any]:
    """Mean over non-overlapping blocks of ``factor`` steps (a coarser resolution of the same series)."""
    if factor == 1:
        return values
    usable = len(values) // factor * factor
    with np.errstate(invalid="ignore"):
        means: NDArray[Any] = np.nanmean(values[:usable].reshape(-1, factor, values.shape[1]), axis=1)
        return means


class UnivariateWindows(Dataset[dict[str, Any]]):
    """Windows over many univariate series (channels are independent in TTM pretraining)."""

    def __init__(self, series: list[tuple[NDArray[Any], str, int]], context_length: int, horizon: int, origins: list[NDArray[Any]],
                 use_freq_token: bool):
        self.series = [torch.from_numpy(np.nan_to_num(v).astype(np.float32)) for v, _, _ in series]
        self.observed = [torch.from_numpy(~np.isnan(v)) for v, _, _ in series]
        self.labels = [label for _, label, _ in series]
        self.tokens = [token for _, _, token in series]
        self.index = np.concatenate([np.stack([np.full(len(o), i), o], 1) for i, o in enumerate(origins) if len(o)]) \
            if any(len(o) for o in origins) else np.zeros((0, 2), dtype=np.int64)
        self.context_length, self.horizon, self.use_freq_token = context_length, horizon, use_freq_token

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, index: int) -> dict[str, Any]:
        which, origin = (int(v) for v in self.index[index])
        values = self.series[which]
        item: dict[str, Any] = {
            "past_values": values[origin - self.context_length : origin, None],
            "future_values": values[origin : origin + self.horizon, None],
            "past_observed_mask": self.observed[which][origin - self.context_length : origin, None].float(),
            "meta": f"{self.labels[which]}@{origin}",
        }
        if self.use_freq_token:
            item["freq_token"] = torch.tensor(self.tokens[which], dtype=torch.long)
        return item


class PretrainDataModule(DictDataModule):
    """TTM pretraining data: many series (files or folders of CSV/Parquet), every channel a
    univariate series, each also downsampled by ``resolutions`` (the paper's augmentation across
    resolutions; the frequency token follows the new step). Each series is standard-scaled with
    its first ``1 - val_fraction`` part, which gives the training windows; the rest validates.
    ``max_windows`` caps the windows per series and resolution (evenly spaced)."""

    def __init__(
        self,
        paths: list[str],
        context_length: int = 512,
        horizon: int = 96,
        resolutions: list[int] | None = None,
        timestamp_column: str | None = "date",
        stride: int = 1,
        max_windows: int | None = 2000,
        val_fraction: float = 0.1,
        use_freq_token: bool = False,
        on_missing: OnMissing = "interpolate",
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
        timestamp_format: str | None = None,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed)
        self.timestamp_format = timestamp_format
        self.paths, self.context_length, self.horizon = list(paths), context_length, horizon
        self.resolutions = list(resolutions or [1, 2, 4])
        self.timestamp_column, self.stride, self.max_windows = timestamp_column, stride, max_windows
        self.val_fraction, self.use_freq_token, self.on_missing = val_fraction, use_freq_token, on_missing
        self.frames: list[tuple[pd.DataFrame, str]] = []
        self.skipped: list[str] = []

    @classmethod
    def from_frames(cls, frames: list[tuple[pd.DataFrame, str]], **kwargs: Any) -> PretrainDataModule:
        dm = cls(paths=[], **kwargs)
        dm.frames = list(frames)
        return dm

    def _series(self) -> list[Series]:
        sources: list[Any] = [(p, str(p)) for p in expand_sources(self.paths)] + self.frames
        if not sources:
            raise ConfigError("PretrainDataModule got no series: pass paths (files or folders) or frames.")
        return [read_series(src, self.timestamp_column, on_missing=self.on_missing, name=name, timestamp_format=self.timestamp_format)
                for src, name in sources]

    def build(self) -> tuple[Dataset[Any], Dataset[Any], Dataset[Any] | None]:
        univariate: list[tuple[NDArray[Any], str, int]] = []
        train_origins: list[NDArray[Any]] = []
        val_origins: list[NDArray[Any]] = []
        window = self.context_length + self.horizon
        for series in self._series():
            for factor in self.resolutions:
                values = downsample(series.values, factor)
                split = int(len(values) * (1 - self.val_fraction))
                if split < window:
                    self.skipped.append(f"{series.source} x{factor}")
                    continue
                step = series.step * factor if series.step is not None else None
                with np.errstate(invalid="ignore"):
                    mean, std = np.nanmean(values[:split], 0), np.nanstd(values[:split], 0)
                scaled = (values - mean) / np.where(std > 1e-8, std, 1.0)
                for c, column in enumerate(series.columns):
                    train = window_origins(0, split, self.context_length, self.horizon, self.stride, inside=True)
                    val = window_origins(split, len(values), self.context_length, self.horizon, self.horizon, inside=False)
                    if self.max_windows is not None and len(train) > self.max_windows:
                        train = train[np.linspace(0, len(train) - 1, self.max_windows).round().astype(int)]
                    univariate.append((scaled[:, c], f"{series.source}:{column}:x{factor}", frequency_token(step)))
                    train_origins.append(train)
                    val_origins.append(val)
        if self.skipped:
            log.warning("pretraining: %d series/resolutions shorter than context + horizon (%d) left out: %s",
                        len(self.skipped), window, ", ".join(self.skipped[:5]))
        train_set = UnivariateWindows(univariate, self.context_length, self.horizon, train_origins, self.use_freq_token)
        if not len(train_set):
            raise DataError(f"no pretraining window of context {self.context_length} + horizon {self.horizon} in any series.")
        val_set = UnivariateWindows(univariate, self.context_length, self.horizon, val_origins, self.use_freq_token)
        return train_set, val_set if len(val_set) else train_set, None
