"""Loading checkpoints: safety, checksums, readable key diffs, the offline error."""

from __future__ import annotations

import hashlib
import os
import pickle

import pytest
import torch

from polyfm.core.errors import CheckpointError
from polyfm.core.toy import ToyEncoder
from polyfm.core.weights import (
    WeightSpec,
    fetch_weights,
    load_checkpoint_file,
    load_state_dict_checked,
    register_weights,
    save_safetensors,
    verify_file,
)


class RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/polyfm-pwned",))


def test_pickle_that_runs_code_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as handle:
        pickle.dump({"model": RunsCode()}, handle)
    if os.path.exists("/tmp/polyfm-pwned"):
        os.unlink("/tmp/polyfm-pwned")
    with pytest.raises(CheckpointError, match="weights_only=True") as info:
        load_checkpoint_file(path)
    assert str(path) in str(info.value)
    assert not os.path.exists("/tmp/polyfm-pwned")


def test_checksum_mismatch_is_refused(tmp_path):
    path = tmp_path / "w.pth"
    torch.save({"model": ToyEncoder().state_dict()}, path)
    verify_file(path, hashlib.sha256(path.read_bytes()).hexdigest())
    with pytest.raises(CheckpointError, match="Checksum mismatch") as info:
        verify_file(path, "0" * 64)
    assert str(path) in str(info.value)


def test_the_checksums_publishers_give_are_checked_by_their_algorithm(tmp_path):
    # Zenodo lists md5, the MONAI model zoo sha1: both are checked as such, and a wrong one is named
    path = tmp_path / "w.pth"
    path.write_bytes(b"released weights")
    verify_file(path, "md5:" + hashlib.md5(b"released weights").hexdigest().upper())
    verify_file(path, "sha1:" + hashlib.sha1(b"released weights").hexdigest())
    with pytest.raises(CheckpointError, match=r"expected sha1 0{40}"):
        verify_file(path, "sha1:" + "0" * 40)
    with pytest.raises(CheckpointError, match="unknown algorithm 'crc32'"):
        verify_file(path, "crc32:1234")


def test_wrong_architecture_shows_the_key_diff(tmp_path):
    path = tmp_path / "deeper.pth"
    torch.save({"model": ToyEncoder(depth=4, in_features=6).state_dict()}, path)
    with pytest.raises(CheckpointError) as info:
        ToyEncoder.from_pretrained(path, depth=3, in_features=8)
    message = str(info.value)
    assert "unexpected in the checkpoint" in message and "blocks.3.0.weight" in message
    assert "shape mismatch" in message and "stem.weight: (32, 8) vs (32, 6)" in message


def test_prefix_hint_and_round_trip(tmp_path):
    model = ToyEncoder()
    prefixed = {f"module.{k}": v for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match="'module.' prefix"):
        load_state_dict_checked(ToyEncoder(), prefixed)
    path = save_safetensors(model.state_dict(), tmp_path / "toy.safetensors")
    loaded = ToyEncoder.from_pretrained(path)
    x = torch.randn(4, 8)
    model.eval(), loaded.eval()
    torch.testing.assert_close(model.forward_features(x), loaded.forward_features(x))


def test_registered_weights_offline_error_names_file_and_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("POLYFM_CACHE", str(tmp_path / "cache"))
    spec = WeightSpec(
        name="toy-test-weights",
        family="toy",
        files={"toy.pth": ("https://example.invalid/toy.pth", None)},
        license="Apache-2.0",
    )
    register_weights(spec)
    with pytest.raises(CheckpointError) as info:
        fetch_weights(spec, offline=True)
    message = str(info.value)
    assert "toy.pth" in message and str(tmp_path / "cache" / "weights" / "toy-test-weights") in message
    assert "https://example.invalid/toy.pth" in message
    # put the file where the message says: from_pretrained by name now works, offline
    target = tmp_path / "cache" / "weights" / "toy-test-weights" / "toy.pth"
    target.parent.mkdir(parents=True)
    torch.save({"model": ToyEncoder().state_dict()}, target)
    monkeypatch.setenv("POLYFM_OFFLINE", "1")
    assert isinstance(ToyEncoder.from_pretrained("toy-test-weights"), ToyEncoder)


def _file_spec(name: str, source, sha: str) -> WeightSpec:
    return WeightSpec(name=name, family="toy", files={"toy.pth": (source.as_uri(), sha)}, license="Apache-2.0")


def test_download_is_verified_before_use(tmp_path, monkeypatch):
    """The real download code, fed from a file:// URL (no network here)."""
    monkeypatch.setenv("POLYFM_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("POLYFM_OFFLINE", raising=False)
    source = tmp_path / "published.pth"
    torch.save({"model": ToyEncoder().state_dict()}, source)
    good = hashlib.sha256(source.read_bytes()).hexdigest()

    bad_spec = _file_spec("toy-bad-sha", source, "f" * 64)
    with pytest.raises(CheckpointError, match="Checksum mismatch"):
        fetch_weights(bad_spec, offline=False)
    assert not any((tmp_path / "cache").rglob("*.pth")), "an unverified download was kept"

    folder = fetch_weights(_file_spec("toy-good-sha", source, good), offline=False)
    assert hashlib.sha256((folder / "toy.pth").read_bytes()).hexdigest() == good
    assert not list(folder.glob("*.part"))


def test_cli_reports_errors_without_a_traceback(tmp_path):
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "polyfm.core.cli", "weights", "fetch", "no-such-weights"],
        capture_output=True, text=True, timeout=120, env={**os.environ, "POLYFM_CACHE": str(tmp_path)},
    )
    assert result.returncode == 2
    assert "No registered weights named 'no-such-weights'" in result.stderr and "Traceback" not in result.stderr


def test_official_checkpoints_with_training_args_load(tmp_path):
    import argparse

    path = tmp_path / "pretrain-vit-base-e199.pth"
    torch.save({"model": ToyEncoder().state_dict(), "args": argparse.Namespace(lr=1e-3, model="mae_vit_base"), "epoch": 199}, path)
    loaded = load_checkpoint_file(path)
    assert loaded["args"].model == "mae_vit_base" and "stem.weight" in loaded["model"]


def test_non_strict_loading_names_what_it_left_out_and_hints_compile_prefix():
    import pytest as _pytest

    from polyfm.core.toy import ToyEncoder
    from polyfm.core.weights import diff_keys, load_state_dict_checked

    source = ToyEncoder().state_dict()
    partial = {k: v for k, v in source.items() if not k.startswith("norm.")}
    partial["extra.weight"] = torch.zeros(1)
    with _pytest.warns(UserWarning, match=r"missing from the checkpoint \(2\):\n  norm.bias\n  norm.weight") as record:
        load_state_dict_checked(ToyEncoder(), partial, strict=False, source="partial.pt")
    assert "unexpected in the checkpoint (1):\n  extra.weight" in str(record[0].message)
    compiled = {f"_orig_mod.{k}": v for k, v in source.items()}
    assert "'_orig_mod.' prefix" in diff_keys(ToyEncoder(), compiled).report()
