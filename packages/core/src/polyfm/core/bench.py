"""Benchmarks side by side with the reference implementations.

Each domain package lists :class:`BenchCase` objects; the harness warms up, repeats,
and reports median and spread of throughput and peak memory for ours and the
reference in the same process, with the ratio ours/reference.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points, version
from pathlib import Path
from typing import Any

import torch

Step = Callable[[], object]


@dataclass
class BenchCase:
    name: str
    unit: str
    items: int
    ours: Callable[[torch.device], Step]
    reference: Callable[[torch.device], Step] | None = None
    flops_per_item: float | None = None
    reference_name: str = ""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(step: Step, device: torch.device, warmup: int = 2, repeats: int = 5, min_seconds: float = 0.0) -> dict[str, float]:
    """Median and spread (min/max) of seconds per call, and peak memory in MB."""
    for _ in range(warmup):
        step()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times: list[float] = []
    start_all = time.perf_counter()
    while len(times) < repeats or time.perf_counter() - start_all < min_seconds:
        start = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - start)
    result = {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "repeats": len(times)}
    if device.type == "cuda":
        result["peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    else:  # CPU allocations cannot be attributed per case: the process's RSS high-water mark, which only grows
        result["rss_high_water_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def peak_flops(device: torch.device) -> float | None:
    """bf16 dense peak of known GPUs, for MFU."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    table = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}
    return next((v for k, v in table.items() if k in name), None)


def run_case(case: BenchCase, device: torch.device, repeats: int = 5) -> dict[str, Any]:
    row: dict[str, Any] = {"name": case.name, "unit": case.unit, "items": case.items, "reference_name": case.reference_name}
    ours = measure(case.ours(device), device, repeats=repeats)
    row["ours"] = {**ours, "items_per_s": case.items / ours["median_s"]}
    if case.flops_per_item and (peak := peak_flops(device)):
        row["ours"]["mfu"] = case.flops_per_item * row["ours"]["items_per_s"] / peak
    if case.reference is not None:
        try:
            ref = measure(case.reference(device), device, repeats=repeats)
            row["reference"] = {**ref, "items_per_s": case.items / ref["median_s"]}
            row["ratio"] = row["ours"]["items_per_s"] / row["reference"]["items_per_s"]
        except ImportError as exc:
            row["reference"] = {"skipped": f"reference not installed: {exc}"}
    return row


def environment() -> dict[str, Any]:
    def v(name: str) -> str:
        try:
            return version(name)
        except Exception:
            return "not installed"

    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch_threads": torch.get_num_threads(),
        "versions": {n: v(n) for n in ("torch", "lightning", "torchaudio", "monai", "torchgeo", "rdkit", "transformers", "timm", "polyfm-core")},
    }


def collect_cases(quick: bool, only: list[str] | None = None) -> list[BenchCase]:
    cases: list[BenchCase] = []
    for ep in sorted(entry_points(group="polyfm.bench"), key=lambda e: e.name):
        if only and ep.name not in only:
            continue
        cases.extend(ep.load()(quick))
    return cases


def run_all(output: Path, quick: bool = True, only: list[str] | None = None, device: str | None = None, repeats: int = 5) -> dict[str, Any]:
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    result: dict[str, Any] = {"environment": environment(), "device": str(dev), "quick": quick, "cases": []}
    for case in collect_cases(quick, only):
        try:
            row = run_case(case, dev, repeats=repeats)
        except Exception as exc:  # one broken case must not hide the others' figures
            row = {"name": case.name, "error": f"{type(exc).__name__}: {exc}"}
        result["cases"].append(row)
        print(format_row(row), flush=True)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, output)
    return result


def format_row(row: dict[str, Any]) -> str:
    if "error" in row:
        return f"{row['name']:<40} ERROR {row['error']}"
    ours = row["ours"]
    memory = f"peak {ours['peak_mb']:.0f} MB" if "peak_mb" in ours else f"rss {ours['rss_high_water_mb']:.0f} MB"
    text = f"{row['name']:<40} {ours['items_per_s']:>10.1f} {row['unit']}/s  {memory}"
    if "ratio" in row:
        text += f"  ref {row['reference']['items_per_s']:.1f}/s  ratio {row['ratio']:.2f}x"
    if "mfu" in ours:
        text += f"  MFU {ours['mfu']:.1%}"
    return text
