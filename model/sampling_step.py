"""One ancestral sampling step, denoiser forward + reverse step: eager, or replayed from a CUDA graph.

Sources: Genie's ancestral DDPM step (``model.diffusion.reverse_step``, one timestep per sample);
PyTorch "CUDA Graphs" ("whole network capture"); the batch buckets follow vLLM's CUDA-graph batch
sizes (capture a few sizes, pad the batch up to the nearest one).

Why graphs: one sampling step of the shipped model is ~8k tiny kernels, so at small batches the step
is bound by CPU-side launch overhead (45 ms at B = 1, L = 128 on an H100). A replayed graph launches
the whole step at once.

    key   = (batch_bucket(B), L)            L is already padded by the caller
    graph = reverse_step(denoiser(x, t, mask), noise, noise_scale, t_prev) on static buffers of that shape
    step  : copy x, t, mask, noise, noise_scale, t_prev into rows [:B]; rows [B:] are padding samples
            (mask 0, x 0, noise 0, t = 1, t_prev = 0, scale 0); replay; return a copy of out[:B]

t_prev (each sample's next timestep: t - 1, or less for a respaced sampler with fewer steps,
``model.diffusion.respaced_timesteps``) is an input buffer like t, so samples of requests with
different step counts share one graph and one replay; the key does not depend on it.

Self-conditioned models (``denoiser.self_conditioning``, ``selfConditioning True``): the step also takes
each sample's previous estimate x0_self [B, L, 3] (zeros: none yet, a sample's first step) and returns
the pair (x_s, x0_hat), x0_hat = ``model.diffusion.predict_x0`` of this step's eps_hat, the sample's
next x0_self. The graph has one more input buffer and one output [2, B_b, L, 3]; other models' steps
are unchanged (no buffer, no copy).

Padding rows never change real rows: every op of the denoiser and of ``reverse_step`` is per sample
(the batch axis is never reduced over), and a sample with an all-zero mask gives finite zeros.

Layout: :func:`eager_step` is the reference; :class:`SamplingStep` holds the buckets, static buffers
and copy-in / copy-out, and keeps its graphs in a ``model.cuda_graphs.GraphCache`` (LRU, shared pool,
capture failure -> eager). It takes a ``capture`` function so its logic runs on CPU in tests
(:func:`eager_capture`) and on GPU with ``model.cuda_graphs.capture_graph``.

NOTE: noise is drawn outside the graph from each sample's own generator and copied in, so a graphed
step draws exactly the random numbers of an eager step.
NOTE: the output is copied out right after each replay, since every graph shares one memory pool (a
later capture may reuse the blocks of an earlier graph's intermediates).

Symbols: B batch (real samples), B_b batch bucket, L residues (padded), T timesteps.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from model.cuda_graphs import GraphCache, GraphStats, capture_graph
from model.diffusion import Schedule, predict_x0, reverse_step

log = logging.getLogger("mhcflash.graphs")

__all__ = ["BATCH_BUCKETS", "SamplingStep", "batch_bucket", "eager_capture", "eager_step"]

# Batch sizes a graph is captured for; a batch is padded up to the next one (<= 50% waste, <= 33%
# from 16 up). Batches above the last bucket run eagerly (they are compute-bound anyway).
BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)

StepFn = Callable[[], torch.Tensor]
# capture(fn, device, pool) -> (replay, out): ``replay()`` recomputes ``out`` in place from fn's inputs;
# ``pool()`` gives the shared memory pool (called only by a real capture).
CaptureFn = Callable[[StepFn, torch.device, Callable[[], object]], tuple[Callable[[], None], torch.Tensor]]


def batch_bucket(batch: int, buckets: Sequence[int] = BATCH_BUCKETS) -> int | None:
    """The smallest bucket >= ``batch``, or None when ``batch`` is larger than every bucket."""
    if batch < 1:
        raise ValueError(f"batch size must be >= 1, got {batch}")
    for b in buckets:
        if b >= batch:
            return b
    return None


def eager_step(denoiser: torch.nn.Module, schedule: Schedule, x: torch.Tensor, t: torch.Tensor,
               mask: torch.Tensor, noise: torch.Tensor, noise_scale: torch.Tensor,
               t_prev: torch.Tensor | None = None, x0_self: torch.Tensor | None = None, *,
               autocast_dtype: torch.dtype | None = None):
    """The reference step: ``eps_hat = denoiser(x, t, mask)`` (under autocast if asked), then ``reverse_step``.

    Args:
        x: [B, L, 3] x_t, zero on padding; t: [B] long in [1, T]; mask: [B, L] float;
        noise: [B, L, 3] (ignored where t_prev == 0); noise_scale: [B];
        t_prev: [B] long, each sample's next timestep in [0, t - 1] (None: t - 1).
        x0_self: [B, L, 3] each sample's previous x0 estimate (self-conditioned models only; None: zeros).
        autocast_dtype: bf16 / fp16 autocast on CUDA (ignored on CPU), or None.
    Returns:
        x_{t_prev}: [B, L, 3] float32; for a self-conditioned denoiser the pair (x_{t_prev}, x0_hat
        [B, L, 3] float32).

    NOTE: autocast's weight-cast cache is off on every path (eager, warm-up, graph capture): the
    CUDA-graph docs advise it off inside a capture, and ``torch.compile`` guards on it, so one
    setting everywhere means the compiled pair stack is compiled once, not once per path. Each
    weight is used once per call, so the cache saved nothing.
    """
    self_conditioned = getattr(denoiser, "self_conditioning", False)
    if x0_self is not None and not self_conditioned:
        raise ValueError("x0_self given, but the denoiser was built without selfConditioning")
    args = (x, t, mask, x0_self) if self_conditioned else (x, t, mask)
    with torch.no_grad():
        if autocast_dtype is not None and x.device.type == "cuda":
            with torch.autocast("cuda", dtype=autocast_dtype, cache_enabled=False):
                eps_hat = denoiser(*args)  # [B, L, 3]
        else:
            eps_hat = denoiser(*args)  # [B, L, 3]
        x_s = reverse_step(schedule, x, eps_hat.float(), t, mask, noise, noise_scale, t_prev)  # [B, L, 3]
        if self_conditioned:
            return x_s, predict_x0(schedule, x, eps_hat, t, mask)  # [B, L, 3] x 2
        return x_s


def cuda_capture(fn: StepFn, device: torch.device, pool: Callable[[], object]):
    """The real capture: ``model.cuda_graphs.capture_graph`` into the cache's shared pool."""
    return capture_graph(fn, device, pool())


def eager_capture(fn: StepFn, device: torch.device, pool=None) -> tuple[Callable[[], None], torch.Tensor]:
    """A stand-in for :func:`cuda_capture` that works anywhere: "replay" reruns ``fn`` eagerly into ``out``.

    It exercises the step's buffers, buckets, copy-in / copy-out and cache without CUDA (tests).
    """
    out = fn()

    def replay() -> None:
        out.copy_(fn())

    return replay, out


@dataclass(eq=False)
class _Graph:
    """Static inputs (rows [:B] real, the rest padding), the replay and its output for one (B_b, L)."""

    x: torch.Tensor  # [B_b, L, 3]
    t: torch.Tensor  # [B_b] long
    mask: torch.Tensor  # [B_b, L]
    noise: torch.Tensor  # [B_b, L, 3]
    scale: torch.Tensor  # [B_b]
    t_prev: torch.Tensor  # [B_b] long
    x0: torch.Tensor | None = None  # [B_b, L, 3] x0_self (self-conditioned models only)
    replay: Callable[[], None] | None = None
    out: torch.Tensor | None = None  # [B_b, L, 3], or [2, B_b, L, 3] (x_s, x0_hat) when self-conditioned
    dirty: int = 0  # rows [:dirty] may hold a previous batch's samples


class SamplingStep:
    """``step(x [B, L, 3], t [B], mask [B, L], noise [B, L, 3], noise_scale [B], t_prev [B] | None) -> x_s [B, L, 3]``.

    ``t_prev`` None means t - 1 (one step of the full schedule). When ``self_conditioning`` (the
    denoiser's), ``step(..., t_prev, x0_self [B, L, 3] | None) -> (x_s, x0_hat)`` (module docstring).

    Returns what :func:`eager_step` returns for the same inputs (a fresh tensor, safe to keep across
    steps). With ``graphed`` True the step is replayed from a graph captured lazily per (batch
    bucket, length) (``capture``: :func:`cuda_capture` on GPU); batches above the largest bucket run
    eagerly. A failed capture is reported once and turns graphs off (eager from then on); out of
    memory drops the cached graphs and is raised for the caller's OOM handling; an error of the step
    itself (raised by the capture's eager warm-up run) is raised as in the eager path.
    ``off_hint`` says, in the failure message, how the caller turns graphs off.
    """

    def __init__(self, denoiser: torch.nn.Module, schedule: Schedule, *, device: torch.device,
                 autocast_dtype: torch.dtype | None = None, graphed: bool = False,
                 capture: CaptureFn | None = None, buckets: Sequence[int] = BATCH_BUCKETS, max_graphs: int = 32,
                 off_hint: str = "Turn CUDA graphs off") -> None:
        self.denoiser = denoiser
        self.schedule = schedule
        self.device = torch.device(device)
        self.autocast_dtype = autocast_dtype if self.device.type == "cuda" else None
        self.graphed = bool(graphed)
        self.capture = capture if capture is not None else cuda_capture
        self.buckets = tuple(sorted(buckets))
        self.self_conditioning = bool(getattr(denoiser, "self_conditioning", False))
        self.cache: GraphCache[_Graph] = GraphCache(max_graphs=max_graphs, owner="CUDA graphs",
                                                    eager_text="sampling goes on eagerly", off_hint=off_hint,
                                                    warn=log.warning)

    @property
    def stats(self) -> GraphStats:
        return self.cache.stats

    @property
    def enabled(self) -> bool:
        """Steps are replayed from graphs (configured so, and no capture has failed)."""
        return self.graphed and self.cache.enabled

    def keys(self) -> list[tuple[int, int]]:
        """Cached (B_b, L), least recently used first."""
        return self.cache.keys()

    def clear(self) -> None:
        self.cache.clear()

    def eager(self, x, t, mask, noise, noise_scale, t_prev=None, x0_self=None):
        self.stats.eager += 1
        return eager_step(self.denoiser, self.schedule, x, t, mask, noise, noise_scale, t_prev, x0_self,
                          autocast_dtype=self.autocast_dtype)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, mask: torch.Tensor, noise: torch.Tensor,
                 noise_scale: torch.Tensor, t_prev: torch.Tensor | None = None,
                 x0_self: torch.Tensor | None = None):
        if x0_self is not None and not self.self_conditioning:
            raise ValueError("x0_self given, but the denoiser was built without selfConditioning")
        batch, length = x.shape[:2]
        bucket = batch_bucket(batch, self.buckets)
        if not self.enabled or bucket is None:
            return self.eager(x, t, mask, noise, noise_scale, t_prev, x0_self)
        if t_prev is None:
            t_prev = t - 1  # [B]
        key = (bucket, length)
        inputs = (x, t, mask, noise, noise_scale, t_prev, x0_self)
        graph = self.cache.get(key)
        if graph is None:
            graph = self._buffers(bucket, length)
            self._copy_in(graph, *inputs)
            self.cache.ready(key)  # capture_after 1: captured on first use
            graph = self.cache.capture(key, lambda: self._record(graph), device=self.device,
                                       describe=f"the step of batch {bucket} x length {length}")
            if graph is None:  # capturing failed (reported once): eager from now on
                return self.eager(*inputs)
        else:
            self._copy_in(graph, *inputs)
        graph.replay()  # after a capture too: the capture only recorded the step
        self.stats.replays += 1
        if self.self_conditioning:  # [2, B, L, 3]: one copy, then (x_s, x0_hat)
            return tuple(graph.out[:, :batch].clone().unbind(0))
        return graph.out[:batch].clone()  # [B, L, 3]: copied before another graph can reuse the pool

    # ------------------------------------------------------------------------------- internals
    def _record(self, graph: _Graph) -> _Graph:
        graph.replay, graph.out = self.capture(self._step_fn(graph), self.device, self.cache.pool)
        return graph

    def _buffers(self, bucket: int, length: int) -> _Graph:
        dev = self.device
        x0 = torch.zeros(bucket, length, 3, device=dev) if self.self_conditioning else None
        return _Graph(x=torch.zeros(bucket, length, 3, device=dev), t=torch.ones(bucket, dtype=torch.long, device=dev),
                      mask=torch.zeros(bucket, length, device=dev), noise=torch.zeros(bucket, length, 3, device=dev),
                      scale=torch.zeros(bucket, device=dev), t_prev=torch.zeros(bucket, dtype=torch.long, device=dev),
                      x0=x0)

    def _step_fn(self, graph: _Graph) -> StepFn:
        def fn() -> torch.Tensor:
            out = eager_step(self.denoiser, self.schedule, graph.x, graph.t, graph.mask, graph.noise, graph.scale,
                             graph.t_prev, graph.x0, autocast_dtype=self.autocast_dtype)  # [B_b, L, 3]
            return torch.stack(out) if graph.x0 is not None else out  # self-conditioned: [2, B_b, L, 3]

        return fn

    @staticmethod
    def _copy_in(graph: _Graph, x, t, mask, noise, noise_scale, t_prev, x0_self=None) -> None:
        """Rows [:B] <- the batch; rows [B:dirty] (a previous, larger batch) <- padding samples."""
        batch = x.shape[0]
        if graph.x0 is not None:  # self-conditioned: the estimates (None: zeros, no estimate yet)
            if x0_self is None:
                graph.x0[:batch].zero_()
            else:
                graph.x0[:batch].copy_(x0_self)
            if graph.dirty > batch:
                graph.x0[batch:graph.dirty].zero_()
        graph.x[:batch].copy_(x)
        graph.t[:batch].copy_(t)
        graph.mask[:batch].copy_(mask)
        graph.noise[:batch].copy_(noise)
        graph.scale[:batch].copy_(torch.as_tensor(noise_scale).expand(batch))
        graph.t_prev[:batch].copy_(t_prev)
        if graph.dirty > batch:
            rows = slice(batch, graph.dirty)
            graph.x[rows].zero_()
            graph.t[rows].fill_(1)
            graph.mask[rows].zero_()
            graph.noise[rows].zero_()
            graph.scale[rows].zero_()
            graph.t_prev[rows].zero_()
        graph.dirty = batch
