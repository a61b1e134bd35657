"""What the sampling engine holds: requests (`Job`), their samples in flight (`Slot`), results, errors, counters.

A request of `count` samples of one length is one `Job` with `count` `Slot`s; slot i samples with seed
`seed + i` (`new_seeds`). A job samples in `steps` steps: its `timesteps` are the respaced sequence
T .. 1 of that many entries (`model.sampler.respaced_timesteps`) followed by 0, and each of its slots
walks them, one entry per step (`Slot.t`, `Slot.t_prev`, `Slot.advance`). The engine resolves the
job's future on its event loop with the job itself (its `results`) or with one of the errors below,
which the routes turn into status codes:
`QueueFull` 429, `EngineUnavailable` 503, `SampleFailed` 503, `Cancelled` (client gone) 499.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass, field

import torch

__all__ = ["Cancelled", "EngineStats", "EngineUnavailable", "Job", "QueueFull", "SampleFailed", "SampleResult",
           "Slot", "new_seeds"]


class QueueFull(Exception):
    def __init__(self, retry_after: int) -> None:
        super().__init__("the sampling queue is full")
        self.retry_after = retry_after


class EngineUnavailable(Exception):
    """Not accepting work: `reason` is 'shutting_down' or 'engine_down'."""

    def __init__(self, reason: str, message: str, retry_after: int = 5) -> None:
        super().__init__(message)
        self.reason = reason
        self.retry_after = retry_after


class SampleFailed(Exception):
    """A request that was accepted but could not be completed; `kind` is a metrics error kind."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class Cancelled(Exception):
    """The request was cancelled (client gone or timed out)."""


@dataclass
class SampleResult:
    index: int
    seed: int
    length: int
    ca: torch.Tensor  # [L, 3] float32 CPU
    pdb: str


@dataclass(eq=False)
class Job:
    """One request: `count` samples of one length, in `steps` sampling steps."""

    id: str
    length: int
    count: int
    seeds: list[int]
    noise_scale: float
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    submitted: float = field(default_factory=time.monotonic)
    first_admitted: float | None = None
    finished: float | None = None
    results: list = field(default_factory=list)
    remaining: int = 0
    cancelled: bool = False
    done: bool = False
    steps: int = 0  # sampling steps of each sample (<= T)
    timesteps: tuple[int, ...] = ()  # T .. 1 (`steps` entries), then 0

    @property
    def queue_wait_s(self) -> float:
        return (self.first_admitted or self.submitted) - self.submitted

    @property
    def sampling_s(self) -> float:
        return (self.finished or time.monotonic()) - (self.first_admitted or self.submitted)


@dataclass(eq=False)
class Slot:
    """One sample of a job: its own generator, its current x_t, t and the next timestep `t_prev`; with a
    self-conditioned model also its latest x0 estimate `x0` (None before its first step)."""

    job: Job
    index: int
    seed: int
    length: int
    t: int = 0
    timesteps: tuple[int, ...] = ()  # its job's T .. 1, 0 (`t == timesteps[pos]`); (): every timestep
    pos: int = 0
    x: torch.Tensor | None = None  # [L, 3] on device
    gen: torch.Generator | None = None
    noise: torch.Tensor | None = None  # [L, 3] drawn for the pending step, reused on an OOM retry
    x0: torch.Tensor | None = None  # [L, 3] on device: the last step's x0 estimate (self-conditioned models)
    admitted: float = 0.0
    uid: int = field(default_factory=itertools.count().__next__)  # never reused (unlike id())

    @property
    def t_prev(self) -> int:
        """The timestep this sample's next step lands on (0: the step that finishes it)."""
        return self.timesteps[self.pos + 1] if self.timesteps else self.t - 1

    def start(self, timesteps: tuple[int, ...]) -> None:
        """At the first of `timesteps` (T .. 1, then 0)."""
        self.timesteps, self.pos, self.t = timesteps, 0, timesteps[0]

    def advance(self) -> None:
        """One step done: t <- t_prev."""
        self.t = self.t_prev
        self.pos += 1

    def stepped(self, x: torch.Tensor, x0: torch.Tensor | None = None) -> None:
        """Its step is done: x_{t_prev} (a padded row [L_pad, 3]) and, if self-conditioned, x0_hat
        [L_pad, 3] become its state; t <- t_prev."""
        self.x = x[: self.length]
        if x0 is not None:
            self.x0 = x0[: self.length]
        self.noise = None
        self.advance()


@dataclass
class EngineStats:
    """Counters the tests and /info read."""

    batches_run: int = 0
    max_batch_size: int = 0
    max_distinct_lengths: int = 0
    max_distinct_requests: int = 0
    max_distinct_timesteps: int = 0  # > 1: samples joined a running batch (iteration-level batching)
    max_length_groups: int = 0  # > 1: one iteration stepped its samples in several length groups
    samples_completed: int = 0
    samples_cancelled: int = 0
    samples_failed: int = 0
    oom_retries: int = 0
    worker_restarts: int = 0
    cuda_graphs_cached: int = 0
    cuda_graph_captures: int = 0
    cuda_graph_replays: int = 0
    inputs_reused: int = 0  # steps whose x / mask were the group's previous output (same members)


def new_seeds(count: int, first: int | None) -> list[int]:
    """Seeds of a request: first, first + 1, ... or random 63-bit seeds."""
    if first is None:
        first = int(torch.randint(0, 2**62, (1,)).item())
    return list(itertools.islice(itertools.count(first), count))
