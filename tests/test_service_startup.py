"""Start-up failures of the real commands (`mhcflash serve`, `python -m service`) as subprocesses.

Each case must exit non-zero and write exactly one line to stderr (no traceback, no server log
lines) and nothing to stdout, and the line must name what to fix. The cases run concurrently; bad
settings and a busy port are reported before torch is imported (under a second each).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from service.testing import make_tiny_weights

REPO = Path(__file__).resolve().parent.parent
SERVE = [sys.executable, "-m", "service.cli", "serve"]  # the console script `mhcflash` is service.cli:app
SERVICE = [sys.executable, "-m", "service"]

# name -> (command, extra environment, words the one line must contain). "{weights}" / "{port}" are filled in.
CASES = {
    "cli-missing-weights": (SERVE + ["--weights", "/nonexistent/weights", "--port", "0"], {},
                            ["weights path /nonexistent/weights does not exist"]),
    "module-corrupt-weights": (SERVICE, {"MHCFLASH_WEIGHTS": "{corrupt}"}, ["model.safetensors"]),
    "cli-bad-setting": (SERVE + ["--weights", "{weights}"], {"MHCFLASH_MAX_COUNT": "abc"},
                        ["MHCFLASH_MAX_COUNT=abc", "valid integer"]),
    "module-bad-setting": (SERVICE, {"MHCFLASH_MAX_COUNT": "abc"}, ["MHCFLASH_MAX_COUNT=abc"]),
    "cli-bad-flag": (SERVE + ["--weights", "{weights}", "--port", "70000"], {}, ["--port 70000", "65535"]),
    "module-limits-beyond-model": (SERVICE, {"MHCFLASH_MAX_LENGTH": "100"},
                                   ["MHCFLASH_MAX_LENGTH=100", "between 3 and 64 residues", "only be lowered"]),
    "module-default-steps-beyond-model": (SERVICE, {"MHCFLASH_DEFAULT_STEPS": "21"},
                                          ["MHCFLASH_DEFAULT_STEPS=21", "between 1 and 20", "numTimesteps"]),
    "cli-port-in-use": (SERVE + ["--weights", "{weights}", "--port", "{port}"], {},
                        ["cannot listen on 127.0.0.1:{port}", "already in use"]),
    "module-no-gpu": (SERVICE, {"MHCFLASH_DEVICE": "cuda"}, ["MHCFLASH_DEVICE=cuda", "no CUDA device"]),
}


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    """Run every case at once; name -> (CompletedProcess-like tuple (rc, stdout, stderr), expected words)."""
    tmp = tmp_path_factory.mktemp("startup")
    weights = make_tiny_weights(tmp / "tiny")
    corrupt = tmp / "corrupt"
    corrupt.mkdir()
    (corrupt / "config.txt").write_text((weights / "config.txt").read_text())
    (corrupt / "model.safetensors").write_bytes(b"\x00not a safetensors file\x00" * 8)
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = str(busy.getsockname()[1])
    base = {k: v for k, v in os.environ.items() if not k.startswith("MHCFLASH_")}  # the defaults: log level info
    base.update(PYTHONPATH=str(REPO), MHCFLASH_WEIGHTS=str(weights), MHCFLASH_PORT="0", MHCFLASH_DEVICE="cpu",
                COLUMNS="80")

    def fill(text: str) -> str:
        return text.replace("{weights}", str(weights)).replace("{corrupt}", str(corrupt)).replace("{port}", port)

    procs = {}
    for name, (cmd, env, words) in CASES.items():
        if name == "module-no-gpu" and torch.cuda.is_available():
            continue
        procs[name] = (subprocess.Popen([fill(c) for c in cmd], cwd=REPO, env={**base, **{k: fill(v) for k, v in
                                        env.items()}}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
                       [fill(w) for w in words])
    try:
        results = {}
        for name, (proc, words) in procs.items():
            out, err = proc.communicate(timeout=300)
            results[name] = ((proc.returncode, out, err), words)
        yield results
    finally:
        for proc, _ in procs.values():
            if proc.poll() is None:
                proc.kill()
        busy.close()


@pytest.mark.parametrize("name", list(CASES))
def test_startup_failure_is_one_line_and_non_zero(outcomes, name):
    if name not in outcomes:
        pytest.skip("a CUDA device is present: MHCFLASH_DEVICE=cuda is valid here")
    (code, out, err), words = outcomes[name]
    assert code != 0
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: cannot start the service: "), lines[0]
    for word in words:
        assert word in lines[0], (word, lines[0])
