"""Benchmarks: TTM forward and train-step throughput vs granite-tsfm, same config and weights,
and the data pipeline's windows per second.

Cases (``polyfm bench``): r2 512-96 (common channel, adaptive patching) and, in full mode,
a mix-channel decoder with resolution prefix tuning (1024-96); for each, inference (no
grad) and one AdamW train step. Items are forecast windows (one multivariate window = one
item). The reference is granite-tsfm's ``TinyTimeMixerForPrediction`` holding the same
weights (a test-only dependency; the case reports "skipped" without it).

``ts/windows-<context>-<horizon>``: an ETT-like CSV (17420 hourly rows, 7 channels and a
date column, written once to a temporary folder) read, scaled with train-split statistics
and cut into every train, validation and test window of the ETT split, each window
fetched once: ``ForecastDataModule`` (what fine-tuning uses) vs granite-tsfm's
``TimeSeriesPreprocessor`` (standard scaling) and ``get_datasets`` (``ForecastDFDataset``
per split), the way its TTM fine-tuning notebooks use them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from polyfm.core.bench import BenchCase, scratch_dir

Step = Callable[[], object]

CONFIGS: dict[str, dict[str, Any]] = {
    "r2-512-96": dict(context_length=512, prediction_length=96, patch_length=64, d_model=192, decoder_d_model=128, num_layers=2,
                      decoder_num_layers=2, adaptive_patching_levels=3, dropout=0.4, head_dropout=0.4, num_input_channels=7),
    "mixchannel-prefix-1024-96": dict(context_length=1024, prediction_length=96, patch_length=128, d_model=192, decoder_d_model=128,
                                      num_layers=2, decoder_num_layers=2, adaptive_patching_levels=3, decoder_mode="mix_channel",
                                      resolution_prefix_tuning=True, frequency_token_vocab_size=10, num_input_channels=7),
}


def _models(name: str) -> tuple[torch.nn.Module, dict[str, Any]]:
    from polyfm.ts.models.ttm import TTM

    torch.manual_seed(0)
    return TTM(**CONFIGS[name]), {**CONFIGS[name], "patch_stride": CONFIGS[name]["patch_length"]}


def _inputs(config: dict[str, Any], batch: int, device: torch.device) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    inputs = {"past_values": torch.randn(batch, config["context_length"], config["num_input_channels"], generator=generator)}
    if config.get("resolution_prefix_tuning"):
        inputs["freq_token"] = torch.full((batch,), 7)
    return {k: v.to(device) for k, v in inputs.items()}


def _reference_of(ours: torch.nn.Module, config: dict[str, Any]) -> torch.nn.Module:
    from tsfm_public.models.tinytimemixer import TinyTimeMixerConfig, TinyTimeMixerForPrediction

    reference: torch.nn.Module = TinyTimeMixerForPrediction(TinyTimeMixerConfig(**config))
    reference.load_state_dict(ours.state_dict(), strict=True)
    return reference


def _step(model: torch.nn.Module, inputs: dict[str, torch.Tensor], train: bool, target: torch.Tensor) -> Step:
    def output() -> torch.Tensor:
        out = model(**inputs)
        prediction: torch.Tensor = out["prediction_outputs"] if isinstance(out, dict) else out.prediction_outputs
        return prediction

    if not train:
        model.eval()

        def infer() -> object:
            with torch.no_grad():
                return output()

        return infer
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def train_step() -> object:
        optimizer.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(output(), target)
        torch.autograd.backward(loss)  # Tensor.backward is unannotated in torch; this is the typed function it calls
        optimizer.step()
        return loss

    return train_step


def _case(name: str, train: bool, batch: int) -> BenchCase:
    def build(reference: bool) -> Callable[[torch.device], Step]:
        def make(device: torch.device) -> Step:
            ours, config = _models(name)
            model = _reference_of(ours, config) if reference else ours
            model.to(device)
            inputs = _inputs(config, batch, device)
            target = torch.randn(batch, config["prediction_length"], config["num_input_channels"], device=device)
            return _step(model, inputs, train, target)

        return make

    return BenchCase(
        name=f"ts/ttm-{name}/{'train' if train else 'inference'}",
        unit="windows",
        items=batch,
        ours=build(False),
        reference=build(True),
        reference_name="granite-tsfm TinyTimeMixerForPrediction",
    )


ETT_ROWS, ETT_CHANNELS = 17420, ("HUFL", "HULL", "MUFL", "MULL", "LUFL", "LULL", "OT")
ETT_BORDERS = (8640, 11520, 14400)  # the ETT split of 17420 hourly rows: 12/4/4 months of 30 days


def ett_like_csv(folder: Path, rows: int = ETT_ROWS) -> Path:
    """An hourly series shaped like ETTh1 (``date`` + 7 channels): daily cycles, drift, noise."""
    import pandas as pd

    rng = np.random.default_rng(0)
    hours = np.arange(rows)[:, None]
    values = (
        10 * np.sin(2 * np.pi * hours / 24 + rng.uniform(0, np.pi, len(ETT_CHANNELS)))
        + np.cumsum(rng.normal(0, 0.1, (rows, len(ETT_CHANNELS))), axis=0)
        + rng.normal(0, 1, (rows, len(ETT_CHANNELS)))
    )
    frame = pd.DataFrame(values.round(3), columns=list(ETT_CHANNELS))
    frame.insert(0, "date", pd.date_range("2016-07-01", periods=rows, freq="h").strftime("%Y-%m-%d %H:%M:%S"))
    path = folder / "ett_like.csv"
    frame.to_csv(path, index=False)
    return path


def _fetch_all(datasets: Any) -> int:
    """Every window of every dataset, once; the number fetched."""
    fetched = 0
    for dataset in datasets:
        for index in range(len(dataset)):
            dataset[index]
            fetched += 1
    return fetched


def _window_count(context: int, horizon: int) -> int:
    train = ETT_BORDERS[0] - context - horizon + 1
    return train + sum(end - start - horizon + 1 for start, end in zip(ETT_BORDERS, ETT_BORDERS[1:]))


def _windows_case(name: str) -> BenchCase:
    context, horizon = CONFIGS[name]["context_length"], CONFIGS[name]["prediction_length"]
    items = _window_count(context, horizon)
    state: dict[str, Path] = {}

    def csv() -> Path:
        if "csv" not in state:
            state["csv"] = ett_like_csv(scratch_dir("polyfm-bench-ts-"))
        return state["csv"]

    def checked(pipeline: Callable[[], int]) -> Step:
        def step() -> int:
            fetched = pipeline()
            if fetched != items:
                raise RuntimeError(f"{name}: {fetched} windows fetched, expected {items}")
            return fetched

        return step

    def ours(device: torch.device) -> Step:
        from polyfm.ts.data import ForecastDataModule

        path = csv()

        def pipeline() -> int:
            data = ForecastDataModule(str(path), context_length=context, horizon=horizon, split="ett")
            data.setup("fit")
            return _fetch_all((data.train_set, data.val_set, data.test_set))

        return checked(pipeline)

    def reference(device: torch.device) -> Step:
        import pandas as pd
        from tsfm_public.toolkit.time_series_preprocessor import TimeSeriesPreprocessor, get_datasets

        path = csv()
        split = {"train": [0, ETT_BORDERS[0]], "valid": list(ETT_BORDERS[:2]), "test": list(ETT_BORDERS[1:])}

        def pipeline() -> int:
            preprocessor = TimeSeriesPreprocessor(
                timestamp_column="date", target_columns=list(ETT_CHANNELS), context_length=context,
                prediction_length=horizon, scaling=True, encode_categorical=False, scaler_type="standard",
            )  # fmt: skip
            return _fetch_all(get_datasets(preprocessor, pd.read_csv(path, parse_dates=["date"]), split_config=split))

        return checked(pipeline)

    return BenchCase(
        f"ts/windows-{context}-{horizon}", "windows", items, ours, reference,
        reference_name="granite-tsfm TimeSeriesPreprocessor + ForecastDFDataset",
    )  # fmt: skip


def cases(quick: bool) -> list[BenchCase]:
    batch = 32 if quick else 256
    names = ["r2-512-96"] if quick else list(CONFIGS)
    models = [_case(name, train, batch) for name in names for train in (False, True)]
    return [*models, *(_windows_case(name) for name in names)]
