"""Timing and memory measurement: monotonic clock, CUDA synchronised before every reading."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch


@dataclass
class Stopwatch:
    seconds: float = 0.0


@contextmanager
def timed(device: torch.device) -> Iterator[Stopwatch]:
    """Wall time of the block; on CUDA, queued kernels are waited for on both ends."""
    watch = Stopwatch()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    try:
        yield watch
    finally:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        watch.seconds = time.perf_counter() - start


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_bytes(device: torch.device) -> int | None:
    """Peak allocated device memory since the last reset; None where torch does not track it (CPU)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return None
