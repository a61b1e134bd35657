"""The service reaches the model through one facade: every module of `service/` imports `model.sampler`
(and `model.limits`, the request ranges it shares with the command line) and no other model module;
no module of `model/` imports `service/`. The console command (`service/cli.py`) is the one module that
joins both: it adds `serve` and `client` to the model's command-line app (`model.cli`).

Imports are read with `ast` from the source (top level, inside functions and `TYPE_CHECKING` blocks
alike), so a lazy import inside a function counts too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SERVICE_MAY_IMPORT = {"model.sampler", "model.limits"}
SERVICE_CONSOLE = {"service/cli.py"}  # `mhcflash`: model.cli's app plus serve and client


def imports(source: str, filename: str = "<source>") -> list[tuple[int, str]]:
    """(line, module) for every absolute import; `from model import x` counts as `model.x`."""
    found = []
    for node in ast.walk(ast.parse(source, filename=filename)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module in ("model", "service"):
                found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
            else:
                found.append((node.lineno, node.module))
    return found


def in_package(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def violations(package_dir: str, other: str, allowed: set[str], exempt: set[str] = frozenset()) -> list[str]:
    out = []
    for path in sorted((ROOT / package_dir).rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel in exempt:
            continue
        for line, module in imports(path.read_text(), rel):
            if in_package(module, other) and module not in allowed:
                out.append(f"{rel}:{line}: imports {module}")
    return out


def test_service_imports_only_the_model_facade():
    bad = violations("service", "model", SERVICE_MAY_IMPORT, SERVICE_CONSOLE)
    assert not bad, "service/ must reach the model through model.sampler (or model.limits):\n" + "\n".join(bad)


def test_the_console_command_joins_model_and_service_cli_only():
    allowed = SERVICE_MAY_IMPORT | {"model.cli"}
    bad = [f"service/cli.py:{line}: imports {m}" for line, m in imports((ROOT / "service/cli.py").read_text())
           if in_package(m, "model") and m not in allowed]
    assert not bad, "\n".join(bad)


def test_model_does_not_import_the_service():
    bad = violations("model", "service", set())
    assert not bad, "model/ must not depend on service/:\n" + "\n".join(bad)


@pytest.mark.parametrize(("source", "flagged"), [
    ("from model.diffusion import Schedule", ["model.diffusion"]),
    ("def f():\n    from model.weights_io import load_weights", ["model.weights_io"]),
    ("import model.geometry as g", ["model.geometry"]),
    ("from model import build_denoiser, sampler", ["model.build_denoiser"]),
    ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from model.denoiser import Denoiser", ["model.denoiser"]),
    ("from model.sampler import Sampler\nfrom model.limits import SampleLimits\nimport torch", []),
])
def test_the_check_sees_every_kind_of_import(source, flagged):
    found = [m for _, m in imports(source) if in_package(m, "model") and m not in SERVICE_MAY_IMPORT]
    assert found == flagged
