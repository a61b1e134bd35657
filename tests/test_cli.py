"""The `mhcflash` command: help, clean errors, self-check, example configs, data -> train -> sample."""

from __future__ import annotations

import asyncio
import itertools
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import typer
from typer.testing import CliRunner

from model.cli import INSTALL_HINT, NOT_AVAILABLE
from model.config import load_config
from model.training import EXIT_NAN
from service.cli import app  # the console command: model.cli plus serve and client

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()


pytestmark = pytest.mark.usefixtures("one_thread")


def _plain(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


@pytest.mark.parametrize("args,expect", [
    ([], ["data", "train", "sample", "selfcheck", "serve"]),
    (["data", "build", "--help"], ["--index", "--cache-dir", "cgdms"]),
    (["train", "--help"], ["--devices", "--num-nodes", "--accelerator", "--resume", "--debug", "--set"]),
    (["sample", "--help"], ["--length", "--count", "--seed", "--noise-scale", "--steps", "--out"]),
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


HELP_COLUMNS = 80
SHORT_LINE = 60  # a line of a wrapped paragraph this short, followed by more of the paragraph, broke early


def _command_paths(command, path=()):
    """Every visible command of the CLI as an argument path: (), ("data",), ("data", "build"), ("train",), ..."""
    yield path
    for name, sub in getattr(command, "commands", {}).items():
        if not sub.hidden:
            yield from _command_paths(sub, (*path, name))


def _check_help(out: str) -> None:
    """A help text fit for an 80-column terminal: no `<bool>` type, nothing cut or broken mid-sentence."""
    assert "<bool>" not in out
    lines = out.splitlines()
    assert all(len(ln) <= HELP_COLUMNS for ln in lines), max(lines, key=len)
    assert re.search(r"^\s+--help\s+Show this message and exit\.$", out, re.MULTILINE), out
    for ln in lines:
        if "[default:" in ln:
            assert "]" in ln.split("[default:", 1)[1], ln  # a default is never split over two lines
    description = out.split("\n\n", 1)[1].split("\nArguments:", 1)[0].split("\nOptions:", 1)[0]
    for paragraph in description.split("\n\n"):
        rows = paragraph.splitlines()
        for row, following in itertools.pairwise(rows):
            assert len(row) + 1 + len(following.split()[0]) > SHORT_LINE, f"broken early: {row!r} / {following!r}"


@pytest.mark.parametrize("path", list(_command_paths(typer.main.get_command(app))),
                         ids=lambda p: " ".join(p) or "mhcflash")
def test_every_help_renders_plainly_at_80_columns(path):
    result = runner.invoke(app, [*path, "--help"], env={"COLUMNS": str(HELP_COLUMNS)})
    assert result.exit_code == 0, result.output
    _check_help(result.output)


def test_help_of_the_real_command_at_80_columns():
    proc = subprocess.run([sys.executable, "-m", "model.cli", "train", "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT),
                                                       "COLUMNS": str(HELP_COLUMNS)}, check=False)
    assert proc.returncode == 0, proc.stderr
    _check_help(proc.stdout)
    assert "saving a checkpoint and naming the config keys" in proc.stdout  # the docstring, re-flowed


def test_set_errors_name_the_flag_and_the_key():
    cfg = str(ROOT / "configs" / "standard.txt")
    result = runner.invoke(app, ["train", cfg, "--set", "fooBar=1"])
    assert result.exit_code == 2
    assert result.output.strip() == "error: --set fooBar=1: unknown key 'fooBar'; see the table of config keys in docs/CONFIG.md"
    result = runner.invoke(app, ["train", cfg, "--set", "batchsize=8"])
    assert result.exit_code == 2 and "--set batchsize=8: unknown key 'batchsize'; did you mean 'batchSize'?" in \
        result.output
    result = runner.invoke(app, ["train", cfg, "--set", "batchSize=x"])
    assert result.exit_code == 2 and "--set batchSize=x, key 'batchSize': expected an integer, got 'x'" in \
        result.output
    result = runner.invoke(app, ["train", cfg, "--set", "usePairFree=True"])
    assert result.exit_code == 2 and f"{cfg} with --set usePairFree=True: usePairFree True needs useFlashMode" in \
        result.output
    assert "line" not in result.output  # an override has no line number


def test_sample_refuses_exactly_what_the_service_refuses(tmp_path, tiny_weights):
    """`mhcflash sample` and `POST /sample` share `model.limits`: the same request gets the same message."""
    from service.app import create_app
    from service.testing import asgi_client, tiny_settings

    cases = [(["-l", "4"], {"length": 4}), (["-l", "65"], {"length": 65}),
             (["-l", "20", "--noise-scale", "2.5"], {"length": 20, "noise_scale": 2.5}),
             (["-l", "20", "--steps", "21"], {"length": 20, "steps": 21})]

    async def service_messages():
        async with asgi_client(create_app(tiny_settings(tiny_weights))) as client:
            replies = [await client.post("/sample", json=body) for _, body in cases]
        assert [r.status_code for r in replies] == [422] * len(cases)
        return [r.json()["detail"][0]["msg"] for r in replies]

    for (flags, _), message in zip(cases, asyncio.run(service_messages())):
        out = tmp_path / "refused"
        result = runner.invoke(app, ["sample", str(tiny_weights), *flags, "--out", str(out), "--no-progress"])
        assert result.exit_code == 2, result.output
        assert message in result.output and result.output.startswith("error: --"), (message, result.output)
        assert not out.exists()
    result = runner.invoke(app, ["sample", str(tiny_weights), "-l", "5", "--out", str(tmp_path / "ok"), "--no-progress"])
    assert result.exit_code == 0, result.output  # the shortest length the service takes
    assert (tmp_path / "ok" / "sample_len5_seed0.pdb").is_file()
    result = runner.invoke(app, ["sample", str(tiny_weights), "-l", "9", "--steps", "3", "--out", str(tmp_path / "few"),
                                 "--no-progress"])
    assert result.exit_code == 0, result.output  # fewer steps than the model's T = 20
    assert "steps 3," in (tmp_path / "few" / "sample_len9_seed0.pdb").read_text()


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
    from test_config import REFERENCE_BLOCK

    mf = ROOT / "configs" / "mhc_flash.txt"
    assert mf.read_text(encoding="utf-8") == REFERENCE_BLOCK  # exactly the reference configuration
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
    result = runner.invoke(app, ["sample", str(weights), "--length", "21", "--count", "2", "--seed", "5",
                                 "--out", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    files = sorted(out.glob("*.pdb"))
    assert [f.name for f in files] == ["sample_len21_seed5.pdb", "sample_len21_seed6.pdb"]
    for f in files:
        atoms = pdb.PDBFile.read(str(f)).get_structure(model=1)
        assert len(atoms) == 21 and set(atoms.atom_name) == {"CA"} and set(atoms.res_name) == {"ALA"}
    # a training checkpoint samples too (config read from the checkpoint)
    ckpt = tmp_path / "runs" / "e2e-debug" / "checkpoints" / "last.ckpt"
    result = runner.invoke(app, ["sample", str(ckpt), "-l", "23", "--out", str(tmp_path / "s2"), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert len(pdb.PDBFile.read(str(tmp_path / "s2" / "sample_len23_seed0.pdb")).get_structure(model=1)) == 23
    result = runner.invoke(app, ["sample", str(ckpt), "-l", "17", "--out", str(tmp_path / "s3"), "--no-progress"])
    assert result.exit_code == 2 and "between 20 and 48 residues (got 17)" in result.output  # the model's range

    # NaN injected through the CLI: exit 3 with the knobs, checkpoint kept
    result = runner.invoke(app, ["train", str(cfg), "--debug", "--no-progress", "--accelerator", "cpu",
                                 "--resume", "never", "--inject-fault", "nan@1"])
    assert result.exit_code == EXIT_NAN, result.output
    for key in ("mhcSinkhornIters", "learningRate", "warmupEpoches", "gradientClipVal"):
        assert key in result.output
