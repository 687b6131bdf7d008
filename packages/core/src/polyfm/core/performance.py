"""The GPU path and its measurement.

``GpuPath``: channels_last for CNNs, opt-in torch.compile, and TF32 matmuls. bf16
autocast comes from the Trainer's precision ("bf16-mixed", the default on CUDA), fused
AdamW from the tasks, pinned memory and persistent workers from ``DictDataModule``.
``UtilisationMonitor``: data-wait and device-busy fractions of a training run.
``HostSyncCounter``: finds host-device synchronisations (``.item()``, ``bool(tensor)``)
in a step, on any device, so a test on CPU can keep the GPU step free of them."""

from __future__ import annotations

import contextlib
import contextvars
import os
import time
import traceback
from collections.abc import Iterator
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.overrides import TorchFunctionMode


def has_convolutions(module: nn.Module, dims: int = 2) -> bool:
    kind = {2: nn.Conv2d, 3: nn.Conv3d}[dims]
    return any(isinstance(m, kind) for m in module.modules())


def prepare_for_device(module: nn.Module, on_cuda: bool, channels_last: bool | str = "auto") -> None:
    """The layout half of the GPU path, for a Trainer run (``GpuPath``) or a bare model (the
    benchmarks): TF32 matmuls and cuDNN autotuning on CUDA; channels_last memory for models
    with 2D/3D convolutions ("auto": on CUDA only, where cuDNN's NHWC kernels are faster)."""
    if on_cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    if channels_last is True or (channels_last == "auto" and on_cuda):
        if has_convolutions(module, 3):
            module.to(memory_format=torch.channels_last_3d)  # type: ignore[call-overload]  # (torch's stubs lack it)
        elif has_convolutions(module, 2):
            module.to(memory_format=torch.channels_last)  # type: ignore[call-overload]


class GpuPath(Callback):
    """Applied at ``setup``. ``channels_last``: "auto" converts models with 2D/3D
    convolutions (PANNs, ResNets, U-Nets) when training on CUDA. ``compile``: wraps the
    task's encoder/model in ``torch.compile`` (opt-in: compilation costs minutes)."""

    def __init__(self, channels_last: bool | str = "auto", compile: bool = False, compile_mode: str | None = None) -> None:
        self.channels_last, self.compile, self.compile_mode = channels_last, compile, compile_mode

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        prepare_for_device(pl_module, trainer.strategy.root_device.type == "cuda", self.channels_last)
        if self.compile:
            for name in ("encoder", "model"):
                inner = getattr(pl_module, name, None)
                if isinstance(inner, nn.Module):
                    compiled: Any = torch.compile(inner, mode=self.compile_mode)
                    setattr(pl_module, name, compiled)
                    break


def _batch_size(batch: Any) -> int:
    """Samples in a batch: the length of its first tensor (dicts and lists searched in order)."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.ndim else 1
    values = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, list | tuple) else []
    for value in values:
        if (size := _batch_size(value)) > 0:
            return size
    return 0


class UtilisationMonitor(Callback):
    """Where training time goes: waiting for data, or computing.

    Host timestamps around each batch give the data-wait fraction (time between the
    end of one step and the start of the next, which is the dataloader's ``next()``
    plus Lightning's bookkeeping) and samples/s. On CUDA, events recorded on the
    stream at each batch start and end give the device-busy fraction: the share of
    wall time the GPU had queued step work, exact even though the host runs ahead;
    NVML utilisation is added when ``pynvml`` is installed. Events are read only at
    logging time (``log_every_n_steps``) and at the end, so the monitor adds no host
    sync to the step. The first ``skip_first`` steps (warm-up, cudnn autotuning,
    compilation) are left out. ``summary`` holds the figures for benchmarks; they are
    also logged as ``perf/*`` metrics.
    """

    def __init__(self, skip_first: int = 3) -> None:
        self.skip_first = skip_first
        self.summary: dict[str, float] = {}
        self._reset()

    def _reset(self) -> None:
        self._seen = 0
        self._samples = 0
        self._wait = self._step = 0.0
        self._last_end: float | None = None
        self._start = 0.0
        self._events: list[tuple[Any, Any]] = []
        self._device_busy_ms = 0.0
        self._first_event: Any = None
        self._last_event: Any = None
        self._nvml: list[float] = []

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._reset()

    def _counting(self) -> bool:
        return self._seen > self.skip_first

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        now = time.perf_counter()
        self._seen += 1
        if self._counting() and self._last_end is not None:
            self._wait += now - self._last_end
        self._start = now
        if pl_module.device.type == "cuda" and self._counting():
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self._events.append((event, None))
            if self._first_event is None:
                self._first_event = event

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        now = time.perf_counter()
        self._last_end = now
        if not self._counting():
            return
        self._step += now - self._start
        self._samples += _batch_size(batch)
        if self._events:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self._events[-1] = (self._events[-1][0], event)
            self._last_event = event
        if trainer.global_step % max(1, getattr(trainer, "log_every_n_steps", 50)) == 0:
            self._update(pl_module, wait_for_device=False)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._update(pl_module, wait_for_device=True)

    def _update(self, pl_module: L.LightningModule, wait_for_device: bool) -> None:
        if wait_for_device and self._last_event is not None:
            self._last_event.synchronize()
        while self._events and self._events[0][1] is not None and self._events[0][1].query():
            start, end = self._events.pop(0)
            self._device_busy_ms += start.elapsed_time(end)
        if pl_module.device.type == "cuda":
            try:
                self._nvml.append(float(torch.cuda.utilization(pl_module.device)))
            except Exception:  # pynvml missing or no permission: events still give the busy fraction
                pass
        host = self._wait + self._step
        if host <= 0:
            return
        summary = {
            "steps": float(max(0, self._seen - self.skip_first)),
            "samples_per_s": self._samples / host,
            "data_wait_fraction": self._wait / host,
            "data_wait_s_per_step": self._wait / max(1, self._seen - self.skip_first),
        }
        if self._first_event is not None and self._last_event is not None and not self._events and self._last_event.query():
            span = self._first_event.elapsed_time(self._last_event)
            if span > 0:
                summary["device_busy_fraction"] = min(1.0, self._device_busy_ms / span)
        if self._nvml:
            summary["gpu_utilisation"] = sum(self._nvml) / len(self._nvml) / 100
        self.summary = summary
        if pl_module._trainer is not None and pl_module.trainer.logger is not None:
            pl_module.trainer.logger.log_metrics({f"perf/{k}": v for k, v in summary.items() if k != "steps"}, step=pl_module.trainer.global_step)


_EXPECTED_SYNC: contextvars.ContextVar[bool] = contextvars.ContextVar("polyfm_expected_host_sync", default=False)


@contextlib.contextmanager
def expected_host_sync() -> Iterator[None]:
    """Marks a read that never waits for a device: of a tensor that lives on the host
    whatever the accelerator (a sampler's order), or on a path only CPU runs take.
    ``HostSyncCounter`` does not report it."""
    token = _EXPECTED_SYNC.set(True)
    try:
        yield
    finally:
        _EXPECTED_SYNC.reset(token)


class HostSyncCounter(TorchFunctionMode):
    """Records every call that makes the host wait for the device on CUDA: reading a
    value (``item``, ``bool``/``int``/``float`` of a tensor, ``tolist``, ``numpy``,
    ``cpu``, ``to("cpu")``) or an op whose output size depends on the data
    (``nonzero``, boolean-mask indexing, ``masked_select``, ``unique``) or that returns a
    Python bool (``equal``, ``allclose``). Works on CPU, so tests can keep GPU steps free
    of them without a GPU. ``calls`` holds (name, innermost polyfm/user frame)."""

    _READS = {"item", "__bool__", "__int__", "__float__", "__index__", "tolist", "numpy", "cpu"}
    _DATA_DEPENDENT = {"nonzero", "argwhere", "masked_select", "unique", "unique_consecutive", "equal", "allclose"}

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, str]] = []

    def _syncs(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        if name in self._READS or name in self._DATA_DEPENDENT:
            return True
        if name == "to":  # a device-to-host copy; host-to-device copies are asynchronous
            target = kwargs.get("device", args[1] if len(args) > 1 else None)
            source = args[0] if args and isinstance(args[0], torch.Tensor) else None
            to_host = isinstance(target, str | torch.device) and torch.device(target).type == "cpu"
            return to_host and source is not None and source.device.type != "cpu"
        if name == "__getitem__" and len(args) > 1:
            index = args[1] if isinstance(args[1], tuple) else (args[1],)
            return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in index)
        return name == "where" and len(args) == 1 and not kwargs

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if not _EXPECTED_SYNC.get() and self._syncs(name, args, kwargs):
            self.calls.append((name, _caller()))
        return func(*args, **kwargs)


def _caller() -> str:
    """The innermost frame outside torch itself: the line that asked for the sync."""
    for frame in reversed(traceback.extract_stack()):
        if frame.filename != __file__ and f"{os.sep}torch{os.sep}" not in frame.filename:
            return f"{frame.filename}:{frame.lineno} ({frame.name})"
    return "?"
