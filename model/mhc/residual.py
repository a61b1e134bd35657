"""``MHCResidual``: Eq. (3) of the mHC paper around any residual branch, by the reference or the fused
kernels, chosen once at construction.

    S <- H_res S + H_post^T branch(H_pre S, ...)        S [B, L, n, C]

Reference: ``reference.mhc_pre_reference`` (Eqs. 7-9 and H_pre S), the branch, ``reference.mix_out``.
Fused: ``kernels.pre.fused_pre`` (one kernel each way, then the Sinkhorn kernel), the branch,
``kernels.mix.mix_out`` (one kernel each way, with the streams' mean for the backbone update).
"""

from __future__ import annotations

import torch
from torch import nn

from model.mhc.kernels import mix, pre
from model.mhc.kernels.support import needs_grad
from model.mhc.mappings import MHCMappings
from model.mhc.reference import contract, mhc_pre_reference, mix_out

__all__ = ["MHCResidual"]


class MHCResidual(nn.Module):
    """Eq. (3) around any branch: S <- H_res S + H_post^T branch(H_pre S, *args, **kwargs).

    Args:
        branch: any module y = f(x, ...) with x, y [B, L, C]; extra arguments (pair tensor or
            factors, frames, mask, ...) are passed through untouched.
        dim: C.
        n: the number of streams (``mhcExpansionRate``); n = 1 is the plain residual.
        alpha_init: the mappings' initial alpha (``mhcAlphaInit``).
        sinkhorn_iters: Sinkhorn-Knopp iterations, t_max of Eq. (9) (``mhcSinkhornIters``).
        res_logit_cap: soft cap of the H_res logits (``mhcResLogitCap``; 0: none), see
            ``reference.cap_logits``.
        fused: reference or fused kernels (fixed for the module's life):
            None (default): the fused kernels wherever they can run for the call's tensors
                (``kernels.pre.available``: CUDA or Triton's interpreter, float32 / bf16 / fp16 streams,
                float32 phi, n in 2, 4, 8, ..., C a power of two >= 16, not inside torch.compile),
                the reference everywhere else (the CPU, float64 gradchecks, other shapes);
            True: the fused kernels; ValueError here for a shape they do not take, RuntimeError at a
                call where they cannot run (tests and benchmarks use this to be sure of the path);
            False: always the reference.
    forward(streams [B, L, n, C], *args, **kwargs) -> [B, L, n, C] in the streams' dtype.

    NOTE: "once" is the policy, not the device. A module is built on the CPU and moved to CUDA after
    (and the same parameters may run a float64 gradcheck on the CPU), so with ``fused=None`` the
    device / dtype part of the choice is read from the tensors at each call; nothing else selects a
    path (no module switches), and ``fused`` is read-only.
    With n = 1 there are no mappings (H_pre = H_post = H_res = 1) and the forward is literally
    ``S + f(S[..., 0, :])[..., None, :]``: bit-identical to the plain residual s + f(s).
    After each forward ``last_h_res`` holds the detached H_res [B, L, n, n] (float32) for
    ``mhc_diagnostics``; set ``record = False`` to skip that (serving does).
    NOTE: the stream mixing runs outside autocast, in the streams' dtype (float32 in training), so the
    residual stream is never rounded to bf16 (the plain residual s + y promotes the same way).
    """

    def __init__(self, branch: nn.Module, dim: int, *, n: int, alpha_init: float, sinkhorn_iters: int,
                 res_logit_cap: float = 0.0, fused: bool | None = None) -> None:
        super().__init__()
        self.branch = branch
        self.dim = dim
        self.n = int(n)
        if self.n < 1:
            raise ValueError(f"MHCResidual: n (mhcExpansionRate) must be >= 1, got {self.n}")
        if fused and self.n > 1 and not pre.supports(self.n, dim):
            raise ValueError(f"MHCResidual(fused=True): the fused kernels take n in 2, 4, 8, ... and C a "
                             f"power of two >= 16, got n = {self.n} (mhcExpansionRate), C = {dim}; pass "
                             f"fused=None to use the reference for this shape")
        self._fused = None if fused is None else bool(fused)
        self.mappings = (MHCMappings(dim, self.n, alpha_init=alpha_init, sinkhorn_iters=sinkhorn_iters,
                                     res_logit_cap=res_logit_cap) if self.n > 1 else None)
        self.record = True
        self.last_h_res: torch.Tensor | None = None

    @property
    def fused(self) -> bool | None:
        """The constructor's choice: None (fused where the kernels can run), True or False."""
        return self._fused

    def extra_repr(self) -> str:
        return f"dim={self.dim}, n={self.n}, fused={self._fused}"

    def forward(self, streams: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self._update(streams, args, kwargs, with_mean=False)

    def forward_with_mean(self, streams: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """``(forward(streams, ...), contract(of that))``: the new streams [B, L, n, C] and their mean
        [B, L, C], which the structure layer's backbone update reads. On the fused path the mean comes
        from the kernel that writes the streams: one pass fewer over the streams forward, and no
        separate broadcast-and-add of its gradient backward."""
        return self._update(streams, args, kwargs, with_mean=True)

    def runs_fused(self, streams: torch.Tensor) -> bool:
        """Whether a call on ``streams`` [B, L, n, C] takes the fused kernels (see ``fused``)."""
        if self.mappings is None or self._fused is False:
            return False
        can = pre.available(streams, self.mappings.phi)
        if self._fused and not can:
            raise RuntimeError(
                f"MHCResidual(fused=True): the fused kernels cannot run for streams {streams.dtype} on "
                f"{streams.device} with phi {self.mappings.phi.dtype} (they need CUDA or TRITON_INTERPRET=1, "
                f"Triton, float32 / bf16 / fp16 streams, float32 phi, no torch.compile); pass fused=None "
                f"to fall back to the reference")
        return can

    def _record(self, h_res: torch.Tensor) -> None:
        if self.record:
            self.last_h_res = h_res.detach()

    def _update(self, streams: torch.Tensor, args: tuple, kwargs: dict, *, with_mean: bool):
        if streams.shape[-2:] != (self.n, self.dim):
            raise ValueError(f"MHCResidual: expected streams [..., {self.n}, {self.dim}], "
                             f"got {tuple(streams.shape)}")
        if self.mappings is None:  # n = 1: the plain residual, exactly
            y = self.branch(streams[..., 0, :], *args, **kwargs)  # [B, L, C]
            self._record(torch.ones(*streams.shape[:-2], 1, 1, device=streams.device))
            out = streams + y.unsqueeze(-2)
            return (out, contract(out)) if with_mean else out
        if self.runs_fused(streams):
            return self._fused_update(streams, args, kwargs, with_mean)
        return self._reference_update(streams, args, kwargs, with_mean)

    def _reference_update(self, streams: torch.Tensor, args: tuple, kwargs: dict, with_mean: bool):
        maps, dt = self.mappings, streams.dtype
        x, h_post, h_res = mhc_pre_reference(streams, maps.phi, *maps.column_parameters(),
                                             maps.sinkhorn_iters, maps.res_logit_cap)  # [B, L, C], [B, L, n], [B, L, n, n]
        self._record(h_res)
        y = self.branch(x, *args, **kwargs)  # [B, L, C]
        with torch.autocast(device_type=streams.device.type, enabled=False):
            out = mix_out(h_res.to(dt), h_post.to(dt), streams, y.to(dt))  # [B, L, n, C]
            return (out, contract(out)) if with_mean else out

    def _fused_update(self, streams: torch.Tensor, args: tuple, kwargs: dict, with_mean: bool):
        maps, dt = self.mappings, streams.dtype
        if streams.stride(-2) == 0:  # expand's view (the first layer): copied once here, not by both ops
            streams = streams.contiguous()
        with torch.autocast(device_type=streams.device.type, enabled=False):
            # the Sinkhorn on a side stream, overlapping the branch: sampling small batches only
            side = not needs_grad(streams, *maps.parameters()) and pre.overlap_pays(streams)
            x, h_post, pending = pre.fused_pre(streams, maps.phi, *maps.column_parameters(),
                                               maps.sinkhorn_iters, res_logit_cap=maps.res_logit_cap,
                                               side_stream=side)
            # x [B, L, C], h_post [B, L, n]; H_res [B, L, n, n] to come
        y = self.branch(x, *args, **kwargs)  # [B, L, C]
        h_res = pending.wait()  # [B, L, n, n]
        self._record(h_res)
        with torch.autocast(device_type=streams.device.type, enabled=False):
            # [B, L, n, C] (and its mean [B, L, C] from the same kernel)
            return mix.mix_out(h_res.to(dt), h_post.to(dt), streams, y.to(dt), with_mean=with_mean)
