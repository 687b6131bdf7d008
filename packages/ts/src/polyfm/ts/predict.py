"""Forecasts from ``trainer.predict`` as tables, and the ``polyfm predict`` callback that writes them.

    window_forecasts(dm, trainer.predict(task, dm))    # every test window: forecast beside the truth
    future_forecasts(dm, trainer.predict(task, dm))    # dm built with predict_mode="future": past the end

``ForecastWriter`` is the callback of the recipes: ``<input name>-forecast.csv`` (test windows) or
``<input name>-future.csv`` (``predict_mode: future``). Predictions of ``polyfm.core.predict.Ensemble``
(several checkpoints) carry ``prediction_std``: it becomes a ``<channel>_std`` column (the spread across
members, in the same units as the forecast).

Prediction intervals (``ForecastWriter(interval_coverage=0.8)``, or ``interval_half_widths`` from Python) are
split-conformal: the absolute errors of the model on the validation windows, per series, channel and step, in the
file's units, give each step's half-width; the table gets ``<channel>_lo`` and ``<channel>_hi``.

    calibration = trainer.predict(task, dataloaders=dm.calibration_dataloader())
    widths = interval_half_widths(dm, calibration, coverage=0.8)
    table = window_forecasts(dm, trainer.predict(task, dm), half_widths=widths)
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import pandas as pd
import torch
from numpy.typing import NDArray

from polyfm.core.errors import ConfigError, DataError
from polyfm.core.predict import PredictionFileWriter
from polyfm.ts.data import ForecastDataModule, Series, SeriesPart

Units = Literal["original", "scaled"]
#: series source -> conformal half-widths (horizon, target channels), in the file's units
HalfWidths = dict[str, NDArray[Any]]

log = logging.getLogger("polyfm.ts")


def _check_units(units: str) -> None:
    if units not in ("original", "scaled"):
        raise ConfigError(f"units={units!r}: use 'original' or 'scaled'.")


def _gather(dm: ForecastDataModule, predictions: Sequence[dict[str, Any]]) -> tuple[NDArray[Any], NDArray[Any] | None, list[str]]:
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


def _by_series(dm: ForecastDataModule, labels: Sequence[str]) -> list[tuple[SeriesPart, NDArray[Any]]]:
    """Each series (in prediction order: id order with id_columns) and the indices of its windows."""
    sources = np.array([label.rsplit("@", 1)[0] for label in labels])
    parts = {part.series.source: part for part in dm.parts}
    unknown = [s for s in dict.fromkeys(sources) if s not in parts]
    if unknown:
        raise DataError(f"predictions for series {unknown[:3]} that are not in the data: predictions from other data?", path=dm.path)
    return [(parts[source], np.flatnonzero(sources == source)) for source in dict.fromkeys(sources)]


def _unscale(part: SeriesPart, values: NDArray[Any], targets: Sequence[int], spread: bool = False) -> NDArray[Any]:
    """Scaled forecasts (or their spread: scale only, no shift) in the file's units."""
    unscaled: NDArray[Any] = values * part.scaler.std[list(targets)] if spread else part.scaler.inverse(values, targets)
    return unscaled


def _origin_rows(series: Series, labels: Sequence[str]) -> NDArray[Any]:
    """Rows of the windows' first forecast steps, from their ``meta`` labels (``source@timestamp`` or ``source@row<n>``)."""
    where = [label.rsplit("@", 1)[1] for label in labels]
    if series.timestamps is None:
        return np.array([int(w.removeprefix("row")) - 1 for w in where], dtype=np.int64)
    rows: NDArray[np.intp] = series.timestamps.get_indexer(pd.DatetimeIndex(pd.to_datetime(where)))
    if (rows < 0).any():
        raise DataError(f"window {labels[int(np.argmax(rows < 0))]!r} is not in the series: predictions from other data?",
                        path=series.source)
    return rows


def check_coverage(coverage: float, owner: str = "interval_coverage") -> float:
    if isinstance(coverage, bool) or not isinstance(coverage, int | float) or not 0.0 < coverage < 1.0:
        raise ConfigError(f"{owner}={coverage!r}: give the coverage of the prediction intervals as a fraction strictly between "
                          "0 and 1 (e.g. 0.8 or 0.9), or leave it unset for point forecasts only.")
    return float(coverage)


def conformal_rank(n: int, coverage: float) -> int:
    """k = ceil((n + 1) * coverage): the k-th smallest of n calibration errors bounds a new one with probability
    >= coverage (exchangeable windows). Rounded first: (n + 1) * 0.54 is 243.00000000000003 for n = 449."""
    return math.ceil(round((n + 1) * coverage, 9))


def windows_needed(coverage: float) -> int:
    """The fewest calibration windows for which ``conformal_rank(n, coverage) <= n``."""
    n = max(1, math.floor(coverage / (1.0 - coverage)) - 1)
    while conformal_rank(n, coverage) > n:
        n += 1
    return n


def conformal_quantile(residuals: NDArray[Any], coverage: float, where: str = "the calibration set") -> NDArray[Any]:
    """The split-conformal half-width along axis 0 of ``residuals`` (n calibration windows, any other axes): the
    k-th smallest, k = ``conformal_rank(n, coverage)``, i.e. the quantile at level k / n taking the higher order
    statistic (never interpolated). Too few windows for ``coverage`` (k > n) is a ``ConfigError`` naming ``where``."""
    check_coverage(coverage, "coverage")
    residuals = np.asarray(residuals)
    n = len(residuals)
    k = conformal_rank(n, coverage)
    if k > n:
        best = f"{n} allow a coverage of at most {n / (n + 1):.3f}" if n else "0 allow none"
        raise ConfigError(f"{where}: {n} validation window(s) to calibrate prediction intervals on, but coverage {coverage} needs "
                          f"at least {windows_needed(coverage)} (ceil((n+1)*coverage) <= n; {best}). Lower interval_coverage, or "
                          "give the validation split more windows: a longer validation span (split fractions, e.g. [0.7, 0.2, 0.1]) "
                          "or a smaller eval_stride.")
    bad = ~np.isfinite(residuals.reshape(n, -1)).all(1)  # per window
    if bad.any():  # NaN would sort last and shrink the interval unnoticed
        raise ConfigError(f"{where}: {int(bad.sum())} of {n} validation windows have non-finite forecast errors: the model "
                          f"forecasts NaN or Inf there (first: window {int(np.argmax(bad))} of the validation split).")
    widths: NDArray[Any] = np.partition(residuals, k - 1, axis=0)[k - 1]
    return widths


def interval_half_widths(dm: ForecastDataModule, calibration: Sequence[dict[str, Any]], coverage: float) -> HalfWidths:
    """Split-conformal half-widths per series, ``(horizon, target channels)`` in the file's units, from the batches of
    ``trainer.predict(task, dataloaders=dm.calibration_dataloader())`` (the validation windows): the absolute errors
    |truth - forecast| of each step are ranked over the windows and ``conformal_quantile`` taken. Every series needs
    ``windows_needed(coverage)`` windows, else a ``ConfigError`` naming it and the counts."""
    check_coverage(coverage)
    dm.prepare()
    batches = [b for b in calibration if len(b["meta"])]
    labels = [label for b in batches for label in b["meta"]]
    by_series = dict((part.series.source, chosen) for part, chosen in _by_series(dm, labels)) if labels else {}
    pred = np.concatenate([b["prediction"].detach().float().cpu().numpy() for b in batches]) if batches else None
    targets, horizon = dm.target_indices, dm.horizon
    if pred is not None and pred.shape[1:] != (horizon, len(targets)):
        raise ConfigError(f"calibration forecasts of shape {pred.shape[1:]} are not (horizon {horizon}, {len(targets)} target channels).")
    widths: HalfWidths = {}
    for part in dm.parts:
        source = part.series.source
        chosen = by_series.get(source, np.zeros(0, dtype=np.int64))
        if pred is None or not len(chosen):
            residuals = np.zeros((0, horizon, len(targets)), dtype=np.float32)
        else:
            rows = _origin_rows(part.series, [labels[i] for i in chosen])[:, None] + np.arange(horizon)  # (windows, H)
            residuals = np.abs(part.series.values[rows][..., targets] - _unscale(part, pred[chosen], targets))
        widths[source] = conformal_quantile(residuals, coverage, where=source)
    return widths


def _interval_columns(block: pd.DataFrame, names: Sequence[str], point: NDArray[Any], width: NDArray[Any]) -> None:
    """``<channel>_lo`` / ``_hi``: the point forecast minus / plus its step's half-width (point (..., H, C), width (H, C))."""
    block[[f"{n}_lo" for n in names]] = (point - width).reshape(-1, len(names))
    block[[f"{n}_hi" for n in names]] = (point + width).reshape(-1, len(names))


def _widths_for(part: SeriesPart, half_widths: HalfWidths, targets: Sequence[int], units: str) -> NDArray[Any]:
    width = half_widths.get(part.series.source)
    if width is None:
        raise ConfigError(f"no prediction-interval half-widths for series {part.series.source}: calibrate on this DataModule "
                          f"(interval_half_widths), which gave them for {list(half_widths)[:3]}.")
    # the errors were ranked in the file's units; a positive per-channel scale keeps their order
    return width / part.scaler.std[list(targets)] if units == "scaled" else width


def window_forecasts(dm: ForecastDataModule, predictions: Sequence[dict[str, Any]], units: Units = "original",
                     half_widths: HalfWidths | None = None) -> pd.DataFrame:
    """The batches of ``trainer.predict(task, dm)`` (``{"prediction": (B, H, C), "meta": [...]}``) as one long
    DataFrame: the id columns (with ``id_columns``), ``origin`` (first forecast step, as in ``rolling_evaluate``),
    ``step`` (1..H), the forecast timestamp (the data's timestamp column; the row number without timestamps),
    one column per target channel (in the file's units unless ``units="scaled"``), ``<channel>_std`` for an
    ensemble's predictions, ``<channel>_lo`` and ``<channel>_hi`` with ``half_widths`` (``interval_half_widths``),
    and ``<channel>_true``."""
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
        if half_widths is not None:
            _interval_columns(block, names, window, _widths_for(part, half_widths, targets, units))
        block[[f"{n}_true" for n in names]] = truth.reshape(-1, len(names))
        blocks.append(block)
    return pd.concat(blocks, ignore_index=True)


def future_forecasts(dm: ForecastDataModule, predictions: Sequence[dict[str, Any]], units: Units = "original",
                     half_widths: HalfWidths | None = None) -> pd.DataFrame:
    """The batches of ``trainer.predict(task, dm)`` for a DataModule with ``predict_mode="future"`` (one window per
    series: its last ``context_length`` rows) as a DataFrame of ``horizon`` rows per series: the id columns, ``step``
    (1..H), the future timestamps (continued at the series' frequency, or ``dm.freq``; row numbers without
    timestamps), one column per target channel, ``<channel>_std`` for an ensemble and ``<channel>_lo`` / ``_hi`` with
    ``half_widths``. No truth: it is the future."""
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
        if half_widths is not None:
            _interval_columns(block, names, window, _widths_for(part, half_widths, targets, units))
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
    ``interval_coverage`` (e.g. 0.8) adds split-conformal prediction intervals, ``<channel>_lo`` / ``_hi``: before
    writing, the model forecasts the DataModule's validation windows and its errors there give each series', channel's
    and step's half-width (``interval_half_widths``; kept in ``half_widths``).
    In a recipe: ``trainer.callbacks: [{class_path: polyfm.ts.predict.ForecastWriter}]``."""

    one_process: ClassVar[bool] = True  # one table from every window

    def __init__(self, output: str | None = None, units: Units = "original", interval_coverage: float | None = None) -> None:
        super().__init__(output=output, write_interval="epoch")
        if units not in ("original", "scaled"):
            raise ConfigError(f"ForecastWriter units={units!r}: use 'original' or 'scaled'.")
        self.units = units
        self.interval_coverage = None if interval_coverage is None else check_coverage(interval_coverage, "ForecastWriter interval_coverage")
        self.half_widths: HalfWidths | None = None

    def reset(self) -> None:
        self.half_widths = None

    def calibrate(self, trainer: Any, pl_module: Any, dm: ForecastDataModule) -> HalfWidths:
        """The module's forecasts of the validation windows, batch by batch as the predict loop runs them (device,
        precision), then ``interval_half_widths``."""
        assert self.interval_coverage is not None
        windows = [w for _, w in dm.calibration_windows() if len(w)]
        outputs = []
        if windows:  # none at all: interval_half_widths names the series and the count
            with torch.inference_mode():
                for index, batch in enumerate(dm.calibration_dataloader(windows)):
                    output = trainer.strategy.predict_step(trainer.strategy.batch_to_device(batch), index)
                    outputs.append({"prediction": output["prediction"].detach().float().cpu(), "meta": output["meta"]})
        widths = interval_half_widths(dm, outputs, self.interval_coverage)
        log.info("ForecastWriter: %.0f%% intervals calibrated on %d validation windows (%d series)", 100 * self.interval_coverage,
                 sum(len(w) for w in windows), len(widths))
        return widths

    def write_on_epoch_end(self, trainer: Any, pl_module: Any, predictions: Sequence[Any], batch_indices: Sequence[Any]) -> None:
        dm = trainer.datamodule
        if not isinstance(dm, ForecastDataModule):
            raise ConfigError(f"ForecastWriter writes the windows of a ForecastDataModule; the data is {type(dm).__name__}.")
        # one list per predict dataloader when there are several
        batches = [b for group in predictions for b in (group if isinstance(group, list) else [group])]
        future = dm.predict_mode == "future"
        if self.interval_coverage is not None:
            self.half_widths = self.calibrate(trainer, pl_module, dm)
        frame = (future_forecasts if future else window_forecasts)(dm, batches, self.units, self.half_widths)
        name = f"{_input_name(dm)}-{'future' if future else 'forecast'}.csv"
        self.write_table(self.predictions_folder(trainer) / name, frame)
