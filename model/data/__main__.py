"""``python -m model.data``: build / refresh the chain cache and optionally write the index.

Examples::

    python -m model.data cgdms /path/to/data/pdb20                 # summary only
    python -m model.data --config run.txt --set dataDirectory=/path/to/data --index runs/x/training_index.csv

Without source arguments the sources come from the config's ``datasetNames`` under its
``dataDirectory`` (``--set`` changes a key, as ``mhcflash train --set``); the length filter, ``datasetSize``, ``validationFraction`` and ``seed`` also
come from the config (defaults if no ``--config``). The console command (``model.cli``, via ``mhcflash``) may
wrap `main`.
"""

from __future__ import annotations

import argparse
from collections import Counter

from model.data.split import TRAIN, VAL, split_table, training_set, write_index


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model.data", description=__doc__.split("\n")[0])
    parser.add_argument("sources", nargs="*", help="directories of PDB/mmCIF files, or 'cgdms'")
    parser.add_argument("--config", help="Genie-style config file (default: built-in defaults)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set dataDirectory=/path/to/data (repeatable)")
    parser.add_argument(
        "--cache-dir", help="cache directory (default: $MHCFLASH_CACHE or ~/.cache/mhcflash/data)"
    )
    parser.add_argument("--index", help="write the training-set index here (.csv or .json)")
    parser.add_argument("--min-length", type=int, help="override minimumNumResidues")
    parser.add_argument("--max-length", type=int, help="override maximumNumResidues")
    args = parser.parse_args(argv)

    from model.config import ConfigError, key_location, load_config_with_overrides
    from model.data.sources import sources_from_config

    try:
        config = load_config_with_overrides(args.config, args.overrides)
        sources = args.sources or sources_from_config(
            config, where=key_location(args.config, "datasetNames", args.overrides))
    except ConfigError as err:
        parser.exit(2, f"error: {err}\n")
    overrides = {}
    if args.min_length is not None:
        overrides["minimumNumResidues"] = args.min_length
    if args.max_length is not None:
        overrides["maximumNumResidues"] = args.max_length
    if overrides:
        config = config.replace(**overrides)
    chains, assignment, _ = training_set(config, sources=sources, cache_dir=args.cache_dir)
    counts = Counter(assignment.values())
    print(
        f"split (validationFraction {config.validationFraction}, seed {config.seed}): "
        f"train {counts[TRAIN]}, val {counts[VAL]}"
    )
    print(split_table(chains, assignment))
    if args.index:
        print(f"index written to {write_index(args.index, chains, assignment)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
