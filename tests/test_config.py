"""Config: every key round-trips; every class of bad input names file, line and key."""

import dataclasses
from pathlib import Path

import pytest

from model.config import KEY_DOCS, Config, ConfigError, load_config, parse_config

# The reference configuration ("基本配置"), verbatim: configs/mhc_flash.txt is exactly this block.
REFERENCE_BLOCK = """\
# 同时启用 mHC 和 Flash-IPA
useMHCMode True
useFlashMode True

# Flash-IPA 参数
zFactorRank 2
kNeighbors 10
useFlashAttn3 True

# mHC 参数
mhcExpansionRate 4
mhcSinkhornIters 20
mhcAlphaInit 0.01
"""


def _non_default(f: dataclasses.Field):
    """A valid value different from the default, for the round trip."""
    d, m = f.default, f.metadata
    if m["choices"]:
        return next(c for c in m["choices"] if c != d) if len(m["choices"]) > 1 else d
    if isinstance(d, bool):
        return not d
    if d is None:
        return "x" if m["lo"] is None else 7
    if isinstance(d, int):
        return d + 1 if (m["hi"] is None or d + 1 <= m["hi"]) else d - 1
    if isinstance(d, float):
        return d / 2 if d > 0 else 0.5
    return d + "_x"


def test_every_key_round_trips(tmp_path: Path):
    changes = {f.name: _non_default(f) for f in dataclasses.fields(Config)}
    changes["minimumNumResidues"] = 21
    changes["usePairFree"] = True
    changes["useFlashMode"] = True
    changes["lengthBandWeights"] = "1,2,1,2,0.5"
    cfg = Config(**changes)
    path = tmp_path / "all.txt"
    path.write_text(cfg.to_text())
    back = load_config(path)
    assert back == cfg
    for name, value in changes.items():
        assert getattr(back, name) == value, name


def test_every_key_documented():
    assert set(KEY_DOCS) == {f.name for f in dataclasses.fields(Config)}
    assert all(len(doc) > 5 for doc in KEY_DOCS.values())


def test_reference_configuration_parses_to_documented_values(tmp_path: Path):
    path = tmp_path / "reference.txt"
    path.write_text(REFERENCE_BLOCK, encoding="utf-8")
    cfg = load_config(path)
    assert (cfg.useMHCMode, cfg.useFlashMode, cfg.useFlashAttn3) == (True, True, True)
    assert (cfg.zFactorRank, cfg.kNeighbors) == (2, 10)
    assert (cfg.mhcExpansionRate, cfg.mhcSinkhornIters, cfg.mhcAlphaInit) == (4, 20, 0.01)
    assert cfg.mode == "mhc_flash"


def test_comments_and_blank_lines():
    cfg = parse_config("\n# header\nbatchSize 8   # after a value\n\n  learningRate 3e-4\n")
    assert cfg.batchSize == 8 and cfg.learningRate == 3e-4


@pytest.mark.parametrize(
    "text, line, needles",
    [
        ("batchSize 8\nuseMHCMod True\n", 2, ["unknown key 'useMHCMod'", "did you mean 'useMHCMode'"]),
        ("kNeighbors ten\n", 1, ["kNeighbors", "expected an integer"]),
        ("useFlashMode yes\n", 1, ["useFlashMode", "True or False"]),
        ("learningRate 0\n", 1, ["learningRate", "allowed: > 0"]),
        ("kNeighbors 0\n", 1, ["kNeighbors", "allowed: >= 1"]),
        ("mhcSinkhornIters 0\n", 1, ["mhcSinkhornIters", ">= 1"]),
        ("mhcAlphaInit -0.1\n", 1, ["mhcAlphaInit", "> 0"]),
        ("mhcExpansionRate 99\n", 1, ["mhcExpansionRate", "<= 16"]),
        ("precision fp16\n", 1, ["precision", "one of"]),
        ("gradientClipVal nan\n", 1, ["gradientClipVal", "not finite"]),
        ("seed 1\nbatchSize 2\nseed 3\n", 3, ["duplicate key", "line 1"]),
        ("batchSize 8 16\n", 1, ["batchSize", "one value"]),
    ],
)
def test_bad_input_names_file_line_key(tmp_path: Path, text, line, needles):
    path = tmp_path / "bad.txt"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert str(path) in msg and f"line {line}" in msg, msg
    for needle in needles:
        assert needle in msg, msg
    assert isinstance(err.value, ValueError)


def test_cross_key_checks_name_the_file(tmp_path: Path):
    path = tmp_path / "x.txt"
    path.write_text("minimumNumResidues 300\nmaximumNumResidues 100\n")
    with pytest.raises(ConfigError, match="minimumNumResidues .*maximumNumResidues"):
        load_config(path)
    with pytest.raises(ConfigError, match="usePairFree True needs useFlashMode True"):
        parse_config("usePairFree True\n")


def test_replace_validates():
    cfg = Config().replace(batchSize=4)
    assert cfg.batchSize == 4
    with pytest.raises(ConfigError, match="did you mean 'batchSize'"):
        Config().replace(batchsize=4)
    with pytest.raises(ConfigError, match="kNeighbors"):
        Config().replace(kNeighbors=2.5)
    with pytest.raises(ConfigError, match="useMHCMode"):
        Config().replace(useMHCMode=1)


def test_modes():
    assert Config().mode == "standard"
    assert Config(useMHCMode=True).mode == "mhc"
    assert Config(useFlashMode=True).mode == "flash"
    assert Config(useMHCMode=True, useFlashMode=True).mode == "mhc_flash"
    for name in ("standard", "mhc", "flash", "mhc_flash"):
        assert Config().with_mode(name).mode == name
    with pytest.raises(ConfigError, match="unknown mode 'mhcflash'"):
        Config().with_mode("mhcflash")


def test_missing_and_binary_files(tmp_path: Path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.txt")
    bad = tmp_path / "bin.txt"
    bad.write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(ConfigError, match="UTF-8"):
        load_config(bad)


def test_config_doc_documents_every_key():
    doc = (Path(__file__).resolve().parents[1] / "docs" / "CONFIG.md").read_text(encoding="utf-8")
    for f in dataclasses.fields(Config):
        assert f"| `{f.name}` |" in doc, f"docs/CONFIG.md's config table lacks {f.name}"
