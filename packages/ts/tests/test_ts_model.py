"""TTM: registry and hub-layout loading, encoder contract, input handling."""

from __future__ import annotations

import json

import pytest
import torch

from polyfm.core.adaptation import Adaptation, apply_adaptation
from polyfm.core.errors import CheckpointError, ConfigError
from polyfm.core.weights import get_weights
from polyfm.ts.models.ttm import TTM, TTMConfig, head_only

SMALL = dict(context_length=64, prediction_length=16, patch_length=8, d_model=16, decoder_d_model=8, num_layers=1,
             adaptive_patching_levels=2, num_input_channels=1)


def test_ts_registry_lists_r1_r2_variants() -> None:
    spec = get_weights("ttm-r2-512-96")
    assert spec.files["model.safetensors"][0] == "https://huggingface.co/ibm-granite/granite-timeseries-ttm-r2/resolve/main/model.safetensors"
    assert spec.primary_file == "model.safetensors" and "config.json" in spec.files
    assert get_weights("ttm-r2-1536-96").meta["revision"] == "1536-96-r2"
    assert get_weights("ttm-r1-1024-96").files["config.json"][0].endswith("/granite-timeseries-ttm-r1/resolve/1024_96_v1/config.json")
    assert get_weights("ttm-r2.1-512-96-ft").meta["context_length"] == 512


def test_ts_from_pretrained_registry_cache_hub_id_and_offline_error(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("POLYFM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("POLYFM_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(CheckpointError, match=r"resolve/512-192-r2/model.safetensors.*cache"):
        TTM.from_pretrained("ttm-r2-512-192")
    torch.manual_seed(0)
    model = TTM(**SMALL)
    model.save_pretrained(tmp_path / "cache" / "weights" / "ttm-r2-512-96")  # as the downloader would leave it
    for name in ("ttm-r2-512-96", "ibm-granite/granite-timeseries-ttm-r2"):
        loaded = TTM.from_pretrained(name)
        assert torch.equal(loaded.state_dict()["head.base_forecast_block.weight"], model.state_dict()["head.base_forecast_block.weight"])
    # a snapshot in the Hugging Face cache (e.g. from granite-tsfm) is used as is
    repo = tmp_path / "hf" / "hub" / "models--ibm-granite--granite-timeseries-ttm-r2"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "1024-96-r2").write_text("abc123")
    model.save_pretrained(repo / "snapshots" / "abc123")
    assert TTM.from_pretrained("ibm-granite/granite-timeseries-ttm-r2@1024-96-r2").config.context_length == 64


def test_ts_checkpoint_mismatch_and_r3_configs_are_refused(tmp_path) -> None:
    model = TTM(**SMALL)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "d_model": 32}))
    with pytest.raises(CheckpointError, match=r"shape mismatch"):
        TTM.from_pretrained(tmp_path)
    with pytest.raises(ConfigError, match=r"register_tokens.*r3"):
        TTMConfig.from_dict({**config, "register_tokens": 2})
    with pytest.raises(ConfigError, match=r"patch_stride"):
        TTMConfig.from_dict({**config, "patch_stride": 4})


def test_ts_encoder_contract_and_head_only() -> None:
    model = TTM(**SMALL)
    x = torch.randn(3, 64, 5)  # a common-channel TTM takes any channel count
    assert model.forward_features(x).shape == (3, model.feature_dim)
    assert model(x)["prediction_outputs"].shape == (3, 16, 5)
    assert model.block_names()[0] == "backbone.encoder.patcher" and len(model.block_names()) == 3
    apply_adaptation(model, head_only(model))
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"decoder", "head"}
    lora = apply_adaptation(TTM(**SMALL), Adaptation(mode="lora", lora_rank=2))
    assert any("lora_" in n for n, p in lora.named_parameters() if p.requires_grad)
    assert lora(x)["prediction_outputs"].shape == (3, 16, 5)


def test_ts_input_length_and_channels() -> None:
    torch.manual_seed(0)
    model = TTM(**SMALL).eval()
    x = torch.randn(2, 80, 1) * 3 + 10
    with torch.no_grad():
        full = model(x)["prediction_outputs"]
        assert torch.equal(full, model(x[:, -64:])["prediction_outputs"])  # longer input: last context_length points
        short = model(x[:, -40:])["prediction_outputs"]  # shorter: left-padded, padding unobserved
    assert torch.isfinite(short).all() and short.shape == (2, 16, 1)
    # padding is excluded from the window statistics: the forecast's level follows the data, not the zeros
    assert (short.mean() - x[:, -40:].mean()).abs() < 5
    mixer = TTM(**{**SMALL, "num_input_channels": 3, "mode": "mix_channel"})
    with pytest.raises(ValueError, match=r"2 channels; this TTM was built for num_input_channels=3"):
        mixer(torch.randn(2, 64, 2))
    prefix = TTM(**{**SMALL, "resolution_prefix_tuning": True})
    with pytest.raises(ValueError, match=r"freq_token"):
        prefix(torch.randn(2, 64, 1))


def test_ts_pretrained_argument_for_recipes(tmp_path) -> None:
    """``TTM(..., pretrained=...)`` (what the YAML recipes use) loads strictly into the given architecture."""
    source = TTM(**SMALL)
    source.save_pretrained(tmp_path / "ckpt")
    loaded = TTM(**SMALL, pretrained=str(tmp_path / "ckpt"))
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in source.state_dict().items())
    with pytest.raises(CheckpointError, match=r"shape mismatch"):
        TTM(**{**SMALL, "decoder_d_model": 4}, pretrained=str(tmp_path / "ckpt"))


def test_ts_package_imports_no_transformers_or_other_domains() -> None:
    """Pure torch at run time: no module of polyfm.ts imports transformers, granite-tsfm or another domain."""
    import ast
    from pathlib import Path

    import polyfm.ts

    banned = ("transformers", "tsfm_public", "torchaudio", "monai", "rdkit", "torchgeo", "polyfm.audio", "polyfm.geo",
              "polyfm.mol", "polyfm.medseg")
    for path in Path(polyfm.ts.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for name in names:
                assert not name.startswith(banned) or path.name == "bench.py" and name.startswith("tsfm_public"), (path, name)


def test_ts_from_pretrained_with_new_decoder_parts(tmp_path, caplog) -> None:
    """Fine-tuning recipe: a common-channel checkpoint + mix-channel decoder and exogenous mixer for a
    3-channel target; the backbone loads exactly, the new parts start fresh and are reported."""
    import logging

    source = TTM(**SMALL)
    source.save_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING, logger="polyfm.ts"):
        model = TTM.from_pretrained(tmp_path, num_input_channels=3, decoder_mode="mix_channel", exogenous_channel_indices=[2],
                                    enable_forecast_channel_mixing=True)
    assert "initialised fresh" in caplog.text and "head.fcm_block" in caplog.text
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in source.state_dict().items() if k.startswith("backbone."))
    out = model(torch.randn(2, 64, 3), future_known_values=torch.randn(2, 16, 3))["prediction_outputs"]
    assert out.shape == (2, 16, 2)
    with pytest.raises(CheckpointError, match=r"shape mismatch"):
        TTM.from_pretrained(tmp_path, d_model=32)


def _hub_snapshot(cache, repo: str, branch: str, commit: str, files: dict[str, bytes]) -> None:
    """huggingface_hub's cache layout: content-addressed blobs, a snapshot of symlinks, refs/<branch>."""
    import hashlib

    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / branch).write_text(commit)
    (root / "blobs").mkdir(exist_ok=True)
    snapshot = root / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name, data in files.items():
        digest = hashlib.sha256(data).hexdigest()
        (root / "blobs" / digest).write_bytes(data)
        (snapshot / name).symlink_to(f"../../blobs/{digest}")


def test_ts_hub_snapshot_layouts_branch_names_and_revision(tmp_path, monkeypatch) -> None:
    """Hub snapshots (symlinked blobs, generation_config.json beside, or only an older pytorch_model.bin) load by
    hub id + branch, by revision=, by granite-tsfm's get_model key and by the -l1 registry names."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("POLYFM_CACHE", str(tmp_path / "polyfm"))
    monkeypatch.setenv("POLYFM_OFFLINE", "1")
    torch.manual_seed(0)
    model = TTM(**SMALL).eval()
    model.save_pretrained(tmp_path / "saved")
    config = (tmp_path / "saved" / "config.json").read_bytes()
    safetensors = (tmp_path / "saved" / "model.safetensors").read_bytes()
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    repo = "ibm-granite/granite-timeseries-ttm-r2"
    _hub_snapshot(tmp_path / "hub", repo, "1024-96-r2", "a" * 40,
                  {"config.json": config, "model.safetensors": safetensors, "generation_config.json": b"{}"})
    _hub_snapshot(tmp_path / "hub", repo, "180-60-ft-l1-r2.1", "b" * 40,
                  {"config.json": config, "pytorch_model.bin": (tmp_path / "pytorch_model.bin").read_bytes()})
    x = torch.randn(2, 64, 1)
    with torch.no_grad():
        expected = model(x)["prediction_outputs"]
        for name, kwargs in [(f"{repo}@1024-96-r2", {}), (repo, {"revision": "1024-96-r2"}), ("1024-96-r2", {}),
                             ("ttm-r2-1024-96", {}), ("ttm-r2.1-180-60-ft-l1", {}), ("180-60-ft-l1-r2.1", {})]:
            loaded = TTM.from_pretrained(name, **kwargs).eval()
            assert torch.equal(loaded(x)["prediction_outputs"], expected), name
    assert get_weights("ttm-r2.1-360-60-ft-l1").meta["revision"] == "360-60-ft-l1-r2.1"
    with pytest.raises(CheckpointError, match=r"resolve/1536-96-r2/model.safetensors"):
        TTM.from_pretrained(repo, revision="1536-96-r2")  # not in either cache: the offline error names the URL


def test_ts_from_pretrained_refuses_unknown_overrides_and_bad_configs(tmp_path, caplog) -> None:
    """A misspelt keyword, a corrupt or inconsistent config.json and an unknown config field are never passed over silently."""
    import logging

    TTM(**SMALL).save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match=r"unknown keyword\(s\) \['prediction_filter_lenght'\]"):
        TTM.from_pretrained(tmp_path, prediction_filter_lenght=8)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_patches": 9}))
    with pytest.raises(ConfigError, match=r"config.json: num_patches=9 disagrees with context_length=64"):
        TTM.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_patches": 8, "some_future_field": 1, "init_std": 0.1}))
    with caplog.at_level(logging.WARNING, logger="polyfm.ts"):
        TTM.from_pretrained(tmp_path)
    assert "['some_future_field'] are not TTM r1/r2 architecture fields" in caplog.text and "init_std" not in caplog.text
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"Cannot read the TTM config .*config.json"):
        TTM.from_pretrained(tmp_path)
    with pytest.raises(ConfigError, match=r"loss='rmse'"):
        TTMConfig.from_dict({**config, "loss": "rmse"})
    with pytest.raises(ConfigError, match=r"quantile=1.5"):
        TTMConfig.from_dict({**config, "loss": "pinball", "quantile": 1.5})
    with pytest.raises(ConfigError, match=r"fcm_use_mixer=True needs fcm_context_length >= 1"):
        TTMConfig.from_dict({**config, "enable_forecast_channel_mixing": True, "fcm_use_mixer": True, "fcm_context_length": 0})


def test_ts_out_of_vocabulary_tokens_are_named() -> None:
    """A frequency token or static category outside the embedding's vocabulary names the field to change
    (nn.Embedding alone says only 'index out of range in self')."""
    prefix = TTM(**{**SMALL, "resolution_prefix_tuning": True})  # granite's default vocabulary: 5 tokens
    x = torch.randn(2, 64, 1)
    with pytest.raises(ValueError, match=r"freq_token holds 7, outside this TTM's frequency_token_vocab_size=5.*>= 10"):
        prefix(x, freq_token=torch.tensor([7, 7]))  # hourly
    with pytest.raises(ValueError, match=r"one token per window, shape \(2,\); got shape \(3,\)"):
        prefix(x, freq_token=torch.tensor([1, 2, 3]))
    assert prefix(x, freq_token=torch.tensor([[4], [0]]))["prediction_outputs"].shape == (2, 16, 1)
    static = TTM(**{**SMALL, "num_input_channels": 2, "decoder_mode": "mix_channel", "categorical_vocab_size_list": [3, 2]})
    x2 = torch.randn(2, 64, 2)
    with pytest.raises(ValueError, match=r"static_categorical_values\[:, 1\] holds 2, outside .*categorical_vocab_size_list\[1\]=2"):
        static(x2, static_categorical_values=torch.tensor([[0, 1], [2, 2]]))
    with pytest.raises(ValueError, match=r"must be \(batch, 2\) token ids"):
        static(x2, static_categorical_values=torch.tensor([0, 1]))


def test_ts_wrapped_state_dicts_load(tmp_path, caplog) -> None:
    """pytorch_model.bin files saved from a wrapped TTM (DDP 'module.', torch.compile '_orig_mod.', a Lightning task's
    {'state_dict': {'model.…'}} with its own extra keys) load into the same weights; the unwrapping is logged."""
    import logging

    torch.manual_seed(0)
    model = TTM(**SMALL)
    model.save_pretrained(tmp_path / "plain")
    own = model.state_dict()
    layouts = {
        "ddp": {f"module.{k}": v for k, v in own.items()},
        "compiled-ddp": {f"module._orig_mod.{k}": v for k, v in own.items()},
        "lightning": {"state_dict": {**{f"model.{k}": v for k, v in own.items()}, "loss_weight": torch.ones(1)}, "epoch": 3},
    }
    for name, content in layouts.items():
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text((tmp_path / "plain" / "config.json").read_text())
        torch.save(content, folder / "pytorch_model.bin")
        with caplog.at_level(logging.WARNING, logger="polyfm.ts"):
            loaded = TTM.from_pretrained(folder)
        assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in own.items()), name
    assert "keys carry a 'model.' prefix" in caplog.text and "leaving out 1 other keys (['loss_weight'])" in caplog.text


def test_ts_pretrained_argument_takes_a_lightning_checkpoint_file(tmp_path) -> None:
    """`pretrained:` in a recipe may name the .ckpt of an earlier run (no config.json beside it): the explicit
    architecture is its config, the task's `model.` prefix is unwrapped, and another architecture is a key diff."""
    from polyfm.core.tasks import Forecasting

    arch = dict(context_length=64, prediction_length=16, patch_length=8, d_model=16, decoder_d_model=8, adaptive_patching_levels=1)
    task = Forecasting(TTM(**arch))
    torch.save({"state_dict": task.state_dict(), "global_step": 3}, tmp_path / "last.ckpt")
    loaded = TTM(**arch, pretrained=str(tmp_path / "last.ckpt"))
    for key, value in task.model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value)
    with pytest.raises(CheckpointError, match="shape mismatch"):
        TTM(**{**arch, "d_model": 32}, pretrained=str(tmp_path / "last.ckpt"))
