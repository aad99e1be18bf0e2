#!/usr/bin/env bash
# Install (scripts/setup.sh), lint, run the fast suite; then the vLLM tests in .venv-vllm
# (scripts/setup-vllm.sh). Extra args go to both pytest runs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff format --check .
.venv/bin/ruff check .
.venv/bin/python -m pytest -q -m "not vllm" "$@"
# The vLLM plugin on real engines (CPU), in their own environment. VLLM_TESTS=0 skips them.
[ "${VLLM_TESTS:-1}" = 0 ] && exit 0
bash scripts/setup-vllm.sh
status=0
.venv-vllm/bin/python -m pytest -q -m vllm --timeout 900 "$@" || status=$?
[ "$status" = 5 ] && status=0  # no test selected (a -k filter for the fast suite)
exit "$status"
