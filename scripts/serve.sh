#!/usr/bin/env bash
# Set up .venv (first run; see scripts/setup.sh) and start the sampling service on the shipped weights,
# GPU if present. Arguments go to `mhcflash serve` (e.g. --port 8080). Ctrl-C / SIGTERM drains and stops.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m service.cli serve "$@"
