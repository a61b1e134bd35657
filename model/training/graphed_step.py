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
epoch's last batch, are not worth a capture). The shapes' graphs live in a ``model.cuda_graphs.GraphCache``
(the cache the sampling step uses too): at most ``max_graphs`` shapes, the least recently used dropped
for a new one, one shared memory pool. If a capture fails (an op that cannot be captured, a host sync),
a warning names the shape and the error and every later call runs eagerly: training goes on, at eager
speed; unless the failure left the CUDA random number generator unusable, which raises an error telling
the user to set ``graphTrainingStep False``. Running out of memory is not caught (training's OOM
handling saves a checkpoint).

mHC diagnostics: a replay runs no Python, so no ``MHCResidual`` sets ``last_h_res``. The H_res a
module recorded while its forward was captured is a tensor of the graph, which every replay of that
shape rewrites; those tensors are kept (and the pool never hands their memory to another capture), and
after each replay every recording module's ``last_h_res`` is pointed at its shape's tensor: it then
holds this step's H_res, as after an eager call, with no eager step for the diagnostics.
NOTE: so ``last_h_res`` after a replay is a view of graph memory: the next replay of the same shape
overwrites it (``mhc_diagnostics`` reads it at once; clone it to keep it).
Self-conditioning (``keep`` given): the graphed forward is ``self_conditioned_eps`` (the no-grad pass,
the estimate and the gradient pass), the same function as the eager step, with ``keep`` [B] a fourth
static input (part of the key): one pair of graphs per shape serves every draw of the coins.
NOTE: autocast's weight-cast cache cannot be captured; captures and replays run under a nested
``torch.autocast(cache_enabled=False)`` with the caller's autocast dtype, which is part of the key.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from model.cuda_graphs import GraphCache, GraphCaptureError, GraphStats, restore_rng
from model.training.self_conditioning import self_conditioned_eps

__all__ = ["GraphStats", "TrainGraphs"]


class _ShapeCall(nn.Module):
    """The denoiser behind one shape's graphs (a separate module: make_graphed_callables replaces
    its ``forward``, and the denoiser itself must stay callable eagerly)."""

    def __init__(self, denoiser: nn.Module, schedule=None) -> None:
        super().__init__()
        self.denoiser = denoiser
        self.schedule = schedule

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, mask: torch.Tensor,
                keep: torch.Tensor | None = None) -> torch.Tensor:
        if keep is None:
            return self.denoiser(x_t, t, mask)
        if self.schedule is None:
            raise ValueError("self-conditioned training steps need the schedule: TrainGraphs(..., schedule=)")
        return self_conditioned_eps(self.denoiser, self.schedule, x_t, t, mask, keep)


def _warn(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=4)


class TrainGraphs:
    """``graphs(x_t [B, L, 3], t [B], mask [B, L], keep [B] | None) -> eps_hat [B, L, 3]`` with gradients,
    replayed from per-shape CUDA graphs where it can (see the module docstring for when it cannot).

    Args:
        denoiser: the model (``model.network.denoiser.Denoiser``); its parameters are used in place.
        schedule: the diffusion schedule (``model.diffusion.Schedule``), for self-conditioned calls.
        max_graphs: shapes kept at once (least recently used dropped beyond that).
        capture_after: capture a shape on its n-th call (earlier calls run eagerly).
        warmup_iters: eager forward + backward passes before a capture (make_graphed_callables').
    """

    def __init__(self, denoiser: nn.Module, *, schedule=None, max_graphs: int = 64, capture_after: int = 2,
                 warmup_iters: int = 3) -> None:
        self.denoiser = denoiser
        self.call = _ShapeCall(denoiser, schedule)  # the eager step: what each shape's graphs capture
        self.warmup_iters = warmup_iters
        # per shape: the graphed call, and (module, H_res tensor of the graph) for every MHCResidual
        # that recorded while it was captured
        self.cache: GraphCache[tuple[nn.Module, list[tuple[nn.Module, torch.Tensor]]]] = GraphCache(
            max_graphs=max_graphs, capture_after=capture_after, owner="graphTrainingStep",
            eager_text="training goes on with eager steps", off_hint="Set graphTrainingStep False", warn=_warn)

    @property
    def stats(self) -> GraphStats:
        return self.cache.stats

    @property
    def failed(self) -> str | None:
        """Why capturing was given up (then every call runs eagerly)."""
        return self.cache.stats.disabled_reason

    def __len__(self) -> int:
        return len(self.cache)

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

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, mask: torch.Tensor, keep: torch.Tensor | None = None,
                 *, eager: bool = False) -> torch.Tensor:
        args = (x_t, t, mask) if keep is None else (x_t, t, mask, keep)
        if eager or self.unsupported_reason(x_t) is not None:
            return self._eager(*args)
        key = self._key(*args)
        entry = self.cache.get(key)
        if entry is None:
            if not self.cache.ready(key):
                return self._eager(*args)
            entry = self.cache.capture(key, lambda: self._record(*args), device=x_t.device,
                                       describe=f"batch shape {list(x_t.shape)}")
            if entry is None:  # capturing failed (warned once): eager from now on
                return self._eager(*args)
        graphed, recorded = entry
        self.stats.replays += 1
        out = graphed(*args)
        for module, h_res in recorded:  # this replay rewrote them: this step's H_res
            module.last_h_res = h_res
        return out

    def _eager(self, *args: torch.Tensor) -> torch.Tensor:
        self.stats.eager += 1
        return self.call(*args)

    @staticmethod
    def _autocast_state() -> tuple[bool, torch.dtype]:
        return torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")

    def _key(self, x_t: torch.Tensor, t: torch.Tensor, mask: torch.Tensor, *keep: torch.Tensor) -> tuple:
        return (tuple(x_t.shape), x_t.dtype, t.dtype, mask.dtype, x_t.device, len(keep), *self._autocast_state())

    def _record(self, *args: torch.Tensor):
        """Capture this shape's forward + backward into the cache's pool; GraphCaptureError if that fails."""
        from model.mhc import find_mhc_modules

        recording = [m for m in find_mhc_modules(self.denoiser) if m.record]
        enabled, dtype = self._autocast_state()
        device = args[0].device
        static = tuple(a.detach().clone() for a in args)  # the graph's own input buffers
        for m in recording:
            m.last_h_res = None
        try:
            with torch.autocast("cuda", dtype=dtype, enabled=enabled, cache_enabled=False):
                graphed = torch.cuda.make_graphed_callables(
                    _ShapeCall(self.denoiser, self.call.schedule), static, num_warmup_iters=self.warmup_iters,
                    allow_unused_input=True, pool=self.cache.pool())
        except torch.cuda.OutOfMemoryError:
            restore_rng(device)
            raise
        except Exception as exc:  # any capture failure: the cache warns and training goes on eagerly
            restore_rng(device)
            raise GraphCaptureError(f"{type(exc).__name__}: {exc}") from exc
        # the forward captured last: each module's last_h_res is now its H_res inside the graph
        return graphed, [(m, m.last_h_res) for m in recording if m.last_h_res is not None]
