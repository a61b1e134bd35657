#!/usr/bin/env bash
# Set up (first run) and start the sampling service on the shipped weights, GPU if present.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${PYTHON:-python3}" -m model.cli serve "$@"
