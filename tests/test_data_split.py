"""The validation split stratified by length band: every band has validation chains, and no
sequence, chain or shared 30-residue run straddles the split."""

from __future__ import annotations

import random

import numpy as np
import pytest
from test_data import toy_chains

from model.config import Config, ConfigError, parse_config
from model.data import Chain, band_of, split_by_band, split_by_sequence
from model.data.bands import NUM_BANDS
from model.data.segments import parent_id
from model.data.split import SHARED_RUN, split_table, training_set

# 12 lengths per band, odd sizes; then identical copies, segments of one chain, a point mutant
LENGTHS = [21 + 3 * k for k in range(12)] + [67 + 5 * k for k in range(12)] + [131 + 9 * k for k in range(12)] \
    + [259 + 19 * k for k in range(12)] + [515 + 41 * k for k in range(12)]


def with_relatives(chains: list[Chain]) -> list[Chain]:
    """Adds, per band, a copy of a chain (same sequence), two segments of one chain (different
    sequences, ids ``x/seg0``, ``x/seg2``) and a point mutant (one residue changed)."""
    extra = []
    for k, chain in enumerate(chains[::12]):
        copy = Chain(id=f"copy:{k}", sequence=chain.sequence, ca=chain.ca, residue_index=chain.residue_index,
                     source="copy")
        half = len(chain) // 2
        segs = [Chain(id=f"toy:whole{k}/seg{j}", sequence=s, ca=c, residue_index=np.arange(len(s), dtype=np.int32),
                      source="toy") for j, (s, c) in ((0, (chain.sequence[:half][::-1], chain.ca[:half])),
                                                      (2, (chain.sequence[half:][::-1], chain.ca[half:])))]
        mutant_seq = chain.sequence[:-1] + ("A" if chain.sequence[-1] != "A" else "C")
        mutant = Chain(id=f"mut:{k}", sequence=mutant_seq, ca=chain.ca, residue_index=chain.residue_index,
                       source="mut")
        extra += [copy, *segs, mutant]
    return chains + extra


def sides(assignment, chains, key):
    groups = {}
    for chain in chains:
        groups.setdefault(key(chain), set()).add(assignment[chain.id])
    return groups


def test_every_band_has_validation_chains_and_relatives_stay_together():
    chains = with_relatives(toy_chains(LENGTHS, seed=4))
    split = split_by_band(chains, fraction=0.1, seed=7)
    bands = band_of([len(c) for c in chains])
    for band in range(NUM_BANDS):
        in_band = [split[c.id] for c, b in zip(chains, bands) if b == band]
        assert "val" in in_band and "train" in in_band
    assert all(len(s) == 1 for s in sides(split, chains, lambda c: c.sequence).values())
    assert all(len(s) == 1 for s in sides(split, chains, lambda c: parent_id(c.id)).values())
    runs = {}
    for chain in chains:  # no 30-residue run on both sides (the mutants share 29 of 30 with their parent)
        for i in range(len(chain.sequence) - SHARED_RUN + 1):
            runs.setdefault(chain.sequence[i : i + SHARED_RUN], set()).add(split[chain.id])
    assert all(len(s) == 1 for s in runs.values())
    shuffled = chains[:]
    random.Random(2).shuffle(shuffled)
    assert split_by_band(shuffled, fraction=0.1, seed=7) == split  # order does not matter
    assert split_by_band(chains, fraction=0.1, seed=8) != split


def test_one_band_without_relatives_is_the_plain_sequence_split():
    chains = toy_chains([30 + k // 2 % 20 for k in range(60)], seed=1, groups=[k // 2 for k in range(60)])
    assert split_by_band(chains, fraction=0.15, seed=3) == split_by_sequence(chains, fraction=0.15, seed=3)


def test_training_set_picks_the_split_by_config():
    chains = toy_chains(LENGTHS, seed=5)
    config = Config().replace(maximumNumResidues=1024, validationFraction=0.1, seed=2)
    _, by_band, _ = training_set(config, chains=chains, verbose=False)
    _, plain, _ = training_set(config.replace(validationByLengthBand=False), chains=chains, verbose=False)
    assert plain == split_by_sequence(chains, fraction=0.1, seed=2) != by_band
    table = split_table(chains, by_band)
    assert "256-511" in table and "11/1" in table  # 12 chains per band: one held out in each


def test_band_weight_key_is_checked_at_load_time():
    assert parse_config("lengthBandWeights 1,1,2,2,0.5\ncropLength 384\n").cropLength == 384
    with pytest.raises(ConfigError, match=r"run.txt, line 2, key 'lengthBandWeights': expected 5"):
        parse_config("seed 1\nlengthBandWeights 1,2\n", source="run.txt")
    with pytest.raises(ConfigError, match="not all 0"):
        parse_config("lengthBandWeights 0,0,0,0,0\n")
    with pytest.raises(ConfigError, match="chainBreaks"):
        parse_config("chainBreaks glue\n")
