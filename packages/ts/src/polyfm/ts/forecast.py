"""Forecasting for users who never touch Lightning: DataFrame in, DataFrame out.

    model = TTM.from_pretrained("ttm-r2-512-96", num_input_channels=1)   # zero-shot
    future = forecast(model, df, timestamp_column="date")                 # timestamps + forecasts, original units

    dm = ForecastDataModule("ETTh1.csv", context_length=512, horizon=96, label_fraction=0.05)
    fine_tune(model, dm, mode="head")                                     # few-shot, head-only (or "full")
    scores = rolling_evaluate(model, dm, "test")                          # MSE/MAE scaled and in original units
    baselines(dm, "test", season=24)                                      # repeat-last-value, seasonal naive

Forecast tables from ``trainer.predict`` (every test window, or past the end) and the ``polyfm predict``
callback ``ForecastWriter`` are in ``polyfm.ts.predict``.

Metrics are computed on the target channels over every test window (rolling origin with
``eval_stride``); "scaled" means in the units of the train-fitted standard scaler, as the
TTM and Informer papers report them, "original" in the file's units.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

import numpy as np
import pandas as pd
import torch
from numpy.typing import NDArray
from torch import nn
from torch.utils.data import DataLoader, Dataset

from polyfm.core.errors import ConfigError, DataError
from polyfm.ts.data import ForecastDataModule, StandardScaler, frequency_token, read_series

if TYPE_CHECKING:
    from polyfm.ts.models.ttm import TTMConfig

log = logging.getLogger("polyfm.ts")


def _predict(model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    inputs = {k: v for k, v in batch.items() if k not in ("future_values", "meta", "future_observed_mask")}
    out = model(**inputs)
    prediction: torch.Tensor = out["prediction_outputs"] if isinstance(out, dict) else out
    return prediction


def naive_forecast(past: torch.Tensor, horizon: int, season: int | None = None) -> torch.Tensor:
    """Repeat the last value (``season=None``), or the last season (seasonal naive)."""
    if season is None:
        return past[:, -1:, :].expand(-1, horizon, -1)
    if past.shape[1] < season:
        raise DataError(f"seasonal naive needs a context of at least one season ({season}); got {past.shape[1]}.")
    last = past[:, -season:, :]
    repeats = -(-horizon // season)
    return last.repeat(1, repeats, 1)[:, :horizon, :]


class _Accumulator:
    """Error sums over windows; original units through each window's series scaler (``meta`` = ``source@origin``)."""

    def __init__(self, scalers: dict[str, StandardScaler], targets: Sequence[int]):
        self.scalers, self.targets = scalers, list(targets)
        self.sums = dict.fromkeys(("se", "ae", "se_orig", "ae_orig"), 0.0)
        self.count = 0
        self.per_window: list[tuple[str, float, float]] = []

    def _original_error(self, pred: torch.Tensor, target: torch.Tensor, meta: Sequence[str]) -> torch.Tensor:
        # (pred - target) in the units of each window's own series (one scaler per id with id_columns)
        std = torch.stack([torch.as_tensor(self.scalers[m.rsplit("@", 1)[0]].std[self.targets]) for m in meta])
        return (pred - target) * std[:, None, :]

    def add(self, pred: torch.Tensor, target: torch.Tensor, meta: Sequence[str]) -> None:
        pred, target = pred.detach().float().cpu(), target.detach().float().cpu()
        err = pred - target
        err_orig = self._original_error(pred, target, meta)
        self.sums["se"] += float((err**2).sum())
        self.sums["ae"] += float(err.abs().sum())
        self.sums["se_orig"] += float((err_orig**2).sum())
        self.sums["ae_orig"] += float(err_orig.abs().sum())
        self.count += err.numel()
        window_mse = (err**2).mean(dim=(1, 2))
        window_mae = err.abs().mean(dim=(1, 2))
        self.per_window += [(m, float(a), float(b)) for m, a, b in zip(meta, window_mse, window_mae)]

    def result(self) -> dict[str, Any]:
        n = max(self.count, 1)
        return {
            "mse": self.sums["se"] / n, "mae": self.sums["ae"] / n,
            "mse_original": self.sums["se_orig"] / n, "mae_original": self.sums["ae_orig"] / n,
            "windows": len(self.per_window),
            "per_window": pd.DataFrame(self.per_window, columns=["origin", "mse", "mae"]),
        }


def check_model_fits_data(model: nn.Module, dm: ForecastDataModule) -> None:
    """Refuse a TTM whose channels or horizon differ from the DataModule's batches: equal channel counts with
    other channels would compare forecasts of one channel with the truth of another, silently."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "output_length"):
        return  # not a TTM: the caller's model, the caller's contract
    expected = dm.model_config()
    channels = len(dm.parts[0].series.columns)
    if config.output_length != dm.horizon:
        raise ConfigError(f"the model forecasts {config.output_length} steps but the data's horizon is {dm.horizon}: build "
                          f"the data with horizon={config.output_length}, or the model with prediction_filter_length={dm.horizon} "
                          f"(at most its prediction_length); in a recipe: --data.init_args.horizon={config.output_length}.")
    if config.channel_specific:
        got = {"num_input_channels": config.num_input_channels, "prediction_channel_indices": config.prediction_channel_indices,
               "exogenous_channel_indices": config.exogenous_channel_indices}
        if got["prediction_channel_indices"] == list(range(config.num_input_channels)):
            got["prediction_channel_indices"] = None
        differs = {k: (got[k], v) for k, v in expected.items() if got[k] != v}
    else:  # a common-channel TTM forecasts every channel it is given: the data must forecast them all
        differs = {k: (None, v) for k, v in expected.items() if k != "num_input_channels" and v is not None}
    if differs:
        names = dm.parts[0].series.columns
        raise ConfigError(
            "the model's channels do not match the data's (" + "; ".join(f"{k}: model {a}, data {b}" for k, (a, b) in differs.items())
            + f"; the data's channels are {names} with targets {[names[i] for i in dm.target_indices]}). "
            f"Build the TTM with **dm.model_config() ({channels} channels), or choose target_columns/exogenous_columns/columns "
            "to match the model; in a recipe: "
            + " ".join(f"--model.init_args.model.init_args.{k}={'null' if v is None else v}".replace(" ", "") for k, (_, v) in differs.items())
            + "."
        )


def _loader(
    dm: ForecastDataModule, stage: Literal["val", "test"], stride: int | None, batch_size: int
) -> tuple[Dataset[Any], DataLoader[Any]]:
    dataset = dm.dataset(stage, stride)
    return dataset, DataLoader(dataset, batch_size=batch_size, shuffle=False)


@torch.no_grad()
def rolling_evaluate(
    model: nn.Module, dm: ForecastDataModule, stage: Literal["val", "test"] = "test", stride: int | None = None, batch_size: int = 256
) -> dict[str, Any]:
    """Rolling-origin evaluation over every window of ``stage`` (origins ``stride`` apart).

    Returns ``mse``/``mae`` (scaled), ``mse_original``/``mae_original``, ``windows`` and a
    ``per_window`` DataFrame (origin timestamp, mse, mae).
    """
    check_model_fits_data(model, dm)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    _, loader = _loader(dm, stage, stride, batch_size)
    acc = _Accumulator(dm.scalers, dm.target_indices)
    for batch in loader:
        moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
        acc.add(_predict(model, moved), batch["future_values"], batch["meta"])
    model.train(was_training)
    return acc.result()


@torch.no_grad()
def baselines(dm: ForecastDataModule, stage: Literal["val", "test"] = "test", season: int | None = 24,
              stride: int | None = None) -> dict[str, dict[str, Any]]:
    """Repeat-last-value and seasonal-naive (``season`` steps, 24 for hourly data) on the same windows."""
    _, loader = _loader(dm, stage, stride, 1024)
    kinds: dict[str, int | None] = {"repeat_last": None}
    if season:
        kinds[f"seasonal_naive_{season}"] = season
    accs = {name: _Accumulator(dm.scalers, dm.target_indices) for name in kinds}
    for batch in loader:
        past = batch["past_values"][..., dm.target_indices]
        for name, period in kinds.items():
            accs[name].add(naive_forecast(past, dm.horizon, period), batch["future_values"], batch["meta"])
    return {name: acc.result() for name, acc in accs.items()}


def fine_tune(
    model: nn.Module,
    dm: ForecastDataModule,
    mode: Literal["head", "full", "lora"] = "head",
    epochs: int = 10,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    root: str | Path = "runs/ts-finetune",
    max_steps: int = -1,
    progress: bool = False,
    **trainer_kwargs: Any,
) -> Any:
    """Few-shot (``dm.label_fraction``) or full fine-tuning through ``polyfm.core.tasks.Forecasting``.

    ``mode="head"`` freezes the backbone (TTM's few-shot recipe), ``"full"`` trains everything,
    ``"lora"`` adds PEFT adapters. Returns the task (its ``.model`` is the fine-tuned TTM).
    """
    from polyfm.core.adaptation import Adaptation
    from polyfm.core.tasks import Forecasting, OptimConfig
    from polyfm.core.trainer import build_trainer
    from polyfm.ts.models.ttm import head_only

    check_model_fits_data(model, dm)
    adaptation = {"head": head_only(model), "full": Adaptation(mode="full"), "lora": Adaptation(mode="lora")}[mode]  # type: ignore[arg-type]
    task = Forecasting(model, adaptation=adaptation, optim=OptimConfig(lr=lr, weight_decay=weight_decay))
    trainer = build_trainer(
        max_epochs=epochs, max_steps=max_steps, default_root_dir=str(root), loggers=(), enable_progress_bar=progress,
        enable_checkpointing=False, **{"enable_model_summary": False, **trainer_kwargs},
    )
    trainer.fit(task, datamodule=dm)
    return task


@torch.no_grad()
def forecast(
    model: nn.Module,
    data: pd.DataFrame | str | Path,
    timestamp_column: str | None = "date",
    columns: Sequence[str] | None = None,
    scaler: StandardScaler | None = None,
    future_exogenous: pd.DataFrame | None = None,
    freq_token: int | None = None,
    on_missing: Literal["error", "interpolate", "mask"] = "error",
    timestamp_format: str | None = None,
    half_widths: NDArray[Any] | None = None,
) -> pd.DataFrame:
    """Forecast the next horizon after the last row of ``data``; returns a DataFrame with the future
    timestamps (``timestamp_column``) and one column per forecast channel, in the data's units.
    ``half_widths`` ``(horizon, forecast channels)`` in the data's units (a series' entry of
    ``polyfm.ts.predict.interval_half_widths``: split-conformal) adds ``<channel>_lo`` / ``_hi``.

    The model's last ``context_length`` rows are used (a shorter history is left-padded and marked
    unobserved). ``scaler`` (e.g. ``dm.scaler`` of the fine-tuning data) is applied before and
    inverted after; TTM scales each window itself, so zero-shot use needs none. Exogenous channels
    (the model's ``exogenous_channel_indices``) need their known future in ``future_exogenous``.
    """
    # a TTM (or a wrapper that forwards .config); nn.Module.__getattr__ is typed Tensor | Module
    config = cast("TTMConfig", model.config)
    series = read_series(data, timestamp_column, columns, on_missing=on_missing, timestamp_format=timestamp_format)
    if config.channel_specific and len(series.columns) != config.num_input_channels:
        raise DataError(
            f"has {len(series.columns)} channels {series.columns}; the model expects {config.num_input_channels}. "
            "Select them with columns=[...].",
            path=series.source,
        )
    if len(series) < config.patch_length:
        raise DataError(f"has {len(series)} rows; a forecast needs at least one patch ({config.patch_length} rows).", path=series.source)
    history = series.values[-config.context_length:]
    if len(history) < config.context_length:
        log.warning("%s: %d rows of history, left-padded to the context length %d (padding unobserved)", series.source,
                    len(history), config.context_length)
    if scaler is not None:
        history = scaler.transform(history)
    observed = ~np.isnan(history)
    past = torch.from_numpy(np.nan_to_num(history)).unsqueeze(0)
    mask = torch.from_numpy(observed).float().unsqueeze(0)
    horizon = config.output_length
    inputs: dict[str, Any] = {"past_values": past, "past_observed_mask": mask}
    if config.resolution_prefix_tuning:
        inputs["freq_token"] = torch.tensor([freq_token if freq_token is not None else frequency_token(series.step)])
    exogenous = config.exogenous_channel_indices or []
    if exogenous:
        names = [series.columns[i] for i in exogenous]
        if future_exogenous is None or any(c not in future_exogenous.columns for c in names) or len(future_exogenous) < horizon:
            raise DataError(f"the model mixes in exogenous channels {names}: pass future_exogenous with {horizon} rows of them.",
                            path=series.source)
        given = future_exogenous[names].iloc[:horizon].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)
        bad = ~np.isfinite(given)
        if bad.any():  # a NaN here would make the forecast NaN, silently
            row, col = (int(v) for v in np.argwhere(bad)[0])
            cell = future_exogenous[names[col]].iloc[row]
            raise DataError(f"future_exogenous row {row + 1} (of the {horizon} forecast steps): "
                            f"{'an empty cell (NaN)' if pd.isna(cell) else repr(cell)} is not a finite number ({int(bad.sum())} such values). The exogenous channels' future must be known "
                            "at every step: fill it in.", path=series.source, key=names[col])
        known = np.zeros((horizon, len(series.columns)), dtype=np.float32)
        known[:, exogenous] = given.astype(np.float32)
        if scaler is not None:
            known[:, exogenous] = ((known - scaler.mean) / scaler.std)[:, exogenous]
        inputs["future_known_values"] = torch.from_numpy(known).unsqueeze(0)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    prediction = _predict(model, {k: v.to(device) for k, v in inputs.items()})[0].cpu().numpy()
    model.train(was_training)
    targets = config.prediction_channel_indices or list(range(len(series.columns)))
    if scaler is not None:
        prediction = scaler.inverse(prediction, targets)
    names = [series.columns[i] for i in targets]
    out = pd.DataFrame(prediction, columns=names)
    if half_widths is not None:
        width = np.asarray(half_widths, dtype=np.float64)
        if width.shape != prediction.shape:
            raise ConfigError(f"half_widths of shape {width.shape} do not match the forecast's (horizon {horizon}, {len(names)} channels "
                              f"{names}): pass the series' entry of interval_half_widths for this model and data.")
        out[[f"{n}_lo" for n in names]] = prediction - width
        out[[f"{n}_hi" for n in names]] = prediction + width
    out.insert(0, timestamp_column or "step", series.future_timestamps(len(series) - 1, horizon))
    return out


def plot_forecast(
    history: pd.DataFrame,
    predicted: pd.DataFrame,
    truth: pd.DataFrame | None = None,
    column: str | None = None,
    timestamp_column: str = "date",
    history_points: int | None = 336,
    path: str | Path | None = None,
) -> Any:
    """History + forecast (+ truth) of one channel; saved as PNG when ``path`` is given.
    Needs matplotlib (``pip install polyfm-ts[plot]``)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover - optional dependency
        raise ImportError("plot_forecast needs matplotlib: pip install 'polyfm-ts[plot]'") from exc
    column = column or [c for c in predicted.columns if c != timestamp_column and not c.endswith(("_lo", "_hi"))][-1]
    recent = history.iloc[-history_points:] if history_points else history
    recent = recent.assign(**{timestamp_column: pd.to_datetime(recent[timestamp_column])})
    if truth is not None:
        truth = truth.assign(**{timestamp_column: pd.to_datetime(truth[timestamp_column])})
    fig, ax = plt.subplots(figsize=(10, 3.5))
    ax.plot(recent[timestamp_column], recent[column], color="0.35", lw=1.0, label="history")
    if truth is not None:
        ax.plot(truth[timestamp_column], truth[column], color="tab:green", lw=1.0, label="truth")
    ax.plot(predicted[timestamp_column], predicted[column], color="tab:red", lw=1.5, label="forecast")
    if f"{column}_lo" in predicted and f"{column}_hi" in predicted:  # prediction intervals (forecast(half_widths=...))
        ax.fill_between(predicted[timestamp_column], predicted[f"{column}_lo"], predicted[f"{column}_hi"], color="tab:red", alpha=0.2,
                        lw=0, label="interval")  # fmt: skip
    ax.axvline(predicted[timestamp_column].iloc[0], color="0.6", ls="--", lw=0.8)
    ax.set_ylabel(column)
    ax.legend(loc="upper left", frameon=False, ncol=3)
    fig.autofmt_xdate()
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
        plt.close(fig)
    return fig
