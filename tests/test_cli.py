"""The `mhcflash` command: help, clean errors, self-check, example configs, data -> train -> sample."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from model.cli import INSTALL_HINT, NOT_AVAILABLE, app
from model.config import load_config
from model.training import EXIT_NAN

ROOT = Path(__file__).resolve().parent.parent
SEED = Path(__file__).resolve().parents[2] / "shared" / "seed" / "mhc_flash_ipa.zh.md"
runner = CliRunner()


pytestmark = pytest.mark.usefixtures("one_thread")


def _plain(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


@pytest.mark.parametrize("args,expect", [
    ([], ["data", "train", "sample", "selfcheck", "serve"]),
    (["data", "build", "--help"], ["--index", "--cache-dir", "cgdms"]),
    (["train", "--help"], ["--devices", "--num-nodes", "--accelerator", "--resume", "--debug", "--set"]),
    (["sample", "--help"], ["--length", "--count", "--seed", "--noise-scale", "--out"]),
    (["selfcheck", "--help"], ["useFlashAttn3"]),
    (["serve", "--help"], ["--weights", "--port"]),
])
def test_help_is_readable(args, expect):
    result = runner.invoke(app, args + (["--help"] if not args else []))
    assert result.exit_code == 0, result.output
    out = _plain(result.output)
    for word in expect:
        assert word in out
    assert "--inject-fault" not in out  # testing hook stays hidden


def test_config_errors_exit_2_without_traceback(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text("useMHCMode True\nzFactorRnk 2\n")
    result = runner.invoke(app, ["train", str(bad)])
    assert result.exit_code == 2
    assert "unknown key 'zFactorRnk'" in result.output and "zFactorRank" in result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    result = runner.invoke(app, ["train", str(ROOT / "configs" / "standard.txt"), "--set", "batchSize=-3"])
    assert result.exit_code == 2 and "batchSize" in result.output and "out of range" in result.output
    result = runner.invoke(app, ["sample", str(tmp_path / "nowhere"), "--length", "10"])
    assert result.exit_code == 2 and "does not exist" in result.output
    result = runner.invoke(app, ["train", str(ROOT / "configs" / "standard.txt"), "--profiler", "fast"])
    assert result.exit_code == 2 and "--profiler 'fast'" in result.output and "simple" in result.output


def test_example_configs():
    user_block = SEED.read_text().split("```txt\n", 1)[1].split("```", 1)[0] if SEED.is_file() else None
    mf = ROOT / "configs" / "mhc_flash.txt"
    if user_block is not None:
        assert mf.read_text() == user_block  # exactly the user's example block
    cfg = load_config(mf)
    assert (cfg.useMHCMode, cfg.useFlashMode, cfg.zFactorRank, cfg.kNeighbors, cfg.useFlashAttn3,
            cfg.mhcExpansionRate, cfg.mhcSinkhornIters, cfg.mhcAlphaInit) == (True, True, 2, 10, True, 4, 20, 0.01)
    modes = {name: load_config(ROOT / "configs" / f"{name}.txt").mode
             for name in ("standard", "mhc", "flash", "mhc_flash")}
    assert modes == {"standard": "standard", "mhc": "mhc", "flash": "flash", "mhc_flash": "mhc_flash"}
    assert load_config(ROOT / "configs" / "tiny_cpu.txt").datasetNames == "cgdms"


def test_selfcheck_reports_backends_and_fallback():
    result = runner.invoke(app, ["selfcheck", "--config", str(ROOT / "configs" / "mhc_flash.txt")])
    out = result.output
    assert result.exit_code == 0, out
    for name in ("fa4", "fa3", "fa2", "sdpa_cudnn", "sdpa_flash", "sdpa_efficient", "math"):
        assert re.search(rf"^\s+{name}\s+found=", out, re.MULTILINE)
    assert "useFlashAttn3 True resolves to:" in out
    assert "combined denoiser (mHCFlashDenoiser): runs on" in out
    if not torch.cuda.is_available():  # FlashAttention needs a GPU: one message, install hint, fallback
        lines = [ln for ln in out.splitlines() if NOT_AVAILABLE in ln]
        assert len(lines) == 1 and lines[0].startswith(NOT_AVAILABLE)
        assert INSTALL_HINT in lines[0] and "Falling back to the 'math'" in lines[0]


def test_data_build_train_debug_sample_end_to_end(tmp_path, monkeypatch):
    from biotite.structure.io import pdb

    monkeypatch.setenv("MHCFLASH_CACHE", str(tmp_path / "cache"))
    cfg = tmp_path / "run.txt"
    cfg.write_text(f"name e2e\nlogDirectory {tmp_path / 'runs'}\ndatasetNames cgdms\nmaximumNumResidues 48\n"
                   f"datasetSize 40\nuseMHCMode True\nuseFlashMode True\n")
    result = runner.invoke(app, ["data", "build", "--config", str(cfg)])
    assert result.exit_code == 0, result.output
    index = tmp_path / "runs" / "e2e" / "training_index.csv"
    assert "kept" in result.output and index.is_file() and len(index.read_text().splitlines()) == 41

    result = runner.invoke(app, ["train", str(cfg), "--debug", "--no-progress", "--accelerator", "cpu",
                                 "--profiler", "simple"])
    assert result.exit_code == 0, result.output
    weights = tmp_path / "runs" / "e2e-debug" / "weights"
    profile = (tmp_path / "runs" / "e2e-debug" / "fit-profile.txt").read_text()
    assert "run_training_batch" in profile and "optimizer_step" in profile  # Lightning's per-hook times
    assert (weights / "model.safetensors").is_file()
    assert load_config(weights / "config.txt").mode == "mhc_flash"

    out = tmp_path / "samples"
    result = runner.invoke(app, ["sample", str(weights), "--length", "17", "--count", "2", "--seed", "5",
                                 "--out", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    files = sorted(out.glob("*.pdb"))
    assert [f.name for f in files] == ["sample_len17_seed5.pdb", "sample_len17_seed6.pdb"]
    for f in files:
        atoms = pdb.PDBFile.read(str(f)).get_structure(model=1)
        assert len(atoms) == 17 and set(atoms.atom_name) == {"CA"} and set(atoms.res_name) == {"ALA"}
    # a training checkpoint samples too (config read from the checkpoint)
    ckpt = tmp_path / "runs" / "e2e-debug" / "checkpoints" / "last.ckpt"
    result = runner.invoke(app, ["sample", str(ckpt), "-l", "11", "--out", str(tmp_path / "s2"), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert len(pdb.PDBFile.read(str(tmp_path / "s2" / "sample_len11_seed0.pdb")).get_structure(model=1)) == 11

    # NaN injected through the CLI: exit 3 with the knobs, checkpoint kept
    result = runner.invoke(app, ["train", str(cfg), "--debug", "--no-progress", "--accelerator", "cpu",
                                 "--resume", "never", "--inject-fault", "nan@1"])
    assert result.exit_code == EXIT_NAN, result.output
    for key in ("mhcSinkhornIters", "learningRate", "warmupEpoches", "gradientClipVal"):
        assert key in result.output
