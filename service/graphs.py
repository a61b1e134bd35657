"""CUDA graphs for the engine's sampling step: denoiser forward + reverse step replayed as one graph.

Sources: PyTorch "CUDA Graphs" (``torch.cuda.graphs`` docs, "whole network capture": warm up on a
side stream, capture once with static input / output tensors, then copy inputs in and ``replay()``);
the bucketing of batch sizes follows vLLM's CUDA-graph batch sizes (capture a few sizes, pad the
batch up to the nearest one).

Why: one sampling step of the shipped model is ~8k tiny kernels, so at small batches the step is
bound by CPU-side launch overhead (45 ms at B = 1, L = 128 on an H100). A replayed graph launches the
whole step at once.

    key   = (batch_bucket(B), L)            L is already padded by the engine (pad_multiple)
    graph = reverse_step(denoiser(x, t, mask), noise, noise_scale) on static buffers of that shape
    step  : copy x, t, mask, noise, noise_scale into rows [:B]; rows [B:] are padding samples
            (mask 0, x 0, noise 0, t = 1, scale 0); replay; return a copy of out[:B]

Padding rows never change real rows: every op of the denoiser and of ``reverse_step`` is per sample
(the batch axis is never reduced over), and a sample with an all-zero mask gives finite zeros.

Layout: :func:`eager_step` is the reference (the engine's eager path); :class:`StepGraphRunner`
holds the buckets, static buffers, copy-in / copy-out and the LRU of captured graphs, and takes a
``capture`` function so its logic runs on CPU in tests (:func:`eager_capture`) and on GPU with
:class:`CudaCapture` (one per runner).

NOTE: all graphs share one private memory pool (``torch.cuda.graph_pool_handle``), so their memory is
about that of the largest step, not the sum. That is safe here because graphs never consume each
other's outputs and the output is copied out right after each replay (a later capture may reuse
the blocks of an earlier graph's intermediates, which that graph rewrites on its next replay).
NOTE: noise is drawn outside the graph from each sample's own generator and copied in, so a graphed
step draws exactly the random numbers of an eager step.

Symbols: B batch (real samples), B_b batch bucket, L residues (padded), T timesteps.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from model.diffusion import Schedule, reverse_step
from model.geometry import skip_input_checks

log = logging.getLogger("mhcflash.graphs")

__all__ = [
    "BATCH_BUCKETS",
    "CudaCapture",
    "GraphCaptureError",
    "GraphStats",
    "StepGraphRunner",
    "batch_bucket",
    "cuda_capture",
    "eager_capture",
    "eager_step",
    "graphs_enabled",
]

# Batch sizes a graph is captured for; a batch is padded up to the next one (<= 50% waste, <= 33%
# from 16 up). Batches above the last bucket run eagerly (they are compute-bound anyway).
BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
WARMUP_ITERS = 2  # eager runs on a side stream before a capture (fills lazy caches: backends, tables)

StepFn = Callable[[], torch.Tensor]
# capture(fn, device) -> (replay, out): ``replay()`` recomputes ``out`` in place from fn's inputs.
CaptureFn = Callable[[StepFn, torch.device], tuple[Callable[[], None], torch.Tensor]]


class GraphCaptureError(RuntimeError):
    """Recording the step as a graph failed (not the step itself): the runner falls back to eager."""


def graphs_enabled(setting: str, device: torch.device) -> bool:
    """``MHCFLASH_CUDA_GRAPHS``: auto / on -> graphs on CUDA devices; off -> never; CPU never."""
    if setting not in ("auto", "on", "off"):
        raise ValueError(f"cuda_graphs must be auto, on or off (got {setting!r})")
    if setting == "off":
        return False
    if device.type != "cuda":
        if setting == "on":
            log.warning("MHCFLASH_CUDA_GRAPHS=on but the device is %s: CUDA graphs need CUDA; running eagerly",
                        device)
        return False
    return True


def batch_bucket(batch: int, buckets: Sequence[int] = BATCH_BUCKETS) -> int | None:
    """The smallest bucket >= ``batch``, or None when ``batch`` is larger than every bucket."""
    if batch < 1:
        raise ValueError(f"batch size must be >= 1, got {batch}")
    for b in buckets:
        if b >= batch:
            return b
    return None


def eager_step(denoiser: torch.nn.Module, schedule: Schedule, x: torch.Tensor, t: torch.Tensor,
               mask: torch.Tensor, noise: torch.Tensor, noise_scale: torch.Tensor, *,
               autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
    """The reference step: ``eps_hat = denoiser(x, t, mask)`` (under autocast if asked), then ``reverse_step``.

    Args:
        x: [B, L, 3] x_t, zero on padding; t: [B] long in [1, T]; mask: [B, L] float;
        noise: [B, L, 3] (ignored where t == 1); noise_scale: [B].
        autocast_dtype: bf16 / fp16 autocast on CUDA (ignored on CPU), or None.
    Returns:
        x_{t-1}: [B, L, 3] float32.

    NOTE: autocast's weight-cast cache is off on every path (eager, warm-up, graph capture): the
    CUDA-graph docs advise it off inside a capture, and ``torch.compile`` guards on it, so one
    setting everywhere means the compiled pair stack is compiled once, not once per path. Each
    weight is used once per call, so the cache saved nothing.
    """
    with torch.no_grad():
        if autocast_dtype is not None and x.device.type == "cuda":
            with torch.autocast("cuda", dtype=autocast_dtype, cache_enabled=False):
                eps_hat = denoiser(x, t, mask)  # [B, L, 3]
        else:
            eps_hat = denoiser(x, t, mask)  # [B, L, 3]
        return reverse_step(schedule, x, eps_hat.float(), t, mask, noise, noise_scale)  # [B, L, 3]


# ------------------------------------------------------------------------------------- captures
def eager_capture(fn: StepFn, device: torch.device) -> tuple[Callable[[], None], torch.Tensor]:
    """A stand-in for :func:`cuda_capture` that works anywhere: "replay" reruns ``fn`` eagerly into ``out``.

    It exercises the runner's buffers, buckets, copy-in / copy-out and LRU without CUDA (tests).
    """
    out = fn()

    def replay() -> None:
        out.copy_(fn())

    return replay, out


class CudaCapture:
    """Captures into one private memory pool per device, shared by this instance's graphs (module NOTE).

    One instance per :class:`StepGraphRunner`. NOTE: a pool handle must not outlive the graphs that
    use it: once they are all freed the allocator keeps the pool with a zero use count, and capturing
    into that handle again trips an internal assert (``use_count > 0``, seen on the H100 with torch
    2.11). ``reset()`` (called when the runner drops its graphs) therefore forgets the handles, and
    the next capture takes a fresh pool.
    """

    def __init__(self) -> None:
        self.pools: dict[torch.device, object] = {}

    def reset(self) -> None:
        self.pools.clear()

    def __call__(self, fn: StepFn, device: torch.device) -> tuple[Callable[[], None], torch.Tensor]:
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP_ITERS):
                fn()
        torch.cuda.current_stream(device).wait_stream(side)
        torch.cuda.synchronize(device)
        graph = torch.cuda.CUDAGraph()
        pool = self.pools.setdefault(device, torch.cuda.graph_pool_handle())
        # thread_local: other threads (metrics scrapes, the event loop) may touch CUDA meanwhile.
        try:
            with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"), skip_input_checks():
                out = fn()  # [B_b, L, 3], lives in the pool
        except torch.cuda.OutOfMemoryError:
            _restore_rng_capture_state(device)
            raise
        except Exception as exc:  # e.g. a host sync inside the step: "operation not permitted when capturing"
            _restore_rng_capture_state(device)
            raise GraphCaptureError(f"{type(exc).__name__}: {exc}") from exc
        return graph.replay, out


def _restore_rng_capture_state(device: torch.device) -> None:
    """After a failed capture: one empty, successful capture, so that the default CUDA generator
    leaves its capture bookkeeping. NOTE: without this, the next ``torch.randn`` on the device failed
    with "Offset increment outside graph capture encountered unexpectedly" (H100, torch 2.11), i.e.
    one failed capture broke every later noise draw of the service."""
    try:
        torch.cuda.synchronize(device)
        scratch = torch.zeros(1, device=device)
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            scratch.add_(1.0)
        torch.cuda.synchronize(device)
    except Exception as exc:  # noqa: BLE001 - best effort; the caller reports the original failure
        log.warning("could not reset the CUDA generator after a failed capture: %s", exc)


cuda_capture = CudaCapture()  # for one-off captures (tests); runners make their own


# --------------------------------------------------------------------------------------- runner
@dataclass
class GraphStats:
    captures: int = 0
    replays: int = 0
    evictions: int = 0
    eager_steps: int = 0  # steps that ran eagerly (too large a batch, capture disabled / failed)
    cached: int = 0
    disabled_reason: str | None = None


@dataclass(eq=False)
class _Graph:
    """Static inputs (rows [:B] real, the rest padding), the replay and its output for one (B_b, L)."""

    x: torch.Tensor  # [B_b, L, 3]
    t: torch.Tensor  # [B_b] long
    mask: torch.Tensor  # [B_b, L]
    noise: torch.Tensor  # [B_b, L, 3]
    scale: torch.Tensor  # [B_b]
    replay: Callable[[], None] | None = None
    out: torch.Tensor | None = None  # [B_b, L, 3]
    dirty: int = 0  # rows [:dirty] may hold a previous batch's samples


class StepGraphRunner:
    """One sampling step per call, replayed from a graph captured lazily per (batch bucket, length).

    ``step(x, t, mask, noise, noise_scale)`` returns what :func:`eager_step` returns for the same
    inputs (a fresh tensor, safe to keep across steps). ``capture`` is :func:`cuda_capture` on GPU.
    A failed capture (``GraphCaptureError``) is logged once and turns graphs off (eager from then
    on); out of memory frees the cached graphs and is raised for the engine's OOM handling; an error
    of the step itself (raised by the warm-up run) is raised as in the eager path.
    """

    def __init__(self, denoiser: torch.nn.Module, schedule: Schedule, *, device: torch.device,
                 autocast_dtype: torch.dtype | None = None, capture: CaptureFn | None = None,
                 buckets: Sequence[int] = BATCH_BUCKETS, max_graphs: int = 32) -> None:
        if max_graphs < 1:
            raise ValueError(f"max_graphs must be >= 1, got {max_graphs}")
        self.denoiser = denoiser
        self.schedule = schedule
        self.device = torch.device(device)
        self.autocast_dtype = autocast_dtype if self.device.type == "cuda" else None
        self.capture = capture if capture is not None else CudaCapture()
        self.buckets = tuple(sorted(buckets))
        self.max_graphs = int(max_graphs)
        self.stats = GraphStats()
        self._graphs: OrderedDict[tuple[int, int], _Graph] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return self.stats.disabled_reason is None

    def keys(self) -> list[tuple[int, int]]:
        """Cached (B_b, L), least recently used first."""
        return list(self._graphs)

    def clear(self) -> None:
        self._graphs.clear()
        reset = getattr(self.capture, "reset", None)
        if reset is not None:  # the freed graphs' pool must not be captured into again (CudaCapture)
            reset()
        self.stats.cached = 0

    def eager(self, x, t, mask, noise, noise_scale) -> torch.Tensor:
        self.stats.eager_steps += 1
        return eager_step(self.denoiser, self.schedule, x, t, mask, noise, noise_scale,
                          autocast_dtype=self.autocast_dtype)

    def step(self, x: torch.Tensor, t: torch.Tensor, mask: torch.Tensor, noise: torch.Tensor,
             noise_scale: torch.Tensor) -> torch.Tensor:
        """x [B, L, 3], t [B] long, mask [B, L], noise [B, L, 3], noise_scale [B] -> x_{t-1} [B, L, 3]."""
        batch, length = x.shape[:2]
        bucket = batch_bucket(batch, self.buckets)
        if not self.enabled or bucket is None:
            return self.eager(x, t, mask, noise, noise_scale)
        key = (bucket, length)
        graph = self._graphs.get(key)
        if graph is not None:
            self._graphs.move_to_end(key)
            self._copy_in(graph, x, t, mask, noise, noise_scale)
            graph.replay()
            self.stats.replays += 1
            return graph.out[:batch].clone()  # [B, L, 3]: copied before another graph can reuse the pool

        graph = self._buffers(bucket, length)
        self._copy_in(graph, x, t, mask, noise, noise_scale)
        try:
            graph.replay, graph.out = self.capture(self._step_fn(graph), self.device)
        except torch.cuda.OutOfMemoryError:
            self.clear()
            raise
        except GraphCaptureError as exc:  # log once, run eagerly from now on
            self.stats.disabled_reason = str(exc)
            self.clear()
            log.warning("CUDA graph capture failed for batch %d x length %d; sampling eagerly from now on "
                        "(set MHCFLASH_CUDA_GRAPHS=off to silence this): %s", bucket, length,
                        self.stats.disabled_reason)
            return self.eager(x, t, mask, noise, noise_scale)
        self.stats.captures += 1
        self._graphs[key] = graph
        while len(self._graphs) > self.max_graphs:
            self._graphs.popitem(last=False)
            self.stats.evictions += 1
        self.stats.cached = len(self._graphs)
        # The capture only recorded the step: replay it for this step's result.
        graph.replay()
        self.stats.replays += 1
        return graph.out[:batch].clone()  # [B, L, 3]

    # ------------------------------------------------------------------------------- internals
    def _buffers(self, bucket: int, length: int) -> _Graph:
        dev = self.device
        return _Graph(x=torch.zeros(bucket, length, 3, device=dev), t=torch.ones(bucket, dtype=torch.long, device=dev),
                      mask=torch.zeros(bucket, length, device=dev), noise=torch.zeros(bucket, length, 3, device=dev),
                      scale=torch.zeros(bucket, device=dev))

    def _step_fn(self, graph: _Graph) -> StepFn:
        def fn() -> torch.Tensor:
            return eager_step(self.denoiser, self.schedule, graph.x, graph.t, graph.mask, graph.noise, graph.scale,
                              autocast_dtype=self.autocast_dtype)  # [B_b, L, 3]

        return fn

    @staticmethod
    def _copy_in(graph: _Graph, x, t, mask, noise, noise_scale) -> None:
        """Rows [:B] <- the batch; rows [B:dirty] (a previous, larger batch) <- padding samples."""
        batch = x.shape[0]
        graph.x[:batch].copy_(x)
        graph.t[:batch].copy_(t)
        graph.mask[:batch].copy_(mask)
        graph.noise[:batch].copy_(noise)
        graph.scale[:batch].copy_(torch.as_tensor(noise_scale).expand(batch))
        if graph.dirty > batch:
            rows = slice(batch, graph.dirty)
            graph.x[rows].zero_()
            graph.t[rows].fill_(1)
            graph.mask[rows].zero_()
            graph.noise[rows].zero_()
            graph.scale[rows].zero_()
        graph.dirty = batch
