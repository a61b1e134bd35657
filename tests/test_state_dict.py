"""The denoiser's parameters are a contract: state-dict keys, shapes and seeded initialisation per mode.

``tests/fixtures/denoiser_state_dict.json`` records, for the four modes and the pair-free flash mode:
- ``keys``: every state-dict key of ``build_denoiser`` with its shape, at the reference configuration
  (``Config()``, built on the meta device: no memory, no time);
- ``init``: per key, (sum, sum of squares) of the parameters of the tiny test configuration built
  under ``torch.manual_seed(0)``, so a change of initialisation or of construction order (which
  changes the random draws each parameter gets) fails here.
Shipped weights must still load into the network their config builds: the keys and shapes of each
``weights/*/model.safetensors`` header (after the legacy-layout upgrade) equal those of the model.

Regenerate the fixture only for a deliberate change of the parameters: ``python tests/test_state_dict.py
--write``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import tiny_config

from model import build_denoiser
from model.config import Config, load_config

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "denoiser_state_dict.json"
WEIGHTS = Path(__file__).resolve().parents[1] / "weights"
MODES = {
    "standard": {"useMHCMode": False, "useFlashMode": False},
    "mhc": {"useMHCMode": True, "useFlashMode": False},
    "flash": {"useMHCMode": False, "useFlashMode": True},
    "mhc_flash": {"useMHCMode": True, "useFlashMode": True},
    "mhc_flash_pairfree": {"useMHCMode": True, "useFlashMode": True, "usePairFree": True},
}
REL_INIT = 1e-6  # float64 sums of float32 parameters drawn from the same seeded generator


def _keys(mode: str) -> dict[str, list[int]]:
    with torch.device("meta"):
        den = build_denoiser(Config().replace(**MODES[mode]))
    return {k: list(v.shape) for k, v in den.state_dict().items()}


def _init(mode: str) -> dict[str, list[float]]:
    torch.manual_seed(0)
    den = build_denoiser(tiny_config(**MODES[mode]))
    return {k: [float(v.double().sum()), float(v.double().square().sum())] for k, v in den.state_dict().items()}


def _record() -> dict:
    return {mode: {"keys": _keys(mode), "init": _init(mode)} for mode in MODES}


@pytest.fixture(scope="module")
def pinned() -> dict:
    return json.loads(FIXTURE.read_text())


@pytest.mark.parametrize("mode", list(MODES))
def test_state_dict_keys_and_shapes_are_pinned(pinned, mode):
    assert _keys(mode) == pinned[mode]["keys"]


@pytest.mark.parametrize("mode", list(MODES))
def test_seeded_initialisation_is_pinned(pinned, mode):
    got, want = _init(mode), pinned[mode]["init"]
    assert list(got) == list(want)  # same keys in the same order
    for key, (total, squares) in want.items():
        assert got[key] == pytest.approx([total, squares], rel=REL_INIT, abs=1e-9), key


@pytest.mark.parametrize("name", sorted(p.parent.name for p in WEIGHTS.glob("*/model.safetensors")))
def test_shipped_weights_headers_match_the_built_network(name):
    from safetensors import safe_open

    from model.ipa.flash import upgrade_legacy_state

    with safe_open(str(WEIGHTS / name / "model.safetensors"), framework="pt") as f:
        header = {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}  # noqa: SIM118 - not a dict
    header = upgrade_legacy_state(header)  # the earlier FlashIPA layout, as loading does
    with torch.device("meta"):
        den = build_denoiser(load_config(WEIGHTS / name / "config.txt"))
    assert {k: list(v.shape) for k, v in header.items()} == {k: list(v.shape) for k, v in den.state_dict().items()}


if __name__ == "__main__" and "--write" in sys.argv:
    FIXTURE.parent.mkdir(exist_ok=True)
    blocks = []  # one key per line, so a diff of the file reads as a diff of the parameters
    for mode, rec in _record().items():
        parts = [f'  "{part}": {{\n' + ",\n".join(f"   {json.dumps(k)}: {json.dumps(v)}" for k, v in rec[part].items())
                 + "\n  }" for part in ("keys", "init")]
        blocks.append(f' "{mode}": {{\n' + ",\n".join(parts) + "\n }")
    FIXTURE.write_text("{\n" + ",\n".join(blocks) + "\n}\n")
    print(f"wrote {FIXTURE}")
