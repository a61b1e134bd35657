#!/usr/bin/env bash
# Create the project's virtual environment .venv and install the project into it (editable).
#   bash scripts/setup.sh                  runtime (service, CLI, training)
#   bash scripts/setup.sh dev              + test tools
#   bash scripts/setup.sh --dry-run [dev]  print what it would install and run; change nothing
# PyTorch: where nvidia-smi sees a GPU, pip resolves the project's torch range to a CUDA build (PyPI).
# Elsewhere the CPU build, torch==2.13.0+cpu, from PyTorch's CPU wheel index; if that index does not
# answer within 10 s (a machine without internet), from the sources pip is configured with (a local
# wheel or a mirror) -- a CPU-only machine never downloads a CUDA build. A later run installs again
# only when pyproject.toml changed, so `bash scripts/serve.sh` starts at once the second time.
# Environment: PYTHON  the interpreter .venv is made from (default python3; 3.11 or newer)
#              MHCFLASH_TORCH_INDEX  PyTorch's CPU wheel index (default https://download.pytorch.org/whl/cpu)
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_CPU="2.13.0+cpu"
TORCH_GPU="torch>=2.4,<2.15"
INDEX="${MHCFLASH_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}"
PY="${PYTHON:-python3}"
VENV=.venv
VPY="$VENV/bin/python"

dry=0 mode=runtime
for arg in "$@"; do
  case "$arg" in
    --dry-run) dry=1 ;;
    dev) mode=dev ;;
    *) echo "setup.sh: unknown argument '$arg'; usage: bash scripts/setup.sh [--dry-run] [dev]" >&2; exit 2 ;;
  esac
done
die() { echo "setup.sh: $*" >&2; exit 1; }
run() { if [ "$dry" = 1 ]; then echo "+ $*"; else "$@"; fi; }
index_answers() {  # a HEAD request for the torch page of the index, 10 s at most, no retries
  "$PY" - "$1" >/dev/null 2>&1 <<'EOF'
import sys, urllib.request
urllib.request.urlopen(urllib.request.Request(sys.argv[1].rstrip("/") + "/torch/", method="HEAD"), timeout=10)
EOF
}

command -v "$PY" >/dev/null 2>&1 || die "no '$PY' on PATH: install Python 3.11 or newer, or set PYTHON"
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || die "$PY is Python $("$PY" -c 'import platform; print(platform.python_version())'); 3.11 or newer is needed (set PYTHON)"

stamp_value="$(cksum < pyproject.toml)"
if [ -x "$VPY" ] && [ "$(cat "$VENV/.setup-$mode" 2>/dev/null)" = "$stamp_value" ]; then
  echo "setup: $VENV is up to date ($mode)"
  exit 0
fi

if [ ! -x "$VPY" ]; then
  echo "setup: creating $VENV with $PY"
  run "$PY" -m venv "$VENV" || die "'$PY -m venv $VENV' failed (Debian/Ubuntu: apt-get install python3-venv)"
fi

if [ -x "$VPY" ] && "$VPY" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("torch") is None)'; then
  echo "setup: torch already in $VENV"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "setup: NVIDIA GPU found: torch with CUDA from PyPI (several GB)"
  run "$VPY" -m pip install -q "$TORCH_GPU"
elif index_answers "$INDEX"; then
  echo "setup: no NVIDIA GPU: torch $TORCH_CPU (CPU build, ~190 MB) from $INDEX"
  run "$VPY" -m pip install -q --index-url "$INDEX" "torch==$TORCH_CPU" \
    || die "could not install torch $TORCH_CPU from $INDEX (see pip's message above)"
else
  echo "setup: no NVIDIA GPU; $INDEX did not answer: torch $TORCH_CPU from pip's configured sources"
  run "$VPY" -m pip install -q "torch==$TORCH_CPU" \
    || die "no CPU build of torch $TORCH_CPU: $INDEX did not answer and pip's configured sources have none;" \
           "set MHCFLASH_TORCH_INDEX to a reachable mirror of PyTorch's CPU index and rerun"
fi

extras=""
[ "$mode" = dev ] && extras="[dev]"
echo "setup: installing the project${extras:+ with $extras} into $VENV"
run "$VPY" -m pip install -q -e ".$extras"
run "$VPY" -c "import torch, model, service; print('setup: ready in $VENV: torch', torch.__version__, '| CUDA', torch.cuda.is_available())"
if [ "$dry" = 0 ]; then
  echo "$stamp_value" > "$VENV/.setup-$mode"
  [ "$mode" = dev ] && echo "$stamp_value" > "$VENV/.setup-runtime"
fi
echo "setup: use it with '$VPY -m ...' or 'source $VENV/bin/activate'"
