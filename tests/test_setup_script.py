"""scripts/setup.sh: a project virtual environment .venv; PyTorch's CPU build on a machine without an
NVIDIA GPU (from PyTorch's CPU index, or pip's configured sources when that index does not answer, never
a CUDA build); a CUDA build where nvidia-smi sees a GPU. Checked through its --dry-run mode, which
prints what it would run and changes nothing."""

from __future__ import annotations

import http.server
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import tomllib
from functools import partial
from pathlib import Path

import pytest
from packaging.specifiers import SpecifierSet
from packaging.version import Version

REPO = Path(__file__).resolve().parent.parent
SETUP = REPO / "scripts" / "setup.sh"


def _setup_var(name: str) -> str:
    match = re.search(rf'^{name}="([^"]+)"$', SETUP.read_text(), re.MULTILINE)
    assert match, f"scripts/setup.sh has no {name}=\"...\" line"
    return match.group(1)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def checkout(tmp_path):
    """A copy of the files setup.sh reads, without a .venv, and a bin/ for a fake nvidia-smi."""
    (tmp_path / "scripts").mkdir()
    shutil.copy(SETUP, tmp_path / "scripts" / "setup.sh")
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    (tmp_path / "bin").mkdir()
    return tmp_path


def _fake_nvidia_smi(checkout: Path, gpu: bool) -> None:
    tool = checkout / "bin" / "nvidia-smi"
    tool.write_text("#!/bin/sh\n" + ("echo 'GPU 0: NVIDIA H100 (UUID: GPU-0)'\n" if gpu else "exit 6\n"))
    tool.chmod(0o755)


def _dry_run(checkout: Path, *args: str, index: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{checkout / 'bin'}{os.pathsep}{os.environ['PATH']}",
           "MHCFLASH_TORCH_INDEX": index, "PYTHON": sys.executable}
    return subprocess.run(["bash", str(checkout / "scripts" / "setup.sh"), "--dry-run", *args], env=env,
                          capture_output=True, text=True, timeout=60, check=False)


def _commands(proc: subprocess.CompletedProcess) -> list[str]:
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return [line[2:] for line in proc.stdout.splitlines() if line.startswith("+ ")]


def test_torch_pins_agree_with_pyproject():
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    torch_range = next(d for d in deps if re.match(r"torch\b", d))
    assert _setup_var("TORCH_GPU") == torch_range
    cpu = _setup_var("TORCH_CPU")
    assert cpu.endswith("+cpu") and Version(cpu) in SpecifierSet(torch_range.removeprefix("torch"))


def test_cpu_host_without_index_takes_cpu_build_from_configured_sources_at_once(checkout):
    _fake_nvidia_smi(checkout, gpu=False)
    start = time.monotonic()
    proc = _dry_run(checkout, "dev", index=f"http://127.0.0.1:{_closed_port()}")
    elapsed = time.monotonic() - start
    cmds = _commands(proc)
    assert cmds[0] == f"{sys.executable} -m venv .venv"
    assert f".venv/bin/python -m pip install -q torch=={_setup_var('TORCH_CPU')}" in cmds
    assert ".venv/bin/python -m pip install -q -e .[dev]" in cmds
    assert not any("torch>=" in c or "--index-url" in c for c in cmds), cmds
    assert "did not answer" in proc.stdout
    assert elapsed < 20, f"an unreachable index cost {elapsed:.0f} s"
    assert not (checkout / ".venv").exists(), "--dry-run created the environment"


def test_cpu_host_takes_cpu_build_from_the_cpu_index_when_it_answers(checkout):
    index = checkout / "index"
    (index / "torch").mkdir(parents=True)
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(index))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        _fake_nvidia_smi(checkout, gpu=False)
        url = f"http://127.0.0.1:{server.server_address[1]}"
        cmds = _commands(_dry_run(checkout, index=url))
    finally:
        server.shutdown()
        server.server_close()
    assert f".venv/bin/python -m pip install -q --index-url {url} torch=={_setup_var('TORCH_CPU')}" in cmds
    assert ".venv/bin/python -m pip install -q -e ." in cmds


def test_gpu_host_takes_cuda_build_from_pypi(checkout):
    _fake_nvidia_smi(checkout, gpu=True)
    cmds = _commands(_dry_run(checkout, index=f"http://127.0.0.1:{_closed_port()}"))
    assert f".venv/bin/python -m pip install -q {_setup_var('TORCH_GPU')}" in cmds
    assert not any("+cpu" in c or "--index-url" in c for c in cmds), cmds


def test_second_run_installs_only_when_pyproject_changed(checkout):
    _fake_nvidia_smi(checkout, gpu=False)
    (checkout / ".venv" / "bin").mkdir(parents=True)
    (checkout / ".venv" / "bin" / "python").symlink_to(sys.executable)
    cksum = subprocess.run(["cksum"], stdin=(checkout / "pyproject.toml").open("rb"), capture_output=True,
                           text=True, check=True).stdout.strip()
    (checkout / ".venv" / ".setup-runtime").write_text(cksum + "\n")
    index = f"http://127.0.0.1:{_closed_port()}"
    proc = _dry_run(checkout, index=index)
    assert _commands(proc) == [] and "up to date" in proc.stdout
    assert any("-e .[dev]" in c for c in _commands(_dry_run(checkout, "dev", index=index)))
    (checkout / "pyproject.toml").write_text((checkout / "pyproject.toml").read_text() + "\n# changed\n")
    assert ".venv/bin/python -m pip install -q -e ." in _commands(_dry_run(checkout, index=index))


def test_bad_argument_and_missing_python_fail_with_one_line(checkout):
    proc = subprocess.run(["bash", str(checkout / "scripts" / "setup.sh"), "--dryrun"], capture_output=True,
                          text=True, timeout=30, check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "--dryrun" in proc.stderr
    env = {**os.environ, "PYTHON": "python3.0-missing"}
    proc = subprocess.run(["bash", str(checkout / "scripts" / "setup.sh"), "--dry-run"], env=env,
                          capture_output=True, text=True, timeout=30, check=False)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and "python3.0-missing" in proc.stderr


def test_serve_script_sets_up_then_runs_the_venv_python():
    lines = [ln.strip() for ln in (REPO / "scripts" / "serve.sh").read_text().splitlines()]
    assert "bash scripts/setup.sh" in lines
    assert lines.index("bash scripts/setup.sh") < lines.index('exec .venv/bin/python -m service.cli serve "$@"')
