"""model.weights_io: round trip, safe loading, and clear errors for every broken weights directory."""

from __future__ import annotations

import hashlib
import pickle

import pytest
import torch

from model import build_denoiser
from model.weights_io import WeightsError, load_weights, resolve_weights_dir, save_weights
from service.testing import make_tiny_weights

L_TEST = 17  # odd length; the mask has real zeros


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_weights(tmp_path_factory.mktemp("w") / "tiny")


def _inputs():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, L_TEST, 3, generator=g) * 5  # [B, L, 3]
    mask = torch.ones(2, L_TEST)  # [B, L]
    mask[1, 11:] = 0
    t = torch.tensor([4, 17])  # [B]
    return x * mask[..., None], t, mask


def test_round_trip_same_outputs_and_hash(tiny_dir, tmp_path):
    loaded = load_weights(tiny_dir)
    assert loaded.name == "tiny" and loaded.config.mode == "mhc_flash"
    assert loaded.sha256 == hashlib.sha256((tiny_dir / "model.safetensors").read_bytes()).hexdigest()
    assert not loaded.denoiser.training
    # Save again from the loaded model: identical outputs, identical bytes (deterministic format).
    out = save_weights(tmp_path / "again", loaded.denoiser)
    again = load_weights(out)
    assert again.sha256 == loaded.sha256
    x, t, mask = _inputs()
    with torch.no_grad():
        a, b = loaded.denoiser(x, t, mask), again.denoiser(x, t, mask)
    assert torch.equal(a, b)
    assert not list(tmp_path.glob("again/.*tmp"))  # atomic writes leave no temporaries


def test_bf16_save_is_close(tiny_dir, tmp_path):
    loaded = load_weights(tiny_dir)
    save_weights(tmp_path / "bf16", loaded.denoiser, dtype=torch.bfloat16)
    half = load_weights(tmp_path / "bf16")
    assert (tmp_path / "bf16" / "model.safetensors").stat().st_size < (tiny_dir / "model.safetensors").stat().st_size
    for (k, p), q in zip(loaded.denoiser.state_dict().items(), half.denoiser.state_dict().values()):
        assert q.dtype == p.dtype, k  # loaded back in float32
        assert torch.allclose(p, q, rtol=1e-2, atol=1e-6), k  # bf16 keeps 8 mantissa bits


def test_weights_only_lightning_style_checkpoint(tiny_dir, tmp_path):
    loaded = load_weights(tiny_dir)
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "config.txt").write_text((tiny_dir / "config.txt").read_text())
    state = {f"denoiser.{k}": v for k, v in loaded.denoiser.state_dict().items()}
    torch.save({"state_dict": state, "epoch": 3, "global_step": 120}, d / "last.ckpt")
    ck = load_weights(d)
    x, t, mask = _inputs()
    with torch.no_grad():
        assert torch.equal(ck.denoiser(x, t, mask), loaded.denoiser(x, t, mask))
    assert ck.path.name == "last.ckpt"


def test_resolve_default_pointer_and_only_dir(tiny_dir, tmp_path):
    root = tmp_path / "weights"
    root.mkdir()
    with pytest.raises(WeightsError, match="no weights in"):
        resolve_weights_dir(root)
    make_tiny_weights(root / "a")
    assert resolve_weights_dir(root) == root / "a"
    make_tiny_weights(root / "b", seed=1)
    with pytest.raises(WeightsError, match="several weights directories .*a, b"):
        resolve_weights_dir(root)
    (root / "DEFAULT").write_text("b\n")
    assert resolve_weights_dir(root) == (root / "b").resolve()
    (root / "DEFAULT").write_text("../../etc\n")
    with pytest.raises(WeightsError, match="not a weights directory inside"):
        resolve_weights_dir(root)


def test_missing_things_are_named(tmp_path, tiny_dir):
    with pytest.raises(WeightsError, match="does not exist"):
        load_weights(tmp_path / "nope")
    d = tmp_path / "noweights"
    d.mkdir()
    (d / "config.txt").write_text((tiny_dir / "config.txt").read_text())
    with pytest.raises(WeightsError, match=r"model\.safetensors is missing"):
        load_weights(d)
    bad = tmp_path / "badcfg"
    bad.mkdir()
    (bad / "config.txt").write_text("numTimesteps twenty\n")
    (bad / "model.safetensors").write_bytes((tiny_dir / "model.safetensors").read_bytes())
    with pytest.raises(WeightsError, match=r"config\.txt.*line 1.*numTimesteps"):
        load_weights(bad)


def test_corrupt_safetensors(tmp_path, tiny_dir):
    d = tmp_path / "corrupt"
    d.mkdir()
    (d / "config.txt").write_text((tiny_dir / "config.txt").read_text())
    data = (tiny_dir / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match=r"corrupt/model\.safetensors is not a readable safetensors file"):
        load_weights(d)


def test_mismatched_shapes_and_names(tmp_path, tiny_dir):
    d = tmp_path / "wide"
    make_tiny_weights(d, singleFeatureDimension=26)  # other widths than the config we pair it with
    (d / "config.txt").write_text((tiny_dir / "config.txt").read_text())
    with pytest.raises(WeightsError) as err:
        load_weights(d)
    msg = str(err.value)
    assert "model.safetensors does not match its config" in msg
    assert "expected shape" in msg and "26" in msg and "24" in msg  # found 26 where the config says 24
    d2 = tmp_path / "othermode"
    make_tiny_weights(d2, useMHCMode=False, useFlashMode=False)
    (d2 / "config.txt").write_text((tiny_dir / "config.txt").read_text())
    with pytest.raises(WeightsError, match=r"tensor\(s\) missing, e\.g\. .*unexpected tensor"):
        load_weights(d2)


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # would create the marker file when unpickled


def test_pickle_with_code_is_refused_and_not_run(tmp_path, tiny_dir):
    d = tmp_path / "evil"
    d.mkdir()
    (d / "config.txt").write_text((tiny_dir / "config.txt").read_text())
    marker = tmp_path / "PWNED"
    with open(d / "model.pt", "wb") as f:
        pickle.dump({"state_dict": {"x": _Evil(str(marker))}}, f)
    with pytest.raises(WeightsError, match=r"evil/model\.pt .*(refused|not a readable)"):
        load_weights(d)
    assert not marker.exists()


def test_nan_weights_are_refused(tmp_path):
    from model.config import Config
    from service.testing import TINY_SERVICE_CONFIG

    den = build_denoiser(Config().replace(**TINY_SERVICE_CONFIG))
    name, p = next(iter(den.named_parameters()))
    with torch.no_grad():
        p.view(-1)[0] = float("nan")
    save_weights(tmp_path / "nan", den)
    with pytest.raises(WeightsError, match=f"tensor '{name}' contains NaN"):
        load_weights(tmp_path / "nan")
