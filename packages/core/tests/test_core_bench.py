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
