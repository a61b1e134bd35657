"""The engine's queue: samples waiting to enter the running batch, and the rule that admits them.

Strict FIFO: a request's samples wait behind every earlier request's. A queued sample joins the
running batch when, with it, `number of active samples * longest padded length <= residue_budget`
(a bound on every length group's step, since the groups of one iteration run one after another),
and, with `max_batch_requests` > 0, when its request is already running or fewer than that many
requests are. The queue holds at most `queue_max_samples` samples; a request that would overflow
it is refused whole (`QueueFull`, 429 + Retry-After). Samples of a cancelled or finished request
are dropped when they reach the head.

Not thread-safe on its own: the engine calls it under its lock.
"""

from __future__ import annotations

from collections import deque

from service.batching import padded
from service.jobs import Job, QueueFull, Slot

__all__ = ["Admission"]


class Admission:
    """`enqueue` a job's samples; `admit` the ones that join the running batch now."""

    def __init__(self, *, queue_max_samples: int, max_batch_requests: int = 0, pad_multiple: int = 8) -> None:
        self.queue_max_samples = int(queue_max_samples)
        self.max_batch_requests = int(max_batch_requests)
        self.pad_multiple = int(pad_multiple)
        self.pending: deque[Slot] = deque()

    def __len__(self) -> int:
        return len(self.pending)

    def enqueue(self, job: Job, retry_after: int) -> None:
        """One slot per sample of `job` at the tail; QueueFull if they do not all fit."""
        if len(self.pending) + job.count > self.queue_max_samples:
            raise QueueFull(retry_after)
        for i in range(job.count):
            self.pending.append(Slot(job=job, index=i, seed=job.seeds[i], length=job.length))

    def drop(self, job: Job) -> int:
        """Remove every queued slot of `job`; returns how many there were."""
        kept = deque(s for s in self.pending if s.job is not job)
        dropped = len(self.pending) - len(kept)
        self.pending = kept
        return dropped

    def take_all(self) -> list[Slot]:
        """Empty the queue; returns what it held."""
        left = list(self.pending)
        self.pending.clear()
        return left

    def admit(self, active: list[Slot], residue_budget: int) -> list[Slot]:
        """Pop, in order, the queued slots that join `active` now (module docstring); the caller starts them."""
        admitted: list[Slot] = []
        count = len(active)
        longest = max((s.length for s in active), default=0)
        jobs = {s.job for s in active}
        while self.pending:
            slot = self.pending[0]
            if slot.job.cancelled or slot.job.done:
                self.pending.popleft()
                continue
            if count:
                if (count + 1) * padded(max(slot.length, longest), self.pad_multiple) > residue_budget:
                    break
                if self.max_batch_requests and slot.job not in jobs and len(jobs) >= self.max_batch_requests:
                    break
            self.pending.popleft()
            admitted.append(slot)
            count, longest = count + 1, max(longest, slot.length)
            jobs.add(slot.job)
        return admitted
