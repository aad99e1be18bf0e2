#!/usr/bin/env bash
# Install (scripts/setup.sh), then run the guard A/B demo on a tiny LLaVA built offline.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/vlsae-guard demo --out runs/demo "$@"
