"""Benchmarks side by side with the reference implementations.

Each domain package lists :class:`BenchCase` objects; the harness warms up, repeats,
and reports median and spread of throughput and peak memory for ours and the
reference in the same process, with the ratio ours/reference. FLOPs are counted, not
written by hand: one extra call runs under ``torch.utils.flop_counter.FlopCounterMode``
(matmuls, convolutions, attention; forward and backward), which gives achieved
TFLOP/s everywhere and MFU on GPUs whose bf16 peak is known.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import platform
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points, version
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from polyfm.core.files import atomic_path

Step = Callable[[], object]


@dataclass
class BenchCase:
    name: str
    unit: str
    items: int
    ours: Callable[[torch.device], Step]
    reference: Callable[[torch.device], Step] | None = None
    #: Overrides the counted FLOPs (e.g. for ops the counter does not know); None: count them.
    flops_per_item: float | None = None
    reference_name: str = ""


def gpu_path_train_step(model: torch.nn.Module, loss_of: Callable[[torch.nn.Module], torch.Tensor], lr: float = 1e-4, compile: bool = False) -> Step:
    """A training step on polyfm's GPU path, for cases that set it against a reference's own
    plain fp32 loop: what the Trainer and ``GpuPath`` do in a recipe run, on a bare model.
    On CUDA: bf16 autocast, channels_last for CNNs, TF32, fused AdamW, optional
    ``torch.compile``. On CPU it is the plain fp32 step (as the Trainer's CPU fallback is),
    so there the ratio only shows that nothing was lost. ``loss_of(model)`` runs the forward
    pass on the case's inputs and returns the loss."""
    from polyfm.core.performance import prepare_for_device

    device = next(model.parameters()).device
    on_cuda = device.type == "cuda"
    prepare_for_device(model, on_cuda)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, fused=on_cuda or None)
    forward: Any = torch.compile(model) if compile else model

    def step() -> object:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=on_cuda):
            loss = loss_of(forward)
        loss.backward()
        optimizer.step()
        return loss

    return step


_SCRATCH: list[tempfile.TemporaryDirectory[str]] = []


def scratch_dir(prefix: str) -> Path:
    """A folder for a case's generated input files, removed when the process exits."""
    folder = tempfile.TemporaryDirectory(prefix=prefix)
    _SCRATCH.append(folder)  # kept alive until exit; its finaliser removes it then
    return Path(folder.name)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class ResidentPeak:
    """Peak resident memory added while the block runs (MB), for CPU cases.

    CPU allocations carry no per-case statistics, so a thread samples the resident set.
    Freed heap is first handed back to the OS (``malloc_trim``) so memory the previous
    case left free does not hide this one's. ``mb`` is None where /proc is missing.
    """

    def __init__(self, interval_s: float = 0.0005) -> None:
        self.interval_s = interval_s
        self.mb: float | None = None
        self._done = threading.Event()

    def __enter__(self) -> ResidentPeak:
        _trim_heap()
        self._before = _rss_bytes()
        self._peak = self._before or 0
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        if self._before is not None:
            self._sampler.start()
        return self

    def _sample(self) -> None:
        while not self._done.is_set():
            self._peak = max(self._peak, _rss_bytes() or 0)
            time.sleep(self.interval_s)

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        if self._before is not None:
            self._sampler.join()
            self.mb = max(0, max(self._peak, _rss_bytes() or 0) - self._before) / 2**20


def _trim_heap() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def count_flops(step: Step) -> int:
    """FLOPs of one call (forward, and backward where the step has one)."""
    with FlopCounterMode(display=False) as counter:
        step()
    return int(counter.get_total_flops())


def _timing(times: list[float]) -> dict[str, float]:
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "repeats": len(times)}


def peak_flops(device: torch.device) -> float | None:
    """bf16 dense peak of known GPUs, for MFU."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    table = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}
    return next((v for k, v in table.items() if k in name), None)


def _build(build: Callable[[torch.device], Step], device: torch.device) -> tuple[Step, float | None]:
    """The step, and the peak memory (MB) that building it and two warm-up calls added:
    weights, inputs, activations, optimizer state. On CUDA the allocator's peak over
    what was allocated before; on CPU the resident set, sampled outside the timed calls."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    with ResidentPeak() as resident:
        step = build(device)
        for _ in range(2):
            step()
        _sync(device)
    if device.type == "cuda":
        return step, (torch.cuda.max_memory_allocated(device) - before) / 2**20
    return step, resident.mb


def _calls_for(step: Step, device: torch.device, min_run_s: float) -> int:
    start = time.perf_counter()
    step()
    _sync(device)
    return max(1, math.ceil(min_run_s / max(time.perf_counter() - start, 1e-6)))


def run_case(case: BenchCase, device: torch.device, repeats: int = 5, min_run_s: float = 0.05) -> dict[str, Any]:
    """Ours and the reference are built once, then timed in alternation (ours, reference,
    ours, ...), so a change in machine load during the case hits both sides alike."""
    row: dict[str, Any] = {"name": case.name, "unit": case.unit, "items": case.items, "reference_name": case.reference_name}
    built: dict[str, tuple[Step, float | None]] = {"ours": _build(case.ours, device)}
    if case.reference is not None:
        try:
            built["reference"] = _build(case.reference, device)
        except ImportError as exc:
            row["reference"] = {"skipped": f"reference not installed: {exc}"}
    # short steps (quick CPU cases take ~1 ms) are timed in runs of several calls lasting
    # at least ``min_run_s``, so timer and scheduler noise does not swamp them
    calls = max(_calls_for(step, device, min_run_s) for step, _ in built.values())
    row["calls_per_run"] = calls
    times: dict[str, list[float]] = {side: [] for side in built}
    for _ in range(repeats):
        for side, (step, _) in built.items():
            start = time.perf_counter()
            for _ in range(calls):
                step()
            _sync(device)
            times[side].append((time.perf_counter() - start) / calls)
    for side, (step, peak_mb) in built.items():
        timing = _timing(times[side])
        result: dict[str, Any] = {**timing, "items_per_s": case.items / timing["median_s"]}
        if peak_mb is not None:
            result["peak_mb"] = peak_mb
        flops = case.flops_per_item * case.items if case.flops_per_item else count_flops(step)
        if flops:
            result["gflop_per_item"] = flops / case.items / 1e9
            result["tflop_per_s"] = flops / timing["median_s"] / 1e12
            if peak := peak_flops(device):
                result["mfu"] = flops / timing["median_s"] / peak
        row[side] = result
    if "reference" in built:
        row["ratio"] = row["ours"]["items_per_s"] / row["reference"]["items_per_s"]
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


def finetune_utilisation(domain: str, device: torch.device, steps: int, quick: bool = True) -> dict[str, Any]:
    """A domain's fine-tuning loop as the studies run it (its kit's task, data module and
    workers, polyfm's Trainer) for ``steps`` steps under ``UtilisationMonitor``: is the
    data pipeline ever the bottleneck? Real data when ``POLYFM_DATA_DIR`` is set."""
    import lightning as L

    from polyfm.core.adaptation import Adaptation
    from polyfm.core.kit import load_kit
    from polyfm.core.performance import UtilisationMonitor
    from polyfm.core.trainer import build_trainer

    data_dir = os.environ.get("POLYFM_DATA_DIR") or None
    kit = load_kit(domain, Path(data_dir) if data_dir else None, quick=quick)
    L.seed_everything(0, verbose=False)
    task = kit.make_task(kit.make_encoder(), Adaptation())
    data = kit.make_finetune_data(1.0, 0)
    monitor = UtilisationMonitor(skip_first=3)
    with tempfile.TemporaryDirectory(prefix="polyfm-bench-finetune-") as root:
        trainer = build_trainer(
            max_epochs=-1, max_steps=steps, default_root_dir=root, accelerator="gpu" if device.type == "cuda" else "cpu", devices=1,
            enable_progress_bar=False, loggers=(), enable_checkpointing=False, callbacks=[monitor], limit_val_batches=0,
            enable_model_summary=False,
        )  # fmt: skip
        task.train()
        trainer.fit(task, data)
    return {"name": f"finetune/{domain}", "data_source": kit.data_source, **monitor.summary}


def run_all(
    output: Path,
    quick: bool = True,
    only: list[str] | None = None,
    device: str | None = None,
    repeats: int = 5,
    finetune_steps: int = 30,
) -> dict[str, Any]:
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    result: dict[str, Any] = {"environment": environment(), "device": str(dev), "quick": quick, "complete": False, "cases": [], "finetune": []}
    for case in collect_cases(quick, only):
        try:
            row = run_case(case, dev, repeats=repeats)
        except Exception as exc:  # one broken case must not hide the others' figures
            row = {"name": case.name, "error": f"{type(exc).__name__}: {exc}"}
        result["cases"].append(row)
        print(format_row(row), flush=True)
        _write_json(output, result)  # after every case: a run stopped at a device's time limit keeps what it measured
    if finetune_steps > 0:
        from polyfm.core.kit import installed_kits

        for domain in installed_kits(include_registered=False):
            if only and domain not in only:
                continue
            try:
                run = finetune_utilisation(domain, dev, finetune_steps, quick)
            except Exception as exc:
                run = {"name": f"finetune/{domain}", "error": f"{type(exc).__name__}: {exc}"}
            result["finetune"].append(run)
            print(format_utilisation(run), flush=True)
            _write_json(output, result)
    result["complete"] = True
    _write_json(output, result)
    return result


def _write_json(output: Path, result: dict[str, Any]) -> None:
    """Atomically: a reader (or a run killed at its time limit) sees the last whole file."""
    with atomic_path(output) as temporary:
        temporary.write_text(json.dumps(result, indent=2))


def format_utilisation(run: dict[str, Any]) -> str:
    if "error" in run:
        return f"{run['name']:<40} ERROR {run['error']}"
    text = f"{run['name']:<40} {run['samples_per_s']:>10.1f} samples/s  data wait {run['data_wait_fraction']:.1%}"
    if "device_busy_fraction" in run:
        text += f"  GPU busy {run['device_busy_fraction']:.1%}"
    if "gpu_utilisation" in run:
        text += f"  NVML {run['gpu_utilisation']:.0%}"
    return text


def format_row(row: dict[str, Any]) -> str:
    if "error" in row:
        return f"{row['name']:<40} ERROR {row['error']}"
    ours = row["ours"]
    text = f"{row['name']:<40} {ours['items_per_s']:>10.1f} {row['unit']}/s"
    if "peak_mb" in ours:
        text += f"  peak {ours['peak_mb']:.0f} MB"
    if "tflop_per_s" in ours:
        text += f"  {ours['tflop_per_s'] * 1e3:.1f} GFLOP/s"
    if "mfu" in ours:
        text += f"  MFU {ours['mfu']:.1%}"
    if "ratio" in row:
        reference = row["reference"]
        text += f"  | ref {reference['items_per_s']:.1f}/s"
        text += f"  peak {reference['peak_mb']:.0f} MB" if "peak_mb" in reference else ""
        text += f"  ratio {row['ratio']:.2f}x"
    elif "skipped" in row.get("reference", {}):
        text += f"  | ref {row['reference']['skipped']}"
    return text
