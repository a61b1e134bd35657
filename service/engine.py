"""Sampling engine: one worker thread owns the device and runs iteration-level batched diffusion.

Sources: the scheduling idea is Orca's iteration-level scheduling (Yu et al., OSDI 2022) as used
by vLLM / TGI "continuous batching"; the sampler is Genie's ancestral DDPM
(`model.diffusion.reverse_step`, one timestep per sample).

Each iteration the worker gathers every active sample (mixed lengths, each with its own t), splits
them into length groups (:func:`length_groups`: a sample shares a batch with samples at most
1 / `length_group_ratio` times its length, so a 64-residue sample is not padded to 256 when the pair
stack costs B * L^2), and for each group, longest first, pads to a multiple of `pad_multiple`,
masks, runs `denoiser(x_t, t, mask)` and `reverse_step` once; it retires samples that reached t = 0
(PDB text via `model.pdb_io`) and admits queued samples (strict FIFO) while `number of active
samples * longest padded length <= residue_budget` (a bound on every group's step, since groups run
one after another). A request's future is resolved
on its event loop with `loop.call_soon_threadsafe`.

Sample i of a request with seed s draws x_T and every step's noise from its own generator seeded
s + i, in the same order as `model.diffusion.sample`, so a sample does not depend on what it is
batched with (up to the denoiser's batch-size numerics).

Faults:
- `torch.cuda.OutOfMemoryError` in a step: the batch is split in halves and retried (the noise
  already drawn is reused, so results do not change), the residue budget is lowered; a single
  sample that still does not fit fails only its own request.
- any other exception in a step fails only the requests in that batch; the worker keeps going.
- an exception that escapes the loop (a bug) fails the running samples, and the worker restarts
  up to `max_worker_restarts` times; after that the engine stays down (`alive` False, /ready 503,
  `mhcflash_engine_up` 0) and `on_dead` is called (the app exits the process for the orchestrator).

On CUDA the worker does not wait for the GPU each step: step inputs go up with non-blocking copies
and `service.pacing.StepPacer` lets it run at most `steps_ahead` steps in front of the GPU, so the
host's per-step work (gathering the batch, noise draws) overlaps the previous step's kernels; the
step-time metric is measured with CUDA events.

CUDA graphs (`service.graphs`, `cuda_graphs` auto|on|off): on CUDA the step (denoiser + reverse step)
is replayed from a graph captured per (batch bucket, padded length); the eager path stays beside it
(CPU, batches above the largest bucket, or a failed capture) and gives the same samples.

Symbols: B batch, L residues (padded), T timesteps.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from model.diffusion import Schedule
from model.mhc import find_mhc_modules
from service.graphs import StepGraphRunner, eager_step, graphs_enabled
from service.pacing import StepPacer, to_device

log = logging.getLogger("mhcflash.engine")


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
    """One request: `count` samples of one length."""

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

    @property
    def queue_wait_s(self) -> float:
        return (self.first_admitted or self.submitted) - self.submitted

    @property
    def sampling_s(self) -> float:
        return (self.finished or time.monotonic()) - (self.first_admitted or self.submitted)


@dataclass(eq=False)
class _Slot:
    job: Job
    index: int
    seed: int
    length: int
    t: int = 0
    x: torch.Tensor | None = None  # [L, 3] on device
    gen: torch.Generator | None = None
    noise: torch.Tensor | None = None  # [L, 3] drawn for the pending step, reused on an OOM retry
    admitted: float = 0.0
    uid: int = field(default_factory=itertools.count().__next__)  # never reused (unlike id())


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


class SamplingEngine:
    """Owns `denoiser` on `device`; `submit` from the event loop, results arrive as futures."""

    def __init__(
        self,
        denoiser: torch.nn.Module,
        schedule: Schedule,
        *,
        device: torch.device,
        residue_budget: int,
        queue_max_samples: int,
        max_batch_requests: int = 0,
        pad_multiple: int = 8,
        autocast_dtype: torch.dtype | None = None,
        max_worker_restarts: int = 3,
        metrics=None,
        to_pdb: Callable[[torch.Tensor], str] | None = None,
        on_dead: Callable[[], None] | None = None,
        cuda_graphs: str = "auto",
        cuda_graph_cache: int = 32,
        length_group_ratio: float = 0.75,
        steps_ahead: int = 2,
    ) -> None:
        if to_pdb is None:
            from model.pdb_io import ca_to_pdb as to_pdb
        self.denoiser = denoiser.eval()
        for module in find_mhc_modules(self.denoiser):  # serving logs no mHC diagnostics: keep no H_res
            module.record, module.last_h_res = False, None
        self.schedule = schedule
        self.device = torch.device(device)
        self.residue_budget = int(residue_budget)
        self.queue_max_samples = int(queue_max_samples)
        self.max_batch_requests = int(max_batch_requests)
        self.pad_multiple = int(pad_multiple)
        if not 0.0 <= length_group_ratio <= 1.0:
            raise ValueError(f"length_group_ratio must be in [0, 1] (got {length_group_ratio})")
        self.length_group_ratio = float(length_group_ratio)
        self.autocast_dtype = autocast_dtype
        self.max_worker_restarts = int(max_worker_restarts)
        self.metrics = metrics
        self.to_pdb = to_pdb
        self.on_dead = on_dead
        self.stats = EngineStats()
        self.before_step: Callable[[], None] | None = None  # fault-injection hook (tests), outside the step guard
        self._cv = threading.Condition()
        self._pending: deque[_Slot] = deque()
        self._active: list[_Slot] = []
        self._accepting = True
        self._stopping = False
        self._dead = False
        self._thread: threading.Thread | None = None
        self._ema_sample_s = 1.0
        self._set_gauge("residue_budget", self.residue_budget)
        # x_{t-1} and mask of each group's last step, keyed by (L, member uids): when a group has the
        # same members as in the previous iteration, its next input is that output (no per-sample copies)
        self._inputs_prev: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._inputs_next: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._step_inputs: tuple = ((), None)
        self.pacer = StepPacer(self.device, ahead=steps_ahead,
                               observe=metrics.step_duration.observe if metrics is not None else None)
        self.graphs: StepGraphRunner | None = None
        if graphs_enabled(cuda_graphs, self.device):
            self.graphs = StepGraphRunner(self.denoiser, schedule, device=self.device, autocast_dtype=autocast_dtype,
                                          max_graphs=cuda_graph_cache)

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> None:
        self._thread = threading.Thread(target=self._worker_main, name="mhcflash-engine", daemon=True)
        self._thread.start()
        self._set_gauge("engine_up", 1)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._dead

    @property
    def accepting(self) -> bool:
        return self._accepting and self.alive

    def load(self) -> tuple[int, int]:
        """(queued samples, active samples)."""
        with self._cv:
            return len(self._pending), len(self._active)

    def retry_after(self) -> int:
        return int(min(120, max(1, math.ceil(self._ema_sample_s))))

    async def shutdown(self, timeout_s: float) -> None:
        """Stop accepting; let accepted work finish for up to `timeout_s`; fail what is left (503)."""
        with self._cv:
            self._accepting = False
            self._cv.notify_all()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.alive and any(self.load()):
            await asyncio.sleep(0.02)
        with self._cv:
            self._stopping = True
            left = list(self._pending) + list(self._active)
            self._pending.clear()
            self._active.clear()
            self._cv.notify_all()
        for job in {s.job for s in left}:
            self._fail(job, EngineUnavailable("shutting_down", "the server shut down before this request finished"))
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 30)
        self._set_gauge("engine_up", 0)
        self._update_depth()

    # ---------------------------------------------------------------- requests (event-loop side)
    def submit(self, *, length: int, count: int, seeds: list[int], noise_scale: float) -> Job:
        loop = asyncio.get_running_loop()
        job = Job(
            id=uuid.uuid4().hex[:12],
            length=length,
            count=count,
            seeds=seeds,
            noise_scale=noise_scale,
            loop=loop,
            future=loop.create_future(),
            remaining=count,
            results=[None] * count,
        )
        with self._cv:
            if self._dead or (self._thread is not None and not self._thread.is_alive()):
                raise EngineUnavailable("engine_down", "the sampling engine is down", 30)
            if not self._accepting:
                raise EngineUnavailable("shutting_down", "the server is shutting down")
            if len(self._pending) + count > self.queue_max_samples:
                raise QueueFull(self.retry_after())
            for i in range(count):
                self._pending.append(_Slot(job=job, index=i, seed=seeds[i], length=length))
            self._cv.notify_all()
        self._update_depth()
        return job

    def cancel(self, job: Job) -> None:
        """Drop every sample of `job` (queued now, running at the next step)."""
        with self._cv:
            if job.done:
                return
            job.cancelled = True
            kept = deque(s for s in self._pending if s.job is not job)
            dropped = len(self._pending) - len(kept)
            self._pending = kept
            self._cv.notify_all()
        self._count_cancelled(dropped)
        self._fail(job, Cancelled("cancelled"))
        self._update_depth()

    # ---------------------------------------------------------------- worker
    def _worker_main(self) -> None:
        while True:
            try:
                self._loop()
                return
            except BaseException as exc:
                error_id = uuid.uuid4().hex[:12]
                log.exception("engine worker crashed (error id %s)", error_id)
                self._count_error("worker_crash")
                self._set_gauge("engine_up", 0)
                with self._cv:
                    lost = list(self._active)
                    self._active.clear()
                for job in {s.job for s in lost}:
                    self._fail(job, SampleFailed("worker_crash", f"the sampling worker crashed (error id {error_id})"))
                if self.stats.worker_restarts >= self.max_worker_restarts or self._stopping:
                    with self._cv:
                        self._dead = True
                        left = list(self._pending)
                        self._pending.clear()
                    for job in {s.job for s in left}:
                        self._fail(job, EngineUnavailable("engine_down", "the sampling engine is down", 30))
                    log.error("engine worker is down after %d restarts: %r", self.stats.worker_restarts, exc)
                    if self.on_dead is not None:
                        self.on_dead()
                    return
                self.stats.worker_restarts += 1
                if self.metrics is not None:
                    self.metrics.engine_restarts.inc()
                self._set_gauge("engine_up", 1)

    def _loop(self) -> None:
        while True:
            with self._cv:
                self._admit_locked()
                if not self._active:
                    self._cv.release()  # report the last steps' times without holding the lock
                    try:
                        self.pacer.drain()
                    finally:
                        self._cv.acquire()
                    self._admit_locked()
                while not self._active:
                    if self._stopping or (not self._accepting and not self._pending):
                        return
                    self._cv.wait(timeout=0.5)
                    self._admit_locked()
                batch = [s for s in self._active if not s.job.done]
                dropped = sum(1 for s in self._active if s.job.done and s.job.cancelled)
                self._active = batch
            self._count_cancelled(dropped)
            self._update_depth()
            if self.before_step is not None:
                self.before_step()
            self._inputs_prev, self._inputs_next = self._inputs_next, {}
            groups = length_groups([self._padded(s.length) for s in batch], self.length_group_ratio)
            self.stats.max_length_groups = max(self.stats.max_length_groups, len(groups))
            for group in groups:
                group = [batch[i] for i in group if not batch[i].job.done]  # a failed group may end a job
                if group:
                    self._guarded_step(group)

    def _padded(self, length: int) -> int:
        return -(-length // self.pad_multiple) * self.pad_multiple

    def _admit_locked(self) -> None:
        now = time.monotonic()
        while self._pending and not self._stopping:
            slot = self._pending[0]
            if slot.job.cancelled or slot.job.done:
                self._pending.popleft()
                continue
            if self._active:
                lmax = self._padded(max(slot.length, max(s.length for s in self._active)))
                if (len(self._active) + 1) * lmax > self.residue_budget:
                    break
                jobs = {s.job for s in self._active}
                if self.max_batch_requests and slot.job not in jobs and len(jobs) >= self.max_batch_requests:
                    break
            self._pending.popleft()
            slot.gen = torch.Generator(device=self.device).manual_seed(slot.seed)
            slot.x = torch.randn(slot.length, 3, generator=slot.gen, device=self.device)  # [L, 3] x_T
            slot.t = self.schedule.num_timesteps
            slot.admitted = now
            self._active.append(slot)
            if slot.job.first_admitted is None:
                slot.job.first_admitted = now
                if self.metrics is not None:
                    self.metrics.queue_wait.observe(now - slot.job.submitted)

    def _guarded_step(self, batch: list[_Slot]) -> None:
        try:
            self._step(batch)
        except Exception as exc:
            error_id = uuid.uuid4().hex[:12]
            log.exception("sampling step failed (error id %s)", error_id)
            self._count_error("step")
            jobs = {s.job for s in batch}
            with self._cv:
                self._active = [s for s in self._active if s.job not in jobs]
            for job in jobs:
                self._fail(job, SampleFailed("step", f"sampling failed (error id {error_id})"))
            del exc

    @torch.no_grad()
    def _step(self, batch: list[_Slot]) -> None:
        started = self.pacer.begin()
        try:
            x_new = self._forward(batch)
        except torch.cuda.OutOfMemoryError:
            self._count_error("oom")
            self.stats.oom_retries += 1
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            cost = len(batch) * self._padded(max(s.length for s in batch))
            self.residue_budget = max(self._padded(max(s.length for s in batch)), cost // 2)
            self._set_gauge("residue_budget", self.residue_budget)
            if len(batch) == 1:
                slot = batch[0]
                with self._cv:
                    self._active = [s for s in self._active if s.job is not slot.job]
                log.warning("out of memory for one sample of length %d; failing its request", slot.length)
                self._fail(slot.job, SampleFailed("oom", f"out of GPU memory for length {slot.length}; "
                                                  "try a shorter length or fewer samples"))
                return
            half = len(batch) // 2
            log.warning("out of memory on a batch of %d samples; retrying in halves", len(batch))
            self._step(batch[:half])
            self._step(batch[half:])
            return
        self.pacer.end(started)  # reports the step time; may wait for an earlier step (CUDA)
        self._remember_output(batch, x_new)
        self._record_batch(batch)
        finished = []
        with self._cv:
            for b, slot in enumerate(batch):
                if slot.job.done:
                    continue
                slot.x = x_new[b, : slot.length]
                slot.noise = None
                slot.t -= 1
                if slot.t == 0:
                    finished.append(slot)
            done_ids = {id(s) for s in finished}
            self._active = [s for s in self._active if id(s) not in done_ids]
            if not self._active:  # idle: no group can reuse the last inputs; free them (device memory)
                self._inputs_prev, self._inputs_next, self._step_inputs = {}, {}, ((), None)
            self._cv.notify_all()
        for slot in finished:
            try:
                self._finish(slot)
            except Exception as exc:  # noqa: BLE001 - e.g. coordinates a PDB file cannot hold
                log.error("could not finish a sample of request %s: %s", slot.job.id, exc)
                self._count_error("step")
                self._fail(slot.job, SampleFailed("step", f"could not write the sample as PDB: {exc}"))
        self._update_depth()

    def _forward(self, batch: list[_Slot]) -> torch.Tensor:
        """One denoiser call + reverse step on `batch`; returns x_{t-1} [B, L, 3].

        Per sample only its noise draw is a separate operation (its own generator); x and mask are
        gathered per sample only when the group's members changed since its previous step.
        """
        B, L = len(batch), self._padded(max(s.length for s in batch))
        dev = self.device
        key = (L, *(s.uid for s in batch))
        previous = self._inputs_prev.get(key)
        if previous is not None:  # same members, same order: x_t is the last step's output
            x_prev, mask = previous
            x = torch.where(mask[..., None] > 0, x_prev, 0.0)  # [B, L, 3] (padding back to 0)
            self.stats.inputs_reused += 1
        else:
            lengths = to_device([s.length for s in batch], torch.long, dev)  # [B]
            mask = (torch.arange(L, device=dev)[None, :] < lengths[:, None]).float()  # [B, L]
            x = torch.zeros(B, L, 3, device=dev)  # [B, L, 3]
            for b, s in enumerate(batch):
                x[b, : s.length] = s.x
        noise = torch.zeros(B, L, 3, device=dev)  # [B, L, 3]
        for b, s in enumerate(batch):
            if s.t > 1:
                if s.noise is None:  # drawn once per step (into the batch), kept for an OOM retry
                    s.noise = torch.randn(s.length, 3, generator=s.gen, device=dev, out=noise[b, : s.length])
                else:
                    noise[b, : s.length] = s.noise
        self._step_inputs = (key, mask)  # kept with x_{t-1} by _remember_output once the step succeeded
        t = to_device([s.t for s in batch], torch.long, dev)  # [B]
        scale = to_device([s.job.noise_scale for s in batch], torch.float32, dev)  # [B]
        if self.graphs is not None:
            try:
                return self.graphs.step(x, t, mask, noise, scale)  # [B, L, 3]
            finally:
                self._graph_stats()
        return eager_step(self.denoiser, self.schedule, x, t, mask, noise, scale,
                          autocast_dtype=self.autocast_dtype)  # [B, L, 3]

    def _remember_output(self, batch: list[_Slot], x_new: torch.Tensor) -> None:
        """Keep x_{t-1} as the group's next input if no member finishes or leaves in between."""
        key, mask = self._step_inputs
        if not any(s.t <= 1 or s.job.done for s in batch):  # t == 1: the sample finishes with this step
            self._inputs_next[key] = (x_new, mask)

    def _graph_stats(self) -> None:
        g, st = self.graphs.stats, self.stats
        st.cuda_graphs_cached, st.cuda_graph_captures, st.cuda_graph_replays = g.cached, g.captures, g.replays
        if self.metrics is not None and hasattr(self.metrics, "cuda_graphs_cached"):
            self.metrics.cuda_graphs_cached.set(g.cached)

    def _finish(self, slot: _Slot) -> None:
        ca = slot.x.float().cpu()  # [L, 3]
        pdb = self.to_pdb(ca)
        now = time.monotonic()
        self._ema_sample_s = 0.8 * self._ema_sample_s + 0.2 * (now - slot.admitted)
        self.stats.samples_completed += 1
        if self.metrics is not None:
            self.metrics.samples_generated.inc()
            self.metrics.residues_generated.inc(slot.length)
        job = slot.job
        with self._cv:
            if job.done:
                return
            job.results[slot.index] = SampleResult(slot.index, slot.seed, slot.length, ca, pdb)
            job.remaining -= 1
            complete = job.remaining == 0
            if complete:
                job.done = True
                job.finished = now
        if complete:
            self._resolve(job, result=job)

    # ---------------------------------------------------------------- helpers
    def _fail(self, job: Job, exc: Exception) -> None:
        with self._cv:
            if job.done:
                return
            job.done = True
            job.finished = time.monotonic()
            pending_slots = sum(1 for s in self._pending if s.job is job)
            if pending_slots:
                self._pending = deque(s for s in self._pending if s.job is not job)
        if not isinstance(exc, Cancelled):
            self.stats.samples_failed += job.remaining
        self._resolve(job, error=exc)

    def _resolve(self, job: Job, *, result=None, error: Exception | None = None) -> None:
        def settle() -> None:
            if job.future.done():
                return
            if error is not None:
                job.future.set_exception(error)
            else:
                job.future.set_result(result)

        try:
            job.loop.call_soon_threadsafe(settle)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass

    def _record_batch(self, batch: list[_Slot]) -> None:
        st = self.stats
        st.batches_run += 1
        st.max_batch_size = max(st.max_batch_size, len(batch))
        st.max_distinct_lengths = max(st.max_distinct_lengths, len({s.length for s in batch}))
        st.max_distinct_requests = max(st.max_distinct_requests, len({s.job.id for s in batch}))
        st.max_distinct_timesteps = max(st.max_distinct_timesteps, len({s.t for s in batch}))
        if self.metrics is not None:
            padded = len(batch) * self._padded(max(s.length for s in batch))
            real = sum(s.length for s in batch)
            self.metrics.batch_size.observe(len(batch))
            self.metrics.batch_occupancy.observe(min(1.0, padded / self.residue_budget))
            self.metrics.batch_padding_efficiency.observe(real / padded)

    def _count_cancelled(self, n: int) -> None:
        if n:
            self.stats.samples_cancelled += n
            if self.metrics is not None:
                self.metrics.samples_cancelled.inc(n)

    def _count_error(self, kind: str) -> None:
        if self.metrics is not None:
            self.metrics.errors.labels(kind=kind).inc()

    def _set_gauge(self, name: str, value: float) -> None:
        if self.metrics is not None:
            getattr(self.metrics, name).set(value)

    def _update_depth(self) -> None:
        if self.metrics is not None:
            queued, active = self.load()
            self.metrics.queue_depth.set(queued)
            self.metrics.active_samples.set(active)


def length_groups(lengths: list[int], ratio: float) -> list[list[int]]:
    """Indices of ``lengths`` split into groups that run as separate steps, longest group first.

    Sorted longest first, a sample joins the current group while its length is at least ``ratio``
    times the group's longest; otherwise it starts a new group. ``ratio`` 0 gives one group (every
    sample padded to the longest). E.g. ratio 0.75 on 256, 200, 128, 100, 64 gives {256, 200},
    {128, 100}, {64}: the pair stack's B * L^2 work of that mix drops ~2x against one padded batch,
    for two more (graph-replayed) steps.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    for i in order:
        if groups and lengths[i] >= ratio * lengths[groups[-1][0]]:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def new_seeds(count: int, first: int | None) -> list[int]:
    """Seeds of a request: first, first + 1, ... or random 63-bit seeds."""
    if first is None:
        first = int(torch.randint(0, 2**62, (1,)).item())
    return list(itertools.islice(itertools.count(first), count))


def auto_residue_budget(denoiser: torch.nn.Module, device: torch.device, max_length: int,
                        *, cpu_budget: int = 4096, memory_fraction: float = 0.8) -> int:
    """Padded residues per step: fixed on CPU; on GPU sized from one probe step at `max_length`.

    The probe's peak memory per residue at the longest length is the most expensive per-residue
    cost (dense modes grow with L^2), so the budget is conservative for shorter chains; an OOM
    later still halves it (see `SamplingEngine._step`).
    """
    if device.type != "cuda":
        return max(cpu_budget, max_length)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    x = torch.randn(1, max_length, 3, device=device)  # [1, L, 3]
    mask = torch.ones(1, max_length, device=device)  # [1, L]
    t = torch.full((1,), 1, dtype=torch.long, device=device)  # [1]
    with torch.no_grad():
        denoiser(x, t, mask)
    torch.cuda.synchronize(device)
    per_residue = max(1, torch.cuda.max_memory_allocated(device) - base) / max_length
    free, _ = torch.cuda.mem_get_info(device)
    budget = int(memory_fraction * free / per_residue)
    return max(max_length, min(budget, 1 << 20))
