"""Shape-keyed caches of CUDA graphs, shared by the graphed training step and the graphed sampling step.

Sources: PyTorch "CUDA Graphs" (``torch.cuda.graphs`` docs: warm up on a side stream, capture once on
static input / output tensors, then copy inputs in and ``replay()``; several graphs may share one
private memory pool); the per-shape graph cache with a bounded size follows vLLM's captured batch sizes.

Two owners keep one graph (or graph pair) per input shape:
- ``model.training.graphed_step.TrainGraphs``: the training forward + backward (``make_graphed_callables``);
- ``model.sampling_step.SamplingStep``: the sampling step, denoiser + reverse step (:func:`capture_graph`).

:class:`GraphCache` is what they share:

    key             hashable, chosen by the owner (a batch shape; a batch bucket and length)
    capture_after   a key is captured on its n-th request; earlier requests run eagerly
    LRU             at most ``max_graphs`` entries; the least recently used is dropped to make room
    pool            one private memory pool for every entry: about the largest shape's memory, not the sum
    failure         the recorder raises :class:`GraphCaptureError`: one warning, every entry dropped, every
                    later call eager (``stats.disabled_reason``); if the failure left the CUDA random
                    number generator unusable, a RuntimeError that says how to turn the graphs off
    out of memory   every entry dropped (their memory freed), the error raised for the caller's OOM handling

Sharing one pool is safe for both owners: a graph's outputs are consumed (copied out, or used by the
backward of the same shape) before another shape runs, and the tensors a graph keeps between replays
(static inputs, outputs) stay allocated, so a later capture reuses only memory that is dead between steps.
NOTE: a pool handle must not outlive the graphs that use it: once they are all freed the allocator
keeps the pool with a zero use count, and capturing into that handle again tripped an internal assert
(``use_count > 0`` in CUDACachingAllocator, H100, torch 2.11). The cache therefore forgets its handle
whenever it holds no graph (after dropping the last one, or clearing), and the next capture takes a
fresh pool.
NOTE: a capture that fails after it began can leave the default CUDA generator in capture mode: the
next ``torch.randn`` then failed with "Offset increment outside graph capture encountered
unexpectedly" (H100, torch 2.11). Recorders call :func:`restore_rng` after a failure (one empty,
successful capture), and the cache checks the generator with :func:`rng_broken`.

Symbols: B batch, L residues.
"""

from __future__ import annotations

import logging
from collections import Counter, OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

import torch

log = logging.getLogger("mhcflash.graphs")

__all__ = ["GraphCache", "GraphCaptureError", "GraphStats", "capture_graph", "restore_rng", "rng_broken"]

E = TypeVar("E")
WARMUP_ITERS = 2  # eager runs on a side stream before a capture (fills lazy caches: backends, tables)


class GraphCaptureError(RuntimeError):
    """Recording a graph failed (not the computation itself): the owner runs eagerly from then on."""


@dataclass
class GraphStats:
    """What a cache's owner did: shapes captured, calls replayed / run eagerly, shapes dropped (LRU)."""

    captures: int = 0
    replays: int = 0
    evictions: int = 0
    eager: int = 0  # calls that ran eagerly (not graphable, not captured yet, or capturing failed)
    cached: int = 0
    disabled_reason: str | None = None  # why capturing was given up (then every call runs eagerly)


class GraphCache(Generic[E]):
    """Captured entries by key, with the LRU, capture-after-n, pool and failure policy of the module docstring.

    Args:
        max_graphs: entries kept at once.
        capture_after: capture a key on its n-th :meth:`ready` call.
        owner: names the feature in messages (``graphTrainingStep``, ``CUDA graphs``).
        eager_text: what happens after a failure ("training goes on with eager steps").
        off_hint: how to turn the feature off ("Set graphTrainingStep False").
        warn: reports a failure once (``warnings.warn`` for training, a log line for the service).
    """

    def __init__(self, *, max_graphs: int, capture_after: int = 1, owner: str, eager_text: str, off_hint: str,
                 warn: Callable[[str], None] = log.warning) -> None:
        if max_graphs < 1 or capture_after < 1:
            raise ValueError(f"{owner}: max_graphs and capture_after must be >= 1, got {max_graphs}, {capture_after}")
        self.max_graphs, self.capture_after = int(max_graphs), int(capture_after)
        self.owner, self.eager_text, self.off_hint, self.warn = owner, eager_text, off_hint, warn
        self.stats = GraphStats()
        self._entries: OrderedDict[Hashable, E] = OrderedDict()
        self._seen: Counter = Counter()
        self._pool = None

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def enabled(self) -> bool:
        return self.stats.disabled_reason is None

    def keys(self) -> list:
        """Cached keys, least recently used first."""
        return list(self._entries)

    def get(self, key: Hashable) -> E | None:
        """The entry of ``key`` (now the most recently used), or None."""
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
        return entry

    def ready(self, key: Hashable) -> bool:
        """Count a request for the uncached ``key``; True from its ``capture_after``-th request on."""
        self._seen[key] += 1
        return self._seen[key] >= self.capture_after

    def pool(self):
        """The private memory pool every entry is captured into (a fresh one when no entry holds the last)."""
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        return self._pool

    def capture(self, key: Hashable, record: Callable[[], E], *, device: torch.device, describe: str) -> E | None:
        """Make room (LRU), then ``record()`` the entry of ``key``; None when capturing failed (module docstring).

        ``record`` captures into :meth:`pool` and raises :class:`GraphCaptureError` when recording
        failed; any other exception (an error of the computation itself) propagates unchanged.
        """
        while len(self._entries) >= self.max_graphs:
            self._entries.popitem(last=False)
            self.stats.evictions += 1
        if not self._entries:
            self._pool = None  # the pool's graphs are gone: never capture into it again (module NOTE)
        try:
            entry = record()
        except torch.cuda.OutOfMemoryError:
            self.clear()
            raise
        except GraphCaptureError as exc:
            self._fail(exc, torch.device(device), describe)
            return None
        self._entries[key] = entry
        self.stats.captures += 1
        self.stats.cached = len(self._entries)
        return entry

    def clear(self) -> None:
        """Drop every entry and forget the pool."""
        self._entries.clear()
        self._pool = None
        self.stats.cached = 0

    def _fail(self, exc: GraphCaptureError, device: torch.device, describe: str) -> None:
        self.stats.disabled_reason = f"CUDA graph capture failed ({exc})"
        self.clear()
        if rng_broken(device):
            raise RuntimeError(
                f"{self.owner}: capturing {describe} failed ({exc}) and left the CUDA random number generator "
                f"unusable, so this process cannot go on eagerly. {self.off_hint} and rerun.") from exc
        self.warn(f"{self.owner}: capturing {describe} failed ({exc}); {self.eager_text}. "
                  f"{self.off_hint} to skip the attempt.")


# ------------------------------------------------------------------------------------------ capture
def capture_graph(fn: Callable[[], torch.Tensor], device: torch.device, pool=None,
                  warmup_iters: int = WARMUP_ITERS) -> tuple[Callable[[], None], torch.Tensor]:
    """Record ``out = fn()`` as a CUDA graph; returns ``(replay, out)``: ``replay()`` recomputes ``out`` in place.

    ``fn`` runs ``warmup_iters`` times eagerly on a side stream first (an error there is the
    computation's own and propagates), then once under capture into ``pool`` (None: a private pool of
    its own). A failure of the capture (e.g. a host sync inside ``fn``: "operation not permitted when
    stream is capturing") restores the generator and raises :class:`GraphCaptureError`; out of memory
    restores it and is raised as is.
    """
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(warmup_iters):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    from model.geometry import skip_input_checks  # host-side checks would sync inside the capture

    # thread_local: other threads (metrics scrapes, an event loop) may touch CUDA meanwhile.
    try:
        with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"), skip_input_checks():
            out = fn()  # lives in the pool
    except torch.cuda.OutOfMemoryError:
        restore_rng(device)
        raise
    except Exception as exc:
        restore_rng(device)
        raise GraphCaptureError(f"{type(exc).__name__}: {exc}") from exc
    return graph.replay, out


def restore_rng(device: torch.device) -> None:
    """After a failed capture: one empty, successful capture, so that the default CUDA generator leaves
    its capture bookkeeping (module NOTE). Best effort; nothing to do off CUDA."""
    if torch.device(device).type != "cuda":
        return
    try:
        torch.cuda.synchronize(device)
        scratch = torch.zeros(1, device=device)
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            scratch.add_(1.0)
        torch.cuda.synchronize(device)
    except Exception as exc:  # noqa: BLE001 - best effort; the caller reports the original failure
        log.warning("could not reset the CUDA generator after a failed capture: %s", exc)


def rng_broken(device: torch.device) -> bool:
    """True when the CUDA random number generator of ``device`` cannot draw (e.g. left in capture mode
    by a capture that failed after it started); always False off CUDA."""
    if torch.device(device).type != "cuda":
        return False
    try:
        torch.empty(1, device=device).normal_()
    except RuntimeError:
        return True
    return False
