"""Parity with granite-tsfm's TinyTimeMixerForPrediction (random weights, same keys)."""

from __future__ import annotations

import logging

import pytest
import torch

from polyfm.core.weights import load_state_dict_checked
from polyfm.ts.models.ttm import TTM, TTMConfig

tinytimemixer = pytest.importorskip("tsfm_public.models.tinytimemixer")
logging.getLogger("tsfm_public").setLevel(logging.ERROR)

BASE = dict(context_length=64, patch_length=8, patch_stride=8, num_input_channels=3, prediction_length=16,
            d_model=32, num_layers=2, decoder_d_model=16, decoder_num_layers=2)

CONFIGS = {
    "r2-like-adaptive": dict(adaptive_patching_levels=3),
    "mix-channel+prefix": dict(adaptive_patching_levels=3, mode="mix_channel", decoder_mode="mix_channel",
                               resolution_prefix_tuning=True, frequency_token_vocab_size=10),
    "exogenous-fcm-mixer+filter": dict(adaptive_patching_levels=2, decoder_mode="mix_channel", exogenous_channel_indices=[2],
                                       enable_forecast_channel_mixing=True, fcm_use_mixer=True, fcm_context_length=2,
                                       prediction_filter_length=12, decoder_raw_residual=True, resolution_prefix_tuning=True, frequency_token_vocab_size=10),
    "selfattn-batchnorm-mean-scaler": dict(self_attn=True, self_attn_heads=2, use_positional_encoding=True, norm_mlp="BatchNorm",
                                           scaling="mean", enable_forecast_channel_mixing=True, fcm_context_length=0,
                                           prediction_channel_indices=[0, 2]),
    "static-categorical-no-scaling": dict(categorical_vocab_size_list=[3, 4], decoder_mode="mix_channel", use_positional_encoding=True,
                                          positional_encoding_type="random", scaling=None, fcm_prepend_past_offset=2,
                                          enable_forecast_channel_mixing=True),
}


def _inputs(config: dict, batch: int = 4) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    inputs = {
        "past_values": torch.randn(batch, config["context_length"], config["num_input_channels"], generator=generator) * 5 + 2,
        "future_values": torch.randn(batch, config["prediction_length"], config["num_input_channels"], generator=generator),
    }
    if config.get("resolution_prefix_tuning"):
        inputs["freq_token"] = torch.tensor([7, 3, 0, 1])[:batch]
    if config.get("categorical_vocab_size_list"):
        inputs["static_categorical_values"] = torch.tensor([[0, 1], [2, 3], [1, 0], [2, 2]])[:batch]
    return inputs


def _reference(config: dict):
    torch.manual_seed(0)
    return tinytimemixer.TinyTimeMixerForPrediction(tinytimemixer.TinyTimeMixerConfig(**config)).eval()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_ts_parity_prediction_outputs(name: str) -> None:
    config = {**BASE, **CONFIGS[name]}
    reference = _reference(config)
    ours = TTM.from_config(TTMConfig.from_dict(reference.config.to_dict())).eval()
    load_state_dict_checked(ours, reference.state_dict(), strict=True)  # same key names, same shapes
    inputs = _inputs(config)
    with torch.no_grad():
        expected = reference(**inputs)
        got = ours(**inputs)
    assert got["prediction_outputs"].shape == expected.prediction_outputs.shape
    torch.testing.assert_close(got["prediction_outputs"], expected.prediction_outputs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got["backbone_hidden_state"], expected.backbone_hidden_state, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got["loss"], expected.loss, atol=1e-5, rtol=1e-5)


def test_ts_parity_hub_folder_loads_strict(tmp_path) -> None:
    """A folder written by granite-tsfm's save_pretrained (the hub layout) loads by path, strictly."""
    config = {**BASE, **CONFIGS["mix-channel+prefix"]}
    reference = _reference(config)
    reference.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists() and (tmp_path / "config.json").exists()
    ours = TTM.from_pretrained(tmp_path).eval()
    inputs = _inputs(config)
    with torch.no_grad():
        torch.testing.assert_close(ours(**inputs)["prediction_outputs"], reference(**inputs).prediction_outputs, atol=1e-5, rtol=1e-5)


def test_ts_parity_r2_512_96_architecture(tmp_path) -> None:
    """The r2 512-96 architecture (TTM's defaults in our constructor): same parameter count and keys as the reference."""
    ours = TTM(num_input_channels=1)
    config = TTMConfig.from_dict(ours.config.to_dict()).to_dict()
    reference = tinytimemixer.TinyTimeMixerForPrediction(tinytimemixer.TinyTimeMixerConfig(**config))
    assert set(ours.state_dict()) == set(reference.state_dict())
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in reference.parameters())
    ours.save_pretrained(tmp_path)  # and our own hub-layout writer is readable by granite-tsfm
    back = tinytimemixer.TinyTimeMixerForPrediction.from_pretrained(tmp_path).eval()
    x = torch.randn(2, 512, 1)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x)["prediction_outputs"], back(past_values=x).prediction_outputs, atol=1e-5, rtol=1e-5)


def test_ts_parity_zero_shot_pipeline(tmp_path) -> None:
    """Zero-shot: an official-layout univariate checkpoint, loaded with a shorter forecast (filter length),
    evaluated over every window of a 3-channel series, matches granite-tsfm on the same windows."""
    from torch.utils.data import DataLoader

    from polyfm.ts.data import ForecastDataModule
    from polyfm.ts.forecast import rolling_evaluate
    from polyfm.ts.samples import synthetic_series

    config = {**BASE, **CONFIGS["r2-like-adaptive"], "num_input_channels": 1}
    reference = _reference(config)
    reference.save_pretrained(tmp_path)
    ours = TTM.from_pretrained(tmp_path, prediction_filter_length=8)
    dm = ForecastDataModule.from_frame(synthetic_series(600, channels=3, seed=5), name="zs", context_length=64, horizon=8,
                                       split=[0.6, 0.2, 0.2], eval_stride=3)
    scores = rolling_evaluate(ours, dm, "test")
    batch = next(iter(DataLoader(dm.dataset("test"), batch_size=10_000)))
    with torch.no_grad():
        expected = reference(past_values=batch["past_values"]).prediction_outputs[:, :8]
    mse = torch.nn.functional.mse_loss(expected, batch["future_values"]).item()
    assert scores["windows"] == len(batch["past_values"])
    assert abs(scores["mse"] - mse) < 1e-5 * max(1.0, mse)
