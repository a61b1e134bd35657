"""Atomic file writes: readers see the old file or the new one, never half of one.

Every file the project writes for later use (checkpoints, weights, the data cache and its manifest,
the training-set index) goes through :func:`atomic_write`: write a temporary sibling, flush and fsync
it, then ``os.replace`` it over the target. A crash, ``kill -9`` or two writers (DDP ranks) at any
moment leave the previous file intact and no temporary behind.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

__all__ = ["atomic_write", "atomic_write_bytes"]


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> Path:
    """Call ``write(f)`` on a binary file object for a temporary sibling of ``path``, then rename it
    over ``path`` (mode 0644). On any exception the temporary is removed and the error re-raised."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """:func:`atomic_write` of ``data``."""
    return atomic_write(path, lambda f: f.write(data))
