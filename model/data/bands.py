"""Length bands: the coarse length classes that band-balanced sampling and the split stratify by.

Bands by example length L (the uncropped chain or segment): ``< 64``, ``64-127``, ``128-255``,
``256-511``, ``>= 512``. They follow the lengths the evaluation samples at (64, 100, 128, 256, 384,
512) and double in width, so each band is one "size class" of protein: peptides and small domains,
single domains, large domains, multi-domain chains, and chains longer than the training crop.
"""

from __future__ import annotations

import math

import numpy as np

BAND_EDGES = (64, 128, 256, 512)  # band k holds BAND_EDGES[k-1] <= L < BAND_EDGES[k]
NUM_BANDS = len(BAND_EDGES) + 1
BAND_NAMES = ("<64", "64-127", "128-255", "256-511", ">=512")


def band_of(lengths) -> np.ndarray:
    """Band index (0 .. NUM_BANDS - 1) of each length; lengths [N] -> [N] int64."""
    return np.searchsorted(np.asarray(BAND_EDGES), np.asarray(lengths, dtype=np.int64), side="right")


def parse_band_weights(text: str) -> np.ndarray:
    """``"1,1,2,2,1"`` -> float64 [NUM_BANDS]. Raises ValueError saying what is wrong."""
    parts = [p.strip() for p in str(text).split(",")]
    if len(parts) != NUM_BANDS:
        raise ValueError(f"expected {NUM_BANDS} comma-separated weights (bands {', '.join(BAND_NAMES)}), "
                         f"got {len(parts)}")
    try:
        weights = np.array([float(p) for p in parts], dtype=np.float64)
    except ValueError:
        raise ValueError(f"weights must be numbers, got {text!r}") from None
    if not all(math.isfinite(w) and w >= 0 for w in weights) or weights.sum() <= 0:
        raise ValueError(f"weights must be finite, >= 0 and not all 0, got {text!r}")
    return weights
