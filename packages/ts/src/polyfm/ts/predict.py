"""Forecasts from ``trainer.predict`` as tables, and the ``polyfm predict`` callback that writes them.

    window_forecasts(dm, trainer.predict(task, dm))    # every test window: forecast beside the truth
    future_forecasts(dm, trainer.predict(task, dm))    # dm built with predict_mode="future": past the end

``ForecastWriter`` is the callback of the recipes: ``<input name>-forecast.csv`` (test windows) or
``<input name>-future.csv`` (``predict_mode: future``). Predictions of ``polyfm.core.predict.Ensemble``
(several checkpoints) carry ``prediction_std``: it becomes a ``<channel>_std`` column (the spread across
members, in the same units as the forecast).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import pandas as pd

from polyfm.core.errors import ConfigError, DataError
from polyfm.core.predict import PredictionFileWriter
from polyfm.ts.data import ForecastDataModule, Series, SeriesPart

Units = Literal["original", "scaled"]


def _check_units(units: str) -> None:
    if units not in ("original", "scaled"):
        raise ConfigError(f"units={units!r}: use 'original' or 'scaled'.")


def _gather(dm: ForecastDataModule, predictions: Sequence[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray | None, list[str]]:
    """Forecasts ``(N, H, C_target)``, their ensemble spread (or None) and the ``meta`` labels of every batch."""
    batches = [b for b in predictions if len(b["meta"])]
    if not batches:
        raise DataError("no prediction to write: the predict split yielded no window.", path=dm.path)
    pred = np.concatenate([b["prediction"].detach().float().cpu().numpy() for b in batches])
    spread = None
    if all("prediction_std" in b for b in batches):
        spread = np.concatenate([b["prediction_std"].detach().float().cpu().numpy() for b in batches])
    if pred.shape[1:] != (dm.horizon, len(dm.target_indices)):
        raise ConfigError(f"forecasts of shape {pred.shape[1:]} are not (horizon {dm.horizon}, {len(dm.target_indices)} target channels).")
    return pred, spread, [label for b in batches for label in b["meta"]]


def _check_kind(labels: Sequence[str], future: bool) -> None:
    """Test windows and forecasts past the end make different tables: say which function reads which."""
    if any(label.endswith("@future") != future for label in labels):
        raise ConfigError("these are forecasts past the end of the data (predict_mode='future'): build the table with future_forecasts"
                          if not future else "these are test-window forecasts (predict_mode='test'): build the table with window_forecasts")


def _by_series(dm: ForecastDataModule, labels: Sequence[str]) -> list[tuple[SeriesPart, np.ndarray]]:
    """Each series (in prediction order: id order with id_columns) and the indices of its windows."""
    sources = np.array([label.rsplit("@", 1)[0] for label in labels])
    parts = {part.series.source: part for part in dm.parts}
    unknown = [s for s in dict.fromkeys(sources) if s not in parts]
    if unknown:
        raise DataError(f"predictions for series {unknown[:3]} that are not in the data: predictions from other data?", path=dm.path)
    return [(parts[source], np.flatnonzero(sources == source)) for source in dict.fromkeys(sources)]


def _unscale(part: SeriesPart, values: np.ndarray, targets: Sequence[int], spread: bool = False) -> np.ndarray:
    """Scaled forecasts (or their spread: scale only, no shift) in the file's units."""
    return values * part.scaler.std[list(targets)] if spread else part.scaler.inverse(values, targets)


def _origin_rows(series: Series, labels: Sequence[str]) -> np.ndarray:
    """Rows of the windows' first forecast steps, from their ``meta`` labels (``source@timestamp`` or ``source@row<n>``)."""
    where = [label.rsplit("@", 1)[1] for label in labels]
    if series.timestamps is None:
        return np.array([int(w.removeprefix("row")) - 1 for w in where], dtype=np.int64)
    rows = series.timestamps.get_indexer(pd.DatetimeIndex(pd.to_datetime(where)))
    if (rows < 0).any():
        raise DataError(f"window {labels[int(np.argmax(rows < 0))]!r} is not in the series: predictions from other data?",
                        path=series.source)
    return rows


def window_forecasts(dm: ForecastDataModule, predictions: Sequence[dict[str, Any]], units: Units = "original") -> pd.DataFrame:
    """The batches of ``trainer.predict(task, dm)`` (``{"prediction": (B, H, C), "meta": [...]}``) as one long
    DataFrame: the id columns (with ``id_columns``), ``origin`` (first forecast step, as in ``rolling_evaluate``),
    ``step`` (1..H), the forecast timestamp (the data's timestamp column; the row number without timestamps),
    one column per target channel (in the file's units unless ``units="scaled"``), ``<channel>_std`` for an
    ensemble's predictions, and ``<channel>_true``."""
    _check_units(units)
    dm.prepare()
    pred, spread, labels = _gather(dm, predictions)
    _check_kind(labels, future=False)
    targets, horizon = dm.target_indices, dm.horizon
    blocks = []
    for part, chosen in _by_series(dm, labels):
        names = [part.series.columns[i] for i in targets]
        rows = _origin_rows(part.series, [labels[i] for i in chosen])[:, None] + np.arange(horizon)  # (windows, H)
        truth, window = part.series.values[rows][..., targets], pred[chosen]
        window_spread = spread[chosen] if spread is not None else None
        if units == "original":
            window = _unscale(part, window, targets)
            window_spread = _unscale(part, window_spread, targets, spread=True) if window_spread is not None else None
        else:
            truth = part.scaler.transform(part.series.values[rows])[..., targets]
        when = part.series.timestamps[rows.ravel()] if part.series.timestamps is not None else rows.ravel() + 1
        block = pd.DataFrame({**dm.series_ids.get(part.series.source, {}), "origin": np.repeat(when[::horizon], horizon),
                              "step": np.tile(np.arange(1, horizon + 1), len(chosen)), dm.timestamp_column or "row": when})
        block[names] = window.reshape(-1, len(names))
        if window_spread is not None:
            block[[f"{n}_std" for n in names]] = window_spread.reshape(-1, len(names))
        block[[f"{n}_true" for n in names]] = truth.reshape(-1, len(names))
        blocks.append(block)
    return pd.concat(blocks, ignore_index=True)


def future_forecasts(dm: ForecastDataModule, predictions: Sequence[dict[str, Any]], units: Units = "original") -> pd.DataFrame:
    """The batches of ``trainer.predict(task, dm)`` for a DataModule with ``predict_mode="future"`` (one window per
    series: its last ``context_length`` rows) as a DataFrame of ``horizon`` rows per series: the id columns, ``step``
    (1..H), the future timestamps (continued at the series' frequency, or ``dm.freq``; row numbers without
    timestamps), one column per target channel and ``<channel>_std`` for an ensemble. No truth: it is the future."""
    _check_units(units)
    dm.prepare()
    pred, spread, labels = _gather(dm, predictions)
    _check_kind(labels, future=True)
    targets, horizon = dm.target_indices, dm.horizon
    blocks = []
    for part, chosen in _by_series(dm, labels):
        if len(chosen) != 1:
            raise DataError(f"{len(chosen)} forecasts past the end of one series: predict with predict_mode='future' "
                            "gives one per series.", path=part.series.source)
        names = [part.series.columns[i] for i in targets]
        window = pred[chosen[0]]
        window_spread = spread[chosen[0]] if spread is not None else None
        if units == "original":
            window = _unscale(part, window, targets)
            window_spread = _unscale(part, window_spread, targets, spread=True) if window_spread is not None else None
        block = pd.DataFrame({**dm.series_ids.get(part.series.source, {}), "step": np.arange(1, horizon + 1),
                              dm.timestamp_column or "row": dm.future_timestamps(part)})
        block[names] = window
        if window_spread is not None:
            block[[f"{n}_std" for n in names]] = window_spread
        blocks.append(block)
    return pd.concat(blocks, ignore_index=True)


def _input_name(dm: ForecastDataModule) -> str:
    """The input file's name without its data suffixes (``ETTh1.csv.gz`` -> ``ETTh1``), or the DataFrame's name, file-safe."""
    name = Path(os.path.expandvars(dm.path)).name
    for suffix in (".gz", ".csv", ".txt", ".parquet", ".pq"):
        name = name.removesuffix(suffix)
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name).strip("_.") or "data"


class ForecastWriter(PredictionFileWriter):
    """``polyfm predict`` callback. With the DataModule's ``predict_mode: test`` (default), the forecasts of every
    test window (origins ``eval_stride`` apart) beside the truth, as ``window_forecasts``, in
    ``<output>/<input name>-forecast.csv``; with ``predict_mode: future``, ``horizon`` rows past the end of
    each series, as ``future_forecasts``, in ``<output>/<input name>-future.csv``. ``output`` is a folder
    (default ``<default_root_dir>/predictions``); ``units`` ``original`` (the file's) or ``scaled``.
    In a recipe: ``trainer.callbacks: [{class_path: polyfm.ts.predict.ForecastWriter}]``."""

    one_process: ClassVar[bool] = True  # one table from every window

    def __init__(self, output: str | None = None, units: Units = "original") -> None:
        super().__init__(output=output, write_interval="epoch")
        if units not in ("original", "scaled"):
            raise ConfigError(f"ForecastWriter units={units!r}: use 'original' or 'scaled'.")
        self.units = units

    def write_on_epoch_end(self, trainer: Any, pl_module: Any, predictions: Sequence[Any], batch_indices: Sequence[Any]) -> None:
        dm = trainer.datamodule
        if not isinstance(dm, ForecastDataModule):
            raise ConfigError(f"ForecastWriter writes the windows of a ForecastDataModule; the data is {type(dm).__name__}.")
        # one list per predict dataloader when there are several
        batches = [b for group in predictions for b in (group if isinstance(group, list) else [group])]
        future = dm.predict_mode == "future"
        frame = (future_forecasts if future else window_forecasts)(dm, batches, self.units)
        name = f"{_input_name(dm)}-{'future' if future else 'forecast'}.csv"
        self.write_table(self.predictions_folder(trainer) / name, frame)
