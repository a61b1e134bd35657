"""Length-bucketed, masked batches of CA traces for Lightning, DDP-aware.

Source: Genie's data loader pads every chain to ``maximumNumResidues``; here batches hold chains
of similar length and are padded to the batch's longest chain only.
NOTE: deliberate difference from Genie - padding to the batch maximum, not the global maximum
(same model outputs, since padding never changes real residues; much less compute).

Batch (a dict): ``x0`` [B, L, 3] float32 CA coordinates centred on the real residues (zeros on
padding), ``mask`` [B, L] float32 (1 residue, 0 padding), ``lengths`` [B] long, ``ids`` list[str].

The samplers (`model.data.sampling`) decide which examples, which crop windows and which batches;
the dataset turns one sampled batch (a list of items) into the dict above. Training uses
`BandBalancedBatchSampler` when the config sets ``lengthBandWeights``, else
`LengthBucketBatchSampler`; validation always the latter, unshuffled (each chain once, fixed crops).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from model.data.bands import parse_band_weights
from model.data.build import BuildSummary
from model.data.parse import Chain
from model.data.sampling import BandBalancedBatchSampler, LengthBucketBatchSampler
from model.data.sources import sources_from_config
from model.data.split import TRAIN, VAL, training_set


class ChainDataset(Dataset):
    """Chains indexed by lists of items: ``dataset[[i, (j, start, stop), k]]`` -> one padded batch
    dict; an item is a position (the whole chain) or a position with a window (a crop)."""

    def __init__(self, chains: list[Chain], *, pad_to_multiple: int = 1):
        self.chains = list(chains)
        self.lengths = [len(c) for c in self.chains]
        self.pad_to_multiple = pad_to_multiple

    def __len__(self) -> int:
        return len(self.chains)

    def __getitem__(self, items) -> dict:
        if isinstance(items, int):
            items = [items]
        return collate([self._example(item) for item in items], pad_to_multiple=self.pad_to_multiple)

    def _example(self, item) -> Chain:
        if isinstance(item, (int, np.integer)):
            return self.chains[item]
        i, start, stop = item
        return crop(self.chains[i], start, stop)


def crop(chain: Chain, start: int, stop: int) -> Chain:
    """The window start:stop of a chain, under the same id (collate re-centres it)."""
    if not 0 <= start < stop <= len(chain):
        raise ValueError(f"crop {start}:{stop} outside chain {chain.id} of {len(chain)} residues")
    return Chain(id=chain.id, sequence=chain.sequence[start:stop], ca=chain.ca[start:stop],
                 residue_index=chain.residue_index[start:stop], source=chain.source, path=chain.path,
                 num_breaks=chain.num_breaks, num_dropped=chain.num_dropped + len(chain) - (stop - start))


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


class ProteinDataModule(LightningDataModule):
    """Chains from ``config.datasetNames`` (or given ``chains``), split by sequence, bucketed.

    Config keys: the data recipe's (`model.data.split.training_set`), batchSize, cropLength,
    lengthBandWeights, batchesPerEpoch, maxResiduesPerBatch (``max_residues_per_batch`` overrides
    it), numDataWorkers, seed. ``prepare_data`` (rank 0 of each node) builds / refreshes the cache;
    ``setup`` reads it. Given ``chains`` (parsed or packed) go through the same recipe.
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
        # given chains need no sources (a packed set on a machine without them)
        self.sources = sources if sources is not None or chains is not None else sources_from_config(config)
        self.cache_dir = cache_dir
        self.max_residues_per_batch = (
            max_residues_per_batch if max_residues_per_batch is not None else config.maxResiduesPerBatch
        )
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
                f"maximumNumResidues={cfg.maximumNumResidues} in "
                + (str(self.sources) if self._given is None else "the given chains")
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

    def _sampler(self, dataset: ChainDataset, shuffle: bool):
        cfg, (world, rank) = self.config, self._rank()
        common = {
            "batch_size": cfg.batchSize,
            "seed": cfg.seed,
            "num_replicas": world,
            "rank": rank,
            "max_residues": self.max_residues_per_batch,
            "max_pair_elements": self.max_pair_elements_per_batch,
            "crop_length": cfg.cropLength,
            "pad_to_multiple": self.pad_to_multiple,
        }
        if shuffle and cfg.lengthBandWeights is not None:
            return BandBalancedBatchSampler(
                dataset.lengths,
                band_weights=parse_band_weights(cfg.lengthBandWeights),
                batches_per_epoch=cfg.batchesPerEpoch,
                **common,
            )
        return LengthBucketBatchSampler(dataset.lengths, shuffle=shuffle, **common)

    def _loader(self, dataset: ChainDataset, shuffle: bool) -> DataLoader:
        workers = self.config.numDataWorkers
        return DataLoader(
            dataset,
            batch_size=None,  # the sampler yields whole batches
            sampler=self._sampler(dataset, shuffle),
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
