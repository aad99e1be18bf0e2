#!/usr/bin/env bash
# Install (scripts/setup.sh), lint, run the fast suite, then the slow tests (subprocesses,
# torchrun), then the vLLM tests in .venv-vllm (scripts/setup-vllm.sh). Extra args go to every
# pytest run.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff format --check .
.venv/bin/ruff check .
# A run that selects no test exits 5 (a -k filter meant for another run): not a failure.
selected() { local s=0; "$@" || s=$?; [ "$s" = 5 ] && s=0; return "$s"; }
selected .venv/bin/python -m pytest -q -m "not vllm" "$@"
selected .venv/bin/python -m pytest -q -m "slow and not vllm" "$@"
# lmms-eval's model vlsae_llava, in its own environment. LMMS_TESTS=0 skips them.
if [ "${LMMS_TESTS:-1}" != 0 ]; then
  bash scripts/setup-lmms.sh
  selected .venv-lmms/bin/python -m pytest -q -m lmms "$@"
fi
# The vLLM plugin on real engines (CPU), in their own environment. VLLM_TESTS=0 skips them.
[ "${VLLM_TESTS:-1}" = 0 ] && exit 0
bash scripts/setup-vllm.sh
selected .venv-vllm/bin/python -m pytest -q -m vllm --timeout 900 "$@"
