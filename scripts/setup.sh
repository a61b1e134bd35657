#!/usr/bin/env bash
# Install the project and what it needs on a fresh machine.
#   bash scripts/setup.sh          runtime (service, CLI, training)
#   bash scripts/setup.sh dev      + test tools
# PyTorch first: where no NVIDIA GPU is visible we pin the CPU build this workplace keeps on local
# disk (torch==2.13.0); on a GPU host pip resolves the project's torch range to a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    "$PY" -m pip install -q "torch>=2.4,<2.15"
  else
    "$PY" -m pip install -q "torch==2.13.0"
  fi
fi
extras=""
[ "${1:-}" = "dev" ] && extras="[dev]"
"$PY" -m pip install -q -e ".${extras}"
"$PY" -c "import torch, model, service; print('installed: torch', torch.__version__, '| cuda', torch.cuda.is_available())"
