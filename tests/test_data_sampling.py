"""Crops and batch samplers: windows (length, contiguity, centring, per-epoch randomness, seeded
determinism), band-balanced batches (band shares, budgets, shapes, DDP shards), and the DataModule
built from packed examples batching exactly as from the originals."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from test_data import ATOL_CENTRE, toy_chains

from model.config import Config
from model.data.bands import BAND_EDGES, NUM_BANDS, band_of, parse_band_weights
from model.data.datamodule import ChainDataset, ProteinDataModule
from model.data.sampling import BandBalancedBatchSampler, LengthBucketBatchSampler, crop_item, item_index

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from pack_chains import pack, unpack, unpack_split

CROP = 48
# lengths in every band, odd sizes: 30 short, 24 of 64-127, 16 of 128-255, 9 of 256-511, 5 of 512+
BAND_LENGTHS = ([21 + (7 * k) % 43 for k in range(30)] + [64 + (11 * k) % 64 for k in range(24)]
                + [128 + (29 * k) % 128 for k in range(16)] + [256 + (53 * k) % 256 for k in range(9)]
                + [512 + 37 * k for k in range(5)])


def windows(sampler) -> list[list]:
    return [list(b) for b in sampler]


# ----------------------------------------------------------------------------- crops
def test_crop_item_is_a_uniform_window_of_exact_length():
    rng = np.random.default_rng(0)
    assert crop_item(3, 40, CROP, rng) == 3 and crop_item(3, 40, None, rng) == 3  # fits: whole
    starts = []
    for _ in range(400):
        i, start, stop = crop_item(5, 61, CROP, rng)
        assert i == 5 and stop - start == CROP and 0 <= start and stop <= 61
        starts.append(start)
    assert set(starts) == set(range(61 - CROP + 1))  # every position reachable, ends included


def test_cropped_batches_are_contiguous_centred_windows():
    chains = toy_chains([23, 97, 130, 40, 211])
    data = ChainDataset(chains, pad_to_multiple=16)
    sampler = LengthBucketBatchSampler(data.lengths, batch_size=3, seed=5, crop_length=CROP, pad_to_multiple=16)
    seen = 0
    for items in sampler:
        batch = data[items]
        assert batch["x0"].shape[1] == 48 and batch["lengths"].max() <= CROP
        for b, item in enumerate(items):
            chain, n = chains[item_index(item)], int(batch["lengths"][b])
            start, stop = (0, len(chain)) if isinstance(item, int) else item[1:]
            assert n == min(len(chain), CROP) == stop - start
            x = batch["x0"][b, :n]
            assert x.mean(0).abs().max() < ATOL_CENTRE  # re-centred on the window
            window = chain.ca[start:stop]
            torch.testing.assert_close(x, torch.from_numpy(window - window.mean(0)), atol=1e-4, rtol=0)
            assert batch["mask"][b, n:].eq(0).all() and batch["mask"][b, :n].eq(1).all()
            seen += 1
    assert seen == len(chains)


def test_crops_change_across_epochs_and_repeat_for_a_seed():
    lengths = [30, 200, 301, 150, 77, 512]
    a = LengthBucketBatchSampler(lengths, batch_size=2, seed=9, crop_length=CROP)
    b = LengthBucketBatchSampler(lengths, batch_size=2, seed=9, crop_length=CROP)
    first = windows(a)
    assert first == windows(b)  # same seed and epoch: same batches and windows (every rank agrees)
    crops = {item for batch in first for item in batch if not isinstance(item, int)}
    assert {i for i, _, _ in crops} == {1, 2, 3, 4, 5}  # longer than the crop: cropped
    a.set_epoch(1)
    later = {item for batch in windows(a) for item in batch if not isinstance(item, int)}
    assert later != crops and {i for i, _, _ in later} == {1, 2, 3, 4, 5}
    val = LengthBucketBatchSampler(lengths, batch_size=2, seed=9, crop_length=CROP, shuffle=False)
    fixed = windows(val)
    val.set_epoch(3)
    assert windows(val) == fixed  # validation windows do not move between epochs


# ----------------------------------------------------------------------------- band balancing
def balanced(weights="1,1,1,1,1", **kw):
    args = {"batch_size": 12, "seed": 4, "max_residues": 2048, "crop_length": 400, "pad_to_multiple": 16,
            "batches_per_epoch": 200}
    args.update(kw)
    return BandBalancedBatchSampler(BAND_LENGTHS, band_weights=parse_band_weights(weights), **args)


def test_band_shares_follow_the_weights_within_the_budgets():
    weights = parse_band_weights("1,2,1,3,1")
    sampler = balanced("1,2,1,3,1")
    lengths, bands = np.array(BAND_LENGTHS), band_of(BAND_LENGTHS)
    counts, drawn = Counter(), Counter()
    for epoch in range(10):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == 200  # an epoch is a fixed number of batches
        for batch in batches:
            idx = [item_index(item) for item in batch]
            assert len(set(bands[idx])) == 1 and len(set(idx)) == len(idx)  # one band, no repeats
            counts[int(bands[idx[0]])] += 1
            drawn.update(idx)
            effective = [n if isinstance(item, int) else item[2] - item[1] for n, item in zip(lengths[idx], batch)]
            padded = -(-max(effective) // 16) * 16
            assert len(batch) * padded <= 2048 and len(batch) <= 12 and max(effective) <= 400
    target = weights / weights.sum()
    for band in range(NUM_BANDS):  # 2000 batches: 3 standard deviations of a binomial share
        assert abs(counts[band] / 2000 - target[band]) < 3 * np.sqrt(target[band] * (1 - target[band]) / 2000)
    assert set(drawn) == set(range(len(BAND_LENGTHS)))  # every example drawn


def test_batch_size_is_a_function_of_padded_length():
    sampler, rng = balanced(), np.random.default_rng(1)
    for members in sampler.members:
        for _ in range(5):  # passes: ties in a new order each time
            one_pass = sampler._pass(members, rng)
            drawn = [i for b in one_pass for i in b]
            assert set(drawn) == set(members.tolist()) and len(drawn) < len(members) + 12  # all; few twice
            sizes = [(len(b), min(12, 2048 // int(sampler.padded[b].max()))) for b in one_pass]
            assert all(n <= allowed for n, allowed in sizes)
            short = [n for n, allowed in sizes if n < allowed]
            assert len(short) <= 1 and (not short or short[0] == len(members) or len(one_pass) > 1)


def test_zero_weight_band_is_never_drawn_and_empty_weights_are_refused():
    sampler = balanced("1,0,1,0,0")
    bands = {int(band_of([BAND_LENGTHS[item_index(batch[0])]])[0]) for batch in sampler}
    assert bands == {0, 2}
    with pytest.raises(ValueError, match="no training example in a band of weight > 0"):
        BandBalancedBatchSampler([30, 40], band_weights=parse_band_weights("0,1,1,1,1"), batch_size=4)


def test_balanced_sampler_is_seeded_and_ddp_ranks_are_disjoint():
    one = balanced(batches_per_epoch=31)
    assert len(one) == 31 and windows(one) == windows(balanced(batches_per_epoch=31))
    one.set_epoch(2)
    assert windows(one) != windows(balanced(batches_per_epoch=31))
    ranks = [balanced(batches_per_epoch=31, num_replicas=3, rank=r) for r in range(3)]
    for r in ranks:
        r.set_epoch(2)
    shards = [windows(r) for r in ranks]
    assert [len(s) for s in shards] == [11, 11, 11]  # 31 rounded up to a multiple of 3, split evenly
    whole = balanced(batches_per_epoch=33)
    whole.set_epoch(2)
    everything = windows(whole)  # what every rank builds
    assert shards == [everything[r::3] for r in range(3)]  # disjoint positions, together all


def test_default_epoch_is_about_one_pass():
    sampler = balanced(batches_per_epoch=None)
    drawn = sum(len(b) for b in sampler)
    assert 0.7 * len(BAND_LENGTHS) <= drawn <= 1.5 * len(BAND_LENGTHS)


def test_band_edges():
    assert band_of([20, 63, 64, 127, 128, 255, 256, 511, 512, 4000]).tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert BAND_EDGES == (64, 128, 256, 512)


# ----------------------------------------------------------------------------- DataModule, packing
def test_datamodule_from_packed_examples_batches_as_from_the_originals(tmp_path):
    config = Config().replace(batchSize=8, minimumNumResidues=20, maximumNumResidues=700, validationFraction=0.2,
                              cropLength=200, lengthBandWeights="1,1,1,2,1", maxResiduesPerBatch=1024, seed=3)
    chains = toy_chains(BAND_LENGTHS, seed=2)
    first = ProteinDataModule(config, chains=chains, pad_to_multiple=16, verbose=False)
    first.setup("fit")
    assert {int(b) for b in band_of([len(c) for c in first.val_set.chains])} == set(range(NUM_BANDS))
    pack(first.train_set.chains + first.val_set.chains, first.assignment, tmp_path / "chains.npz")
    assert unpack_split(tmp_path / "chains.npz") == first.assignment
    second = ProteinDataModule(config, chains=unpack(tmp_path / "chains.npz"), pad_to_multiple=16, verbose=False)
    second.setup("fit")
    assert second.assignment == first.assignment
    loaders = [dm.train_dataloader() for dm in (first, second)]
    assert isinstance(loaders[0].sampler, BandBalancedBatchSampler)
    for a, b in zip(*loaders):
        assert a["ids"] == b["ids"]
        torch.testing.assert_close(a["x0"], b["x0"])
        assert a["x0"].shape[0] * a["x0"].shape[1] <= 1024 and a["x0"].shape[1] % 16 == 0
        assert int(a["lengths"].max()) <= 200
    val = [batch["ids"] for batch in first.val_dataloader()]
    assert sorted(i for ids in val for i in ids) == sorted(c.id for c in first.val_set.chains)
