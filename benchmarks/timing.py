"""Timing helpers shared by the benchmark scripts."""

from __future__ import annotations

import time

import torch


def event_ms(fn, iters: int) -> float:
    """Mean milliseconds per call of ``fn`` over ``iters`` calls, timed with CUDA events."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / iters


def time_ms(fn, iters: int, device: torch.device) -> float:
    """Mean milliseconds per call: CUDA events on a GPU, the wall clock on a CPU."""
    if device.type == "cuda":
        return event_ms(fn, iters)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return 1e3 * (time.perf_counter() - t0) / iters
