"""Data pipeline: parsing rules, bad files, real pdb20 / cgdms chains, cache, split, batches.

Small and fast: hand-written PDB texts for each rule, 8 real pdb20 files, 25 cgdms chains.
"""

from __future__ import annotations

import gzip
import os
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from model.data import (
    Chain,
    ParseError,
    Source,
    build_dataset,
    limit_chains,
    parse_structure_file,
    read_index,
    split_by_sequence,
    write_index,
)
from model.data.cache import MANIFEST, load_manifest
from model.data.datamodule import LengthBucketBatchSampler, ProteinDataModule, collate
from model.data.parse import BREAK_DISTANCE, PARSER_VERSION, parse_cgdms_file
from model.data.segments import cut_chain
from model.data.sources import cgdms_chain_dir

REPO = Path(__file__).resolve().parents[1]
# The folder that holds the real sets the shipped configs name (pdb20/, reseek/): the configs' default
# dataDirectory (``data`` in the repository, a folder or a link), or $MHCFLASH_TEST_DATA. The tests that
# read the real sets skip without them.
DATA_DIR = Path(os.environ.get("MHCFLASH_TEST_DATA", REPO / "data"))
PDB20 = DATA_DIR / "pdb20"
ATOL_PDB = 1e-3  # PDB coordinate precision (3 decimals)
ATOL_CENTRE = 1e-4  # |mean of centred coordinates|, Angstrom, float32


# ----------------------------------------------------------------------------- PDB text helpers
def atom(serial, name, resn, chain, resi, xyz, *, icode=" ", altloc=" ", occ=1.0, het=False, element="C"):
    """One fixed-column PDB ATOM/HETATM record (PDB 3.3)."""
    record = "HETATM" if het else "ATOM  "
    x, y, z = xyz
    return (
        f"{record}{serial:5d} {name:<4s}{altloc}{resn:>3s} {chain}{resi:4d}{icode}   "
        f"{x:8.3f}{y:8.3f}{z:8.3f}{occ:6.2f}{0.0:6.2f}          {element:>2s}  "
    )


def residue(serial, resn, chain, resi, x, *, icode=" ", het=False, with_ca=True, altloc=" ", occ=1.0, dy=0.0):
    """Backbone N, CA, C of one residue with its CA at (x, dy, 0)."""
    names = [(" N", -1.0, 0.5, "N"), (" CA", 0.0, 0.0, "C"), (" C", 1.0, 0.5, "C")]
    kw = {"icode": icode, "het": het, "altloc": altloc, "occ": occ}
    return [
        atom(serial + k, name, resn, chain, resi, (x + ddx, dy + ddy, 0.0), element=el, **kw)
        for k, (name, ddx, ddy, el) in enumerate(names)
        if with_ca or name != " CA"
    ]


def write(tmp_path: Path, name: str, lines) -> Path:
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\nEND\n")
    return path


def straight(n, chain="A", start=1, resn="ALA", x0=0.0):
    """n residues with CA 3.8 A apart along x."""
    out = []
    for i in range(n):
        out += residue(10 * i + 1, resn, chain, start + i, x0 + 3.8 * i)
    return out


# ----------------------------------------------------------------------------- parsing rules
def test_altloc_keeps_highest_occupancy(tmp_path):
    lines = straight(2)
    lines += residue(100, "SER", "A", 3, 7.6, altloc="A", occ=0.4, dy=1.0)
    lines += residue(200, "SER", "A", 3, 7.6, altloc="B", occ=0.6, dy=-1.0)
    lines += residue(300, "ALA", "A", 4, 11.4)
    (chain,) = parse_structure_file(write(tmp_path, "alt.pdb", lines))
    assert len(chain) == 4 and chain.sequence == "AASA"
    np.testing.assert_allclose(chain.ca[2], [7.6, -1.0, 0.0], atol=ATOL_PDB)  # altloc B, occ 0.6
    tie = straight(2) + residue(100, "SER", "A", 3, 7.6, altloc="A", occ=0.5, dy=1.0)
    tie += residue(200, "THR", "A", 3, 7.6, altloc="B", occ=0.5, dy=-1.0)  # microheterogeneity
    (chain,) = parse_structure_file(write(tmp_path, "tie.pdb", tie))
    assert chain.sequence == "AAS"  # tie: the first altloc
    np.testing.assert_allclose(chain.ca[2], [7.6, 1.0, 0.0], atol=ATOL_PDB)


def test_insertion_codes_are_separate_residues_and_index_is_normalised(tmp_path):
    lines = residue(1, "GLY", "A", 52, 0.0) + residue(10, "ALA", "A", 52, 3.8, icode="A")
    lines += residue(20, "VAL", "A", 52, 7.6, icode="B") + residue(30, "LEU", "A", 53, 11.4)
    lines += residue(40, "LYS", "A", 56, 15.2)  # author numbering jumps by 3
    (chain,) = parse_structure_file(write(tmp_path, "ins.pdb", lines))
    assert chain.sequence == "GAVLK"
    np.testing.assert_array_equal(chain.residue_index, [0, 1, 2, 3, 6])
    np.testing.assert_allclose(chain.ca[:, 0], [0.0, 3.8, 7.6, 11.4, 15.2], atol=ATOL_PDB)


def test_hetatm_rules_modified_residues_kept_ligands_dropped(tmp_path):
    lines = straight(2)
    lines += residue(100, "MSE", "A", 3, 7.6, het=True)  # selenomethionine -> M
    lines += residue(200, "SEC", "A", 4, 11.4, het=True)  # selenocysteine -> C
    lines += residue(300, "UNK", "A", 5, 15.2)  # unknown residue in ATOM -> X
    lines += residue(400, "SEP", "A", 6, 19.0, het=True)  # phosphoserine -> S
    lines.append(atom(500, "CA", "CA", "A", 601, (20.0, 3.0, 0.0), het=True, element="CA"))  # calcium
    lines.append(atom(501, " O", "HOH", "A", 701, (21.0, 3.0, 0.0), het=True, element="O"))
    lines += residue(600, "ALA", "A", 602, 25.0, het=True)  # free amino acid ligand, 6 A away
    (chain,) = parse_structure_file(write(tmp_path, "het.pdb", lines))
    assert chain.sequence == "AAMCXSA" and chain.num_breaks == 1  # the free ALA is kept, after a break
    (piece,) = cut_chain(chain, min_segment_length=4)  # ... and cut off with the break
    assert piece.sequence == "AAMCXS" and piece.num_dropped == 1


def test_missing_ca_drops_residue_and_opens_a_break(tmp_path):
    lines = straight(3)  # residues 1-3
    lines += residue(100, "GLY", "A", 4, 11.4, with_ca=False)  # no CA: dropped -> 7.6 A gap
    lines += straight(5, start=5, resn="VAL", x0=15.2)  # residues 5-9
    (whole,) = parse_structure_file(write(tmp_path, "gap.pdb", lines))
    assert whole.sequence == "AAAVVVVV" and whole.num_breaks == 1 and whole.num_dropped == 0
    np.testing.assert_array_equal(whole.residue_index, [0, 1, 2, 4, 5, 6, 7, 8])  # the gap is kept
    (chain,) = cut_chain(whole, mode="longest")
    assert chain.sequence == "VVVVV" and chain.num_breaks == 1 and chain.num_dropped == 3
    np.testing.assert_array_equal(chain.residue_index, [0, 1, 2, 3, 4])
    steps = np.linalg.norm(np.diff(chain.ca, axis=0), axis=-1)
    assert steps.max() <= BREAK_DISTANCE


def test_multiple_chains_first_model_only(tmp_path):
    model1 = straight(4, chain="A") + straight(3, chain="B", resn="GLY", x0=50.0)
    model2 = [line[:30] + f"{999.0:8.3f}" + line[38:] for line in model1]  # moved: must be ignored
    lines = ["MODEL        1", *model1, "ENDMDL", "MODEL        2", *model2, "ENDMDL"]
    chains = parse_structure_file(write(tmp_path, "1abc.pdb", lines), source="toy")
    assert [c.id for c in chains] == ["toy:1abc_A", "toy:1abc_B"]
    assert [c.sequence for c in chains] == ["AAAA", "GGG"]
    assert np.all(chains[0].ca[:, 0] < 20.0)


def test_mmcif_and_gzip_give_the_same_chain(tmp_path):
    from biotite.structure.io import pdb, pdbx

    path = write(tmp_path, "toy.pdb", straight(7, resn="TRP"))
    atoms = pdb.get_structure(pdb.PDBFile.read(str(path)), model=1)
    cif = pdbx.CIFFile()
    pdbx.set_structure(cif, atoms)
    cif.write(str(tmp_path / "toy.cif"))
    with gzip.open(tmp_path / "toy.cif.gz", "wb") as fh:
        fh.write((tmp_path / "toy.cif").read_bytes())
    bcif = pdbx.BinaryCIFFile()
    pdbx.set_structure(bcif, atoms)
    bcif.write(str(tmp_path / "toy.bcif"))
    ref = parse_structure_file(path)[0]
    for name in ("toy.cif", "toy.cif.gz", "toy.bcif"):
        other = parse_structure_file(tmp_path / name)[0]
        assert other.sequence == ref.sequence == "WWWWWWW"
        np.testing.assert_allclose(other.ca, ref.ca, atol=ATOL_PDB)


# ----------------------------------------------------------------------------- bad files
def test_bad_files_are_reported_not_fatal(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    write(src, "good.pdb", straight(6))
    (src / "empty.pdb").write_text("")
    (src / "corrupt.pdb.gz").write_bytes(b"\x1f\x8b\x08\x00garbage" + bytes(range(50)))
    good_gz = gzip.compress(("\n".join(straight(40)) + "\nEND\n").encode())
    (src / "truncated.pdb.gz").write_bytes(good_gz[: len(good_gz) // 2])
    (src / "cut.pdb").write_text("\n".join(straight(2)) + "\nATOM     99  CA  ALA A   9      1.000   2.0")
    write(
        src,
        "water.pdb",
        [atom(i + 1, " O", "HOH", "W", i + 1, (i, 0, 0), het=True, element="O") for i in range(5)],
    )
    dna = []
    for i, base in enumerate(["DA", "DC", "DG"]):
        dna += [
            atom(10 * i + 1, " P", base, "B", i + 1, (6.0 * i, 0, 0), element="P"),
            atom(10 * i + 2, " C1'", base, "B", i + 1, (6.0 * i, 2, 0)),
        ]
    write(src, "dna.pdb", dna)
    (src / "junk.cif").write_text("data_junk\n_foo.bar 1\n")
    chains, summary = build_dataset([src], cache_dir=tmp_path / "cache", verbose=True)
    assert [c.id for c in chains] == ["src:good_A"]
    assert summary.skipped_by_reason == {
        "empty": 1,
        "unreadable": 2,
        "parse_error": 2,
        "no_protein": 2,
    }
    reasons = {s.path: s.reason for s in summary.skipped}
    assert reasons["cut.pdb"] == "parse_error" and reasons["junk.cif"] == "parse_error"
    assert reasons["water.pdb"] == reasons["dna.pdb"] == "no_protein"
    assert reasons["truncated.pdb.gz"] == reasons["corrupt.pdb.gz"] == "unreadable"
    out = capsys.readouterr().out
    assert "kept 1 of 1 examples from 8 files" in out and "no_protein 2" in out


def test_cgdms_malformed_file_is_reported(tmp_path):
    (tmp_path / "X1.txt").write_text("ACD\nCCC\n" + "1 2 3 4 5 6 7 8 9 10 11 12\n" * 2)
    with pytest.raises(ParseError) as err:
        parse_cgdms_file(tmp_path / "X1.txt")
    assert err.value.reason == "bad_format"


# ----------------------------------------------------------------------------- real data
def _subset(src: Path, dst: Path, files: list[Path]) -> Path:
    dst.mkdir()
    for f in files:
        os.symlink(f, dst / f.name)
    return dst


@pytest.fixture(scope="module")
def pdb20_subset(tmp_path_factory):
    if not PDB20.is_dir():
        pytest.skip(f"real PDB chains not found at {PDB20}")
    files = sorted(PDB20.glob("*.pdb.gz"))[:8]
    return _subset(PDB20, tmp_path_factory.mktemp("real") / "pdb20", files)


@pytest.fixture(scope="module")
def cgdms_subset(tmp_path_factory):
    root = cgdms_chain_dir()
    if root is None:
        pytest.skip("cgdms is not installed")
    files = sorted(root.glob("*.txt"))[:25]
    return Source("cgdms", "cgdms", _subset(root, tmp_path_factory.mktemp("cg") / "cgdms", files))


def test_build_from_real_pdb20(pdb20_subset, tmp_path):
    chains, summary = build_dataset([pdb20_subset], cache_dir=tmp_path, verbose=False)
    assert summary.files_total == 8 and summary.skipped == [] and len(chains) >= 8
    for chain in chains:
        steps = np.linalg.norm(np.diff(chain.ca, axis=0), axis=-1)  # [L-1]
        assert steps.max() <= BREAK_DISTANCE
        assert abs(np.median(steps) - 3.8) < 0.1  # some low-resolution chains sit at 3.87 A
        assert len(chain.sequence) == len(chain) == chain.residue_index.shape[0]
        assert chain.ca.dtype == np.float32 and np.all(np.diff(chain.residue_index) >= 1)


def test_build_from_real_cgdms(cgdms_subset, tmp_path):
    chains, summary = build_dataset([cgdms_subset], cache_dir=tmp_path, verbose=False)
    assert len(chains) == 25 and summary.kept_by_source == {"cgdms": 25}
    for chain in chains[:5]:
        lines = (cgdms_subset.root / chain.path).read_text().split("\n")
        assert chain.sequence == lines[0].strip() and chain.num_breaks == 0
        first = [float(v) for v in lines[2].split()]
        np.testing.assert_allclose(chain.ca[0], first[3:6], atol=1e-5)
        assert 20 <= len(chain) <= 100


# ----------------------------------------------------------------------------- cache
def test_second_build_is_served_from_cache(pdb20_subset, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(pdb20_subset, src)  # real files (copies), so one can be modified
    (src / "bad.pdb").write_text("")
    first, s1 = build_dataset([src], cache_dir=tmp_path / "c", verbose=False)
    second, s2 = build_dataset([src], cache_dir=tmp_path / "c", verbose=False)
    assert (s1.files_parsed, s1.files_cached) == (9, 0)
    assert (s2.files_parsed, s2.files_cached) == (0, 9)
    assert s2.skipped_by_reason == {"empty": 1}  # cached failures are still reported
    assert [c.id for c in first] == [c.id for c in second]
    for a, b in zip(first, second):
        assert a.sequence == b.sequence and a.num_breaks == b.num_breaks
        np.testing.assert_array_equal(a.ca, b.ca)
        np.testing.assert_array_equal(a.residue_index, b.residue_index)
    manifest = load_manifest(tmp_path / "c", PARSER_VERSION)
    (entry,) = manifest["sources"].values()
    assert len(entry["files"]) == 9 and entry["files"]["bad.pdb"]["skipped"][0] == "empty"
    write(src, "bad.pdb", straight(25))  # a fixed file is re-parsed, the rest is not
    third, s3 = build_dataset([src], cache_dir=tmp_path / "c", verbose=False)
    assert (s3.files_parsed, s3.files_cached) == (1, 8) and len(third) == len(first) + 1
    (tmp_path / "c" / MANIFEST).write_text("{not json")  # a torn manifest means a full rebuild
    _, s4 = build_dataset([src], cache_dir=tmp_path / "c", verbose=False)
    assert s4.files_parsed == 9


def test_length_filter_counts(cgdms_subset, tmp_path):
    chains, summary = build_dataset(
        [cgdms_subset], cache_dir=tmp_path, min_length=40, max_length=70, verbose=False
    )
    all_chains, _ = build_dataset([cgdms_subset], cache_dir=tmp_path, verbose=False)
    lengths = np.array([len(c) for c in all_chains])
    assert len(chains) == int(((lengths >= 40) & (lengths <= 70)).sum())
    assert summary.skipped_by_reason.get("too_short", 0) == int((lengths < 40).sum())
    assert summary.skipped_by_reason.get("too_long", 0) == int((lengths > 70).sum())


# ----------------------------------------------------------------------------- split + index
def toy_chains(lengths, *, seed=0, groups=None):
    """Random-walk CA chains; ``groups[i]`` chains share one sequence when given."""
    rng = np.random.default_rng(seed)
    chains = []
    for i, n in enumerate(lengths):
        steps = rng.normal(size=(n, 3))
        steps *= 3.8 / np.linalg.norm(steps, axis=-1, keepdims=True)
        ca = (np.cumsum(steps, axis=0) + rng.normal(scale=20.0, size=3)).astype(np.float32)
        g = groups[i] if groups is not None else i
        aa = np.array(list("ACDEFGHIKLMNPQRSTVWY"))
        seq = "".join(aa[np.random.default_rng([seed, g]).integers(0, 20, size=n)])  # one per group
        chains.append(
            Chain(
                id=f"toy:{i:03d}",
                sequence=seq,
                ca=ca,
                residue_index=np.arange(n, dtype=np.int32),
                source="toy",
                path=f"{i}.pdb",
            )
        )
    return chains


def test_split_has_no_identical_sequences_across_and_is_deterministic():
    groups = [k for k in range(30) for _ in range(1 + k % 4)]  # 30 groups of 1-4 identical chains
    chains = toy_chains([30] * len(groups), groups=groups)
    split = split_by_sequence(chains, fraction=0.2, seed=7)
    train = {c.sequence for c in chains if split[c.id] == "train"}
    val = {c.sequence for c in chains if split[c.id] == "val"}
    assert train and val and not (train & val)
    n_val = sum(v == "val" for v in split.values())
    assert 0.2 * len(chains) <= n_val <= 0.2 * len(chains) + 4  # overshoot at most one group
    shuffled = chains[:]
    random.Random(3).shuffle(shuffled)
    assert split_by_sequence(shuffled, fraction=0.2, seed=7) == split
    assert split_by_sequence(chains, fraction=0.2, seed=8) != split
    assert set(split_by_sequence(chains[:2], fraction=0.05, seed=1).values()) == {"train", "val"}


def test_index_round_trip_and_limit(tmp_path):
    chains = toy_chains([13, 29, 17])
    split = {"toy:000": "train", "toy:001": "val", "toy:002": "train"}
    for name in ("index.csv", "index.json"):
        rows = read_index(write_index(tmp_path / name, chains, split))
        assert [(r["id"], r["length"], r["split"], r["source"]) for r in rows] == [
            ("toy:000", 13, "train", "toy"),
            ("toy:001", 29, "val", "toy"),
            ("toy:002", 17, "train", "toy"),
        ]
    picked = limit_chains(chains, 2, seed=5)
    assert len(picked) == 2 and picked == limit_chains(chains, 2, seed=5)


# ----------------------------------------------------------------------------- batches
LENGTHS = [13 + (k * 37) % 71 for k in range(90)]  # 13..83, scrambled


def test_collate_masks_and_centring():
    chains = toy_chains([13, 31, 22])
    batch = collate(chains)
    assert batch["x0"].shape == (3, 31, 3) and batch["ids"] == ["toy:000", "toy:001", "toy:002"]
    torch.testing.assert_close(batch["mask"].sum(1), torch.tensor([13.0, 31.0, 22.0]))
    assert batch["mask"][0, 13:].eq(0).all() and batch["x0"][0, 13:].eq(0).all()
    for b, chain in enumerate(chains):
        n = len(chain)
        centre = batch["x0"][b, :n].mean(0)
        assert centre.abs().max() < ATOL_CENTRE
        expected = torch.from_numpy(chain.ca - chain.ca.mean(0))
        torch.testing.assert_close(batch["x0"][b, :n], expected, atol=1e-4, rtol=0)
    padded = collate(chains, pad_to_multiple=8)
    assert padded["x0"].shape == (3, 32, 3) and padded["mask"][:, 31].eq(0).all()
    torch.testing.assert_close(padded["x0"][:, :31], batch["x0"])


def _spread(batches, lengths):
    return float(np.mean([max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches]))


def test_bucketed_sampler_epochs_and_ranks():
    sampler = LengthBucketBatchSampler(LENGTHS, batch_size=7, seed=3)
    batches = list(sampler)
    assert sorted(i for b in batches for i in b) == list(range(len(LENGTHS)))  # each once
    rng = np.random.default_rng(0)
    random_batches = np.array_split(rng.permutation(len(LENGTHS)), len(batches))
    assert _spread(batches, LENGTHS) < 0.25 * _spread(random_batches, LENGTHS)
    assert list(sampler) == batches  # deterministic within an epoch
    sampler.set_epoch(1)
    assert list(sampler) != batches
    shards = [
        list(LengthBucketBatchSampler(LENGTHS, batch_size=7, seed=3, num_replicas=3, rank=r))
        for r in range(3)
    ]
    assert len({len(s) for s in shards}) == 1  # same step count on every rank
    flat = [tuple(b) for s in shards for b in s]
    assert set(flat) == {tuple(b) for b in batches}  # every batch reaches some rank
    assert len(flat) == 3 * -(-len(batches) // 3)  # padded by wrapping to a multiple of 3
    assert len(set(flat)) == len(batches)
    budget = LengthBucketBatchSampler(LENGTHS, batch_size=50, seed=3, max_residues=200)
    assert all(len(b) * max(LENGTHS[i] for i in b) <= 200 for b in budget)
    pairs = list(LengthBucketBatchSampler(LENGTHS, batch_size=50, seed=3, max_pair_elements=4000))
    assert all(len(b) * max(LENGTHS[i] for i in b) ** 2 <= 4000 or len(b) == 1 for b in pairs)
    assert sorted(i for b in pairs for i in b) == list(range(len(LENGTHS)))  # each chain once
    sizes = {max(LENGTHS[i] for i in b): len(b) for b in pairs}
    short, long_ = min(sizes), max(sizes)
    assert sizes[short] > sizes[long_]  # short chains get bigger batches than long ones


def test_datamodule_batches(tmp_path):
    from model.config import Config

    config = Config().replace(
        batchSize=6,
        minimumNumResidues=15,
        maximumNumResidues=80,
        validationFraction=0.2,
        numDataWorkers=0,
        seed=11,
    )
    chains = toy_chains(LENGTHS)
    dm = ProteinDataModule(config, chains=chains)
    dm.prepare_data()
    dm.setup("fit")
    kept = [c for c in chains if 15 <= len(c) <= 80]
    assert len(dm.train_set) + len(dm.val_set) == len(kept) and len(dm.val_set) >= 0.2 * len(kept)
    loader = dm.train_dataloader()
    assert isinstance(loader.sampler, torch.utils.data.DistributedSampler)  # Lightning keeps it
    seen, by_id = [], {c.id: c for c in kept}
    for batch in loader:
        lengths, mask, x0 = batch["lengths"], batch["mask"], batch["x0"]
        assert x0.shape[:2] == mask.shape and x0.shape[1] == int(lengths.max()) and len(lengths) <= 6
        torch.testing.assert_close(mask.sum(1), lengths.float())
        assert (x0 * (1 - mask)[..., None]).abs().max() == 0
        centre = (x0 * mask[..., None]).sum(1) / lengths[:, None]
        assert centre.abs().max() < ATOL_CENTRE
        assert all(
            dm.assignment[i] == "train" and len(by_id[i]) == n for i, n in zip(batch["ids"], lengths.tolist())
        )
        seen += batch["ids"]
    assert sorted(seen) == sorted(c.id for c in dm.train_set.chains)
    val_ids = [i for batch in dm.val_dataloader() for i in batch["ids"]]
    assert sorted(val_ids) == sorted(c.id for c in dm.val_set.chains)


def test_datamodule_from_real_sources(pdb20_subset, cgdms_subset, tmp_path):
    from model.config import Config

    config = Config().replace(
        batchSize=4, minimumNumResidues=20, maximumNumResidues=256, validationFraction=0.2
    )
    dm = ProteinDataModule(config, sources=[pdb20_subset, cgdms_subset], cache_dir=tmp_path, verbose=False)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.summary is not None and dm.summary.files_parsed == 0  # setup read prepare_data's cache
    batch = next(iter(dm.train_dataloader()))
    assert batch["x0"].dtype == torch.float32 and batch["x0"].shape[1] <= 256
