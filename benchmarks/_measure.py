"""Timing and peak-memory helpers shared by the benchmarks."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_mb(device: torch.device) -> float:
    """Peak GPU memory since the last reset (cuda), else the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(device: torch.device, fn: Callable[[], Any]) -> tuple[Any, float, float]:
    """(result, wall seconds, peak MB) of ``fn()``."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    t0 = time.perf_counter()
    result = fn()
    sync(device)
    return result, time.perf_counter() - t0, peak_mb(device)


def max_diff(a: dict[str, list[float]], b: dict[str, list[float]]) -> str:
    """Largest |a - b| over layers, per candidate-bit column (equal values, infinities included, count as 0)."""
    cols = len(next(iter(a.values())))
    return " / ".join(
        f"{max((abs(a[n][j] - b[n][j]) for n in a if a[n][j] != b[n][j]), default=0.0):.1e}" for j in range(cols)
    )
