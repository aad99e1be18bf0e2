#!/usr/bin/env bash
# Install (scripts/setup.sh), then run the POPE A/B demo (guard off vs on) on a lab LLaVA
# trained here with a planted hallucination, and its VL-SAE, offline: the README's main command.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python benchmarks/pope.py --demo --out runs/demo "$@"
