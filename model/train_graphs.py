"""CUDA graphs of the denoiser's training forward and backward, one pair of graphs per batch shape.

Why: a training step of the pair-free model is host-bound on an H100 (BENCHMARKS.md: a batch of
112 chains of 72 residues takes no longer than one of 56), so what a step costs is the number of
kernels Python launches, and mHC's ~30 small ops per residual show up as +19-23 % of the step.
Replaying the forward and the backward from CUDA graphs makes the step cost GPU time only.

How: ``torch.cuda.make_graphed_callables`` on a thin per-shape wrapper around the same denoiser (the
parameters are shared, so the optimizer, checkpoints and DDP see one module). Every shape's graphs
come from one shared memory pool: a step replays the forward and then the backward of one shape
before any other shape runs, and the only tensors a graph keeps between replays (its static inputs,
output and gradients) stay allocated, so another shape's capture can reuse only memory that is dead
between steps. The pool therefore holds about the largest shape's activations, not their sum.

Gradients come out of the graph's static buffers and are accumulated into ``.grad`` by autograd as
usual (the graph's buffer becomes ``.grad`` when ``.grad`` is None). That is right when ``.grad`` is
reset to None before every backward (Lightning's ``zero_grad(set_to_none=True)``), not with gradient
accumulation over several backward passes of the same shape, so the caller turns graphs off then.

A call runs eagerly (the same module, same numbers up to kernel choice) when: not CUDA, gradients
disabled, the module is in eval mode, gradient checkpointing is on (its RNG bookkeeping cannot be
captured), or the shape has been seen fewer than ``capture_after`` times (one-off shapes, such as an
epoch's last batch, are not worth a capture). At most ``max_graphs`` shapes are kept; the least
recently used one is dropped for a new one (when that leaves none, the next capture takes a fresh
pool). If a capture fails (an op that cannot be captured, a host sync), a warning names the shape and
the error and every later call runs eagerly: training goes on, at eager speed; unless the failure left
the CUDA random number generator unusable (seen when a capture failed as it began), which raises an
error telling the user to set ``graphTrainingStep False``. Running out of memory is not caught
(training's OOM handling saves a checkpoint).

mHC diagnostics: a replay runs no Python, so no ``MHCResidual`` sets ``last_h_res``. The H_res a
module recorded while its forward was captured is a tensor of the graph, which every replay of that
shape rewrites; those tensors are kept (and the pool never hands their memory to another capture), and
after each replay every recording module's ``last_h_res`` is pointed at its shape's tensor: it then
holds this step's H_res, as after an eager call, with no eager step for the diagnostics.
NOTE: so ``last_h_res`` after a replay is a view of graph memory: the next replay of the same shape
overwrites it (``mhc_diagnostics`` reads it at once; clone it to keep it).
NOTE: autocast's weight-cast cache cannot be captured; captures and replays run under a nested
``torch.autocast(cache_enabled=False)`` with the caller's autocast dtype, which is part of the key.
"""

from __future__ import annotations

import warnings
from collections import Counter, OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["GraphStats", "TrainGraphs"]


class _ShapeCall(nn.Module):
    """The denoiser behind one shape's graphs (a separate module: make_graphed_callables replaces
    its ``forward``, and the denoiser itself must stay callable eagerly)."""

    def __init__(self, denoiser: nn.Module) -> None:
        super().__init__()
        self.denoiser = denoiser

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.denoiser(x_t, t, mask)


@dataclass
class GraphStats:
    """What ``TrainGraphs`` did: shapes captured, calls replayed / run eagerly, shapes dropped (LRU)."""

    captures: int = 0
    replays: int = 0
    eager: int = 0
    evictions: int = 0


def _rng_broken(device: torch.device) -> bool:
    """True when the CUDA random number generator of ``device`` cannot draw (e.g. left in graph-capture
    mode by a capture that failed after it started); always False off CUDA."""
    if device.type != "cuda":
        return False
    try:
        torch.empty(1, device=device).normal_()
    except RuntimeError:
        return True
    return False


class TrainGraphs:
    """``graphs(x_t [B, L, 3], t [B], mask [B, L]) -> eps_hat [B, L, 3]`` with gradients, replayed
    from per-shape CUDA graphs where it can (see the module docstring for when it cannot).

    Args:
        denoiser: the model (``model.network.denoiser.Denoiser``); its parameters are used in place.
        max_graphs: shapes kept at once (least recently used dropped beyond that).
        capture_after: capture a shape on its n-th call (earlier calls run eagerly).
        warmup_iters: eager forward + backward passes before a capture (make_graphed_callables').
    """

    def __init__(self, denoiser: nn.Module, *, max_graphs: int = 64, capture_after: int = 2,
                 warmup_iters: int = 3) -> None:
        if max_graphs < 1 or capture_after < 1:
            raise ValueError(f"TrainGraphs: max_graphs and capture_after must be >= 1, "
                             f"got {max_graphs}, {capture_after}")
        self.denoiser = denoiser
        self.max_graphs, self.capture_after, self.warmup_iters = max_graphs, capture_after, warmup_iters
        self.stats = GraphStats()
        self._graphs: OrderedDict[tuple, nn.Module] = OrderedDict()
        # per shape: (module, H_res tensor of the graph) for every MHCResidual that recorded while captured
        self._recorded: dict[tuple, list[tuple[nn.Module, torch.Tensor]]] = {}
        self._seen: Counter = Counter()
        self._pool = None
        self.failed: str | None = None  # why capturing was given up (then every call runs eagerly)

    def __len__(self) -> int:
        return len(self._graphs)

    def unsupported_reason(self, x_t: torch.Tensor) -> str | None:
        """Why this call cannot be graphed (None when it can)."""
        if self.failed is not None:
            return self.failed
        if getattr(self.denoiser, "checkpointing", False):
            return "useGradientCheckpointing is on"
        if not self.denoiser.training:
            return "module in eval mode"
        if not torch.is_grad_enabled():
            return "gradients disabled"
        if not x_t.is_cuda:
            return "not a CUDA tensor"
        return None

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, mask: torch.Tensor, *, eager: bool = False) -> torch.Tensor:
        if eager or self.unsupported_reason(x_t) is not None:
            self.stats.eager += 1
            return self.denoiser(x_t, t, mask)
        key = self._key(x_t, t, mask)
        graphed = self._graphs.get(key)
        if graphed is None:
            self._seen[key] += 1
            if self._seen[key] < self.capture_after:
                self.stats.eager += 1
                return self.denoiser(x_t, t, mask)
            try:
                graphed = self._capture(key, x_t, t, mask)
            except torch.cuda.OutOfMemoryError:
                raise
            except Exception as exc:  # any capture failure: warn, go on eagerly (if the RNG survived)
                self.failed = f"CUDA graph capture failed ({type(exc).__name__}: {exc})"
                if _rng_broken(x_t.device):  # a capture that failed half-way can leave it in capture mode
                    raise RuntimeError(
                        f"graphTrainingStep: capturing batch shape {list(x_t.shape)} failed ({type(exc).__name__}: "
                        f"{exc}) and left the CUDA random number generator unusable, so training cannot go on "
                        "eagerly in this process. Set graphTrainingStep False and rerun (training resumes from "
                        "the last checkpoint).") from exc
                warnings.warn(f"graphTrainingStep: capturing batch shape {list(x_t.shape)} failed "
                              f"({type(exc).__name__}: {exc}); training goes on with eager steps. Set "
                              f"graphTrainingStep False to skip the attempt.", RuntimeWarning, stacklevel=2)
                self.stats.eager += 1
                return self.denoiser(x_t, t, mask)
        self._graphs.move_to_end(key)
        self.stats.replays += 1
        out = graphed(x_t, t, mask)
        for module, h_res in self._recorded[key]:  # this replay rewrote them: this step's H_res
            module.last_h_res = h_res
        return out

    @staticmethod
    def _autocast_state() -> tuple[bool, torch.dtype]:
        return torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")

    def _key(self, x_t: torch.Tensor, t: torch.Tensor, mask: torch.Tensor) -> tuple:
        return (tuple(x_t.shape), x_t.dtype, t.dtype, mask.dtype, x_t.device, *self._autocast_state())

    def _capture(self, key: tuple, x_t: torch.Tensor, t: torch.Tensor, mask: torch.Tensor) -> nn.Module:
        from model.mhc import find_mhc_modules

        while len(self._graphs) >= self.max_graphs:
            dropped, _ = self._graphs.popitem(last=False)
            self._recorded.pop(dropped, None)
            self.stats.evictions += 1
        if not self._graphs:
            # NOTE: no graph holds the shared pool any more, and the allocator releases a pool whose graphs
            # are gone; capturing into the old handle then failed on the H100 (INTERNAL ASSERT use_count > 0
            # in CUDACachingAllocator, max_graphs = 1): start a fresh pool
            self._pool = None
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        recording = [m for m in find_mhc_modules(self.denoiser) if m.record]
        enabled, dtype = self._autocast_state()
        static = tuple(a.detach().clone() for a in (x_t, t, mask))  # the graph's own input buffers
        for m in recording:
            m.last_h_res = None
        with torch.autocast("cuda", dtype=dtype, enabled=enabled, cache_enabled=False):
            graphed = torch.cuda.make_graphed_callables(
                _ShapeCall(self.denoiser), static, num_warmup_iters=self.warmup_iters,
                allow_unused_input=True, pool=self._pool)
        # the forward captured last: each module's last_h_res is now its H_res inside the graph
        self._recorded[key] = [(m, m.last_h_res) for m in recording if m.last_h_res is not None]
        self._graphs[key] = graphed
        self.stats.captures += 1
        return graphed
