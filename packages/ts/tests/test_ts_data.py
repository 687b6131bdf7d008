"""Readers, splits, scaling and windows; bad input gets an error naming file, row and column."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest
import torch

from polyfm.core.errors import ConfigError, DataError
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
    # 'last' few-shot windows, as granite-tsfm: those inside the last int(0.1 * (8640 - 96)) + 96 training rows
    assert len(dm.train_set) == len(range(8640 - int(0.1 * (8640 - 96)), 8640 - 24 + 1, 4))
    assert dm.train_set.indices[-1] == len(full_train) - 1
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


def _etth1() -> str:
    import os
    from pathlib import Path

    root = os.environ.get("POLYFM_DATA_DIR")
    if not root or not (Path(root) / "ts" / "ETTh1.csv").exists():
        pytest.skip("POLYFM_DATA_DIR with ts/ETTh1.csv is not set")
    return str(Path(root) / "ts" / "ETTh1.csv")


def _assert_same_windows(dm: ForecastDataModule, reference, every: int) -> None:
    """Our train/val/test windows equal granite-tsfm's datasets (same count, same scaled values)."""
    for ref, ours in zip(reference, (dm.train_set, dm.val_set, dm.test_set)):
        assert len(ref) == len(ours)
        for i in range(0, len(ours), every):
            torch.testing.assert_close(ours[i]["past_values"], ref[i]["past_values"], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(ours[i]["future_values"], ref[i]["future_values"], atol=1e-5, rtol=1e-5)


def test_ts_etth1_european_export_matches_granite_windows(tmp_path) -> None:
    """Real ETTh1 re-exported the European way (';' separator, day-first dotted dates, local time with UTC
    offsets) reads to the same series, and its scaled windows equal granite-tsfm's TimeSeriesPreprocessor +
    ForecastDFDataset on the original frame (fraction split)."""
    preprocessor = pytest.importorskip("tsfm_public.toolkit.time_series_preprocessor")
    original = pd.read_csv(_etth1(), parse_dates=["date"])
    export = original.assign(date=original["date"].dt.tz_localize("UTC").dt.tz_convert("Europe/Paris").dt.strftime("%d.%m.%Y %H:%M%z"))
    export.to_csv(tmp_path / "etth1_eu.csv", sep=";", index=False)
    series = read_series(tmp_path / "etth1_eu.csv")
    assert series.report == {"dayfirst_timestamps": 1} and series.step == pd.Timedelta(hours=1)
    assert (series.timestamps == pd.DatetimeIndex(original["date"])).all()  # back in UTC: regular across the DST changes
    columns = [c for c in original.columns if c != "date"]
    tsp = preprocessor.TimeSeriesPreprocessor(timestamp_column="date", target_columns=columns, context_length=512, prediction_length=96,
                                              scaling=True, encode_categorical=False, scaler_type="standard")
    reference = preprocessor.get_datasets(tsp, original, split_config={"train": 0.7, "test": 0.2})
    dm = ForecastDataModule(str(tmp_path / "etth1_eu.csv"), context_length=512, horizon=96, split=[0.7, 0.1, 0.2])
    dm.setup()
    _assert_same_windows(dm, reference, every=97)
    # 5% few-shot on the ETT split: the same 311 training windows as get_datasets(fewshot_fraction=0.05)
    ett = {"train": [0, 8640], "valid": [8640, 11520], "test": [11520, 14400]}
    few_ref = preprocessor.get_datasets(tsp, original, split_config=ett, fewshot_fraction=0.05)[0]
    few = ForecastDataModule(_etth1(), context_length=512, horizon=96, label_fraction=0.05)
    few.setup()
    assert len(few.train_set) == len(few_ref) == 311
    for i in (0, 155, 310):
        torch.testing.assert_close(few.train_set[i]["past_values"], few_ref[i]["past_values"], atol=1e-5, rtol=1e-5)


def test_ts_numeric_and_calendar_timestamps(tmp_path) -> None:
    """Epoch numbers are refused unless their unit is named; calendar months and business days are regular steps."""
    frame = _frame(rows=120)
    epoch = frame.assign(date=frame["date"].astype("datetime64[s]").astype("int64"))
    _write(epoch, tmp_path / "epoch.csv")
    with pytest.raises(DataError, match=r"epoch.csv, key 'date'.*holds numbers.*timestamp_format='s'"):
        read_series(tmp_path / "epoch.csv")
    read = read_series(tmp_path / "epoch.csv", timestamp_format="s")
    assert (read.timestamps == pd.DatetimeIndex(frame["date"])).all() and read.step == pd.Timedelta(hours=1)
    daily = pd.DataFrame({"date": pd.date_range("2020-01-01", periods=60, freq="D").strftime("%Y%m%d").astype(int), "x": np.arange(60.0)})
    assert read_series(daily, timestamp_format="%Y%m%d").step == pd.Timedelta(days=1)
    monthly = pd.DataFrame({"date": pd.date_range("1990-01-31", periods=300, freq="ME"), "x": np.sin(np.arange(300) / 6)})
    dm = ForecastDataModule.from_frame(monthly, name="monthly", context_length=48, horizon=12, split=[0.7, 0.1, 0.2])
    dm.setup()
    assert isinstance(dm.series.step, pd.offsets.MonthEnd) and dm.freq_token == 0  # out of TTM's frequency vocabulary
    assert dm.test_set[0]["meta"] == f"monthly@{monthly['date'][dm.borders[1]]}"
    assert list(dm.series.future_timestamps(len(monthly) - 1, 2)) == [pd.Timestamp("2015-01-31"), pd.Timestamp("2015-02-28")]
    with pytest.raises(ConfigError, match=r"'ett' split .* fixed step"):
        ForecastDataModule.from_frame(monthly, name="monthly", context_length=48, horizon=12).setup()
    business = pd.DataFrame({"date": pd.bdate_range("2021-01-01", periods=100), "x": np.arange(100.0)})
    assert isinstance(read_series(business).step, pd.offsets.BusinessDay)  # weekends are not gaps


def test_ts_long_format_file_names_the_id_column(tmp_path) -> None:
    """Several series stacked in one file (granite-tsfm's id_columns layout) get an error naming the id column."""
    frame = _frame(rows=100)
    stacked = pd.concat([frame.assign(station="A"), frame.assign(station="B")])
    path = _write(stacked, tmp_path / "long.csv")
    with pytest.raises(DataError, match=r"long.csv, key 'station'.*stacks 2 series.*df\[df\['station'\] == 'A'\]"):
        read_series(path)
    assert len(read_series(stacked[stacked["station"] == "B"], columns=["c0", "c1", "c2"])) == 100


def test_ts_id_columns_windows_and_few_shot_match_granite(tmp_path) -> None:
    """Several series stacked in one file (id column): per-series splits, scalers and few-shot windows equal
    granite-tsfm's TimeSeriesPreprocessor(id_columns=...) + get_datasets; metrics use each series' own scale."""
    preprocessor = pytest.importorskip("tsfm_public.toolkit.time_series_preprocessor")
    parts = [_frame(rows=500, seed=1).assign(station="B"), _frame(rows=420, seed=2).assign(station="A"),
             _frame(rows=460, seed=3).assign(c1=lambda f: f["c1"] * 100, station="C")]  # series C: another scale
    stacked = pd.concat(parts).reset_index(drop=True)
    path = _write(stacked, tmp_path / "stations.csv")
    columns = ["c0", "c1", "c2"]
    for fraction in (None, 0.3):
        tsp = preprocessor.TimeSeriesPreprocessor(id_columns=["station"], timestamp_column="date", target_columns=columns,
                                                  context_length=64, prediction_length=16, scaling=True, encode_categorical=False,
                                                  scaler_type="standard")
        reference = preprocessor.get_datasets(tsp, stacked, split_config={"train": 0.7, "test": 0.2}, fewshot_fraction=fraction)
        dm = ForecastDataModule(path, context_length=64, horizon=16, split=[0.7, 0.1, 0.2], id_columns=["station"],
                                label_fraction=fraction or 1.0)
        dm.setup()
        _assert_same_windows(dm, reference, every=7)
    assert sorted(dm.scalers) == [f"{path}[station={s}]" for s in "ABC"] and dm.test_set[0]["meta"].startswith(f"{path}[station=A]@")
    from polyfm.ts.forecast import baselines

    naive = baselines(dm, "test", season=None)["repeat_last"]
    # original units: series C's c1 is 100x larger, so its errors dominate; the scaled MSE does not see that
    assert naive["mse_original"] > 50 * naive["mse"]
    with pytest.raises(DataError, match=r"stations.csv\[station=A\]: the train split has 294 rows"):
        ForecastDataModule(path, context_length=280, horizon=16, split=[0.7, 0.1, 0.2], id_columns=["station"]).setup()
    with pytest.raises(DataError, match=r"no id column\(s\) \['site'\]"):
        ForecastDataModule(path, context_length=64, horizon=16, split=[0.7, 0.1, 0.2], id_columns=["site"]).setup()


def test_ts_spreadsheet_and_pandas_exports(tmp_path, caplog) -> None:
    """What other tools write: a saved row index ('Unnamed: 0'), a DatetimeIndex in Parquet, Latin-1 text and
    a space after each comma read to the same series; the row index is dropped and counted, never a channel."""
    frame = _frame(rows=120)
    expected = read_series(frame)
    frame.to_csv(tmp_path / "with_index.csv")  # pandas' default: the row index as a header-less first column
    frame.set_index("date").to_parquet(tmp_path / "indexed.parquet")
    (tmp_path / "latin1.csv").write_bytes(frame.rename(columns={"c0": "température"}).to_csv(index=False).encode("latin-1"))
    (tmp_path / "spaced.csv").write_text(frame.to_csv(index=False).replace(",", ", "))
    with caplog.at_level(logging.WARNING, logger="polyfm.ts"):
        indexed = read_series(tmp_path / "with_index.csv")
        assert indexed.columns == expected.columns and indexed.report == {"dropped_index_columns": 1}
        for name in ("indexed.parquet", "latin1.csv", "spaced.csv"):
            series = read_series(tmp_path / name)
            np.testing.assert_allclose(series.values, expected.values, rtol=1e-6)
            assert (series.timestamps == expected.timestamps).all() and len(series.columns) == 3, name
    assert read_series(tmp_path / "latin1.csv").columns[0] == "température"
    assert "row-number column(s) ['Unnamed: 0']" in caplog.text and "DatetimeIndex" in caplog.text and "Latin-1" in caplog.text
    # selected explicitly, an unnamed column is data
    assert read_series(tmp_path / "with_index.csv", columns=["Unnamed: 0", "c0"]).columns == ["Unnamed: 0", "c0"]


def _with_cell(frame: pd.DataFrame, column: str, rows, value) -> pd.DataFrame:
    frame = frame.astype({column: object})
    frame.loc[rows, column] = value
    return frame


def _step_change(frame: pd.DataFrame) -> pd.DataFrame:
    """Hourly for 200 rows, then every 30 minutes: a logger whose interval was changed."""
    half = frame.iloc[200:].assign(date=pd.date_range(frame["date"][199] + pd.Timedelta("30min"), periods=200, freq="30min"))
    return pd.concat([frame.iloc[:200], half])


@pytest.mark.parametrize(
    "corrupt, match",
    [
        (lambda f: _with_cell(f.astype({"date": str}), "date", [30, 31], ""),
         r"bad.csv, key 'date': data row 31 \(line 32\): the timestamp is missing .*2 such rows.*remove those rows"),
        (lambda f: _step_change(f),
         r"bad.csv: data row 201 \(line 202\): the sampling step changes from 0 days 01:00:00 \(data rows 1-200\) to "
         r"0 days 00:30:00 .*resample\('h'\).*freq='30min' with on_gap='nan'"),
        (lambda f: f.assign(c0=f["c0"].where(~f.index.isin(range(100, 181)))),
         r"bad.csv, key 'c0': data row 101 \(line 102\): empty or non-finite value, the first of a run of 81 to data row 181 \(81 in the file\)"),
        (lambda f: _with_cell(f, "c2", 77, "12.5 kW"), r"bad.csv, key 'c2': data row 78 \(line 79\): value '12.5 kW' is not numeric"),
        (lambda f: _with_cell(f, "c1", 5, "1,5"), r"key 'c1': data row 6 \(line 7\): value '1,5' is not numeric"),
        (lambda f: pd.concat([f.iloc[:100], f.iloc[99:100].assign(c0=99.0), f.iloc[100:]]),
         r"bad.csv: data row 101 \(line 102\): timestamp 2020-01-05 03:00:00 repeats the previous row \(1 duplicates\).*on_duplicate="),
        (lambda f: f.rename(columns={"c2": "c1"}), r"bad.csv, key 'c1': the header names column 'c1' 2 times \(columns \[3, 4\]\)"),
    ],
    ids=["empty-timestamp", "step-change", "nan-run", "unit-in-cell", "decimal-comma", "duplicate-conflicting", "repeated-header"],
)
def test_ts_bad_csv_errors_say_where_and_what_to_do(tmp_path, corrupt, match) -> None:
    path = _write(corrupt(_frame()), tmp_path / "bad.csv")
    with pytest.raises(DataError, match=match):
        read_series(path)


def test_ts_step_change_with_on_gap_nan_keeps_the_finer_grid(tmp_path) -> None:
    """The documented handling of a step change: freq=<finer step> + on_gap='nan' puts the coarse part on the fine grid,
    its missing half-hours empty (then on_missing applies); a single long gap is still a gap, not a step change."""
    path = _write(_step_change(_frame()), tmp_path / "change.csv")
    series = read_series(path, freq="30min", on_gap="nan", on_missing="mask")
    assert series.step == pd.Timedelta("30min") and series.report["inserted_rows"] == 199 and len(series) == 599
    gap = _write(_frame().drop(index=range(50, 60)), tmp_path / "gap.csv")
    with pytest.raises(DataError, match=r"a gap in the 0 days 01:00:00 steps \(10 missing timestamps"):
        read_series(gap)
    sparse = _write(_frame().drop(index=range(101, 141, 2)), tmp_path / "sparse.csv")  # 20 steps of 2 h, then hourly again: gaps
    with pytest.raises(DataError, match=r"data row 102 \(line 103\): .* a gap in the 0 days 01:00:00 steps \(20 missing"):
        read_series(sparse)


def test_ts_nan_runs_and_splits_without_windows(tmp_path, caplog) -> None:
    """A long NaN run interpolated is logged with where it is; a channel never observed on the train split and an
    evaluation split too short for the horizon are errors that say what to change."""
    frame = _frame()
    frame.loc[100:180, "c0"] = np.nan
    path = _write(frame, tmp_path / "run.csv")
    with caplog.at_level(logging.WARNING, logger="polyfm.ts"):
        read_series(path, on_missing="interpolate")
    assert "c0: 81, longest run 81 (data rows 101-181)" in caplog.text
    masked = ForecastDataModule(path, context_length=48, horizon=12, split=[0.7, 0.1, 0.2], on_missing="mask")
    masked.setup()  # windows whose future falls in the run are skipped and counted
    assert masked.series.report["train_windows_skipped"] > 0 and torch.isfinite(masked.train_set[0]["past_values"]).all()
    unobserved = _frame()
    unobserved.loc[:290, "c1"] = np.nan
    with pytest.raises(DataError, match=r"channel\(s\) \['c1'\] have no observed value in the train split: drop them"):
        ForecastDataModule.from_frame(unobserved, name="u.csv", context_length=48, horizon=12, split=[0.7, 0.1, 0.2], on_missing="mask").setup()
    # interpolating would fill the train split from validation rows: refused, naming the first observed row
    with pytest.raises(DataError, match=r"u.csv.*\['c1'\] have no observed value in the train split \(data rows 1-\d+\); the first is at "
                                        r"data row\(s\) \[292\], so on_missing='interpolate'"):
        ForecastDataModule.from_frame(unobserved, name="u.csv", context_length=48, horizon=12, split=[0.7, 0.1, 0.2],
                                      on_missing="interpolate").setup()
    observed_late = _frame()
    observed_late.loc[:20, "c1"] = np.nan  # missing at the start but observed within the train split: filled and kept
    ForecastDataModule.from_frame(observed_late, name="late.csv", context_length=48, horizon=12, split=[0.7, 0.1, 0.2],
                                  on_missing="interpolate").setup()
    with pytest.raises(DataError, match=r"short-val.csv: the val split \(data rows 361-380\) yields no window of context 48 \+ horizon 24: "
                                        r"it has 20 rows, fewer than the horizon 24"):
        ForecastDataModule.from_frame(_frame(), name="short-val.csv", context_length=48, horizon=24, split=[0.9, 0.05, 0.05]).setup()
