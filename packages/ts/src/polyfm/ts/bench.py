"""Benchmarks: TTM forward and train-step throughput vs granite-tsfm, same config and weights.

Cases (``polyfm bench``): r2 512-96 (common channel, adaptive patching) and a mix-channel
decoder with resolution prefix tuning; for each, inference (no grad) and one AdamW train
step. Items are forecast windows (one multivariate window = one item). The reference is
granite-tsfm's ``TinyTimeMixerForPrediction`` holding the same weights (a test-only
dependency; the case reports "skipped" without it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from polyfm.core.bench import BenchCase

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

    reference = TinyTimeMixerForPrediction(TinyTimeMixerConfig(**config))
    reference.load_state_dict(ours.state_dict(), strict=True)
    return reference


def _step(model: torch.nn.Module, inputs: dict[str, torch.Tensor], train: bool, target: torch.Tensor) -> Step:
    def output() -> torch.Tensor:
        out = model(**inputs)
        return out["prediction_outputs"] if isinstance(out, dict) else out.prediction_outputs

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
        loss.backward()
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


def cases(quick: bool) -> list[BenchCase]:
    batch = 32 if quick else 256
    names = ["r2-512-96"] if quick else list(CONFIGS)
    return [_case(name, train, batch) for name in names for train in (False, True)]
