"""Prediction to files: the scaling saved in checkpoints, forecasting past the end of the data, ensembles."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from polyfm.core.errors import ConfigError, DataError
from polyfm.core.predict import Ensemble
from polyfm.core.tasks import Forecasting
from polyfm.core.trainer import build_trainer
from polyfm.ts.data import ForecastDataModule, read_series
from polyfm.ts.models.ttm import TTM
from polyfm.ts.predict import ForecastWriter, future_forecasts, window_forecasts
from polyfm.ts.samples import synthetic_series

warnings.filterwarnings("ignore", ".*does not have many workers.*")
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

CONTEXT, HORIZON = 64, 16


def _task(seed: int = 0, channels: int = 2) -> Forecasting:
    torch.manual_seed(seed)
    # no per-window scaling inside the TTM: its forecasts then depend on the DataModule's scaling, which is under test
    model = TTM(context_length=CONTEXT, prediction_length=HORIZON, patch_length=8, d_model=16, decoder_d_model=8, num_layers=1,
                adaptive_patching_levels=1, num_input_channels=channels, scaling=None)
    return Forecasting(model)


def _trainer(root: Path, callbacks: list | None = None, **kwargs) -> object:
    return build_trainer(default_root_dir=str(root), accelerator="cpu", loggers=(), enable_progress_bar=False, enable_checkpointing=False,
                         enable_model_summary=False, callbacks=callbacks, **kwargs)


def _fit_checkpoint(tmp_path: Path, path: str, seed: int = 0, **data) -> tuple[Path, ForecastDataModule]:
    dm = ForecastDataModule(path, context_length=CONTEXT, horizon=HORIZON, split=[0.7, 0.1, 0.2], batch_size=16, **data)
    task = _task(seed)
    trainer = _trainer(tmp_path / f"fit{seed}", max_steps=3, limit_val_batches=0)
    trainer.fit(task, datamodule=dm)
    checkpoint = tmp_path / f"seed{seed}.ckpt"
    trainer.save_checkpoint(checkpoint)
    return checkpoint, dm


def _predict_future(tmp_path: Path, path: Path, checkpoint: Path | None, folder: str) -> pd.DataFrame:
    dm = ForecastDataModule(str(path), context_length=CONTEXT, horizon=HORIZON, split=[0.7, 0.1, 0.2], predict_mode="future")
    writer = ForecastWriter(output=str(tmp_path / folder))
    _trainer(tmp_path / "predict", callbacks=[writer]).predict(_task(seed=99), datamodule=dm, ckpt_path=checkpoint,
                                                              return_predictions=False)
    assert writer.written == [tmp_path / folder / f"{path.name.removesuffix('.csv')}-future.csv"]
    return pd.read_csv(writer.written[0], parse_dates=["date"])


def test_ts_checkpoint_scaling_forecasts_recent_rows_as_the_full_file(tmp_path: Path) -> None:
    """Fit, then forecast past the end from the .ckpt: a file of the last 300 rows gives the forecasts of the full file
    (the checkpoint's scaler, not one refitted on the recent rows), equal to the model run by hand on the last context."""
    frame = synthetic_series(900, channels=2, seed=5)
    frame["x0"] = 40.0 + 8.0 * frame["x0"]  # far from unit scale: a scaler refitted on other rows shows
    frame.to_csv(tmp_path / "full.csv", index=False)
    frame.iloc[-300:].to_csv(tmp_path / "recent.csv", index=False)
    checkpoint, fit_dm = _fit_checkpoint(tmp_path, str(tmp_path / "full.csv"))

    saved = torch.load(checkpoint, weights_only=True)["ForecastDataModule"]["scaling"]
    train_rows = frame[["x0", "x1"]].to_numpy()[: int(900 * 0.7)]
    assert saved["columns"] == ["x0", "x1"] and list(saved["series"]) == [""]
    np.testing.assert_allclose(saved["series"][""]["mean"], train_rows.mean(0), rtol=1e-5)
    np.testing.assert_allclose(saved["series"][""]["std"], train_rows.std(0), rtol=1e-4)

    full = _predict_future(tmp_path, tmp_path / "full.csv", checkpoint, "a")
    recent = _predict_future(tmp_path, tmp_path / "recent.csv", checkpoint, "b")
    assert list(full.columns) == ["step", "date", "x0", "x1"] and len(full) == HORIZON
    assert full["date"].tolist() == list(pd.date_range(frame["date"].iloc[-1] + pd.Timedelta(hours=1), periods=HORIZON, freq="h"))
    pd.testing.assert_frame_equal(recent, full, rtol=1e-5, atol=1e-5)

    # by hand: the fitted model on the last context, scaled with the train rows' statistics, unscaled after
    task = _task(seed=99)
    task.load_state_dict(torch.load(checkpoint, weights_only=True)["state_dict"])
    mean, std = train_rows.mean(0), train_rows.std(0)
    past = torch.tensor((frame[["x0", "x1"]].to_numpy()[-CONTEXT:] - mean) / std, dtype=torch.float32)[None]
    with torch.no_grad():
        expected = task.eval()(past_values=past)[0].numpy() * std + mean
    np.testing.assert_allclose(full[["x0", "x1"]].to_numpy(), expected, rtol=1e-4, atol=1e-3)

    refitted = _predict_future(tmp_path, tmp_path / "recent.csv", None, "c")  # no checkpoint: scaled with the recent rows
    assert np.abs(refitted["x0"].to_numpy() - full["x0"].to_numpy()).max() > 0.1


def test_ts_checkpoint_scaling_refuses_other_channels_and_series(tmp_path: Path) -> None:
    frame = synthetic_series(400, channels=3, seed=1)
    frame.to_csv(tmp_path / "three.csv", index=False)
    checkpoint, _ = _fit_checkpoint(tmp_path, str(tmp_path / "three.csv"), columns=["x0", "x1"])
    other = ForecastDataModule(str(tmp_path / "three.csv"), context_length=CONTEXT, horizon=HORIZON, columns=["x0", "x2"],
                               predict_mode="future")
    trainer = _trainer(tmp_path / "p", callbacks=[ForecastWriter(output=str(tmp_path / "out"))])
    with pytest.raises(DataError, match=r"three\.csv.*\['x0', 'x2'\] differ from .* \['x0', 'x1'\] \(missing \['x1'\], extra \['x2'\]\)"):
        trainer.predict(_task(), datamodule=other, ckpt_path=checkpoint)
    assert not (tmp_path / "out").exists()

    stations = pd.concat([synthetic_series(300, channels=2, seed=s).assign(station=name) for s, name in ((2, "A"), (3, "B"))])
    fitted = ForecastDataModule.from_frame(stations, name="plants", context_length=CONTEXT, horizon=HORIZON, split=[0.7, 0.1, 0.2],
                                           id_columns=["station"])
    fitted.prepare()
    state = fitted.state_dict()
    assert list(state["scaling"]["series"]) == ["station=A", "station=B"]
    new = ForecastDataModule.from_frame(stations.replace({"station": {"B": "C"}}), name="plants-new", context_length=CONTEXT,
                                        horizon=HORIZON, id_columns=["station"], predict_mode="future")
    new.load_state_dict(state)
    with pytest.raises(DataError, match=r"plants-new\[station=C\].*series station=C has no scaler.*\['station=A', 'station=B'\]"):
        new.prepare()
    single = ForecastDataModule.from_frame(synthetic_series(300, channels=2), name="one", context_length=CONTEXT, horizon=HORIZON,
                                           predict_mode="future")
    single.load_state_dict(state)
    with pytest.raises(DataError, match=r"series <the one series> has no scaler"):
        single.prepare()


def test_ts_future_mode_builtin_sample_per_series(tmp_path: Path) -> None:
    """Two series in long format, no checkpoint: horizon rows per series after its own last timestamp, in its units."""
    parts = [synthetic_series(300, channels=2, seed=s).assign(station=name) for s, name in ((2, "B"), (3, "A"))]
    parts[0]["x0"] += 500.0
    parts[1] = parts[1].iloc[:-5]  # A ends five hours earlier than B
    long = pd.concat(parts, ignore_index=True)
    dm = ForecastDataModule.from_frame(long, name="plants", context_length=CONTEXT, horizon=HORIZON, split=[0.7, 0.1, 0.2],
                                       id_columns=["station"], predict_mode="future", target_columns=["x0"])
    writer = ForecastWriter(output=str(tmp_path))
    task = Forecasting(TTM(context_length=CONTEXT, prediction_length=HORIZON, patch_length=8, d_model=16, decoder_d_model=8,
                           num_layers=1, adaptive_patching_levels=1, **dm.model_config()))
    _trainer(tmp_path, callbacks=[writer]).predict(task, datamodule=dm)
    out = pd.read_csv(tmp_path / "plants-future.csv", parse_dates=["date"])
    assert list(out.columns) == ["station", "step", "date", "x0"] and out["station"].tolist() == ["A"] * HORIZON + ["B"] * HORIZON
    for station, group in out.groupby("station"):
        last = long.loc[long["station"] == station, "date"].iloc[-1]
        assert group["date"].tolist() == list(pd.date_range(last + pd.Timedelta(hours=1), periods=HORIZON, freq="h"))
        assert group["step"].tolist() == list(range(1, HORIZON + 1))
    # by hand for B: its own scaler (its train rows), its last context
    b = long.loc[long["station"] == "B", ["x0", "x1"]].to_numpy()
    mean, std = b[:210].mean(0), b[:210].std(0)
    with torch.no_grad():
        expected = task.eval()(past_values=torch.tensor((b[-CONTEXT:] - mean) / std, dtype=torch.float32)[None])[0, :, 0].numpy()
    np.testing.assert_allclose(out.loc[out["station"] == "B", "x0"], expected * std[0] + mean[0], rtol=1e-4)
    assert out.loc[out["station"] == "B", "x0"].mean() > 400
    predictions = _trainer(tmp_path).predict(task, datamodule=dm)
    with pytest.raises(ConfigError, match=r"past the end .* future_forecasts"):
        window_forecasts(dm, predictions)
    pd.testing.assert_frame_equal(future_forecasts(dm, predictions), out, rtol=1e-5, atol=1e-5, check_dtype=False)


def test_ts_future_mode_on_etth1_through_the_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The user's path on the real ETTh1: fit the CSV recipe, then `polyfm predict --data.init_args.predict_mode=future`
    from last.ckpt on the full file and on its last 200 rows: the same 16 hours after 2018-06-26 19:00."""
    from polyfm.core.cli import main
    from polyfm.ts.predict import __file__ as predict_file

    root = os.environ.get("POLYFM_DATA_DIR")
    if not root or not (Path(root) / "ts" / "ETTh1.csv").exists():
        pytest.skip("POLYFM_DATA_DIR with ts/ETTh1.csv is not set")
    recipe = Path(predict_file).parent / "recipes" / "finetune-csv-scratch.yaml"
    etth1 = pd.read_csv(Path(root) / "ts" / "ETTh1.csv", parse_dates=["date"])
    etth1.iloc[-200:].to_csv(tmp_path / "ETTh1-recent.csv", index=False)
    monkeypatch.chdir(tmp_path)
    small = ["context_length=64", "prediction_length=16", "patch_length=8", "d_model=16", "decoder_d_model=8", "adaptive_patching_levels=1"]
    args = ["--config", str(recipe), "--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
            *[f"--model.init_args.model.init_args.{a}" for a in small], "--data.init_args.context_length=64",
            "--data.init_args.horizon=16", "--data.init_args.batch_size=8"]
    main(["fit", *args, "--trainer.max_steps=2", "--trainer.limit_val_batches=1", "--trainer.val_check_interval=2"])
    last = tmp_path / "runs" / "ts-csv" / "checkpoints" / "last.ckpt"
    future = ["--data.init_args.predict_mode=future", f"--ckpt_path={last}"]
    main(["predict", *args, *future])
    main(["predict", *args, *future, "--data.init_args.path=ETTh1-recent.csv"])
    folder = tmp_path / "runs" / "ts-csv" / "predictions"
    full = pd.read_csv(folder / "ETTh1-future.csv", parse_dates=["date"])
    recent = pd.read_csv(folder / "ETTh1-recent-future.csv", parse_dates=["date"])
    channels = ["HUFL", "HULL", "MUFL", "MULL", "LUFL", "LULL", "OT"]
    assert list(full.columns) == ["step", "date", *channels] and len(full) == 16
    assert full["date"].iloc[0] == etth1["date"].iloc[-1] + pd.Timedelta(hours=1) == pd.Timestamp("2018-06-26 20:00")
    pd.testing.assert_frame_equal(recent, full, rtol=1e-5, atol=1e-4)
    assert (full["OT"] - etth1["OT"].iloc[-200:].mean()).abs().max() < 30  # the file's units (OT is about 10)


def test_ts_freq_for_calendar_series_with_gaps(tmp_path: Path) -> None:
    """Month starts with one month missing: not a fixed step, so an error naming the file and the row unless
    freq='MS' is given; then the gap is filled (on_gap) and the future continues at month starts."""
    dates = pd.date_range("2015-01-01", periods=120, freq="MS").delete(50)
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"date": dates, "sales": 100 + 10 * np.sin(np.arange(119) / 12 * 2 * np.pi) + rng.normal(0, 1, 119)})
    frame.to_csv(tmp_path / "monthly.csv", index=False)
    with pytest.raises(DataError, match=r"monthly\.csv: data row \d+ \(line \d+\): timestamp .* off the regular .*pass it as freq"):
        read_series(tmp_path / "monthly.csv")
    with pytest.raises(DataError, match=r"monthly\.csv: data row 51 \(line 52\): 2019-02-01 00:00:00 is followed by 2019-04-01.*'MS'"):
        read_series(tmp_path / "monthly.csv", freq="MS")
    with pytest.raises(DataError, match=r"monthly\.csv: data row 1 \(line 2\): timestamp 2015-01-01.* not on the 'W-SUN' grid"):
        read_series(tmp_path / "monthly.csv", freq="W")
    with pytest.raises(ConfigError, match=r"freq='monthly' is not a pandas frequency.*'MS'"):
        ForecastDataModule(str(tmp_path / "monthly.csv"), freq="monthly")

    dm = ForecastDataModule(str(tmp_path / "monthly.csv"), context_length=24, horizon=6, split=[0.7, 0.1, 0.2], freq="MS",
                            on_gap="nan", on_missing="interpolate", predict_mode="future")
    task = Forecasting(TTM(context_length=24, prediction_length=6, patch_length=4, d_model=8, decoder_d_model=8, num_layers=1,
                           adaptive_patching_levels=0))
    writer = ForecastWriter(output=str(tmp_path / "out"))
    _trainer(tmp_path, callbacks=[writer]).predict(task, datamodule=dm)
    out = pd.read_csv(tmp_path / "out" / "monthly-future.csv", parse_dates=["date"])
    assert out["date"].dt.strftime("%Y-%m-%d").tolist() == ["2025-01-01", "2025-02-01", "2025-03-01", "2025-04-01", "2025-05-01",
                                                             "2025-06-01"]
    assert dm.series.report["inserted_rows"] == 1 and np.isfinite(out["sales"]).all()


def test_ts_ensemble_of_two_checkpoints_writes_mean_and_spread(tmp_path: Path) -> None:
    """polyfm.core.predict.Ensemble over two fits (seeds 0, 1): the written forecast is the members' mean and
    <channel>_std their sample spread, in the file's units, for the test windows and past the end."""
    frame = synthetic_series(500, channels=2, seed=8)
    frame["x1"] = 10.0 * frame["x1"] - 30.0
    frame.to_csv(tmp_path / "series.csv", index=False)
    checkpoints = [_fit_checkpoint(tmp_path, str(tmp_path / "series.csv"), seed=seed)[0] for seed in (0, 1)]

    def data(mode: str = "test") -> ForecastDataModule:
        return ForecastDataModule(str(tmp_path / "series.csv"), context_length=CONTEXT, horizon=HORIZON, split=[0.7, 0.1, 0.2],
                                  eval_stride=8, predict_mode=mode)

    members = []
    for checkpoint in checkpoints:  # each member alone, through the same table builder
        dm = data()
        predictions = _trainer(tmp_path / "m").predict(_task(seed=7), datamodule=dm, ckpt_path=checkpoint)
        members.append(window_forecasts(dm, predictions))
    stacked = np.stack([m[["x0", "x1"]].to_numpy() for m in members])
    assert np.abs(stacked[0] - stacked[1]).max() > 1e-3  # two different models

    writer = ForecastWriter(output=str(tmp_path / "ensemble"))
    _trainer(tmp_path / "e", callbacks=[writer]).predict(Ensemble(_task(seed=7), [str(c) for c in checkpoints]), datamodule=data())
    out = pd.read_csv(tmp_path / "ensemble" / "series-forecast.csv")
    assert list(out.columns) == ["origin", "step", "date", "x0", "x1", "x0_std", "x1_std", "x0_true", "x1_true"]
    np.testing.assert_allclose(out[["x0", "x1"]].to_numpy(), stacked.mean(0), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out[["x0_std", "x1_std"]].to_numpy(), stacked.std(0, ddof=1), rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(out[["x0_true", "x1_true"]].to_numpy(), members[0][["x0_true", "x1_true"]].to_numpy())

    def ensemble() -> Ensemble:
        return Ensemble(_task(seed=7), [str(c) for c in checkpoints])

    _trainer(tmp_path / "e", callbacks=[writer]).predict(ensemble(), datamodule=data("future"))
    future = pd.read_csv(tmp_path / "ensemble" / "series-future.csv")
    assert list(future.columns) == ["step", "date", "x0", "x1", "x0_std", "x1_std"] and len(future) == HORIZON
    assert (future[["x0_std", "x1_std"]].to_numpy() > 0).all()
    # the checkpoints' scaling serves the ensemble too: 100 recent rows (too few to fit a scaler on) forecast the same
    frame.iloc[-100:].to_csv(tmp_path / "series-recent.csv", index=False)
    recent = ForecastDataModule(str(tmp_path / "series-recent.csv"), context_length=CONTEXT, horizon=HORIZON, split=[0.7, 0.1, 0.2],
                                predict_mode="future")
    _trainer(tmp_path / "e", callbacks=[writer]).predict(ensemble(), datamodule=recent)
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "ensemble" / "series-recent-future.csv"), future, rtol=1e-5, atol=1e-5)

    frame.assign(x0=frame["x0"] * 3).to_csv(tmp_path / "other.csv", index=False)
    checkpoints[1] = _fit_checkpoint(tmp_path, str(tmp_path / "other.csv"), seed=1)[0]
    with pytest.raises(ConfigError, match=r"different ForecastDataModule states \(.*seed1\.ckpt differs from .*seed0\.ckpt\)"):
        _trainer(tmp_path / "e", callbacks=[writer]).predict(ensemble(), datamodule=data("future"))
