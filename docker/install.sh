#!/usr/bin/env bash
# Install steps of the mhcflash GPU image, runnable outside Docker too (any Linux x86-64 host with an
# NVIDIA driver for CUDA 13): PyTorch on the tested CUDA line, FlashAttention 4, then the project.
#
#   bash docker/install.sh              install into the active Python environment (the image: /opt/venv)
#   VENV=/opt/mhcflash bash docker/install.sh    create that virtual environment first and install into it
#   VENV=... VENV_SYSTEM_SITE_PACKAGES=1 bash docker/install.sh    the venv sees the host's packages
#                                       (a host whose Python already has the pinned torch keeps it)
#   WHEELHOUSE=/path bash docker/install.sh      offline: every package from that folder of wheels
#                                       (setuptools and wheel too: the project is built in isolation)
#   bash docker/install.sh --check      validate the pins and the project install; changes nothing (CI)
#
# Pins: docker/stack.env (torch, its CUDA tag, Python, flash-attn-4, nvidia-cutlass-dsl, base image).
# A torch that already is the pinned build (e.g. a host image that ships it) is kept, not reinstalled.
# FlashAttention 4 is a pure-Python wheel (CuTe-DSL kernels compiled at first use, ~4 s per head-width
# configuration); the service's warm-up compiles what it serves before /ready. Without it the service
# runs PyTorch SDPA (cuDNN) and says so on /info and in mhcflash_attention_backend_info.
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
PROJECT_DIR="${PROJECT_DIR:-$(cd "$HERE/.." && pwd)}"
# shellcheck source=stack.env
source "$HERE/stack.env"
PY="${PYTHON:-python3}"
TORCH_INDEX="${TORCH_INDEX:-https://download.pytorch.org/whl/${TORCH_CUDA}}"

pip_args() {  # offline hosts: only the wheelhouse
  if [[ -n "${WHEELHOUSE:-}" ]]; then echo "--no-index --find-links ${WHEELHOUSE}"; fi
}

check() {
  local ok=1
  [[ "$TORCH_VERSION" =~ ^2\.[0-9]+\.[0-9]+$ ]] || { echo "TORCH_VERSION '$TORCH_VERSION' is not like 2.11.0"; ok=0; }
  [[ "$TORCH_CUDA" =~ ^cu1[0-9]{2}$ ]] || { echo "TORCH_CUDA '$TORCH_CUDA' is not like cu130"; ok=0; }
  [[ "$PYTHON_VERSION" =~ ^3\.[0-9]+$ ]] || { echo "PYTHON_VERSION '$PYTHON_VERSION' is not like 3.12"; ok=0; }
  [[ "$FLASH_ATTN_4_VERSION" =~ ^4\. ]] || { echo "FLASH_ATTN_4_VERSION '$FLASH_ATTN_4_VERSION' is not a 4.x"; ok=0; }
  local cuda_major="${TORCH_CUDA:2:2}"
  [[ "$CUDA_BASE_IMAGE" == nvidia/cuda:${cuda_major}.* ]] || { echo "base image $CUDA_BASE_IMAGE is not CUDA ${cuda_major}"; ok=0; }
  grep -q "^ARG CUDA_BASE_IMAGE=${CUDA_BASE_IMAGE}\$" "$HERE/Dockerfile" \
    || { echo "docker/Dockerfile's ARG CUDA_BASE_IMAGE differs from stack.env ($CUDA_BASE_IMAGE)"; ok=0; }
  grep -q "\"flash-attn-4>=${FLASH_ATTN_4_VERSION}\"" "$PROJECT_DIR/pyproject.toml" \
    || { echo "pyproject.toml's gpu extra does not pin flash-attn-4>=${FLASH_ATTN_4_VERSION}"; ok=0; }
  grep -q "\"nvidia-cutlass-dsl\[cu13\]>=${CUTLASS_DSL_VERSION}\"" "$PROJECT_DIR/pyproject.toml" \
    || { echo "pyproject.toml's gpu extra does not pin nvidia-cutlass-dsl[cu13]>=${CUTLASS_DSL_VERSION}"; ok=0; }
  echo "check: torch ${TORCH_VERSION}+${TORCH_CUDA} (${TORCH_INDEX}), Python ${PYTHON_VERSION}," \
       "flash-attn-4 ${FLASH_ATTN_4_VERSION}, nvidia-cutlass-dsl ${CUTLASS_DSL_VERSION}, ${CUDA_BASE_IMAGE}"
  # The project itself must install (metadata and build backend; nothing written).
  "$PY" -m pip install --dry-run --no-deps "$PROJECT_DIR" >/dev/null || { echo "pip cannot install the project"; ok=0; }
  if [[ $ok == 1 ]]; then echo "check: OK"; else echo "check: FAILED"; return 1; fi
}

install() {
  if [[ -n "${VENV:-}" ]]; then
    local venv_args=()
    [[ "${VENV_SYSTEM_SITE_PACKAGES:-0}" == 1 ]] && venv_args+=(--system-site-packages)
    if [[ ! -x "$VENV/bin/python" ]]; then
      "$PY" -m venv "${venv_args[@]}" "$VENV"
      if [[ "${VENV_SYSTEM_SITE_PACKAGES:-0}" == 1 ]]; then
        # --system-site-packages reaches the base interpreter only; when $PY is itself a virtual
        # environment (a host image's /opt/.../.venv holding torch), a .pth file adds its site-packages.
        "$PY" -c 'import site; print("\n".join(site.getsitepackages()))' \
          > "$("$VENV/bin/python" -c 'import site; print(site.getsitepackages()[0])')/host-site-packages.pth"
      fi
    fi
    PY="$VENV/bin/python"
  fi
  local want="${TORCH_VERSION}+${TORCH_CUDA}" have
  have="$("$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null || true)"
  if [[ "$have" == "$want" ]]; then
    echo "torch $have already installed: kept"
  elif [[ -n "${WHEELHOUSE:-}" ]]; then
    # shellcheck disable=SC2046
    "$PY" -m pip install --no-cache-dir $(pip_args) "torch==${TORCH_VERSION}"
  else
    "$PY" -m pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "$TORCH_INDEX"
  fi
  # FlashAttention 4 and its CuTe-DSL stack, exactly the pinned set (--no-deps: nvidia-cutlass-dsl would
  # also pull its CUDA 12 libraries), then their plain dependencies, then the project.
  # shellcheck disable=SC2046
  "$PY" -m pip install --no-cache-dir $(pip_args) --no-deps "flash-attn-4==${FLASH_ATTN_4_VERSION}" \
    "nvidia-cutlass-dsl==${CUTLASS_DSL_VERSION}" "nvidia-cutlass-dsl-libs-base==${CUTLASS_DSL_VERSION}" \
    "nvidia-cutlass-dsl-libs-core==${CUTLASS_DSL_VERSION}" "nvidia-cutlass-dsl-libs-cu13==${CUTLASS_DSL_VERSION}" \
    "apache-tvm-ffi==${APACHE_TVM_FFI_VERSION}" "torch-c-dlpack-ext==${TORCH_C_DLPACK_EXT_VERSION}" \
    "quack-kernels==${QUACK_KERNELS_VERSION}"
  # shellcheck disable=SC2046
  "$PY" -m pip install --no-cache-dir $(pip_args) einops "typing-extensions>=4.13" "cuda-bindings>=12.8" \
    "protobuf>=4.21.12" "$PROJECT_DIR"
  "$PY" - <<'PYCHECK'
import importlib.metadata as md
import torch
print("installed: torch", torch.__version__, "| CUDA", torch.version.cuda, "| flash-attn-4", md.version("flash-attn-4"))
try:
    from flash_attn.cute import flash_attn_func  # noqa: F401  (imports cutlass; kernels compile at first use)
    print("flash_attn.cute: importable")
except Exception as exc:  # a build host without a GPU driver may not load it; the service says so at start
    print(f"flash_attn.cute: not importable here ({type(exc).__name__}: {exc})")
PYCHECK
}

case "${1:-install}" in
  --check) check ;;
  install) install ;;
  *) echo "usage: $0 [--check]"; exit 2 ;;
esac
