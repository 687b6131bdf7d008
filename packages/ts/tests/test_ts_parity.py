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


# Configurations a checkpoint or a fine-tuning recipe may carry beyond the five above: the released r2
# long-context shapes (patch 128 for 1024/1536), a filter much shorter than the horizon, 21 mix-channel
# channels, channel subsets with exogenous mixing, and granite-tsfm's other point losses.
R2_SHAPE = dict(num_input_channels=1, d_model=64, num_layers=1, decoder_d_model=32, decoder_num_layers=1, adaptive_patching_levels=3)
MORE_CONFIGS = {
    "ctx1024-patch128-h192": dict(R2_SHAPE, context_length=1024, patch_length=128, patch_stride=128, prediction_length=192),
    "ctx1536-patch128-h336-filter48": dict(R2_SHAPE, context_length=1536, patch_length=128, patch_stride=128,
                                           prediction_length=336, prediction_filter_length=48),
    "ctx512-h720-no-decoder-apl0": dict(R2_SHAPE, context_length=512, patch_length=64, patch_stride=64, prediction_length=720,
                                        adaptive_patching_levels=0, use_decoder=False, scaling=True),
    "mix-channel-21-batchnorm-no-gate": dict(BASE, num_input_channels=21, mode="mix_channel", decoder_mode="mix_channel",
                                             norm_mlp="BatchNorm", gated_attn=False, head_dropout=0.7),
    "exogenous-subset-fcm-mixer": dict(BASE, num_input_channels=5, exogenous_channel_indices=[4, 0], prediction_channel_indices=[3, 1],
                                       enable_forecast_channel_mixing=True, fcm_use_mixer=True, fcm_gated_attn=False,
                                       fcm_prepend_past=False, fcm_context_length=3),
    "loss-huber-delta": dict(BASE, loss="huber", huber_delta=0.3, decoder_adaptive_patching_levels=2),
    "loss-pinball-q0.9": dict(BASE, loss="pinball", quantile=0.9, scaling=False),
    "loss-mae-selfattn-4-heads": dict(BASE, loss="mae", self_attn=True, self_attn_heads=4, use_positional_encoding=True),
}


def _inputs(config: dict, batch: int = 4) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    inputs = {
        "past_values": torch.randn(batch, config["context_length"], config["num_input_channels"], generator=generator) * 5 + 2,
        "future_values": torch.randn(batch, config["prediction_length"], config["num_input_channels"], generator=generator) * 5,
    }
    if config.get("resolution_prefix_tuning"):
        inputs["freq_token"] = torch.tensor([7, 3, 0, 1])[:batch]
    if config.get("categorical_vocab_size_list"):
        inputs["static_categorical_values"] = torch.tensor([[0, 1], [2, 3], [1, 0], [2, 2]])[:batch]
    return inputs


def _reference(config: dict):
    torch.manual_seed(0)
    return tinytimemixer.TinyTimeMixerForPrediction(tinytimemixer.TinyTimeMixerConfig(**config)).eval()


@pytest.mark.parametrize("name", [*CONFIGS, *MORE_CONFIGS])
def test_ts_parity_prediction_outputs(name: str) -> None:
    config = {**BASE, **CONFIGS[name]} if name in CONFIGS else {**BASE, **MORE_CONFIGS[name]}
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


def _random_config(rng) -> dict:
    """A valid r1/r2 configuration drawn over every architecture field (seeded, so failures reproduce)."""
    channels, patch = rng.choice([1, 2, 4, 7]), rng.choice([4, 8, 16])
    config = dict(
        context_length=patch * rng.choice([4, 6, 8]) + rng.choice([0, 0, 3]), patch_length=patch, patch_stride=patch,
        num_input_channels=channels, prediction_length=rng.choice([8, 12, 24]), d_model=rng.choice([16, 32, 48]),
        num_layers=rng.choice([1, 2]), decoder_d_model=rng.choice([8, 16]), decoder_num_layers=rng.choice([1, 2]),
        adaptive_patching_levels=rng.choice([0, 1, 2, 3]), mode=rng.choice(["common_channel", "mix_channel"]),
        decoder_mode=rng.choice(["common_channel", "mix_channel"]), gated_attn=rng.random() < 0.7,
        norm_mlp=rng.choice(["LayerNorm", "BatchNorm"]), self_attn=rng.random() < 0.3, self_attn_heads=rng.choice([1, 2]),
        use_positional_encoding=rng.random() < 0.3, positional_encoding_type=rng.choice(["sincos", "random"]),
        scaling=rng.choice(["std", "mean", None, True]), loss=rng.choice(["mse", "mae", "huber", "pinball"]),
        quantile=rng.choice([0.1, 0.9]), huber_delta=rng.choice([0.5, 2.0]), resolution_prefix_tuning=rng.random() < 0.3,
        frequency_token_vocab_size=10, decoder_raw_residual=rng.random() < 0.3, use_decoder=rng.random() < 0.9,
        decoder_adaptive_patching_levels=rng.choice([0, 0, 1]), expansion_factor=rng.choice([2, 3]),
    )
    if channels > 1 and rng.random() < 0.4:  # fcm_context_length 0 only with the gate and no mixer: granite fails otherwise
        context = rng.choice([0, 1, 2])
        config.update(enable_forecast_channel_mixing=True, fcm_context_length=context, fcm_prepend_past=rng.random() < 0.7,
                      fcm_use_mixer=context > 0 and rng.random() < 0.5, fcm_gated_attn=context == 0 or rng.random() < 0.5)
        if rng.random() < 0.5:
            config["exogenous_channel_indices"] = [channels - 1]
    if channels > 1 and rng.random() < 0.3:
        exogenous = config.get("exogenous_channel_indices") or []
        config["prediction_channel_indices"] = [i for i in sorted(rng.sample(range(channels), k=channels // 2)) if i not in exogenous] or None
    if rng.random() < 0.3:
        config["prediction_filter_length"] = rng.randint(2, config["prediction_length"])  # granite needs 2+ with channel mixing
    if config["decoder_mode"] == "mix_channel" and config["use_decoder"] and rng.random() < 0.2:
        config["categorical_vocab_size_list"] = [3, 5]
    return config


def test_ts_parity_random_configurations() -> None:
    """40 seeded random configurations (with observed masks, frequency tokens, categoricals): forecasts and losses
    equal granite-tsfm's within 1e-5, so no field combination is silently treated differently."""
    import random

    rng = random.Random(0)
    for trial in range(40):
        config = _random_config(rng)
        torch.manual_seed(trial)
        reference = tinytimemixer.TinyTimeMixerForPrediction(tinytimemixer.TinyTimeMixerConfig(**config)).eval()
        ours = TTM.from_config(TTMConfig.from_dict(reference.config.to_dict())).eval()
        load_state_dict_checked(ours, reference.state_dict(), strict=True)
        generator = torch.Generator().manual_seed(trial)
        shape = (3, config["context_length"], config["num_input_channels"])
        inputs = {"past_values": torch.randn(*shape, generator=generator) * 4 + 1,
                  "future_values": torch.randn(3, config["prediction_length"], shape[2], generator=generator) * 3}
        if trial % 2:
            inputs["past_observed_mask"] = (torch.rand(*shape, generator=generator) > 0.2).float()
        if config["resolution_prefix_tuning"]:
            inputs["freq_token"] = torch.tensor([0, 7, 9])
        if config.get("categorical_vocab_size_list"):
            inputs["static_categorical_values"] = torch.tensor([[0, 4], [2, 1], [1, 3]])
        with torch.no_grad():
            expected, got = reference(**inputs), ours(**inputs)
        assert torch.allclose(got["prediction_outputs"], expected.prediction_outputs, atol=1e-5, rtol=1e-5), config
        assert torch.allclose(got["loss"], expected.loss, atol=1e-5, rtol=1e-5), config


# Long-context r2 shapes with every option a fine-tuning run may switch on at once, read from a hub-layout folder
# that granite-tsfm wrote, with load-time overrides given to both libraries' from_pretrained.
R2_LONG = dict(patch_length=128, patch_stride=128, d_model=32, decoder_d_model=16, num_layers=2, decoder_num_layers=1,
               adaptive_patching_levels=3, num_input_channels=4)
HUB_CASES = {
    "ctx1024-h720-mix-decoder-exogenous-mixer-prefix-filter96": (
        dict(R2_LONG, context_length=1024, prediction_length=720, decoder_mode="mix_channel", resolution_prefix_tuning=True,
             frequency_token_vocab_size=10, enable_forecast_channel_mixing=True, exogenous_channel_indices=[3], fcm_use_mixer=True,
             fcm_context_length=2, prediction_channel_indices=[0, 1, 2], prediction_filter_length=96), {}),
    "ctx1536-h192-prefix-apl3-filter24-at-load": (
        dict(R2_LONG, context_length=1536, prediction_length=192, resolution_prefix_tuning=True, frequency_token_vocab_size=10),
        dict(prediction_filter_length=24)),
    "ctx1536-h720-mix-channel-exogenous-two-filter48-at-load": (
        dict(R2_LONG, context_length=1536, prediction_length=720, mode="mix_channel", decoder_mode="mix_channel",
             enable_forecast_channel_mixing=True, exogenous_channel_indices=[0, 3], fcm_prepend_past=True, decoder_adaptive_patching_levels=2),
        dict(prediction_filter_length=48)),
    "ctx1024-h336-patch64-apl2-raw-residual": (
        dict(R2_LONG, context_length=1024, prediction_length=336, patch_length=64, patch_stride=64, adaptive_patching_levels=2,
             decoder_raw_residual=True, decoder_mode="mix_channel", resolution_prefix_tuning=True, frequency_token_vocab_size=10), {}),
}


@pytest.mark.parametrize("name", list(HUB_CASES))
def test_ts_parity_long_context_hub_folder_with_overrides(name: str, tmp_path) -> None:
    """Forecasts (filtered before the exogenous mixer, as granite does), masked inputs and frequency tokens equal the reference."""
    config, overrides = HUB_CASES[name]
    _reference(config).save_pretrained(tmp_path)
    reference = tinytimemixer.TinyTimeMixerForPrediction.from_pretrained(tmp_path, **overrides).eval()
    ours = TTM.from_pretrained(tmp_path, **overrides).eval()
    generator = torch.Generator().manual_seed(2)
    length, horizon, channels = config["context_length"], config["prediction_length"], config["num_input_channels"]
    inputs = {"past_values": torch.randn(3, length, channels, generator=generator) * 4 + 2,
              "future_values": torch.randn(3, horizon, channels, generator=generator) * 4 + 2,
              "past_observed_mask": (torch.rand(3, length, channels, generator=generator) > 0.1).float()}
    if config.get("resolution_prefix_tuning"):
        inputs["freq_token"] = torch.tensor([7, 5, 0])
    with torch.no_grad():
        expected, got = reference(**inputs), ours(**inputs)
    output_length = overrides.get("prediction_filter_length", config.get("prediction_filter_length", horizon))
    exogenous = config.get("exogenous_channel_indices") or []  # not forecast: their future is given
    targets = config.get("prediction_channel_indices") or [c for c in range(channels) if c not in exogenous]
    assert got["prediction_outputs"].shape == expected.prediction_outputs.shape == (3, output_length, len(targets))
    torch.testing.assert_close(got["prediction_outputs"], expected.prediction_outputs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got["loss"], expected.loss, atol=1e-5, rtol=1e-5)
    if config.get("exogenous_channel_indices"):  # the data pipeline's future_known_values (targets zeroed) give the same forecast
        known = torch.zeros_like(inputs["future_values"])
        known[..., config["exogenous_channel_indices"]] = inputs["future_values"][..., config["exogenous_channel_indices"]]
        rest = {k: v for k, v in inputs.items() if k != "future_values"}
        with torch.no_grad():
            torch.testing.assert_close(ours(**rest, future_known_values=known)["prediction_outputs"], expected.prediction_outputs,
                                       atol=1e-5, rtol=1e-5)


def test_ts_parity_training_step_gradients() -> None:
    """In train mode (BatchNorm on batch statistics, dropout off) loss and every parameter's gradient equal the reference's."""
    config = dict(R2_LONG, context_length=1024, prediction_length=192, norm_mlp="BatchNorm", decoder_mode="mix_channel",
                  resolution_prefix_tuning=True, frequency_token_vocab_size=10, enable_forecast_channel_mixing=True,
                  exogenous_channel_indices=[3], fcm_use_mixer=True, fcm_context_length=2, prediction_filter_length=48,
                  dropout=0.0, head_dropout=0.0, loss="mae")
    reference = _reference(config).train()
    ours = TTM.from_config(TTMConfig.from_dict(reference.config.to_dict())).train()
    load_state_dict_checked(ours, reference.state_dict(), strict=True)
    generator = torch.Generator().manual_seed(3)
    inputs = {"past_values": torch.randn(4, 1024, 4, generator=generator) * 3 + 1, "future_values": torch.randn(4, 192, 4, generator=generator),
              "freq_token": torch.tensor([7, 5, 1, 8])}
    reference(**inputs).loss.backward()
    ours(**inputs)["loss"].backward()
    grads = {name: p.grad for name, p in ours.named_parameters()}
    for name, p in reference.named_parameters():
        assert (p.grad is None) == (grads[name] is None), name
        if p.grad is not None:
            torch.testing.assert_close(grads[name], p.grad, atol=1e-6, rtol=1e-5, msg=name)


def test_ts_parity_fine_tuning_overrides_keep_the_same_tensors(tmp_path) -> None:
    """granite-tsfm's channel-mixing fine-tuning recipe on a univariate checkpoint (from_pretrained with a mix-channel decoder,
    exogenous mixer, channel subset, ignore_mismatched_sizes): ours keeps exactly the tensors granite keeps and builds the same config."""
    source = _reference(dict(R2_LONG, num_input_channels=1, context_length=1024, prediction_length=192))
    source.save_pretrained(tmp_path)
    overrides = dict(num_input_channels=3, decoder_mode="mix_channel", enable_forecast_channel_mixing=True, exogenous_channel_indices=[2],
                     fcm_use_mixer=True, fcm_context_length=2, prediction_channel_indices=[0, 1], prediction_filter_length=96)
    reference = tinytimemixer.TinyTimeMixerForPrediction.from_pretrained(tmp_path, ignore_mismatched_sizes=True, **overrides).eval()
    ours = TTM.from_pretrained(tmp_path, **overrides).eval()
    loaded, theirs, mine = source.state_dict(), reference.state_dict(), ours.state_dict()
    assert set(theirs) == set(mine)
    kept = {k for k in theirs if k in loaded and loaded[k].shape == theirs[k].shape and torch.equal(loaded[k], theirs[k])}
    assert kept == {k for k in mine if k in loaded and loaded[k].shape == mine[k].shape and torch.equal(loaded[k], mine[k])}
    assert {k.split(".")[0] for k in kept} >= {"backbone"} and len(kept) < len(mine)  # backbone kept, the new parts fresh
    load_state_dict_checked(ours, theirs, strict=True)  # same fresh tensors: same forecast
    x, y = torch.randn(2, 1024, 3), torch.randn(2, 192, 3)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, future_values=y)["prediction_outputs"], reference(past_values=x, future_values=y).prediction_outputs,
                                   atol=1e-5, rtol=1e-5)
