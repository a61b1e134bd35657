"""How the engine batches its active samples each iteration: length groups and each group's step inputs.

Every iteration the active samples (mixed lengths, each at its own timestep) are split into length
groups (:func:`length_groups`: a sample shares a batch only with samples at most 1 / `ratio` times
its length, so a 64-residue sample is not padded to 256 when the pair stack costs B * L^2). Each
group runs as one padded, masked batch (:class:`StepInputs`): x_t [B, L, 3] zero on padding, t [B],
mask [B, L], each sample's noise drawn from its own generator straight into the batch, and t_prev
[B] (each sample's next timestep: samples of requests with different step counts share a batch).

A group with the same members (same order) as in its previous step takes that step's output as its
x_t, with no per-sample copies; the outputs are kept only while the engine is busy (`forget` frees
them when it goes idle).

A self-conditioned model's step (`self_conditioning`) also takes each sample's previous x0 estimate
x0_self [B, L, 3] and returns the next one: a group with the same members takes it from its previous
step like x_t; otherwise each sample's own estimate (`Slot.x0`, None until its first step: zeros) is
gathered into the batch, so an estimate follows its sample into any group and a sample that joins
mid-flight starts without one. Other models gather and keep no estimates.

Symbols: B batch, L residues (padded).
"""

from __future__ import annotations

import torch

from service.jobs import Slot
from service.pacing import to_device

__all__ = ["StepInputs", "length_groups", "padded"]


def padded(length: int, multiple: int) -> int:
    """`length` rounded up to a multiple of `multiple`."""
    return -(-length // multiple) * multiple


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


class StepInputs:
    """A group's step inputs, gathered from its slots or taken from the group's previous output.

    ``prev`` / ``next``: x_{t_prev} [B, L, 3], mask [B, L] and x0_hat [B, L, 3] (None unless
    ``self_conditioning``) of each group's step in the previous / this iteration, keyed by (L, member
    uids); ``pending``: (key, mask) of the step in progress.
    """

    def __init__(self, device: torch.device, pad_multiple: int, self_conditioning: bool = False) -> None:
        self.device = torch.device(device)
        self.pad_multiple = int(pad_multiple)
        self.self_conditioning = bool(self_conditioning)
        self.prev: dict[tuple, tuple] = {}
        self.next: dict[tuple, tuple] = {}
        self.pending: tuple = ((), None)

    def new_iteration(self) -> None:
        self.prev, self.next = self.next, {}

    def forget(self) -> None:
        """Idle: no group can reuse the last outputs; free them (device memory)."""
        self.prev, self.next, self.pending = {}, {}, ((), None)

    def gather(self, batch: list[Slot]) -> tuple[tuple[torch.Tensor, ...], bool]:
        """((x [B, L, 3], t [B], mask [B, L], noise [B, L, 3], noise_scale [B], t_prev [B]), reused),
        with x0_self [B, L, 3] appended when ``self_conditioning``.

        Per sample only its noise draw is a separate operation (its own generator, drawn once per
        step and kept on the slot for an OOM retry); x and mask are gathered per sample only when the
        group's members changed since its previous step (``reused`` False).
        """
        B, L = len(batch), padded(max(s.length for s in batch), self.pad_multiple)
        dev = self.device
        key = (L, *(s.uid for s in batch))
        previous = self.prev.get(key)
        if previous is not None:  # same members, same order: x_t (and x0_self) are the last step's outputs
            x_prev, mask, x0_self = previous
            x = torch.where(mask[..., None] > 0, x_prev, 0.0)  # [B, L, 3] (padding back to 0)
        else:
            lengths = to_device([s.length for s in batch], torch.long, dev)  # [B]
            mask = (torch.arange(L, device=dev)[None, :] < lengths[:, None]).float()  # [B, L]
            x = torch.zeros(B, L, 3, device=dev)  # [B, L, 3]
            for b, s in enumerate(batch):
                x[b, : s.length] = s.x
            x0_self = torch.zeros(B, L, 3, device=dev) if self.self_conditioning else None  # [B, L, 3]
            if x0_self is not None:
                for b, s in enumerate(batch):
                    if s.x0 is not None:  # None: its first step, no estimate yet (zeros)
                        x0_self[b, : s.length] = s.x0
        noise = torch.zeros(B, L, 3, device=dev)  # [B, L, 3]
        for b, s in enumerate(batch):
            if s.t_prev > 0:
                if s.noise is None:  # drawn once per step (into the batch), kept for an OOM retry
                    s.noise = torch.randn(s.length, 3, generator=s.gen, device=dev, out=noise[b, : s.length])
                else:
                    noise[b, : s.length] = s.noise
        self.pending = (key, mask)  # kept with x_{t-1} by remember() once the step succeeded
        t = to_device([s.t for s in batch], torch.long, dev)  # [B]
        scale = to_device([s.job.noise_scale for s in batch], torch.float32, dev)  # [B]
        t_prev = to_device([s.t_prev for s in batch], torch.long, dev)  # [B]
        inputs = (x, t, mask, noise, scale, t_prev) + ((x0_self,) if self.self_conditioning else ())
        return inputs, previous is not None

    def remember(self, batch: list[Slot], x_new: torch.Tensor, x0_new: torch.Tensor | None = None) -> None:
        """Keep x_{t_prev} [B, L, 3] (and x0_hat [B, L, 3]) as the group's next inputs if no member
        finishes or leaves in between."""
        key, mask = self.pending
        if not any(s.t_prev == 0 or s.job.done for s in batch):  # t_prev == 0: it finishes with this step
            self.next[key] = (x_new, mask, x0_new)
