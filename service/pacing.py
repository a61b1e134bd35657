"""Step pacing: the engine's host thread runs a bounded number of steps ahead of the GPU.

A sampling step on CUDA is a few hundred microseconds of host work (gathering the batch, each
sample's noise draw, the graph replay's input copies) in front of milliseconds of GPU work. If the
host waits for the GPU every step, that host work adds to every step; if it never waits, it can
queue hundreds of steps, and neither a late request nor the step-time metric sees the GPU's real
pace. :class:`StepPacer` keeps at most ``ahead`` steps in flight: each step is bracketed by two
CUDA events; when a new step would exceed ``ahead``, the host waits for the oldest step's end event
and reports that step's device time (start event to end event: from the stream reaching the step
to its last kernel, so idle time before a step is not counted and gaps inside it are). The
engine's step inputs therefore go up with non-blocking copies from pinned memory (a pageable copy
makes the host wait for the stream).

On a CPU device nothing is asynchronous: ``end`` reports the wall time of the step at once.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

import torch

__all__ = ["StepPacer", "to_device"]


def to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small host list as a tensor on ``device``, without making the host wait for the stream (CUDA)."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype).pin_memory().to(device, non_blocking=True)


class StepPacer:
    """``token = pacer.begin(); <enqueue a step>; pacer.end(token)``; ``drain()`` when going idle.

    ``observe(seconds)`` is called once per completed step (on CUDA up to ``ahead`` steps late).
    """

    def __init__(self, device: torch.device, *, ahead: int = 2,
                 observe: Callable[[float], None] | None = None) -> None:
        if ahead < 1:
            raise ValueError(f"ahead must be >= 1 (got {ahead})")
        self.device = torch.device(device)
        self.ahead = int(ahead)
        self.observe = observe
        self.cuda = self.device.type == "cuda"
        self._in_flight: deque[tuple[torch.cuda.Event, torch.cuda.Event]] = deque()

    def begin(self):
        if not self.cuda:
            return time.perf_counter()
        start = torch.cuda.Event(enable_timing=True)
        start.record()
        return start

    def end(self, token) -> None:
        if not self.cuda:
            self._report(time.perf_counter() - token)
            return
        stop = torch.cuda.Event(enable_timing=True)
        stop.record()
        self._in_flight.append((token, stop))
        while len(self._in_flight) > self.ahead:
            self._complete_oldest()

    def drain(self) -> None:
        """Wait for every step in flight (and report it)."""
        while self._in_flight:
            self._complete_oldest()

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def _complete_oldest(self) -> None:
        start, stop = self._in_flight.popleft()
        stop.synchronize()
        self._report(start.elapsed_time(stop) / 1e3)

    def _report(self, seconds: float) -> None:
        if self.observe is not None:
            self.observe(seconds)
