"""Fine-tuning through polyfm.core.tasks.Forecasting, the DataFrame API, pretraining, and ETTh1."""

from __future__ import annotations

import importlib.util
import logging
import os
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from polyfm.core.errors import DataError
from polyfm.ts.data import ForecastDataModule, PretrainDataModule
from polyfm.ts.forecast import baselines, fine_tune, forecast, rolling_evaluate
from polyfm.ts.models.ttm import TTM
from polyfm.ts.samples import synthetic_series

warnings.filterwarnings("ignore", ".*does not have many workers.*")
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)


def _small(context: int, horizon: int, **extra) -> TTM:
    return TTM(context_length=context, prediction_length=horizon, patch_length=context // 8, d_model=32, decoder_d_model=16,
               num_layers=2, adaptive_patching_levels=2, dropout=0.1, head_dropout=0.1, **extra)


def test_ts_etth1_few_shot_beats_naive_baselines(tmp_path) -> None:
    """10% of ETTh1's training windows, the standard split, test MSE on the scaled data (as the papers report)."""
    root = os.environ.get("POLYFM_DATA_DIR")
    if not root or not (Path(root) / "ts" / "ETTh1.csv").exists():
        pytest.skip("POLYFM_DATA_DIR with ts/ETTh1.csv is not set")
    torch.manual_seed(0)
    dm = ForecastDataModule(str(Path(root) / "ts" / "ETTh1.csv"), context_length=512, horizon=96, label_fraction=0.1,
                            eval_stride=24, batch_size=64)
    model = _small(512, 96, num_input_channels=7)
    fine_tune(model, dm, mode="full", epochs=3, lr=3e-3, root=str(tmp_path), limit_val_batches=0)
    scores = rolling_evaluate(model, dm, "test")
    naive = baselines(dm, "test", season=24)
    assert scores["windows"] == naive["repeat_last"]["windows"] == len(range(11520, 14400 - 96 + 1, 24))
    print(f"ETTh1 10%: TTM {scores['mse']:.3f}, repeat-last {naive['repeat_last']['mse']:.3f}, "
          f"seasonal-24 {naive['seasonal_naive_24']['mse']:.3f}")
    assert scores["mse"] < 0.9 * naive["seasonal_naive_24"]["mse"]
    assert scores["mse"] < 0.9 * naive["repeat_last"]["mse"]
    assert scores["mse_original"] > 0 and len(scores["per_window"]) == scores["windows"]


def test_ts_head_only_few_shot_trains_decoder_and_head_only(tmp_path) -> None:
    frame = synthetic_series(1200, channels=2, seed=3)
    dm = ForecastDataModule.from_frame(frame, name="synthetic", context_length=64, horizon=16, split=[0.6, 0.2, 0.2],
                                       label_fraction=0.5, eval_stride=16, batch_size=32)
    torch.manual_seed(0)
    model = _small(64, 16)
    backbone_before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("backbone.")}
    before = rolling_evaluate(model, dm, "val")["mse"]
    task = fine_tune(model, dm, mode="head", epochs=4, lr=1e-2, root=str(tmp_path))
    after = rolling_evaluate(task.model, dm, "val")["mse"]
    assert after < 0.7 * before
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in backbone_before.items())


def test_ts_forecast_dataframe_in_dataframe_out(tmp_path) -> None:
    frame = synthetic_series(300, channels=2, seed=1)
    torch.manual_seed(0)
    model = _small(64, 16).eval()
    out = forecast(model, frame)
    assert list(out.columns) == ["date", "x0", "x1"] and len(out) == 16
    assert out["date"].iloc[0] == frame["date"].iloc[-1] + pd.Timedelta(hours=1)
    past = torch.tensor(frame[["x0", "x1"]].to_numpy()[-64:], dtype=torch.float32)[None]
    with torch.no_grad():
        expected = model(past)["prediction_outputs"][0].numpy()
    np.testing.assert_allclose(out[["x0", "x1"]].to_numpy(), expected, rtol=1e-5, atol=1e-4)  # original units
    if importlib.util.find_spec("matplotlib"):
        from polyfm.ts.forecast import plot_forecast

        plot_forecast(frame, out, column="x1", path=tmp_path / "forecast.png")
        assert (tmp_path / "forecast.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(DataError, match=r"the model expects 3"):
        forecast(_small(64, 16, num_input_channels=3, mode="mix_channel"), frame)
    exo = _small(64, 16, num_input_channels=2, exogenous_channel_indices=[1], enable_forecast_channel_mixing=True)
    with pytest.raises(DataError, match=r"exogenous channels \['x1'\]: pass future_exogenous"):
        forecast(exo, frame)
    future = pd.DataFrame({"x1": np.linspace(0, 1, 16)})
    out = forecast(exo, frame, future_exogenous=future)
    assert list(out.columns) == ["date", "x0"] and out["x0"].notna().all()
    # an unknown future value would make the forecast NaN: refused, naming the row
    with pytest.raises(DataError, match=r"key 'x1': future_exogenous row 11 \(of the 16 forecast steps\): an empty cell \(NaN\) .*6 such"):
        forecast(exo, frame, future_exogenous=future.assign(x1=future["x1"].where(future.index < 10)))
    with pytest.raises(DataError, match=r"future_exogenous row 3 .*'n/a' is not a finite number"):
        forecast(exo, frame, future_exogenous=future.astype(object).assign(x1=lambda f: f["x1"].where(f.index != 2, "n/a")))


def test_ts_exogenous_channel_mixing_fine_tunes(tmp_path) -> None:
    """Target x0 driven by a known-future x1: the exogenous mixer learns to use x1's future."""
    rng = np.random.default_rng(0)
    n = 1000
    driver = np.repeat(rng.normal(0, 1, n // 6 + 1), 6)[:n]
    frame = pd.DataFrame({"date": pd.date_range("2020", periods=n, freq="h"), "x0": 2 * driver + 0.05 * rng.normal(size=n), "x1": driver})
    dm = ForecastDataModule.from_frame(frame, name="exo", context_length=32, horizon=8, target_columns=["x0"],
                                       exogenous_columns=["x1"], split=[0.6, 0.2, 0.2], eval_stride=2, batch_size=64)
    torch.manual_seed(0)
    # no per-window scaling: the data module's standard scaling makes the x1 -> x0 relation linear for the mixer
    model = _small(32, 8, enable_forecast_channel_mixing=True, fcm_context_length=1, scaling=None, **dm.model_config())
    fine_tune(model, dm, mode="full", epochs=15, lr=1e-2, root=str(tmp_path), limit_val_batches=0)
    model.eval()
    batch = next(iter(torch.utils.data.DataLoader(dm.dataset("test"), batch_size=1000)))
    inputs = {k: batch[k] for k in ("past_values", "future_known_values")}
    with torch.no_grad():
        with_future = torch.nn.functional.mse_loss(model(**inputs)["prediction_outputs"], batch["future_values"])
        inputs["future_known_values"] = inputs["future_known_values"].roll(1, dims=0)  # another window's future
        wrong_future = torch.nn.functional.mse_loss(model(**inputs)["prediction_outputs"], batch["future_values"])
    naive = baselines(dm, "test", season=None)["repeat_last"]["mse"]
    assert float(with_future) < 0.5 * naive
    assert float(with_future) < 0.5 * float(wrong_future)


def test_ts_pretraining_loss_falls_across_resolutions(tmp_path) -> None:
    from polyfm.core.pretrain import Pretraining
    from polyfm.core.tasks import OptimConfig
    from polyfm.core.trainer import build_trainer
    from polyfm.ts.objectives import MultiResolutionForecasting

    folder = tmp_path / "many"
    folder.mkdir()
    for i, freq in enumerate(("h", "15min", "D")):
        synthetic_series(800, channels=2, freq=freq, seed=20 + i).to_csv(folder / f"s{i}.csv", index=False)
    synthetic_series(800, channels=1, seed=30).to_parquet(tmp_path / "extra.parquet")
    dm = PretrainDataModule([str(folder), str(tmp_path / "extra.parquet")], context_length=64, horizon=16, resolutions=[1, 2, 4],
                            max_windows=24, stride=4, use_freq_token=True, batch_size=64)
    dm.setup()
    tokens = {dm.train_set.labels[i]: dm.train_set.tokens[i] for i in range(len(dm.train_set.labels))}
    assert tokens[f"{folder / 's0.csv'}:x0:x1"] == 7 and tokens[f"{folder / 's1.csv'}:x0:x4"] == 7  # 15 min x4 = hourly
    assert len(dm.train_set.labels) == (3 * 2 + 1) * 3
    torch.manual_seed(0)
    model = _small(64, 16, resolution_prefix_tuning=True, frequency_token_vocab_size=10)
    objective = MultiResolutionForecasting()
    batch = next(iter(dm.train_dataloader()))
    with torch.no_grad():
        start = float(objective(model.eval(), batch)["loss"])
    model.train()
    trainer = build_trainer(max_epochs=6, default_root_dir=str(tmp_path / "run"), loggers=(), enable_progress_bar=False,
                            enable_checkpointing=False, enable_model_summary=False)
    trainer.fit(Pretraining(model, objective, optim=OptimConfig(lr=5e-3, weight_decay=0.0)), dm)
    with torch.no_grad():
        end = float(objective(model.eval(), batch)["loss"])
    assert end < 0.6 * start


def test_ts_model_and_data_channels_or_horizon_mismatch_is_refused(tmp_path) -> None:
    """A TTM whose forecast channels or horizon differ from the batches would score one channel against
    another's truth (same count) or fail deep in a loss: evaluation and fine-tuning refuse it up front."""
    from polyfm.core.errors import ConfigError

    frame = synthetic_series(500, channels=3, seed=2)
    dm = ForecastDataModule.from_frame(frame, name="s", context_length=64, horizon=16, split=[0.6, 0.2, 0.2],
                                       target_columns=["x1", "x2"])
    wrong = _small(64, 16, num_input_channels=3, prediction_channel_indices=[0, 1])  # x0, x1: same count, other channels
    with pytest.raises(ConfigError, match=r"prediction_channel_indices: model \[0, 1\], data \[1, 2\].*targets \['x1', 'x2'\]"):
        rolling_evaluate(wrong, dm, "test")
    with pytest.raises(ConfigError, match=r"prediction_channel_indices: model None, data \[1, 2\]"):
        fine_tune(_small(64, 16), dm, epochs=1, root=str(tmp_path))  # common-channel: forecasts all three
    with pytest.raises(ConfigError, match=r"forecasts 8 steps but the data's horizon is 16.*prediction_filter_length=16"):
        rolling_evaluate(_small(64, 16, prediction_filter_length=8, **dm.model_config()), dm, "test")
    assert rolling_evaluate(_small(64, 16, **dm.model_config()), dm, "test")["windows"] > 0


def test_ts_window_forecasts_long_format_keeps_ids_and_units() -> None:
    """Per-window predictions become rows per series id, timestamp and step, unscaled with each series' own scaler."""
    from torch.utils.data import DataLoader

    from polyfm.ts.predict import window_forecasts

    parts = []
    for station, offset in (("B", 1000.0), ("A", 0.0)):
        series = synthetic_series(400, channels=2, seed=3)
        parts.append(series.assign(station=station, x0=series["x0"] + offset))
    long = pd.concat(parts, ignore_index=True)
    dm = ForecastDataModule.from_frame(long, name="plants", context_length=32, horizon=8, split=[0.7, 0.1, 0.2],
                                       eval_stride=8, id_columns=["station"], target_columns=["x0"])
    # the true scaled future as the "prediction": unscaled, it must give back the file's values
    batches = [{"prediction": b["future_values"], "meta": b["meta"]} for b in DataLoader(dm.dataset("test"), batch_size=5)]
    out = window_forecasts(dm, batches)
    assert list(out.columns) == ["station", "origin", "step", "date", "x0", "x0_true"]
    assert out["station"].tolist()[0] == "A" and set(out["station"]) == {"A", "B"}
    np.testing.assert_allclose(out["x0"], out["x0_true"], rtol=1e-5)
    expected = long.set_index(["station", "date"]).loc[list(zip(out["station"], out["date"])), "x0"]
    np.testing.assert_allclose(out["x0_true"], expected.to_numpy(), rtol=1e-6)
    assert out.loc[out["station"] == "B", "x0"].mean() > 900  # B's own scaler
    scaled = window_forecasts(dm, batches, units="scaled")
    np.testing.assert_allclose(scaled["x0"], scaled["x0_true"], atol=1e-5)
    assert abs(scaled["x0"].mean()) < 5


def test_ts_window_forecasts_without_timestamps_uses_row_numbers() -> None:
    from torch.utils.data import DataLoader

    from polyfm.ts.predict import window_forecasts

    frame = synthetic_series(300, channels=2, seed=4).drop(columns=["date"])
    dm = ForecastDataModule.from_frame(frame, context_length=32, horizon=8, split=[0.7, 0.1, 0.2], eval_stride=8, timestamp_column=None)
    batches = [{"prediction": b["future_values"], "meta": b["meta"]} for b in DataLoader(dm.dataset("test"), batch_size=4)]
    out = window_forecasts(dm, batches)
    assert list(out.columns[:3]) == ["origin", "step", "row"] and out["row"].iloc[0] == out["origin"].iloc[0] == 241
    np.testing.assert_allclose(out["x1_true"], frame["x1"].to_numpy()[out["row"] - 1], rtol=1e-6)
    np.testing.assert_allclose(out["x1"], out["x1_true"], rtol=1e-5)
