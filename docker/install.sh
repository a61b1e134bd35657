#!/usr/bin/env bash
# Install steps of the mhcflash GPU image. The Dockerfile runs `install.sh`; CI runs
# `install.sh --check`, which validates the pins and the project install without CUDA packages.
#
# Pins (change together): CUDA 12.4 runtime base, Python 3.11, torch 2.5.1+cu124, flash-attn 2.7.4.post1.
# flash-attn comes as a prebuilt wheel from its GitHub release whose name encodes the CUDA major
# version, the torch minor version, the C++ ABI flag and the Python tag; that wheel must match the
# torch installed here, or flash_attn fails to import (undefined symbol). The service then falls back
# to PyTorch SDPA and says so on /info and in mhcflash_attention_backend_info.
set -euo pipefail

CUDA_TAG="${CUDA_TAG:-cu124}"
TORCH_VERSION="${TORCH_VERSION:-2.5.1}"
PYTHON_TAG="${PYTHON_TAG:-cp311}"
FLASH_ATTN_VERSION="${FLASH_ATTN_VERSION:-2.7.4.post1}"
CXX11_ABI="${CXX11_ABI:-FALSE}"
TORCH_MINOR="${TORCH_VERSION%.*}"
FLASH_ATTN_WHEEL="flash_attn-${FLASH_ATTN_VERSION}+cu12torch${TORCH_MINOR}cxx11abi${CXX11_ABI}-${PYTHON_TAG}-${PYTHON_TAG}-linux_x86_64.whl"
FLASH_ATTN_URL="https://github.com/Dao-AILab/flash-attention/releases/download/v${FLASH_ATTN_VERSION}/${FLASH_ATTN_WHEEL}"
PROJECT_DIR="${PROJECT_DIR:-$(cd "$(dirname "$0")/.." && pwd)}"

check() {
  local ok=1
  [[ "$CUDA_TAG" =~ ^cu1[12][0-9]$ ]] || { echo "CUDA_TAG '$CUDA_TAG' is not like cu124"; ok=0; }
  [[ "$TORCH_VERSION" =~ ^2\.[0-9]+\.[0-9]+$ ]] || { echo "TORCH_VERSION '$TORCH_VERSION' is not like 2.5.1"; ok=0; }
  [[ "$PYTHON_TAG" =~ ^cp3[0-9]+$ ]] || { echo "PYTHON_TAG '$PYTHON_TAG' is not like cp311"; ok=0; }
  [[ "$FLASH_ATTN_WHEEL" == *"torch${TORCH_MINOR}"*"-${PYTHON_TAG}-"* ]] || { echo "flash-attn wheel does not match torch/python"; ok=0; }
  [[ -f "$PROJECT_DIR/pyproject.toml" ]] || { echo "no pyproject.toml in $PROJECT_DIR"; ok=0; }
  local py_tag
  py_tag="cp$(python3 -c 'import sys; print(f"{sys.version_info[0]}{sys.version_info[1]}")')"
  echo "check: torch ${TORCH_VERSION}+${CUDA_TAG}, flash-attn wheel ${FLASH_ATTN_WHEEL} (host python ${py_tag})"
  # The project itself must install (dependency resolution only, nothing written).
  python3 -m pip install --dry-run --no-deps "$PROJECT_DIR" >/dev/null || { echo "pip cannot install the project"; ok=0; }
  [[ $ok == 1 ]] && echo "check: OK" || { echo "check: FAILED"; return 1; }
}

install() {
  python3 -m pip install --no-cache-dir --upgrade pip
  python3 -m pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "https://download.pytorch.org/whl/${CUDA_TAG}"
  python3 -m pip install --no-cache-dir "${FLASH_ATTN_URL}"
  python3 -m pip install --no-cache-dir "$PROJECT_DIR"
  python3 -c "import torch, flash_attn; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'flash_attn', flash_attn.__version__)"
}

case "${1:-install}" in
  --check) check ;;
  install) install ;;
  *) echo "usage: $0 [--check]"; exit 2 ;;
esac
