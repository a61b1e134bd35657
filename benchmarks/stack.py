"""The tested GPU stack (docker/stack.env) beside the stack a benchmark actually ran on.

GPU benchmarks put ``stack()`` into their JSON, so every figure says whether it was measured on the
stack the image installs. ``python benchmarks/stack.py`` prints both.
"""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path

STACK_ENV = Path(__file__).resolve().parent.parent / "docker" / "stack.env"


def tested(path: Path = STACK_ENV) -> dict[str, str]:
    """The pins of docker/stack.env: {KEY: value}."""
    pins = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            pins[key] = value
    return pins


def running() -> dict[str, str | None]:
    """What this process runs on: torch (+ CUDA tag), CUDA, cuDNN, GPU, flash-attn-4."""
    import torch

    def dist(name: str) -> str | None:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    cuda = torch.cuda.is_available()
    return {"torch": torch.__version__, "cuda": torch.version.cuda,
            "cudnn": str(torch.backends.cudnn.version()) if cuda else None,
            "gpu": torch.cuda.get_device_name() if cuda else None,
            "flash_attn_4": dist("flash-attn-4"), "cutlass_dsl": dist("nvidia-cutlass-dsl")}


def stack() -> dict:
    """{"tested": pins, "running": what runs, "on_tested_stack": torch build and flash-attn-4 equal}."""
    pins, now = tested(), running()
    same = (now["torch"] == f"{pins['TORCH_VERSION']}+{pins['TORCH_CUDA']}"
            and now["flash_attn_4"] in (None, pins["FLASH_ATTN_4_VERSION"]))
    return {"tested": pins, "running": now, "on_tested_stack": same}


if __name__ == "__main__":
    print(json.dumps(stack(), indent=1))
