"""Parsed chains -> unbroken training examples: what happens at a chain break.

A chain break is a step between consecutive kept CA atoms longer than ``BREAK_DISTANCE`` (4.2 A;
`model.data.parse`), usually residues missing from the model. The denoiser assumes a contiguous
trace (Frenet-Serret frames from consecutive CA atoms, 3.8 A steps) and its batches carry no break
flags, so a break is never glued over: it would show the model a fake 10+ A step.

Two modes (config ``chainBreaks``):

- ``segments`` (default): every unbroken segment of a broken chain with at least
  ``minimumSegmentLength`` residues becomes its own example, id ``<chain id>/seg<k>``, where k counts
  all segments of the chain from 0 in chain order (short ones included, so an id does not depend on
  the minimum). Shorter pieces are dropped: a few dozen residues cut out of a larger fold are not a
  fold of their own. An unbroken chain is one example under its own id, whatever its length (the
  length filter ``minimumNumResidues`` still applies).
- ``longest``: only the longest segment (ties: the first), under the chain's own id. Cuts only
  residues; kept to reproduce training sets made this way.

Cutting is idempotent (an example has no break, so it comes back unchanged), so packed examples can
be passed through it again. `resolve_example` finds any example id of either mode in parsed chains
(``build_dataset(..., chain_breaks=None)`` returns them uncut), so an index made in either mode can be
matched against the sources.
"""

from __future__ import annotations

import itertools
import re
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from model.data.parse import Chain, break_positions

SEGMENTS, LONGEST = "segments", "longest"
MODES = (SEGMENTS, LONGEST)
_SEGMENT_ID = re.compile(r"^(?P<parent>.+)/seg(?P<k>\d+)$")


@dataclass
class SourceCounts:
    """Chains, examples and residues of one source: what cutting kept and dropped (the builder
    subtracts what the length filter removes and records it in ``dropped_length``)."""

    chains: int = 0  # parsed chains
    broken: int = 0  # chains with at least one break
    breaks: int = 0
    examples: int = 0  # whole chains + segments kept
    segments: int = 0  # kept examples that are a piece of a broken chain
    residues: int = 0  # residues in the kept examples
    dropped_cut: int = 0  # residues cut away: short segments, or outside the longest segment
    dropped_length: int = 0  # residues of examples outside minimumNumResidues..maximumNumResidues

    def format(self, mode: str | None, min_segment_length: int) -> str:
        cut = {SEGMENTS: f"in segments < {min_segment_length}", LONGEST: "outside the longest segment"}.get(
            mode, "by cutting (chains uncut)")
        return (f"{self.chains} chains ({self.broken} broken, {self.breaks} breaks) -> {self.examples} "
                f"examples ({self.segments} segments), {self.residues:,} residues kept; dropped "
                f"{self.dropped_cut:,} {cut}, {self.dropped_length:,} by the length filter")


def segment_bounds(ca: np.ndarray) -> list[tuple[int, int]]:
    """(start, stop) of every unbroken segment of ca [L, 3], in chain order."""
    cuts = break_positions(ca).tolist()
    edges = [0, *cuts, int(ca.shape[0])]
    return list(itertools.pairwise(edges))


def parent_id(example_id: str) -> str:
    """``src:1abc_A/seg2`` -> ``src:1abc_A``; an id without a segment suffix is its own parent."""
    match = _SEGMENT_ID.match(example_id)
    return match["parent"] if match else example_id


def _piece(chain: Chain, start: int, stop: int, new_id: str) -> Chain:
    index = chain.residue_index[start:stop]
    return Chain(
        id=new_id,
        sequence=chain.sequence[start:stop],
        ca=chain.ca[start:stop],
        residue_index=(index - index[0]).astype(np.int32) if len(index) else index,
        source=chain.source,
        path=chain.path,
        num_breaks=chain.num_breaks,
        num_dropped=chain.num_dropped + len(chain) - (stop - start),
    )


def cut_chain(chain: Chain, *, mode: str | None = SEGMENTS, min_segment_length: int = 40) -> list[Chain]:
    """One parsed chain -> its training examples (rules in the module doc); mode None: uncut."""
    if mode is not None and mode not in MODES:
        raise ValueError(f"chainBreaks {mode!r}: use one of {', '.join(MODES)}")
    bounds = segment_bounds(chain.ca)
    if mode is None or len(bounds) <= 1:
        return [chain]
    if mode == LONGEST:
        sizes = [stop - start for start, stop in bounds]
        start, stop = bounds[int(np.argmax(sizes))]  # argmax: the first of equal maxima
        return [_piece(chain, start, stop, chain.id)]
    return [
        _piece(chain, start, stop, f"{chain.id}/seg{k}")
        for k, (start, stop) in enumerate(bounds)
        if stop - start >= min_segment_length
    ]


def cut_chains(
    chains: list[Chain], *, mode: str | None = SEGMENTS, min_segment_length: int = 40
) -> tuple[list[Chain], dict[str, SourceCounts]]:
    """Cut every chain; -> (examples in input order, {source: SourceCounts})."""
    examples: list[Chain] = []
    stats: dict[str, SourceCounts] = defaultdict(SourceCounts)
    for chain in chains:
        pieces = cut_chain(chain, mode=mode, min_segment_length=min_segment_length)
        s = stats[chain.source]
        s.chains += 1
        s.broken += chain.num_breaks > 0
        s.breaks += chain.num_breaks
        s.examples += len(pieces)
        s.segments += sum(p.id != chain.id for p in pieces)
        kept = sum(len(p) for p in pieces)
        s.residues += kept
        s.dropped_cut += len(chain) - kept
        examples.extend(pieces)
    return examples, dict(stats)


def resolve_example(example_id: str, chains_by_id: dict[str, Chain]) -> Chain | None:
    """The example named ``example_id`` (either mode's ids) cut from parsed chains {id: Chain}.

    ``x/seg<k>`` is segment k of chain x; a plain id is the chain's longest segment, which is the
    whole chain when it is unbroken. None when the chain or segment does not exist.
    """
    match = _SEGMENT_ID.match(example_id)
    chain = chains_by_id.get(match["parent"] if match else example_id)
    if chain is None:
        return None
    if match is None:
        return cut_chain(chain, mode=LONGEST)[0]
    bounds = segment_bounds(chain.ca)
    k = int(match["k"])
    if len(bounds) < 2 or k >= len(bounds):
        return None
    start, stop = bounds[k]
    return _piece(chain, start, stop, example_id)
