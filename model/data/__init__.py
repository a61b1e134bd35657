"""Training data: structure files and cgdms chains -> cached CA traces -> bucketed batches.

Modules: ``parse`` (file -> `Chain`, the documented rules), ``sources`` (directories, cgdms),
``cache`` (npz + manifest), ``segments`` (chain breaks: parsed chains -> unbroken examples),
``build`` (`build_dataset` + `BuildSummary`), ``bands`` (length bands), ``split`` (sequence-
grouped train/val split per band, training-set index), ``sampling`` (crops, length-bucketed and
band-balanced batch samplers), ``datamodule`` (Lightning DataModule).
Command line: ``python -m model.data --help``.
"""

from model.data.bands import BAND_EDGES, BAND_NAMES, band_of
from model.data.build import BuildSummary, Skipped, build_dataset, filter_by_length
from model.data.parse import PARSER_VERSION, Chain, ParseError, parse_cgdms_file, parse_structure_file
from model.data.segments import cut_chains, parent_id, resolve_example
from model.data.sources import (
    Source,
    cgdms_dir,
    cgdms_official_split,
    resolve_sources,
    sources_from_config,
)
from model.data.split import (
    limit_chains,
    read_index,
    split_by_band,
    split_by_sequence,
    training_set,
    write_index,
    write_training_index,
)

_LAZY = ("BandBalancedBatchSampler", "ChainDataset", "LengthBucketBatchSampler", "ProteinDataModule", "collate")


def __getattr__(name):  # the DataModule pulls in lightning: import it only when asked for
    if name in _LAZY:
        from model.data import datamodule

        return getattr(datamodule, name)
    raise AttributeError(f"module 'model.data' has no attribute {name!r}")


__all__ = [
    "BAND_EDGES",
    "BAND_NAMES",
    "PARSER_VERSION",
    "BandBalancedBatchSampler",
    "BuildSummary",
    "Chain",
    "ChainDataset",
    "LengthBucketBatchSampler",
    "ParseError",
    "ProteinDataModule",
    "Skipped",
    "Source",
    "band_of",
    "build_dataset",
    "cgdms_dir",
    "cgdms_official_split",
    "collate",
    "cut_chains",
    "filter_by_length",
    "limit_chains",
    "parent_id",
    "parse_cgdms_file",
    "parse_structure_file",
    "read_index",
    "resolve_example",
    "resolve_sources",
    "sources_from_config",
    "split_by_band",
    "split_by_sequence",
    "training_set",
    "write_index",
    "write_training_index",
]
