"""Timing, memory and machine description helpers."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    """``fn()`` and its wall time in seconds (the device synchronised on both sides)."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


class SavedBytes:
    """Bytes of the tensors autograd packs for backward while the context is open.

    ``total`` is the plain sum of ``numel · element_size`` over every packed
    tensor. ``extra`` counts each storage once and leaves out the storages of
    ``exclude`` (the parameters and inputs, which exist anyway): the memory a
    method holds for backward beyond what the caller already holds.

    Tensors saved inside a non-reentrant ``torch.utils.checkpoint`` region are
    packed by the checkpoint's own hooks (they are not stored) and so are not
    counted; tensors a library keeps alive in Python closures are not seen either.
    """

    def __init__(self, exclude: list[torch.Tensor] | tuple[torch.Tensor, ...] = ()) -> None:
        self.total = 0
        self._exclude = {t.untyped_storage().data_ptr() for t in exclude}
        self._seen: dict[int, int] = {}

    @property
    def extra(self) -> int:
        return sum(self._seen.values())

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        nbytes = t.numel() * t.element_size()
        self.total += nbytes
        ptr = t.untyped_storage().data_ptr()
        if ptr not in self._exclude:
            self._seen[ptr] = max(self._seen.get(ptr, 0), nbytes)
        return t

    def __enter__(self) -> SavedBytes:
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._ctx.__exit__(*exc)


class Series:
    """Repeated measurements with their median and spread."""

    def __init__(self) -> None:
        self.values: list[float] = []

    def add(self, v: float) -> None:
        self.values.append(v)

    def __len__(self) -> int:
        return len(self.values)

    @property
    def median(self) -> float:
        return statistics.median(self.values) if self.values else float("nan")

    def quartiles(self) -> tuple[float, float]:
        v = sorted(self.values)
        if len(v) < 2:
            return (v[0], v[0]) if v else (float("nan"), float("nan"))
        q = statistics.quantiles(v, n=4, method="inclusive")
        return q[0], q[2]

    @property
    def spread(self) -> float:
        """Interquartile range relative to the median."""
        lo, hi = self.quartiles()
        return (hi - lo) / self.median if self.median else float("nan")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_machine(device: torch.device, threads: int) -> dict[str, str]:
    info = {
        "cpu": f"{cpu_model()} ({os.cpu_count()} logical cores visible)",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": f"torch.set_num_threads({threads}), interop {torch.get_num_interop_threads()}",
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    try:
        from importlib.metadata import version

        import torchdeq  # noqa: F401

        info["torchdeq"] = version("torchdeq")
    except Exception:  # noqa: BLE001
        info["torchdeq"] = "not installed"
    try:
        import scipy

        info["scipy"] = scipy.__version__
    except ImportError:
        pass
    return info


def load_average() -> str:
    try:
        return " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"
