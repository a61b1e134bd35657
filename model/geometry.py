"""Rigid frames, Frenet-Serret frames from a CA trace, quaternion backbone updates.

The one geometry module of the package: every other module imports from here, none forks it.

Sources:
- ``Frames`` follows OpenFold's ``Rigid`` (``openfold/utils/rigid_utils.py``): a rotation matrix and a
  translation per residue; ``apply(x) = R x + t``, composition ``(R1, t1) o (R2, t2) = (R1 R2, R1 t2 + t1)``.
- ``frenet_serret_frames`` follows Genie (``genie/utils/geo_utils.py::compute_frenet_frames``):
  ``t_i = unit(x_{i+1} - x_i)``, ``b_i = unit(t_{i-1} x t_i)``, ``n_i = b_i x t_i``, rotation columns
  ``[t, n, b]``, translation ``x_i``; the first and last real residue copy their neighbour's rotation.
- ``quaternion_update`` is AlphaFold 2 Algorithm 23 (backbone update) as in OpenFold's
  ``Rigid.compose_q_update_vec``: a non-unit quaternion ``(1, b, c, d)`` is normalised to a rotation,
  then the update is composed on the right of the current frames.

Shapes use the package symbols: B batch, L residues, ``*`` any leading batch dimensions.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from dataclasses import dataclass

import torch

__all__ = [
    "Frames",
    "frenet_serret_frames",
    "input_checks_enabled",
    "quaternion_to_rotation",
    "quaternion_update",
    "random_rotation",
    "rotate_points",
    "rotate_points_elementwise",
    "safe_normalize",
    "skip_input_checks",
]

# Added under the square root of every normalisation (Genie uses 1e-10 in fp32). Large enough that
# a zero vector gives a zero (not NaN) result and a finite gradient, small enough to leave the
# direction of any real CA-CA difference (|v| ~ 3.8 A) unchanged at fp32 precision.
NORM_EPS = 1e-10


_CHECKS = threading.local()  # per thread: CUDA graph capture in the engine thread, eager elsewhere


@contextlib.contextmanager
def skip_input_checks():
    """Skip the data-dependent input checks (host syncs) in this thread, e.g. during CUDA graph capture.

    Shape checks stay; only checks that read tensor values (the prefix-mask check of
    :func:`frenet_serret_frames`) are skipped. Re-entrant; eager code outside the block keeps them.
    """
    depth = getattr(_CHECKS, "skip_depth", 0)
    _CHECKS.skip_depth = depth + 1
    try:
        yield
    finally:
        _CHECKS.skip_depth = depth


def input_checks_enabled() -> bool:
    """False inside ``torch.compile``, inside :func:`skip_input_checks`, and while this thread's
    current CUDA stream is capturing a graph (a host sync there would invalidate the capture)."""
    if torch.compiler.is_compiling() or getattr(_CHECKS, "skip_depth", 0):
        return False
    return not (torch.cuda.is_available() and torch.cuda.is_initialized()
                and torch.cuda.is_current_stream_capturing())


def safe_normalize(v: torch.Tensor, eps: float = NORM_EPS) -> torch.Tensor:
    """``v / sqrt(|v|^2 + eps)`` along the last dimension; finite for ``v = 0``.

    Args:
        v: [*, D]
    Returns:
        [*, D]
    """
    return v * torch.rsqrt((v * v).sum(dim=-1, keepdim=True) + eps)


def _exact(method):
    """Run a Frames method with autocast off and tensors promoted to a common dtype (>= frames').

    NOTE: geometry stays in the frames' precision (float32 in the model) even inside a bf16 autocast
    region; autocast would otherwise round rotations and coordinates of ~100 A to 8 mantissa bits.
    """

    @functools.wraps(method)
    def wrapper(self, *args):
        with torch.autocast(device_type=self.trans.device.type, enabled=False):
            dtype = functools.reduce(torch.promote_types, [a.dtype for a in _tensors(args)], self.dtype)
            return method(self.to(dtype), *[_cast(a, dtype) for a in args])

    return wrapper


def _tensors(args):
    for a in args:
        if isinstance(a, torch.Tensor):
            yield a
        elif isinstance(a, Frames):
            yield a.trans


def _cast(a, dtype):
    return a.to(dtype) if isinstance(a, (torch.Tensor, Frames)) else a


@dataclass(frozen=True)
class Frames:
    """A batch of rigid transforms ``x -> R x + t``.

    Attributes:
        rots: [*, 3, 3] rotation matrices (columns are the frame's axes in global coordinates).
        trans: [*, 3] translations (the frame origins, here the CA positions).
    """

    rots: torch.Tensor  # [*, 3, 3]
    trans: torch.Tensor  # [*, 3]

    def __post_init__(self) -> None:
        if self.rots.shape[-2:] != (3, 3) or self.trans.shape[-1] != 3:
            raise ValueError(f"Frames needs rots [*, 3, 3] and trans [*, 3], got "
                             f"{tuple(self.rots.shape)} and {tuple(self.trans.shape)}")
        if self.rots.shape[:-2] != self.trans.shape[:-1]:
            raise ValueError(f"Frames batch shapes differ: rots {tuple(self.rots.shape[:-2])} vs "
                             f"trans {tuple(self.trans.shape[:-1])}")

    # ----------------------------------------------------------------- construction / shape helpers
    @staticmethod
    def identity(shape: tuple[int, ...], *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> Frames:
        """Identity frames of batch shape ``shape``: rots [*shape, 3, 3], trans [*shape, 3]."""
        rots = torch.eye(3, dtype=dtype, device=device).expand(*shape, 3, 3).clone()
        trans = torch.zeros(*shape, 3, dtype=dtype, device=device)
        return Frames(rots, trans)

    @property
    def shape(self) -> torch.Size:
        """The batch shape ``*`` (without the trailing 3 / 3x3)."""
        return self.trans.shape[:-1]

    @property
    def dtype(self) -> torch.dtype:
        return self.trans.dtype

    @property
    def device(self) -> torch.device:
        return self.trans.device

    def __getitem__(self, index) -> Frames:
        """Index the batch dimensions, e.g. ``frames[:, None]`` -> [B, 1, L]."""
        if not isinstance(index, tuple):
            index = (index,)
        return Frames(self.rots[index + (slice(None), slice(None))], self.trans[index + (slice(None),)])

    def unsqueeze(self, dim: int) -> Frames:
        """Insert a batch dimension (``dim`` counts batch dimensions only; negative from the end)."""
        if dim < 0:
            dim = len(self.shape) + 1 + dim
        return Frames(self.rots.unsqueeze(dim), self.trans.unsqueeze(dim))

    def to(self, *args, **kwargs) -> Frames:
        """``torch.Tensor.to`` on both tensors (dtype and / or device)."""
        return Frames(self.rots.to(*args, **kwargs), self.trans.to(*args, **kwargs))

    def float(self) -> Frames:
        return self.to(torch.float32)

    def detach_rots(self) -> Frames:
        """Stop the gradient through the rotations (OpenFold's ``stop_rot_gradient``)."""
        return Frames(self.rots.detach(), self.trans)

    def detach(self) -> Frames:
        return Frames(self.rots.detach(), self.trans.detach())

    def where(self, keep: torch.Tensor, other: Frames) -> Frames:
        """Per element: ``self`` where ``keep`` [*] is true, ``other`` elsewhere."""
        keep = keep.bool()
        return Frames(torch.where(keep[..., None, None], self.rots, other.rots),
                      torch.where(keep[..., None], self.trans, other.trans))

    # ------------------------------------------------------------------------------- group algebra
    @_exact
    def compose(self, other: Frames) -> Frames:
        """``self o other``: first ``other``, then ``self``. rots ``R1 R2``, trans ``R1 t2 + t1``."""
        rots = self.rots @ other.rots  # [*, 3, 3]
        trans = (self.rots @ other.trans[..., None])[..., 0] + self.trans  # [*, 3]
        return Frames(rots, trans)

    @_exact
    def apply(self, points: torch.Tensor) -> torch.Tensor:
        """Local -> global: ``R x + t``. points [*, 3] (broadcast against the batch shape) -> [*, 3]."""
        return torch.einsum("...ij,...j->...i", self.rots, points) + self.trans

    @_exact
    def invert_apply(self, points: torch.Tensor) -> torch.Tensor:
        """Global -> local: ``R^T (x - t)``. points [*, 3] -> [*, 3]."""
        return torch.einsum("...ji,...j->...i", self.rots, points - self.trans)

    def invert(self) -> Frames:
        """``(R^T, -R^T t)``."""
        rots_t = self.rots.transpose(-1, -2)  # [*, 3, 3]
        return Frames(rots_t, -(rots_t @ self.trans[..., None])[..., 0])

    @_exact
    def apply_rotation(self, vectors: torch.Tensor) -> torch.Tensor:
        """Rotate only (no translation): ``R v``. vectors [*, 3] -> [*, 3]."""
        return torch.einsum("...ij,...j->...i", self.rots, vectors)


# ------------------------------------------------------------------------------------ Frenet-Serret
def rotate_points(points: torch.Tensor, rots: torch.Tensor, *, inverse: bool = False) -> torch.Tensor:
    """Many points per frame: points [*, M, 3] (row vectors), rots [*, 3, 3] -> [*, M, 3], each point
    rotated by its frame's ``R`` (``R^T`` with ``inverse``): ``points @ R^T`` (``points @ R``).

    The reference: one batched matmul. On a GPU that is a cuBLAS batched GEMM with K = 3, a poor fit
    (0.29 ms for 32,768 frames x 192 points on an H100, where reading and writing the points takes
    ~0.05 ms); :func:`rotate_points_elementwise` is the same product written for a fusing compiler.
    """
    return points @ (rots if inverse else rots.transpose(-1, -2))


def rotate_points_elementwise(points: torch.Tensor, rots: torch.Tensor, *, inverse: bool = False) -> torch.Tensor:
    """:func:`rotate_points` as three broadcast multiply-adds, which ``torch.compile`` fuses into one
    memory-bound kernel (``model.network.compile.compile_denoiser`` installs that in Flash-IPA)."""
    r = rots if inverse else rots.transpose(-1, -2)  # [*, 3, 3]: out = points @ r
    return (points[..., 0:1] * r[..., None, 0, :] + points[..., 1:2] * r[..., None, 1, :]
            + points[..., 2:3] * r[..., None, 2, :])


def frenet_serret_frames(ca: torch.Tensor, mask: torch.Tensor, *, eps: float = NORM_EPS) -> Frames:
    """Genie's Frenet-Serret frames from a (noisy) CA trace, respecting per-sample lengths.

    For a real residue ``i`` with both neighbours real: ``t = unit(x[i+1] - x[i])``,
    ``b = unit(t[i-1] x t[i])``, ``n = b x t``, rotation columns ``[t, n, b]``, translation ``x[i]``.
    The first residue copies residue 1's rotation and the last real residue (``length - 1``) copies
    residue ``length - 2``'s, exactly as Genie does per sample.

    NOTE: Genie loops over the batch in Python; this is vectorised with a gather. Padding
    (``mask == 0``) gets identity rotations and zero translations, so padded coordinates never
    reach a real residue's frame. Chains shorter than 3 residues have no defined frame; they get
    identity rotations (Genie would index out of range).
    NOTE: ``mask`` must be a prefix mask per sample (real residues first, then padding), the layout
    every batch in this package uses; a mask with holes raises ``ValueError`` (a host sync, so the
    check is skipped under torch.compile, CUDA graph capture and ``skip_input_checks()``).

    Args:
        ca: [B, L, 3] CA coordinates.
        mask: [B, L] 1 for residues, 0 for padding (float or bool).
    Returns:
        Frames of shape [B, L].
    """
    if ca.ndim != 3 or ca.shape[-1] != 3 or mask.shape != ca.shape[:2]:
        raise ValueError(f"frenet_serret_frames needs ca [B, L, 3] and mask [B, L], got "
                         f"{tuple(ca.shape)} and {tuple(mask.shape)}")
    batch, length = mask.shape
    real = mask.bool()  # [B, L]
    lengths = real.sum(dim=-1)  # [B]
    pos = torch.arange(length, device=ca.device)  # [L]
    # (a data-dependent check: skipped inside torch.compile and CUDA graph capture, see input_checks_enabled)
    if input_checks_enabled() and not torch.equal(real, pos[None, :] < lengths[:, None]):
        raise ValueError("frenet_serret_frames needs prefix masks (residues first, then padding)")

    eye = torch.eye(3, dtype=ca.dtype, device=ca.device)
    if length < 3:
        rots = eye.expand(batch, length, 3, 3).clone()
        return Frames(rots, ca * real[..., None])

    t = safe_normalize(ca[:, 1:] - ca[:, :-1], eps)  # [B, L-1, 3]   t[j] = unit(x[j+1] - x[j])
    b = safe_normalize(torch.cross(t[:, :-1], t[:, 1:], dim=-1), eps)  # [B, L-2, 3]  for residue j+1
    n = torch.cross(b, t[:, 1:], dim=-1)  # [B, L-2, 3]
    tbn = torch.stack([t[:, 1:], n, b], dim=-1)  # [B, L-2, 3, 3]   frames of residues 1 .. L-2

    # Residue i (0 <= i < length) takes interior frame clamp(i, 1, length - 2), stored at index - 1.
    hi = (lengths - 2).clamp(min=1)  # [B]
    src = torch.minimum(pos[None, :].clamp(min=1), hi[:, None]) - 1  # [B, L]  in [0, L-3]
    rots = torch.gather(tbn, 1, src[..., None, None].expand(batch, length, 3, 3))  # [B, L, 3, 3]
    has_frame = real & (lengths[:, None] >= 3)  # [B, L]
    rots = torch.where(has_frame[..., None, None], rots, eye)
    trans = torch.where(real[..., None], ca, torch.zeros_like(ca))  # [B, L, 3]
    return Frames(rots, trans)


# -------------------------------------------------------------------------------------- quaternions
def _quaternion_basis() -> torch.Tensor:
    """[16, 9]: R.flatten() = vec(q q^T) @ basis for a unit quaternion q = (a, b, c, d)."""
    a, b, c, d = range(4)
    terms = [  # (i, j, coefficient) of q_i q_j for each of the 9 entries, row-major
        [(a, a, 1), (b, b, 1), (c, c, -1), (d, d, -1)], [(b, c, 2), (a, d, -2)], [(b, d, 2), (a, c, 2)],
        [(b, c, 2), (a, d, 2)], [(a, a, 1), (b, b, -1), (c, c, 1), (d, d, -1)], [(c, d, 2), (a, b, -2)],
        [(b, d, 2), (a, c, -2)], [(c, d, 2), (a, b, 2)], [(a, a, 1), (b, b, -1), (c, c, -1), (d, d, 1)],
    ]
    basis = torch.zeros(16, 9, dtype=torch.float64)
    for entry, products in enumerate(terms):
        for i, j, coef in products:
            basis[4 * i + j, entry] = coef
    return basis


_QUATERNION_BASIS = _quaternion_basis()
_BASIS_CACHE: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def _basis_on(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``_QUATERNION_BASIS`` on ``device`` / ``dtype``, copied there once (no host copy per call)."""
    if torch.compiler.is_compiling():  # a constant in the graph
        return _QUATERNION_BASIS.to(device=device, dtype=dtype)
    key = (device, dtype)
    if key not in _BASIS_CACHE:
        _BASIS_CACHE[key] = _QUATERNION_BASIS.to(device=device, dtype=dtype)
    return _BASIS_CACHE[key]


def quaternion_to_rotation(quat: torch.Tensor) -> torch.Tensor:
    """Unit quaternion ``(a, b, c, d)`` (real part first) -> rotation matrix.

    NOTE (speed): the 9 entries are quadratic forms of q, computed as vec(q q^T) @ basis [16, 9]
    (one outer product and one matmul instead of ~40 elementwise ops, forward and backward); same
    terms as the textbook formula, so equal to it up to float rounding.

    Args:
        quat: [*, 4], assumed normalised.
    Returns:
        [*, 3, 3]
    """
    outer = (quat[..., :, None] * quat[..., None, :]).flatten(-2)  # [*, 16]
    basis = _basis_on(quat.device, quat.dtype)  # [16, 9]
    return (outer @ basis).unflatten(-1, (3, 3))  # [*, 9] -> [*, 3, 3]


def quaternion_update(frames: Frames, update: torch.Tensor) -> Frames:
    """AF2 Algorithm 23 / OpenFold ``compose_q_update_vec``: compose a predicted update.

    ``update[..., :3] = (b, c, d)`` makes the quaternion ``(1, b, c, d) / |(1, b, c, d)|`` (always
    well defined, identity at zero); ``update[..., 3:]`` is the translation in the local frame.
    Returns ``frames o (R_update, t_update)``.

    Args:
        frames: Frames [*].
        update: [*, 6]
    Returns:
        Frames [*].
    """
    bcd, trans = update[..., :3], update[..., 3:]  # [*, 3], [*, 3]
    quat = torch.cat([torch.ones_like(bcd[..., :1]), bcd], dim=-1)  # [*, 4]
    quat = quat / torch.linalg.vector_norm(quat, dim=-1, keepdim=True)  # norm >= 1, no eps needed
    return frames.compose(Frames(quaternion_to_rotation(quat), trans))


def random_rotation(generator: torch.Generator | None = None, *, dtype: torch.dtype = torch.float32,
                    device: torch.device | str | None = None) -> torch.Tensor:
    """A rotation drawn uniformly from SO(3) (normalised Gaussian quaternion). Returns [3, 3]."""
    quat = torch.randn(4, generator=generator, dtype=torch.float64)
    quat = quat / quat.norm()
    return quaternion_to_rotation(quat).to(dtype=dtype, device=device)
