"""Which examples, which windows of them, in which batches: the two training batch samplers.

Items: a sampler yields batches as lists of items; an item is a dataset index (the whole example)
or ``(index, start, stop)`` (the window ``start:stop`` of a longer example, a crop).

Crops (config ``cropLength``). Source: Genie 2 and FrameDiff train on random contiguous crops of
long chains. An example longer than the crop length is cut to a window of exactly that length,
its start uniform over the ``L - crop + 1`` positions, drawn again each time the example is drawn;
collate centres every window on its own residues. Windows are drawn from the sampler's seeded
stream, so an epoch's crops are the same on every rank and in every run with that seed.

Batch budgets. A batch's padded length P is its longest (cropped) example rounded up to
``pad_to_multiple``; it holds at most ``batch_size`` examples, ``max_residues`` padded residues
(B * P) and ``max_pair_elements`` padded pair entries (B * P^2).

- `LengthBucketBatchSampler` (no ``lengthBandWeights``): every example once per epoch, in batches of
  similar lengths (shuffle, sort pools by length, cut by the budgets, shuffle the batches).
- `BandBalancedBatchSampler` (``lengthBandWeights``): an epoch is a fixed number of batches; each
  batch is drawn from one length band (`model.data.bands`) with probability proportional to the
  band's weight, so a weight is the share of training steps spent on a band. Inside the band an
  anchor example is taken in turn from a shuffled cycle, and the batch is the run of examples
  next to it in length order. Its size is a function of P only (the largest size the budgets
  allow), so with lengths padded to a multiple of 16 there are at most one batch shape per
  multiple of 16 up to the crop length: few CUDA graphs to capture (``graphTrainingStep``).

Distributed: both subclass ``DistributedSampler`` and are passed as the DataLoader's ``sampler``
with ``batch_size=None``; every rank builds the same epoch from ``(seed, epoch)`` and takes batches
r, r + W, ..., all ranks the same number. Lightning sees a distributed sampler already, leaves it
alone, and calls ``set_epoch`` on it every epoch.
"""

from __future__ import annotations

import math

import numpy as np
from torch.utils.data import DistributedSampler

from model.data.bands import NUM_BANDS, band_of

Item = int | tuple[int, int, int]


def effective_lengths(lengths, crop_length: int | None) -> np.ndarray:
    """Residues an example contributes to a batch: min(L, crop); lengths [N] -> [N] int64."""
    lengths = np.asarray(lengths, dtype=np.int64)
    return lengths if crop_length is None else np.minimum(lengths, crop_length)


def crop_item(index: int, length: int, crop_length: int | None, rng: np.random.Generator) -> Item:
    """``index`` when the example fits, else ``(index, start, start + crop_length)``, start uniform."""
    if crop_length is None or length <= crop_length:
        return index
    start = int(rng.integers(0, length - crop_length + 1))
    return (index, start, start + crop_length)


def item_index(item: Item) -> int:
    return item if isinstance(item, int) else item[0]


class _Budget:
    """The batch budgets: largest batch size allowed at padded length P."""

    def __init__(self, batch_size, pad_to_multiple, max_residues, max_pair_elements):
        self.batch_size, self.multiple = int(batch_size), max(1, int(pad_to_multiple))
        self.max_residues, self.max_pair_elements = max_residues, max_pair_elements

    def padded(self, length: int) -> int:
        return -(-int(length) // self.multiple) * self.multiple

    def size(self, padded: int) -> int:
        size = self.batch_size
        if self.max_residues is not None:
            size = min(size, self.max_residues // padded)
        if self.max_pair_elements is not None:
            size = min(size, self.max_pair_elements // (padded * padded))
        return max(1, size)


class _ShardedSampler(DistributedSampler):
    """Shared DDP plumbing: subclasses build ``all_batches()`` (identical on every rank)."""

    def __init__(self, lengths, *, seed, num_replicas, rank, shuffle=True, drop_last=False):
        super().__init__(lengths, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=drop_last)
        self._memo = None  # (epoch, rank, world) and that epoch's batches of this rank

    def all_batches(self) -> list[list[Item]]:
        raise NotImplementedError

    def _sharded(self) -> list[list[Item]]:
        if self._memo is None or self._memo[0] != (self.epoch, self.rank, self.num_replicas):
            self._memo = ((self.epoch, self.rank, self.num_replicas), self._shard(self.all_batches()))
        return self._memo[1]

    def _shard(self, batches: list[list[Item]]) -> list[list[Item]]:
        world = self.num_replicas
        if world == 1:
            return batches
        if self.drop_last:
            per_rank = len(batches) // world
        else:
            per_rank = math.ceil(len(batches) / world)
            while batches and len(batches) < per_rank * world:  # wrap around to pad
                batches = batches + batches[: per_rank * world - len(batches)]
        return batches[self.rank : per_rank * world : world]

    def __iter__(self):
        return iter(self._sharded())

    def __len__(self) -> int:
        return len(self._sharded())


class LengthBucketBatchSampler(_ShardedSampler):
    """Every example once per epoch, chains of similar length together, sharded by rank.

    Per epoch (seeded by ``(seed, epoch)``, identical on every rank): shuffle the indices, cut them
    into pools of ``pool_batches * batch_size``, sort each pool by (cropped) length, cut pools into
    batches within the budgets (module doc), shuffle the batch order, then draw the crop windows.
    The pair budget bounds a pair-stack model's memory ([B, L, L, C_p] activations): it lets
    batches of short chains grow while long chains stay bounded. Rank r takes batches r, r + W,
    ...; the list is padded by wrapping (or trimmed with ``drop_last``) so every rank runs the same
    number of steps. Without ``shuffle`` (validation): one pool, sorted by length then index, and
    each long example's window fixed by ``(seed, index)``, the same every epoch.
    """

    def __init__(
        self,
        lengths: list[int],
        *,
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        drop_last: bool = False,
        pool_batches: int = 50,
        max_residues: int | None = None,
        max_pair_elements: int | None = None,
        crop_length: int | None = None,
        pad_to_multiple: int = 1,
    ):
        super().__init__(lengths, seed=seed, num_replicas=num_replicas, rank=rank, shuffle=shuffle,
                         drop_last=drop_last)
        self.lengths = np.asarray(lengths, dtype=np.int64)  # [N]
        self.crop_length = crop_length
        self.effective = effective_lengths(self.lengths, crop_length)  # [N]
        self.batch_size = int(batch_size)
        self.pool_batches = int(pool_batches)
        self.budget = _Budget(batch_size, pad_to_multiple, max_residues, max_pair_elements)

    def _cut(self, order: np.ndarray) -> list[list[int]]:
        batches, current, longest = [], [], 0
        for i in order.tolist():
            grown = max(longest, self.budget.padded(self.effective[i]))
            if current and len(current) + 1 > self.budget.size(grown):
                batches.append(current)
                current, grown = [], self.budget.padded(self.effective[i])
            current.append(i)
            longest = grown
        if current:
            batches.append(current)
        return batches

    def all_batches(self) -> list[list[Item]]:
        """Every batch of this epoch, before sharding (the same on every rank)."""
        n = len(self.lengths)
        if not self.shuffle:
            batches = self._cut(np.lexsort((np.arange(n), self.effective)))
            return [[crop_item(i, int(self.lengths[i]), self.crop_length, np.random.default_rng([self.seed, i]))
                     for i in batch] for batch in batches]
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(n)
        pool = max(1, self.pool_batches * self.batch_size)
        batches: list[list[int]] = []
        for start in range(0, n, pool):
            chunk = order[start : start + pool]
            batches.extend(self._cut(chunk[np.argsort(self.effective[chunk], kind="stable")]))
        batches = [batches[k] for k in rng.permutation(len(batches))]
        return [[crop_item(i, int(self.lengths[i]), self.crop_length, rng) for i in batch] for batch in batches]


class BandBalancedBatchSampler(_ShardedSampler):
    """A fixed number of batches per epoch, each from one length band drawn by weight (module doc).

    lengths [N]: uncropped example lengths (they decide the band); band_weights [NUM_BANDS]: >= 0,
    renormalised over the bands that hold examples. ``batches_per_epoch`` is the total over all
    ranks (rounded up to a multiple of the world size); None = about one pass over the examples.

    Inside a band, batches come from passes: a pass sorts the band's examples by (cropped) length,
    longest first, ties in a fresh random order, and cuts the list from the top into batches of
    exactly the size the budgets allow at each batch's padded length P (its first, longest member);
    the last batch takes that many from the bottom even if it repeats a few examples. Its batches are
    served in random order; when they run out, a new pass starts; every epoch starts afresh. So
    every example of a band is drawn once per pass, and batch shapes are a function of P.
    """

    def __init__(
        self,
        lengths: list[int],
        *,
        band_weights,
        batch_size: int,
        batches_per_epoch: int | None = None,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        max_residues: int | None = None,
        max_pair_elements: int | None = None,
        crop_length: int | None = None,
        pad_to_multiple: int = 1,
    ):
        super().__init__(lengths, seed=seed, num_replicas=num_replicas, rank=rank)
        self.lengths = np.asarray(lengths, dtype=np.int64)  # [N]
        self.crop_length = crop_length
        self.effective = effective_lengths(self.lengths, crop_length)  # [N]
        self.budget = _Budget(batch_size, pad_to_multiple, max_residues, max_pair_elements)
        self.padded = np.array([self.budget.padded(n) for n in self.effective], dtype=np.int64)  # [N]
        bands = band_of(self.lengths)  # [N]
        self.members = [np.nonzero(bands == b)[0] for b in range(NUM_BANDS)]
        weights = np.asarray(band_weights, dtype=np.float64) * [len(m) > 0 for m in self.members]
        if weights.shape != (NUM_BANDS,) or not weights.sum() > 0:
            raise ValueError(f"lengthBandWeights {list(band_weights)}: no training example in a band of "
                             f"weight > 0 (examples per band: {[len(m) for m in self.members]})")
        self.probabilities = weights / weights.sum()  # [NUM_BANDS]
        if batches_per_epoch is None:
            rng = np.random.default_rng(0)
            per_batch = sum(p * len(m) / len(self._pass(m, rng)) for p, m in zip(self.probabilities, self.members)
                            if p > 0)  # expected examples per batch
            batches_per_epoch = max(1, math.ceil(len(self.lengths) / per_batch))
        self.batches_per_epoch = math.ceil(batches_per_epoch / num_replicas) * num_replicas

    def _pass(self, members: np.ndarray, rng: np.random.Generator) -> list[list[int]]:
        """One pass over a band: its examples cut into budget-sized batches (class doc), in random order."""
        order = members[np.lexsort((rng.random(len(members)), -self.effective[members]))]  # longest first
        n, batches, i = len(order), [], 0
        while i < n:
            size = self.budget.size(int(self.padded[order[i]]))
            if i + size <= n:
                batches.append(order[i : i + size].tolist())
            else:  # the band's shortest: as many as fit, counted from the bottom (holds order[i:])
                k = 1
                while k < n and k + 1 <= self.budget.size(int(self.padded[order[n - k - 1]])):
                    k += 1  # order[n - k - 1] is the longest of the k + 1 last
                batches.append(order[n - k :].tolist())
            i += size
        return [batches[k] for k in rng.permutation(len(batches))]

    def all_batches(self) -> list[list[Item]]:
        """Every batch of this epoch, before sharding (the same on every rank, from ``(seed, epoch)``)."""
        rng = np.random.default_rng([self.seed, self.epoch])
        passes: list[list[list[int]]] = [[] for _ in range(NUM_BANDS)]
        batches = []
        for band in rng.choice(NUM_BANDS, size=self.batches_per_epoch, p=self.probabilities).tolist():
            if not passes[band]:
                passes[band] = self._pass(self.members[band], rng)
            batches.append(passes[band].pop())
        return [[crop_item(i, int(self.lengths[i]), self.crop_length, rng) for i in batch] for batch in batches]

    def describe(self) -> str:
        """Per band: share of batches, examples per batch, draws per example per epoch; batch shapes."""
        from model.data.bands import BAND_NAMES

        rng = np.random.default_rng(self.seed)
        lines = [f"band-balanced batches: {self.batches_per_epoch} per epoch (all ranks)"]
        shapes = set()
        for b, members in enumerate(self.members):
            if not len(members):
                lines.append(f"  {BAND_NAMES[b]:>8}: no examples")
                continue
            one_pass = self._pass(members, rng)
            shapes |= {(len(batch), int(self.padded[batch].max())) for batch in one_pass}
            per_batch = sum(map(len, one_pass)) / len(one_pass)
            draws = self.probabilities[b] * self.batches_per_epoch * per_batch / len(members)
            lines.append(f"  {BAND_NAMES[b]:>8}: {self.probabilities[b]:.1%} of batches, {per_batch:.1f} "
                         f"examples per batch, each example drawn {draws:.2f} times per epoch")
        lines.append(f"  {len(shapes)} batch shapes (B x padded L), largest {max(b * p for b, p in shapes):,} "
                     f"padded residues")
        return "\n".join(lines)
