"""Readers, splits, scaling and windows; bad input gets an error naming file, row and column."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest
import torch

from polyfm.core.errors import DataError
from polyfm.ts.data import ForecastDataModule, read_series, split_borders


def _frame(rows: int = 400, freq: str = "h", channels: int = 3, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    t = np.arange(rows)
    data = {f"c{i}": np.sin(2 * np.pi * t / 24 + i) * (i + 1) + 0.1 * rng.standard_normal(rows) + 10 * i for i in range(channels)}
    return pd.DataFrame({"date": pd.date_range("2020-01-01", periods=rows, freq=freq), **data})


def _write(frame: pd.DataFrame, path) -> str:
    frame.to_csv(path, index=False)
    return str(path)


def test_ts_read_csv_and_parquet_agree(tmp_path) -> None:
    frame = _frame()
    csv = _write(frame, tmp_path / "s.csv")
    frame.to_parquet(tmp_path / "s.parquet")
    a, b = read_series(csv), read_series(tmp_path / "s.parquet")
    assert a.columns == ["c0", "c1", "c2"] and a.step == pd.Timedelta(hours=1)
    np.testing.assert_allclose(a.values, b.values, rtol=1e-6)
    assert a.values.dtype == np.float32 and len(a) == 400


@pytest.mark.parametrize(
    "corrupt, match",
    [
        (lambda f: f.assign(c1=f["c1"].astype(object).where(f.index != 57, "n/a")), r"line 59.*'n/a' is not numeric.*key 'c1'|key 'c1'.*line 59"),
        (lambda f: f.assign(c2=f["c2"].where(f.index != 10)), r"line 12.*empty.*|key 'c2'"),
        (lambda f: f.drop(index=[100, 101, 102]).reset_index(drop=True), r"gap.*3 missing timestamps"),
        (lambda f: pd.concat([f.iloc[:50], f.iloc[49:50], f.iloc[50:]]).reset_index(drop=True), r"line 52.*repeats"),
        (lambda f: f.assign(date=f["date"].where(f.index != 20, f["date"][20] + pd.Timedelta(minutes=7))), r"off the regular"),
        (lambda f: f.assign(date=f["date"].astype(str).where(f.index != 5, "not a date")), r"line 7.*'not a date' cannot be parsed"),
        (lambda f: f.iloc[::-1].reset_index(drop=True), r"comes before"),
        (lambda f: f.rename(columns={"date": "time"}), r"no timestamp column 'date'"),
    ],
    ids=["non-numeric", "nan", "gap", "duplicate", "irregular", "bad-timestamp", "unsorted", "no-timestamp"],
)
def test_ts_bad_input_names_file_row_column(tmp_path, corrupt, match) -> None:
    path = _write(corrupt(_frame()), tmp_path / "bad.csv")
    with pytest.raises(DataError, match=match) as info:
        read_series(path)
    assert "bad.csv" in str(info.value)


def test_ts_bad_input_counted_handling(tmp_path, caplog) -> None:
    frame = _frame()
    frame.loc[10, "c2"] = np.nan
    frame = frame.drop(index=[100, 101]).reset_index(drop=True)
    frame = pd.concat([frame.iloc[:50], frame.iloc[49:50], frame.iloc[50:]]).reset_index(drop=True)
    path = _write(frame, tmp_path / "fixable.csv")
    with caplog.at_level(logging.WARNING, logger="polyfm.ts"):
        series = read_series(path, on_missing="interpolate", on_duplicate="first", on_gap="nan")
    assert series.report == {"duplicate_rows": 1, "inserted_rows": 2, "interpolated_values": 1 + 2 * 3}
    assert len(series) == 400 and not np.isnan(series.values).any()
    assert "interpolated 7 missing values" in caplog.text
    # 'mask' keeps them unobserved: TTM gets past_observed_mask, and windows with missing targets are skipped
    masked = read_series(path, on_missing="mask", on_duplicate="first", on_gap="nan")
    assert masked.report["masked_values"] == 7 and np.isnan(masked.values).sum() == 7


def test_ts_non_numeric_column_and_too_short_series(tmp_path) -> None:
    frame = _frame(rows=100).assign(station=["A"] * 100)
    path = _write(frame, tmp_path / "mixed.csv")
    with pytest.raises(DataError, match=r"key 'station'.*|'A' is not numeric"):
        read_series(path)
    assert read_series(path, columns=["c0", "c1"]).columns == ["c0", "c1"]
    dm = ForecastDataModule(path, context_length=64, horizon=24, columns=["c0"], split=[0.7, 0.1, 0.2])
    with pytest.raises(DataError, match=r"mixed.csv.*train split has 70 rows, fewer than context_length \+ horizon = 88"):
        dm.setup()
    with pytest.raises(DataError, match=r"ETT split .* needs 14400"):
        split_borders(100, pd.Timedelta(hours=1), "ett")


def test_ts_constant_channel_policies(tmp_path, caplog) -> None:
    frame = _frame().assign(c1=5.0)
    path = _write(frame, tmp_path / "const.csv")
    common = dict(context_length=48, horizon=12, split=[0.6, 0.2, 0.2])
    with caplog.at_level(logging.WARNING, logger="polyfm.ts"):
        keep = ForecastDataModule(path, **common)
        keep.setup()
    assert "constant channel(s) ['c1']" in caplog.text and keep.series.report["constant_channels"] == 1
    assert keep.scaler.std[1] == 1.0 and torch.isfinite(keep.train_set[0]["past_values"]).all()
    drop = ForecastDataModule(path, on_constant="drop", **common)
    drop.setup()
    assert drop.series.columns == ["c0", "c2"]
    with pytest.raises(DataError, match=r"const.csv.*constant on the train split"):
        ForecastDataModule(path, on_constant="error", **common).setup()


def test_ts_ett_split_scaling_and_windows(tmp_path) -> None:
    frame = _frame(rows=20 * 30 * 24 + 50, channels=2)
    frame.loc[16 * 30 * 24 :, "c0"] += 1000.0  # a shift in the test months must not leak into the scaler
    path = _write(frame, tmp_path / "ett_like.csv")
    dm = ForecastDataModule(path, context_length=96, horizon=24, train_stride=4, eval_stride=24, label_fraction=0.1)
    dm.setup()
    assert dm.borders == (8640, 11520, 14400)
    train_only = frame["c0"].iloc[:8640]
    np.testing.assert_allclose(dm.scaler.mean[0], train_only.mean(), rtol=1e-4)
    full_train = dm.dataset("train")
    assert len(full_train) == len(range(96, 8640 - 24 + 1, 4))
    assert len(dm.train_set) == round(0.1 * len(full_train))
    assert dm.train_set.indices[-1] == len(full_train) - 1  # 'last' few-shot windows, as granite-tsfm
    test = dm.dataset("test")
    first = test[0]
    assert first["meta"].endswith(str(frame["date"][11520]))  # first test origin at the border, context before it
    assert first["past_values"].shape == (96, 2) and first["future_values"].shape == (24, 2)
    expected = (frame[["c0", "c1"]].to_numpy()[11520 : 11520 + 24] - dm.scaler.mean) / dm.scaler.std
    np.testing.assert_allclose(first["future_values"].numpy(), expected, rtol=1e-4, atol=1e-4)


def test_ts_exogenous_batches_hide_target_future(tmp_path) -> None:
    path = _write(_frame(rows=600), tmp_path / "exo.csv")
    dm = ForecastDataModule(path, context_length=64, horizon=16, target_columns=["c0", "c1"], exogenous_columns=["c2"],
                            split=[0.6, 0.2, 0.2], use_freq_token=True)
    dm.setup()
    item = dm.train_set[0]
    assert dm.model_config() == {"num_input_channels": 3, "prediction_channel_indices": [0, 1], "exogenous_channel_indices": [2]}
    assert item["future_values"].shape == (16, 2)
    assert (item["future_known_values"][:, :2] == 0).all() and (item["future_known_values"][:, 2] != 0).any()
    assert int(item["freq_token"]) == 7  # hourly, granite-tsfm's token
