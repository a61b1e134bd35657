"""Build the example set from sources, through the cache, with a kept / skipped summary.

Source: Genie builds its training set once from SCOPe domain files; here the builder is
incremental (`model.data.cache`) and never stops on a bad file: each failure is recorded with its
reason (codes in `model.data.parse`) and the build ends with a `BuildSummary`. The cache holds
whole parsed chains; cutting them at breaks (`model.data.segments`) and the length filter come
after it, so changing those keys never re-parses a file.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from model.data import cache as cache_io
from model.data.parse import (
    PARSER_VERSION,
    Chain,
    ParseError,
    parse_cgdms_file,
    parse_structure_file,
)
from model.data.segments import SEGMENTS, SourceCounts, cut_chains, parent_id
from model.data.sources import CGDMS, Source, resolve_sources


@dataclass(frozen=True)
class Skipped:
    """One thing left out: a file (``chain`` empty) or a chain, with its reason code."""

    source: str
    path: str
    reason: str
    detail: str = ""
    chain: str = ""


@dataclass
class BuildSummary:
    """What a build kept and why it left the rest out; ``format()`` is what gets printed."""

    chains_kept: int = 0  # examples (whole chains or segments) after the length filter
    kept_by_source: dict[str, int] = field(default_factory=dict)
    by_source: dict[str, SourceCounts] = field(default_factory=dict)
    chain_breaks: str | None = SEGMENTS
    min_segment_length: int = 40
    files_total: int = 0
    files_parsed: int = 0  # parsed in this run
    files_cached: int = 0  # reused from the cache (not parsed)
    skipped_by_reason: dict[str, int] = field(default_factory=dict)  # files and chains
    skipped: list[Skipped] = field(default_factory=list)
    chains_total: int = 0  # examples before the length filter
    seconds: float = 0.0

    def format(self, max_listed: int = 20) -> str:
        lines = [
            (
                f"data build: kept {self.chains_kept} of {self.chains_total} examples "
                f"from {self.files_total} files ({self.files_parsed} parsed, "
                f"{self.files_cached} from cache) in {self.seconds:.1f} s"
            ),
            f"  chain breaks: {self.chain_breaks}"
            + (f" (minimumSegmentLength {self.min_segment_length})" if self.chain_breaks == SEGMENTS else ""),
            *(f"  {name}: {counts.format(self.chain_breaks, self.min_segment_length)}"
              for name, counts in sorted(self.by_source.items())),
            "  kept by source: "
            + (", ".join(f"{k} {v}" for k, v in sorted(self.kept_by_source.items())) or "none"),
            "  skipped by reason: "
            + (", ".join(f"{k} {v}" for k, v in sorted(self.skipped_by_reason.items())) or "none"),
        ]
        files = [s for s in self.skipped if not s.chain]
        for item in files[:max_listed]:
            lines.append(f"    {item.source}/{item.path}: {item.reason} ({item.detail})")
        if len(files) > max_listed:
            lines.append(f"    ... {len(files) - max_listed} more skipped files")
        return "\n".join(lines)


def _parse(source: Source, path: Path, relpath: str) -> list[Chain]:
    if source.kind == CGDMS:
        return [parse_cgdms_file(path, source=source.name, relpath=relpath)]
    return parse_structure_file(path, source=source.name, relpath=relpath)


def _load_source(source: Source, cache_dir: Path | None, manifest: dict, summary: BuildSummary):
    """Chains of one source, reusing cached files; updates manifest + store.

    Returns (chains, whether the manifest changed).
    """
    root_key = str(source.root.resolve())
    entry = manifest["sources"].get(root_key, {})
    if entry.get("name") != source.name or entry.get("kind") != source.kind:
        entry = {}  # ids embed the source name: a renamed source is parsed afresh
    old_files = entry.get("files", {})
    stored: dict[str, Chain] = {}
    store = Path(cache_dir, entry["store"]) if cache_dir and entry.get("store") else None
    if store is not None:
        try:
            stored = cache_io.load_chains(store, source.name)
        except (OSError, ValueError, KeyError):
            old_files = {}  # store lost or torn: parse everything again
    files: dict[str, dict] = {}
    chains: list[Chain] = []
    changed = False
    for path in source.files():
        relpath = path.relative_to(source.root).as_posix()
        try:
            key = cache_io.file_key(path)
        except OSError as err:
            summary.skipped.append(Skipped(source.name, relpath, "unreadable", str(err)))
            continue
        old = old_files.get(relpath)
        cached = (
            old is not None
            and all(old.get(k) == v for k, v in key.items())
            and all(cid in stored for cid in old.get("chains", []))
        )
        summary.files_total += 1
        if cached:
            summary.files_cached += 1
            record = old
            file_chains = [stored[cid] for cid in old.get("chains", [])]
        else:
            summary.files_parsed += 1
            changed = True
            try:
                file_chains = _parse(source, path, relpath)
                record = {**key, "chains": [c.id for c in file_chains], "skipped": None}
            except ParseError as err:
                file_chains = []
                record = {**key, "chains": [], "skipped": [err.reason, err.detail]}
            except Exception as err:  # noqa: BLE001 - a parser bug must not stop the build either
                file_chains = []
                record = {**key, "chains": [], "skipped": ["parse_error", f"{type(err).__name__}: {err}"]}
        if record.get("skipped"):
            reason, detail = record["skipped"]
            summary.skipped.append(Skipped(source.name, relpath, reason, detail))
        files[relpath] = record
        chains.extend(file_chains)
    changed = changed or set(files) != set(old_files)
    rewrite = cache_dir is not None and (changed or store is None or not store.exists())
    if rewrite:
        name = cache_io.store_name(source.name, source.root.resolve())
        cache_io.save_chains(Path(cache_dir) / name, chains)
        manifest["sources"][root_key] = {
            "name": source.name,
            "kind": source.kind,
            "store": name,
            "files": files,
        }
    return chains, rewrite


def filter_by_length(
    chains: list[Chain], *, min_length: int | None, max_length: int | None
) -> tuple[list[Chain], list[Skipped]]:
    """Keep chains with min_length <= L <= max_length (None: no bound)."""
    kept, skipped = [], []
    for chain in chains:
        n = len(chain)
        if min_length is not None and n < min_length:
            skipped.append(Skipped(chain.source, chain.path, "too_short", f"{n} < {min_length}", chain.id))
        elif max_length is not None and max_length > 0 and n > max_length:
            skipped.append(Skipped(chain.source, chain.path, "too_long", f"{n} > {max_length}", chain.id))
        else:
            kept.append(chain)
    return kept, skipped


def build_dataset(
    sources,
    *,
    cache_dir: str | Path | None = None,
    use_cache: bool = True,
    min_length: int | None = None,
    max_length: int | None = None,
    chain_breaks: str | None = SEGMENTS,
    min_segment_length: int = 40,
    verbose: bool = True,
) -> tuple[list[Chain], BuildSummary]:
    """Parse (or reuse from cache) every chain of ``sources``, cut at breaks, filter by length,
    summarise.

    sources: Source specs (see `resolve_sources`: directories, "cgdms"). cache_dir: where the
    cache lives (default `cache.default_cache_dir()`); ``use_cache=False`` parses everything
    and writes nothing. chain_breaks / min_segment_length: `model.data.segments` (config keys
    ``chainBreaks``, ``minimumSegmentLength``; chain_breaks None: parsed chains, uncut). Returns (examples sorted by id, summary); prints
    ``summary.format()`` when ``verbose``. Raises FileNotFoundError only for a missing source,
    never for a bad file.
    """
    start = time.perf_counter()
    resolved = resolve_sources(sources)
    cache_dir = Path(cache_dir or cache_io.default_cache_dir()) if use_cache else None
    manifest = cache_io.load_manifest(cache_dir, PARSER_VERSION) if cache_dir else {"sources": {}}
    summary = BuildSummary(chain_breaks=chain_breaks, min_segment_length=min_segment_length)
    chains: list[Chain] = []
    dirty = False
    for source in resolved:
        source_chains, rewritten = _load_source(source, cache_dir, manifest, summary)
        chains.extend(source_chains)
        dirty = dirty or rewritten
    if cache_dir is not None and dirty:
        cache_io.save_manifest(cache_dir, manifest)
    chains, summary.by_source = cut_chains(chains, mode=chain_breaks, min_segment_length=min_segment_length)
    chains.sort(key=lambda c: c.id)
    summary.chains_total = len(chains)
    before = {c.id: c for c in chains}
    chains, length_skips = filter_by_length(chains, min_length=min_length, max_length=max_length)
    summary.skipped.extend(length_skips)
    for item in length_skips:  # filtered examples move from kept to dropped_length
        example = before[item.chain]
        counts = summary.by_source[example.source]
        counts.examples -= 1
        counts.segments -= parent_id(example.id) != example.id
        counts.residues -= len(example)
        counts.dropped_length += len(example)
    summary.chains_kept = len(chains)
    summary.kept_by_source = dict(Counter(c.source for c in chains))
    summary.skipped_by_reason = dict(Counter(s.reason for s in summary.skipped))
    summary.seconds = time.perf_counter() - start
    if verbose:
        print(summary.format())
    return chains, summary
