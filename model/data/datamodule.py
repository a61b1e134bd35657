"""Length-bucketed, masked batches of CA traces for Lightning, DDP-aware.

Source: Genie's data loader pads every chain to ``maximumNumResidues``; here batches hold chains
of similar length and are padded to the batch's longest chain only.
NOTE: deliberate difference from Genie - padding to the batch maximum, not the global maximum
(same model outputs, since padding never changes real residues; much less compute).

Batch (a dict): ``x0`` [B, L, 3] float32 CA coordinates centred on the real residues (zeros on
padding), ``mask`` [B, L] float32 (1 residue, 0 padding), ``lengths`` [B] long, ``ids`` list[str].

Distributed: `LengthBucketBatchSampler` shards whole batches by rank itself. It subclasses
``DistributedSampler`` and is passed as the DataLoader's ``sampler`` with ``batch_size=None``
(each "sample" it yields is a list of indices; the dataset turns a list into a batch), so
Lightning's ``use_distributed_sampler`` sees a distributed sampler already and leaves it alone,
and still calls ``set_epoch`` on it every epoch.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from model.data.build import BuildSummary
from model.data.parse import Chain
from model.data.sources import sources_from_config
from model.data.split import TRAIN, VAL, training_set


class ChainDataset(Dataset):
    """Chains indexed by lists of positions: ``dataset[[i, j, k]]`` -> one padded batch dict."""

    def __init__(self, chains: list[Chain], *, pad_to_multiple: int = 1):
        self.chains = list(chains)
        self.lengths = [len(c) for c in self.chains]
        self.pad_to_multiple = pad_to_multiple

    def __len__(self) -> int:
        return len(self.chains)

    def __getitem__(self, indices) -> dict:
        if isinstance(indices, int):
            indices = [indices]
        return collate([self.chains[i] for i in indices], pad_to_multiple=self.pad_to_multiple)


def collate(chains: list[Chain], *, pad_to_multiple: int = 1) -> dict:
    """Pad to the longest chain of the batch (rounded up to ``pad_to_multiple``: fewer distinct
    shapes for ``torch.compile``); centre each chain on its own residues."""
    lengths = torch.tensor([len(c) for c in chains], dtype=torch.long)  # [B]
    size = int(lengths.max()) if len(chains) else 0
    size = -(-size // pad_to_multiple) * pad_to_multiple
    x0 = torch.zeros(len(chains), size, 3, dtype=torch.float32)  # [B, L, 3]
    mask = torch.zeros(len(chains), size, dtype=torch.float32)  # [B, L]
    for b, chain in enumerate(chains):
        ca = torch.from_numpy(np.asarray(chain.ca, dtype=np.float32))  # [L_b, 3]
        x0[b, : len(chain)] = ca - ca.mean(dim=0, keepdim=True)
        mask[b, : len(chain)] = 1.0
    return {"x0": x0, "mask": mask, "lengths": lengths, "ids": [c.id for c in chains]}


class LengthBucketBatchSampler(DistributedSampler):
    """Yields lists of dataset indices: chains of similar length together, sharded by rank.

    Per epoch (seeded by ``(seed, epoch)``, identical on every rank): shuffle the indices, cut them
    into pools of ``pool_batches * batch_size``, sort each pool by length, cut pools into batches
    (at most ``batch_size`` chains and, if given, at most ``max_residues`` padded residues B * L_max and
    at most ``max_pair_elements`` padded pair entries B * L_max^2), then shuffle the batch order.
    The pair budget is the one that bounds a pair-stack model's memory and work ([B, L, L, C_p]
    activations): it lets batches of short chains grow while long chains stay bounded. Rank r takes batches r, r + W, ...; the list is padded by wrapping
    (or trimmed with ``drop_last``) so every rank runs the same number of steps.
    Without ``shuffle``: one pool, sorted by length then index (validation).
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
    ):
        super().__init__(
            lengths, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last
        )
        self.lengths = np.asarray(lengths, dtype=np.int64)  # [N]
        self.batch_size = int(batch_size)
        self.pool_batches = int(pool_batches)
        self.max_residues = max_residues
        self.max_pair_elements = max_pair_elements

    def _cut(self, order: np.ndarray) -> list[list[int]]:
        batches, current, longest = [], [], 0
        for i in order.tolist():
            grown = max(longest, int(self.lengths[i]))
            size = len(current) + 1
            over_budget = ((self.max_residues is not None and size * grown > self.max_residues)
                           or (self.max_pair_elements is not None and size * grown * grown > self.max_pair_elements))
            if current and (len(current) == self.batch_size or over_budget):
                batches.append(current)
                current, grown = [], int(self.lengths[i])
            current.append(i)
            longest = grown
        if current:
            batches.append(current)
        return batches

    def all_batches(self) -> list[list[int]]:
        """Every batch of this epoch, before sharding (the same on every rank)."""
        n = len(self.lengths)
        if not self.shuffle:
            return self._cut(np.lexsort((np.arange(n), self.lengths)))
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(n)
        pool = max(1, self.pool_batches * self.batch_size)
        batches: list[list[int]] = []
        for start in range(0, n, pool):
            chunk = order[start : start + pool]
            batches.extend(self._cut(chunk[np.argsort(self.lengths[chunk], kind="stable")]))
        return [batches[k] for k in rng.permutation(len(batches))]

    def _sharded(self) -> list[list[int]]:
        batches = self.all_batches()
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


class ProteinDataModule(LightningDataModule):
    """Chains from ``config.datasetNames`` (or given ``chains``), split by sequence, bucketed.

    Config keys: datasetNames, dataDirectory, minimumNumResidues, maximumNumResidues,
    datasetSize, validationFraction, batchSize, numDataWorkers, seed.
    ``prepare_data`` (rank 0 of each node) builds / refreshes the cache; ``setup`` reads it.
    """

    def __init__(
        self,
        config,
        *,
        chains: list[Chain] | None = None,
        sources: list | None = None,
        cache_dir: str | Path | None = None,
        max_residues_per_batch: int | None = None,
        max_pair_elements_per_batch: int | None = None,
        pad_to_multiple: int = 1,
        verbose: bool = True,
    ):
        super().__init__()
        self.config = config
        self._given = chains
        self.sources = sources if sources is not None else sources_from_config(config)
        self.cache_dir = cache_dir
        self.max_residues_per_batch = max_residues_per_batch
        self.max_pair_elements_per_batch = max_pair_elements_per_batch
        self.pad_to_multiple = pad_to_multiple
        self.verbose = verbose
        self.summary: BuildSummary | None = None
        self.assignment: dict[str, str] = {}
        self.train_set: ChainDataset | None = None
        self.val_set: ChainDataset | None = None

    def prepare_data(self) -> None:
        if self._given is None:  # parse new / changed files into the cache, once per node
            self.summary = training_set(
                self.config, sources=self.sources, cache_dir=self.cache_dir, verbose=self.verbose
            )[2]

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        cfg = self.config
        chains, self.assignment, summary = training_set(
            cfg, sources=self.sources, cache_dir=self.cache_dir, chains=self._given, verbose=False
        )
        self.summary = summary or self.summary
        if not chains:
            raise ValueError(
                f"no chains between minimumNumResidues={cfg.minimumNumResidues} and "
                f"maximumNumResidues={cfg.maximumNumResidues} in {self.sources}"
            )
        pad = self.pad_to_multiple
        self.train_set = ChainDataset(
            [c for c in chains if self.assignment[c.id] == TRAIN], pad_to_multiple=pad
        )
        self.val_set = ChainDataset([c for c in chains if self.assignment[c.id] == VAL], pad_to_multiple=pad)

    def _rank(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return int(trainer.world_size), int(trainer.global_rank)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_world_size(), torch.distributed.get_rank()
        return 1, 0

    def _loader(self, dataset: ChainDataset, shuffle: bool) -> DataLoader:
        world, rank = self._rank()
        sampler = LengthBucketBatchSampler(
            dataset.lengths,
            batch_size=self.config.batchSize,
            shuffle=shuffle,
            seed=self.config.seed,
            num_replicas=world,
            rank=rank,
            max_residues=self.max_residues_per_batch,
            max_pair_elements=self.max_pair_elements_per_batch,
        )
        workers = self.config.numDataWorkers
        return DataLoader(
            dataset,
            batch_size=None,  # the sampler yields whole batches
            sampler=sampler,
            collate_fn=_identity,
            num_workers=workers,
            persistent_workers=workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)


def _identity(batch: dict) -> dict:
    return batch
