"""The README's first section stays true: its two commands use the project's .venv and CI runs the
test command exactly as written; every curl example (README and docs/) fails on an HTTP error instead of
saving the error body; the sample JSON response has the keys a real /sample response has (asked over
HTTP)."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import httpx

from service.testing import serve_in_thread, tiny_settings

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()
QUICKSTART = README[: README.index("\n## ")]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)


def _blocks(text: str, lang: str) -> list[str]:
    return [body for kind, body in FENCE.findall(text) if kind == lang]


def _shell_commands(text: str) -> list[str]:
    """Each command of each bash block, continuation lines joined, comments dropped."""
    commands = []
    for body in _blocks(text, "bash"):
        joined = re.sub(r"\\\n\s*", " ", body)
        commands += [shlex.join(shlex.split(line, comments=True)) for line in joined.splitlines()
                     if shlex.split(line, comments=True)]
    return commands


def _fails_on_http_error(args: list[str]) -> bool:
    return any(a in ("--fail", "--fail-with-body") or re.fullmatch(r"-[a-zA-Z]*f[a-zA-Z]*", a) for a in args)


def test_readme_starts_with_the_two_commands_in_the_venv():
    serve, tests = _blocks(QUICKSTART, "bash")[:2]
    assert serve.strip() == "bash scripts/serve.sh"
    assert re.fullmatch(r'bash scripts/setup\.sh dev && \.venv/bin/python -m pytest -q -m "not gpu"\n', tests)


def test_ci_runs_the_readme_test_command_verbatim():
    test_command = _blocks(QUICKSTART, "bash")[1].strip()
    ci_lines = [ln.strip() for ln in (REPO / ".ci" / "run").read_text().splitlines()]
    assert test_command in ci_lines, f".ci/run does not run the README's test command: {test_command}"
    assert not [ln for ln in ci_lines if "pytest" in ln and ln != test_command], "CI runs pytest another way too"


def test_every_readme_curl_fails_on_http_errors():
    curls = [shlex.split(c) for c in _shell_commands(README) if c.startswith("curl ")]
    assert len(curls) >= 2
    for doc in sorted((REPO / "docs").glob("*.md")):  # the documents' curl examples too
        curls += [shlex.split(c) for c in _shell_commands(doc.read_text()) if c.startswith("curl ")]
    for args in curls:
        assert _fails_on_http_error(args), f"without -f an error body is taken for the answer: {shlex.join(args)}"
    assert not _fails_on_http_error(["curl", "-s", "localhost:8000/sample", "-H", "accept: chemical/x-pdb"])


def test_readme_sample_json_has_the_real_response_keys(tiny_weights):
    example = json.loads(_blocks(QUICKSTART, "json")[0])
    with serve_in_thread(tiny_settings(tiny_weights)) as srv:
        real = httpx.post(f"{srv.url}/sample", json={"length": 20, "count": 2, "seed": 7}, timeout=60).json()

    def shape(value):
        if isinstance(value, dict):
            return {k: shape(v) for k, v in value.items()}
        if isinstance(value, list):
            return [shape(v) for v in value]
        return type(value).__name__

    assert shape(example) == shape(real)
    assert [s["seed"] for s in example["samples"]] == [s["seed"] for s in real["samples"]] == [7, 8]
