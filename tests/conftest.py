"""Shared test helpers: tiny configs, real CA traces, sizes and tolerances in one place.

- ``tiny_config(**overrides)``: a validated ``Config`` small enough for 2 CPU cores (odd sizes so a
  broadcasting bug cannot hide). Import it (``from conftest import tiny_config``) or use the
  ``tiny_cfg`` fixture.
- ``real_ca_chains``: a few real CA traces (centred, float32) from the PyPI package ``cgdms``; the
  package directory is located without importing it. Skips cleanly when cgdms is not installed.
- ``random_ca_trace``: a chain-like random walk with 3.8 A steps, for tests that need no real data.
- ``@pytest.mark.gpu``: the test needs a CUDA device; without one it is skipped (here, in one place).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from model.data.parse import parse_cgdms_file
from model.data.sources import cgdms_chain_dir


def pytest_collection_modifyitems(config, items) -> None:
    """Tests marked ``gpu`` are skipped where no CUDA device is visible (CI: deselected with -m "not gpu")."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# Sizes and tolerances shared by the geometry / IPA / denoiser tests.
TINY = {
    "singleFeatureDimension": 24,
    "pairFeatureDimension": 16,
    "positionalEmbeddingDimension": 14,
    "timestepEmbeddingDimension": 10,
    "relativePositionK": 5,
    "numPairTransformLayers": 1,
    "triangularMultiplicativeHiddenDimension": 12,
    "triangularAttentionHiddenDimension": 7,
    "triangularAttentionNumHeads": 2,
    "numStructureLayers": 2,
    "numStructureBlocks": 1,
    "ipaHiddenDimension": 6,
    "ipaNumHeads": 3,
    "ipaNumQkPoints": 3,
    "ipaNumVPoints": 5,
    "pairTransitionN": 2,
    "numStructureTransitionLayers": 1,
    "numTimesteps": 100,
    "mhcExpansionRate": 3,
    "zFactorRank": 2,
    "kNeighbors": 5,
}

# fp32 absolute tolerances (Angstrom-scale coordinates, O(1) activations).
ATOL_GEOMETRY = 1e-4      # Frenet-Serret frames under a global rigid motion
ATOL_INVARIANCE = 2e-4    # IPA output under a global rigid motion
ATOL_EQUIVARIANCE = 5e-4  # denoiser eps_hat under a global rigid motion (coordinates ~ 10 A)
ATOL_PADDING = 1e-5       # padded vs unpadded outputs on real residues
ATOL_SAMPLE = 1e-4        # a whole sampled trajectory, same seed, other batch (ATOL_PADDING per call, summed)

# The denoiser's modes (config overrides of tiny_config): useMHCMode x useFlashMode, and pair-free Flash-IPA
DENOISER_MODES = {
    "standard": {},
    "mhc": {"useMHCMode": True},
    "flash": {"useFlashMode": True},
    "mhc_flash": {"useMHCMode": True, "useFlashMode": True},
    "flash_pair_free": {"useFlashMode": True, "usePairFree": True},
    "mhc_flash_pair_free": {"useMHCMode": True, "useFlashMode": True, "usePairFree": True},
}
ATOL_GRAD = 1e-5          # gradients with vs without checkpointing


def tiny_config(**overrides):
    """A validated tiny ``Config``: ``Config().replace(**TINY, **overrides)``."""
    from model.config import Config

    return Config().replace(**{**TINY, **overrides})


@pytest.fixture
def tiny_cfg():
    return tiny_config()


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory):
    """Tiny random service weights (`service.testing.make_tiny_weights`: samples 5-64 residues, T = 20), made
    once per test run and shared: read them only; a test that needs other weights makes its own."""
    from service.testing import make_tiny_weights

    return make_tiny_weights(tmp_path_factory.mktemp("tiny_weights") / "tiny")


def tiny_pair_free_denoiser(extra_keys: str = ""):
    """A small pair-free mHC + Flash-IPA denoiser (``parse_config`` text + ``extra_keys``), built under
    seed 0, with every parameter perturbed (N(0, 0.05^2)) so the zero-initialised final layers pass
    the IPA output on to eps_hat and every parameter gets a gradient."""
    from model import build_denoiser
    from model.config import parse_config

    cfg = parse_config("useMHCMode True\nuseFlashMode True\nusePairFree True\nsingleFeatureDimension 32\n"
                       "pairFeatureDimension 16\nnumStructureLayers 2\nipaNumHeads 2\nkNeighbors 4\n"
                       "numTimesteps 20\n" + extra_keys)
    torch.manual_seed(0)
    den = build_denoiser(cfg)
    for p in den.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    return den


def random_ca_trace(batch: int, length: int, *, generator: torch.Generator | None = None,
                    step: float = 3.8) -> torch.Tensor:
    """A chain-like random walk (steps of ``step`` +- 5% A, mildly persistent), centred.

    The step lengths vary, as in real chains (exact distance ties are covered separately by the
    tie test in tests/test_flash_ipa.py: the factorizers pool neighbours order-independently).
    Returns [B, L, 3] float32.
    """
    dirs = torch.randn(batch, length, 3, generator=generator)
    dirs = dirs + 0.8 * torch.roll(dirs, 1, dims=1)  # some persistence, fewer near-collinear triples
    dirs = dirs / dirs.norm(dim=-1, keepdim=True)
    steps = step * (1.0 + 0.05 * torch.randn(batch, length, 1, generator=generator))  # [B, L, 1]
    x = torch.cumsum(steps * dirs, dim=1)  # [B, L, 3]
    return x - x.mean(dim=1, keepdim=True)


def cgdms_data_dir() -> Path | None:
    """``<cgdms package dir>/protein_data/train_val`` without importing cgdms, or None."""
    return cgdms_chain_dir()


def load_cgdms_ca(path: Path) -> torch.Tensor:
    """One cgdms chain file, parsed by the project's own reader -> centred CA trace [L, 3] float32."""
    ca = torch.as_tensor(parse_cgdms_file(path).ca, dtype=torch.float32)  # [L, 3]
    return ca - ca.mean(dim=0)


@pytest.fixture(scope="session")
def real_ca_chains() -> list[torch.Tensor]:
    """Four real CA traces (different lengths), each [L_i, 3] centred float32, shortest first."""
    root = cgdms_data_dir()
    if root is None:
        pytest.skip("cgdms is not installed (pip install cgdms): no real CA traces")
    files = sorted(root.glob("*.txt"))[:40]
    chains = [load_cgdms_ca(f) for f in files]
    chains = [c for c in chains if 20 <= c.shape[0] <= 60]
    picked, seen = [], set()
    for c in chains:  # distinct lengths so padding is exercised
        if c.shape[0] not in seen:
            picked.append(c)
            seen.add(c.shape[0])
        if len(picked) == 4:
            break
    if len(picked) < 2:
        pytest.skip("cgdms data directory has too few chains of 20-60 residues")
    return sorted(picked, key=lambda c: c.shape[0])


def pad_batch(chains: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad CA traces [L_i, 3] into (x [B, L_max, 3], mask [B, L_max]) with zeros."""
    length = max(c.shape[0] for c in chains)
    x = torch.zeros(len(chains), length, 3)
    mask = torch.zeros(len(chains), length)
    for i, c in enumerate(chains):
        x[i, : c.shape[0]] = c
        mask[i, : c.shape[0]] = 1.0
    return x, mask


@torch.no_grad()
def randomize_parameters(module: torch.nn.Module, *, seed: int = 0, scale: float = 0.1) -> torch.nn.Module:
    """Perturb every parameter by N(0, scale^2) noise (in place), so zero-initialised output layers
    ("final" init) do not make outputs trivially zero in property tests. Returns the module."""
    gen = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        p.add_(torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype) * scale)
    return module


@pytest.fixture
def one_thread():
    """Run a test with one intra-op thread: on an oversubscribed 2-core machine OpenMP spin-waits
    can stall small CPU steps for seconds."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
