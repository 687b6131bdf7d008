"""Built-in sample series and the demo kit (the ``polyfm.kits`` entry point).

Without a data dir the demo pretrains a small TTM on generated multi-resolution series and
fine-tunes it on a held-out generated series; with one, it fine-tunes on ETTh1
(``<data_dir>/ts/ETTh1.csv``, the standard 12/4/4-month split). The generated series mix
daily and weekly cycles, trends, regime shifts and AR(1) noise, with correlated channels, so
pretraining has structure to learn that transfers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from polyfm.core.adaptation import Adaptation
from polyfm.core.encoder import Encoder
from polyfm.core.kit import DomainKit


def synthetic_series(length: int = 3000, channels: int = 3, freq: str = "h", seed: int = 0) -> pd.DataFrame:
    """One multivariate series in the ETT layout (``date`` + channels ``x0..``)."""
    rng = np.random.default_rng(seed)
    t = np.arange(length, dtype=np.float64)
    steps_per_day = int(pd.Timedelta(days=1) / pd.Timedelta(pd.tseries.frequencies.to_offset(freq)))
    base = np.zeros(length)
    for period, amplitude in ((steps_per_day, rng.uniform(0.5, 2.0)), (7 * steps_per_day, rng.uniform(0.2, 1.0)),
                              (rng.uniform(5, 50), rng.uniform(0.0, 0.5))):
        base += amplitude * np.sin(2 * np.pi * t / period + rng.uniform(0, 2 * np.pi))
    base += rng.uniform(-1, 1) * t / length + np.cumsum(rng.normal(0, 0.02, length))
    columns = {}
    for c in range(channels):
        noise = np.zeros(length)
        innovations = rng.normal(0, rng.uniform(0.05, 0.3), length)
        phi = rng.uniform(0.3, 0.9)
        for i in range(1, length):
            noise[i] = phi * noise[i - 1] + innovations[i]
        columns[f"x{c}"] = rng.uniform(0.5, 2.0) * base + rng.normal(0, 3) + noise + rng.uniform(0, 0.5) * np.roll(base, c + 1)
    return pd.DataFrame({"date": pd.date_range("2021-01-01", periods=length, freq=freq), **columns})


def pretraining_frames(count: int = 12, length: int = 2000, seed: int = 100) -> list[tuple[pd.DataFrame, str]]:
    """Many generated series at 15-minute, hourly and daily steps."""
    freqs = ("15min", "h", "h", "D")
    return [(synthetic_series(length, channels=2, freq=freqs[i % len(freqs)], seed=seed + i), f"synthetic-{i}") for i in range(count)]


def demo_kit(data_dir: Path | None, quick: bool = False) -> DomainKit:
    from polyfm.core.pretrain import Pretraining
    from polyfm.core.tasks import Forecasting, OptimConfig
    from polyfm.ts.data import ForecastDataModule, PretrainDataModule
    from polyfm.ts.models.ttm import TTM, head_only
    from polyfm.ts.objectives import MultiResolutionForecasting

    context, horizon = (128, 24) if quick else (512, 96)
    ett = Path(data_dir) / "ts" / "ETTh1.csv" if data_dir is not None else None
    if ett is not None and not ett.exists():
        raise FileNotFoundError(f"{ett} not found: the ts demo on real data needs ETTh1.csv under <data_dir>/ts/.")
    target_frame = synthetic_series(3000 if quick else 12000, channels=3, seed=7) if ett is None else None

    def make_encoder() -> TTM:
        return TTM(context_length=context, prediction_length=horizon, patch_length=context // 8, d_model=32 if quick else 64,
                   decoder_d_model=16 if quick else 32, num_layers=2, adaptive_patching_levels=2, dropout=0.1, head_dropout=0.1,
                   num_input_channels=1)

    def make_pretrain_data() -> PretrainDataModule:
        frames = pretraining_frames(count=8 if quick else 24, length=1000 if quick else 6000)
        return PretrainDataModule.from_frames(frames, context_length=context, horizon=horizon, resolutions=[1, 2, 4],
                                              max_windows=12 if quick else 400, stride=4, batch_size=64)

    def make_task(encoder: Encoder, adaptation: Adaptation) -> Forecasting:
        # a linear probe of a forecaster is TTM's head-only recipe (decoder + head train)
        adaptation = head_only(encoder) if adaptation.mode == "linear" else adaptation
        return Forecasting(encoder, adaptation=adaptation, optim=OptimConfig(lr=3e-3, weight_decay=0.0))

    def make_finetune_data(fraction: float, seed: int) -> ForecastDataModule:
        if ett is not None:  # quick: every 4th training window of ETTh1 (8.5k windows at stride 1)
            return ForecastDataModule(str(ett), context_length=context, horizon=horizon, split="ett", train_stride=4 if quick else 1,
                                      eval_stride=horizon, batch_size=64, label_fraction=fraction, seed=seed)
        assert target_frame is not None  # generated when there is no ETTh1
        return ForecastDataModule.from_frame(target_frame, name="synthetic-target", context_length=context, horizon=horizon,
                                             split=[0.6, 0.2, 0.2], eval_stride=horizon, batch_size=64, label_fraction=fraction, seed=seed)

    return DomainKit(
        name="ts",
        target="etth1-forecast" if ett is not None else "synthetic-forecast",
        metric="test/mse",
        higher_is_better=False,
        make_encoder=make_encoder,
        make_pretraining=lambda encoder: Pretraining(encoder, MultiResolutionForecasting(), optim=OptimConfig(lr=3e-3, weight_decay=0.0)),
        make_pretrain_data=make_pretrain_data,
        make_task=make_task,
        make_finetune_data=make_finetune_data,
        pretrain_epochs=1 if quick else 5,
        finetune_epochs=2 if quick else 10,
        data_source=str(ett) if ett is not None else "built-in samples (generated series)",
    )
