"""The bench harness measures ours and the reference on the same inputs and writes the JSON."""

from __future__ import annotations

import json

import torch

from polyfm.core import bench
from polyfm.core.bench import BenchCase, run_case
from polyfm.core.toy import ToyEncoder


def _step(width: int):
    def build(device: torch.device):
        model, x = ToyEncoder(width=width).to(device).eval(), torch.randn(64, 8, device=device)
        return lambda: model(x)

    return build


def test_bench_case_reports_throughput_and_ratio(tmp_path, monkeypatch):
    case = BenchCase(name="toy/inference", unit="vectors", items=64, ours=_step(16), reference=_step(512), reference_name="wide toy")
    row = run_case(case, torch.device("cpu"), repeats=3)
    assert row["ours"]["items_per_s"] > 0 and row["reference"]["items_per_s"] > 0
    assert row["ratio"] == row["ours"]["items_per_s"] / row["reference"]["items_per_s"]
    assert row["ours"]["min_s"] <= row["ours"]["median_s"] <= row["ours"]["max_s"]

    monkeypatch.setattr(bench, "collect_cases", lambda quick, only: [case])
    result = bench.run_all(tmp_path / "bench.json", quick=True, repeats=2)
    written = json.loads((tmp_path / "bench.json").read_text())
    assert written["cases"][0]["name"] == "toy/inference" and result["environment"]["versions"]["torch"]
    assert written["complete"] is True


def test_gpu_path_step_on_cpu_is_the_plain_fp32_step_and_trains():
    """Off CUDA the GPU-path step must fall back to exactly the reference's plain loop
    (same losses, step for step), so a CPU ratio compares like with like."""

    def conv_model():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 1))

    x, y = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(1)), torch.randn(16, 1, generator=torch.Generator().manual_seed(2))
    ours = bench.gpu_path_train_step(conv_model(), lambda m: torch.nn.functional.mse_loss(m(x), y), lr=3e-2)
    plain_model = conv_model()
    optimizer = torch.optim.AdamW(plain_model.parameters(), lr=3e-2)

    def plain():
        optimizer.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(plain_model(x), y)
        loss.backward()
        optimizer.step()
        return loss

    ours_losses = [float(ours()) for _ in range(50)]
    plain_losses = [float(plain()) for _ in range(50)]
    assert ours_losses == plain_losses
    assert ours_losses[-1] < 0.8 * ours_losses[0]


def test_bench_json_keeps_finished_cases_when_the_run_is_stopped(tmp_path, monkeypatch):
    """A device lease can end mid-run: every finished case must already be on disk."""

    def stopped(device):
        raise SystemExit("time limit")  # not an Exception: run_all does not catch it, like a kill

    first = BenchCase(name="toy/first", unit="vectors", items=64, ours=_step(16))
    monkeypatch.setattr(bench, "collect_cases", lambda quick, only: [first, BenchCase(name="toy/stopped", unit="vectors", items=1, ours=stopped)])
    try:
        bench.run_all(tmp_path / "bench.json", quick=True, repeats=2, finetune_steps=0)
    except SystemExit:
        pass
    written = json.loads((tmp_path / "bench.json").read_text())
    assert [c["name"] for c in written["cases"]] == ["toy/first"] and written["complete"] is False
