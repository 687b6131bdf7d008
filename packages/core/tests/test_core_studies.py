"""Studies: the grid, resumption after a kill, the report, config errors."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from polyfm.core.errors import ConfigError
from polyfm.core.studies import StudyConfig, run_key

SCRIPT = Path(__file__).parent / "study_toy_script.py"


def test_killed_study_resumes_without_rerunning_or_losing_runs(tmp_path):
    out = tmp_path / "study"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(SCRIPT), str(out)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and len(list((out / "runs").glob("*.json"))) < 3:
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = {p.name: p.stat().st_mtime_ns for p in (out / "runs").glob("*.json")}
    assert 3 <= len(finished) < 16, f"kill came at a bad moment: {len(finished)} runs finished"

    result = subprocess.run([sys.executable, str(SCRIPT), str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming: {len(finished)} finished run(s) kept" in result.stdout
    after = {p.name: p.stat().st_mtime_ns for p in (out / "runs").glob("*.json")}
    assert len(after) == 16
    assert all(after[name] == mtime for name, mtime in finished.items()), "a finished run was run again"

    table = pd.read_csv(out / "results.csv")
    assert len(table) == 16 and table["key"].is_unique
    assert pd.read_parquet(out / "results.parquet").shape[0] == 16
    summary = (out / "summary.md").read_text()
    assert "gain over scratch" in summary and "Best adaptation" in summary
    assert (out / "label_efficiency_toy.png").stat().st_size > 10_000
    assert (out / "transfer_heatmap.png").exists()
    # the numbers come from training: pretrained on more labels beats scratch on few, on average
    mean = table.groupby("source")["metric"].mean()
    assert mean["pretrained"] > mean["scratch"]


def test_run_keys_follow_the_resolved_config():
    config = StudyConfig(targets=[{"domain": "toy"}], label_fractions=[0.1, 1.0], seeds=[0, 1])
    keys = [run_key(r) for r in config.runs()]
    assert len(set(keys)) == len(keys) == 2 * 2 * 1 * 2
    assert keys == [run_key(r) for r in config.runs()]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("targets: []", "'targets' is empty"),
        ("targets: [{name: audio}]", "targets\\[0\\].*needs a 'domain'"),
        ("targets: [{domain: audio}]\nsources: [imagenet]", "source 'imagenet'"),
        ("targets: [{domain: audio}]\nlabel_fractions: [0]", "label fraction 0"),
        ("targets: [{domain: audio}]\nadaptations: [{mode: prune}]", "Unknown adaptation mode"),
        ("targets: [{domain: audio}]\nepochs: 3", "unknown key"),
        ("targets: [{domain: audio}\n", "not valid YAML"),
    ],
)
def test_bad_study_files_name_the_problem(tmp_path, text, message):
    path = tmp_path / "study.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as info:
        StudyConfig.load(path)
    assert str(path) in str(info.value)


def test_cross_domain_trunk_target_takes_blocks_from_another_domains_checkpoint(tmp_path):
    import torch

    from polyfm.core.kit import register_kit
    from polyfm.core.studies import run_study
    from polyfm.core.toy import toy_kit
    from polyfm.core.transfer import PatchTransformer
    from polyfm.core.weights import save_safetensors

    register_kit("toy", toy_kit)
    torch.manual_seed(0)
    # a "SatMAE-like" ViT checkpoint: image patch embedding + 2 blocks, wrapped as {'model': ...}
    source_vit = PatchTransformer(input_kind="image", in_channels=13, patch_size=8, embed_dim=32, depth=2, num_heads=4)
    path = tmp_path / "geo_vit.pth"
    torch.save({"model": {f"encoder.{k}": v for k, v in source_vit.state_dict().items()}}, path)
    bad = save_safetensors({"conv1.weight": torch.zeros(4, 3, 7, 7)}, tmp_path / "rn50.safetensors")

    config = StudyConfig(
        name="trunk", output=str(tmp_path / "out"), targets=[{"domain": "toy", "trunk": True}],
        sources=["scratch", f"checkpoint:{path}", f"checkpoint:{bad}"], label_fractions=[1.0], seeds=[0], quick=True,
    )
    out = run_study(config)
    table = pd.read_csv(out / "results.csv")
    assert set(table["source"]) == {"scratch", f"checkpoint:{path}"} and set(table["domain"]) == {"toy+trunk"}
    failed = list((out / "failed").glob("*.json"))
    assert len(failed) == 1 and "No transformer blocks recognised" in failed[0].read_text()  # the ResNet cannot give blocks

    with pytest.raises(ConfigError, match="add a checkpoint: or weights: source"):
        StudyConfig(targets=[{"domain": "toy", "trunk": True}], sources=["scratch"]).validate()
