"""The shape of the model/mhc/ package: no import cycles among its modules, each module imports on its
own, nothing imports Triton at import time, and files stay small."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "model" / "mhc"
ROOT = "model.mhc"
MAX_LINES = 400


def _modules() -> dict[str, Path]:
    """Dotted name -> file of every module of the package (a package is its ``__init__``)."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that ``path`` imports, anywhere in the file (lazy imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in modules)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module in modules:
                found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in modules)
    return found


def test_no_import_cycles_and_no_module_imports_the_package_root():
    modules = _modules()
    graph = {name: _imports(path, modules) - {name} for name, path in modules.items()}
    for name, deps in graph.items():
        if name != ROOT:
            assert ROOT not in deps, f"{name} imports {ROOT} (its __init__): import the submodule instead"
    # Kahn's algorithm: every module must come out, else the rest lie on a cycle
    remaining = {name: set(deps) for name, deps in graph.items()}
    while True:
        ready = [name for name, deps in remaining.items() if not deps]
        if not ready:
            break
        for name in ready:
            del remaining[name]
        for deps in remaining.values():
            deps.difference_update(ready)
    assert not remaining, f"import cycle among {sorted(remaining)}"


def test_each_module_imports_alone_without_triton():
    """Each module, imported first in a fresh ``model`` package (the ``model.*`` entries of sys.modules
    dropped in between), loads; none but the Triton sources (``_*_triton.py``, loaded lazily by their
    launchers) imports Triton."""
    sources = [name for name in sorted(_modules()) if name.rsplit(".", 1)[-1].endswith("_triton")]
    names = [name for name in sorted(_modules()) if name not in sources] + sources  # Triton's last
    assert sources, "the Triton sources were not found"
    code = "\n".join([
        "import importlib, importlib.util, sys",
        "import torch  # noqa: F401 (kept between the imports: only model.* is dropped)",
        f"for name in {names!r}:",
        f"    if name in {sources!r} and importlib.util.find_spec('triton') is None:",
        "        continue",
        "    for key in [k for k in sys.modules if k == 'model' or k.startswith('model.')]:",
        "        del sys.modules[key]",
        "    importlib.import_module(name)",
        f"    assert name in {sources!r} or 'triton' not in sys.modules, name",
        "print('ok')",
    ])
    res = subprocess.run([sys.executable, "-c", code], cwd=PACKAGE.parent.parent, capture_output=True, text=True,
                         timeout=300, check=False)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-3000:]


def test_files_stay_small():
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, f"over {MAX_LINES} lines: {long}"
