"""Sampling engine: one worker thread owns the device and runs iteration-level batched diffusion.

Sources: the scheduling idea is Orca's iteration-level scheduling (Yu et al., OSDI 2022) as used
by vLLM / TGI "continuous batching"; the sampler is Genie's ancestral DDPM (one timestep per sample).

The engine talks to the model through one per-step function (`model.sampler.Sampler.step_function`:
the denoiser forward + reverse step, replayed from CUDA graphs on CUDA) and a `to_pdb` function.
Each iteration the worker gathers every active sample (mixed lengths, each with its own t and next
timestep t_prev), splits them into length groups and steps each group, longest first, as one padded,
masked batch (`service.batching`); it retires samples that reached t = 0 (PDB text) and admits
queued samples (`service.admission`: strict FIFO, under the residue budget). A request's future is
resolved on its event loop with `loop.call_soon_threadsafe`.

A request of `steps` steps (T: Genie's sampler) walks `model.sampler.respaced_timesteps(T, steps)`,
one per iteration, so requests of different step counts share batches. Sample i of a request with
seed s draws x_T and every step's noise from its own generator seeded s + i, in the order of
`model.diffusion.sample` (same `steps`): a sample does not depend on what it is batched with (up to
the denoiser's batch-size numerics). A self-conditioned model's step (`step.self_conditioning`) also
carries each sample's x0 estimate from its previous step (`service.batching`; zeros at its first).

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

Symbols: B batch, L residues (padded), T timesteps.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
import uuid
from collections.abc import Callable

import torch

from model.sampler import respaced_timesteps
from service.admission import Admission
from service.batching import StepInputs, length_groups, padded
from service.engine_report import EngineReport
from service.jobs import Cancelled, EngineUnavailable, Job, SampleFailed, SampleResult, Slot
from service.pacing import StepPacer

log = logging.getLogger("mhcflash.engine")

__all__ = ["SamplingEngine"]

StepFn = Callable[..., torch.Tensor]  # (x, t, mask, noise, scale, t_prev[, x0_self]) -> x_s | (x_s, x0_hat)


class SamplingEngine:
    """Owns the device through `step`; `submit` from the event loop, results arrive as futures.

    Args:
        step: the per-step function (see `StepFn`); if it has `graphed` True, its `stats` (captures,
            replays, cached graphs) are copied into the engine's after every step.
        num_timesteps: T; a sample starts at t = T (whatever its request's step count).
        to_pdb: CA trace [L, 3] float32 CPU -> PDB text.
    """

    def __init__(
        self,
        step: StepFn,
        *,
        num_timesteps: int,
        device: torch.device,
        to_pdb: Callable[[torch.Tensor], str],
        residue_budget: int,
        queue_max_samples: int,
        max_batch_requests: int = 0,
        pad_multiple: int = 8,
        length_group_ratio: float = 0.75,
        max_worker_restarts: int = 3,
        metrics=None,
        on_dead: Callable[[], None] | None = None,
        steps_ahead: int = 2,
    ) -> None:
        if not 0.0 <= length_group_ratio <= 1.0:
            raise ValueError(f"length_group_ratio must be in [0, 1] (got {length_group_ratio})")
        self.step = step
        self.num_timesteps = int(num_timesteps)
        self.device = torch.device(device)
        self.to_pdb = to_pdb
        self.residue_budget = int(residue_budget)
        self.queue_max_samples = int(queue_max_samples)
        self.pad_multiple = int(pad_multiple)
        self.length_group_ratio = float(length_group_ratio)
        self.max_worker_restarts = int(max_worker_restarts)
        self.metrics = metrics
        self.on_dead = on_dead
        self.report = EngineReport(metrics)
        self.stats = self.report.stats
        self.before_step: Callable[[], None] | None = None  # fault-injection hook (tests), outside the step guard
        self._cv = threading.Condition()
        self.admission = Admission(queue_max_samples=queue_max_samples, max_batch_requests=max_batch_requests,
                                   pad_multiple=pad_multiple)
        self._active: list[Slot] = []
        self._accepting = True
        self._stopping = False
        self._dead = False
        self._thread: threading.Thread | None = None
        self._ema_sample_s = 1.0
        self.report.gauge("residue_budget", self.residue_budget)
        self.inputs = StepInputs(self.device, self.pad_multiple, getattr(step, "self_conditioning", False))
        self.pacer = StepPacer(self.device, ahead=steps_ahead,
                               observe=metrics.step_duration.observe if metrics is not None else None)

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> None:
        self._thread = threading.Thread(target=self._worker_main, name="mhcflash-engine", daemon=True)
        self._thread.start()
        self.report.gauge("engine_up", 1)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._dead

    @property
    def accepting(self) -> bool:
        return self._accepting and self.alive

    def load(self) -> tuple[int, int]:
        """(queued samples, active samples)."""
        with self._cv:
            return len(self.admission), len(self._active)

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
            left = self.admission.take_all() + list(self._active)
            self._active.clear()
            self._cv.notify_all()
        for job in {s.job for s in left}:
            self._fail(job, EngineUnavailable("shutting_down", "the server shut down before this request finished"))
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 30)
        self.report.gauge("engine_up", 0)
        self._update_depth()

    # ---------------------------------------------------------------- requests (event-loop side)
    def submit(self, *, length: int, count: int, seeds: list[int], noise_scale: float,
               steps: int | None = None) -> Job:
        """Queue `count` samples of `length` in `steps` steps (None: T); ValueError outside 1 .. T."""
        steps = self.num_timesteps if steps is None else int(steps)
        timesteps = (*respaced_timesteps(self.num_timesteps, steps), 0)  # T .. 1, 0
        loop = asyncio.get_running_loop()
        job = Job(
            id=uuid.uuid4().hex[:12],
            length=length,
            count=count,
            seeds=seeds,
            noise_scale=noise_scale,
            steps=steps,
            timesteps=timesteps,
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
            self.admission.enqueue(job, self.retry_after())  # QueueFull: 429
            self._cv.notify_all()
        self._update_depth()
        return job

    def cancel(self, job: Job) -> None:
        """Drop every sample of `job` (queued now, running at the next step)."""
        with self._cv:
            if job.done:
                return
            job.cancelled = True
            dropped = self.admission.drop(job)
            self._cv.notify_all()
        self.report.cancelled(dropped)
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
                self.report.error("worker_crash")
                self.report.gauge("engine_up", 0)
                with self._cv:
                    lost = list(self._active)
                    self._active.clear()
                for job in {s.job for s in lost}:
                    self._fail(job, SampleFailed("worker_crash", f"the sampling worker crashed (error id {error_id})"))
                if self.stats.worker_restarts >= self.max_worker_restarts or self._stopping:
                    with self._cv:
                        self._dead = True
                        left = self.admission.take_all()
                    for job in {s.job for s in left}:
                        self._fail(job, EngineUnavailable("engine_down", "the sampling engine is down", 30))
                    log.error("engine worker is down after %d restarts: %r", self.stats.worker_restarts, exc)
                    if self.on_dead is not None:
                        self.on_dead()
                    return
                self.report.restarted()
                self.report.gauge("engine_up", 1)

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
                    if self._stopping or (not self._accepting and not len(self.admission)):
                        return
                    self._cv.wait(timeout=0.5)
                    self._admit_locked()
                batch = [s for s in self._active if not s.job.done]
                dropped = sum(1 for s in self._active if s.job.done and s.job.cancelled)
                self._active = batch
            self.report.cancelled(dropped)
            self._update_depth()
            if self.before_step is not None:
                self.before_step()
            self.inputs.new_iteration()
            groups = length_groups([padded(s.length, self.pad_multiple) for s in batch], self.length_group_ratio)
            self.stats.max_length_groups = max(self.stats.max_length_groups, len(groups))
            for group in groups:
                group = [batch[i] for i in group if not batch[i].job.done]  # a failed group may end a job
                if group:
                    self._guarded_step(group)

    def _admit_locked(self) -> None:
        """Start the queued samples that join the running batch now (`service.admission`): x_T from each
        sample's own generator, t = T, then its request's timesteps."""
        if self._stopping:
            return
        now = time.monotonic()
        for slot in self.admission.admit(self._active, self.residue_budget):
            slot.gen = torch.Generator(device=self.device).manual_seed(slot.seed)
            slot.x = torch.randn(slot.length, 3, generator=slot.gen, device=self.device)  # [L, 3] x_T
            slot.start(slot.job.timesteps)
            slot.admitted = now
            self._active.append(slot)
            if slot.job.first_admitted is None:
                slot.job.first_admitted = now
                self.report.admitted(now - slot.job.submitted)

    def _guarded_step(self, batch: list[Slot]) -> None:
        try:
            self._step(batch)
        except Exception as exc:
            error_id = uuid.uuid4().hex[:12]
            log.exception("sampling step failed (error id %s)", error_id)
            self.report.error("step")
            jobs = {s.job for s in batch}
            with self._cv:
                self._active = [s for s in self._active if s.job not in jobs]
            for job in jobs:
                self._fail(job, SampleFailed("step", f"sampling failed (error id {error_id})"))
            del exc

    @torch.no_grad()
    def _step(self, batch: list[Slot]) -> None:
        started = self.pacer.begin()
        try:
            x_new, x0_new = self._forward(batch)
        except torch.cuda.OutOfMemoryError:
            self.report.error("oom")
            self.stats.oom_retries += 1
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            longest = padded(max(s.length for s in batch), self.pad_multiple)
            self.residue_budget = max(longest, len(batch) * longest // 2)
            self.report.gauge("residue_budget", self.residue_budget)
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
        self.inputs.remember(batch, x_new, x0_new)
        self.report.batch(batch, self.pad_multiple, self.residue_budget)
        finished = []
        with self._cv:
            for b, slot in enumerate(batch):
                if slot.job.done:
                    continue
                slot.stepped(x_new[b], None if x0_new is None else x0_new[b])  # t <- t_prev
                if slot.t == 0:
                    finished.append(slot)
            done_ids = {id(s) for s in finished}
            self._active = [s for s in self._active if id(s) not in done_ids]
            if not self._active:  # idle: no group can reuse the last inputs; free them (device memory)
                self.inputs.forget()
            self._cv.notify_all()
        for slot in finished:
            try:
                self._finish(slot)
            except Exception as exc:  # noqa: BLE001 - e.g. coordinates a PDB file cannot hold
                log.error("could not finish a sample of request %s: %s", slot.job.id, exc)
                self.report.error("step")
                self._fail(slot.job, SampleFailed("step", f"could not write the sample as PDB: {exc}"))
        self._update_depth()

    def _forward(self, batch: list[Slot]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One step (denoiser + reverse step) of `batch`, a length group: x_{t_prev} [B, L, 3] and the
        x0 estimates [B, L, 3] (None unless self-conditioned)."""
        inputs, reused = self.inputs.gather(batch)
        self.stats.inputs_reused += int(reused)
        try:
            out = self.step(*inputs)  # [B, L, 3], or ([B, L, 3], [B, L, 3])
            return out if self.inputs.self_conditioning else (out, None)
        finally:
            if getattr(self.step, "graphed", False):
                self.report.graphs(self.step.stats)

    def _finish(self, slot: Slot) -> None:
        ca = slot.x.float().cpu()  # [L, 3]
        pdb = self.to_pdb(ca)
        now = time.monotonic()
        self._ema_sample_s = 0.8 * self._ema_sample_s + 0.2 * (now - slot.admitted)
        self.report.finished(slot.length)
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
            self.admission.drop(job)
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

    def _update_depth(self) -> None:
        if self.metrics is not None:
            self.report.depth(*self.load())
