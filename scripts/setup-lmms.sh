#!/usr/bin/env bash
# Create .venv-lmms: lmms-eval with this package, for `pytest -m lmms` (the vlsae_llava model).
# From this repository's files only (requirements/base.txt + lmms.txt); rerunning is cheap.
# A separate environment because lmms-eval pulls in many packages (datasets, evaluate, wandb,
# opencv, ...) that the package and its other tests do not need.
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
[ -x .venv-lmms/bin/python ] || "$python" -m venv .venv-lmms
pip=(.venv-lmms/bin/python -m pip install --quiet --disable-pip-version-check)
"${pip[@]}" -r requirements/base.txt -r requirements/lmms.txt
# PyPI's torchvision is built against PyPI's (CUDA) torch and does not load with the CPU torch
# base.txt installs; transformers falls back to its PIL image processors without it, and
# lmms-eval's image tasks do not import it.
.venv-lmms/bin/python -m pip uninstall --quiet --yes torchvision
"${pip[@]}" --no-deps -e .
