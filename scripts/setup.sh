#!/usr/bin/env bash
# Create .venv and install what the tests and the demo need, from this repository's files only.
# Works on a machine with nothing but Python >= 3.11; rerunning is cheap (pip skips what is there).
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
"${pip[@]}" -r requirements/test.txt
# The original LLaVA code pins torch 2.0.1 / transformers 4.36 in its metadata but runs on ours.
"${pip[@]}" --no-deps llava-torch==1.2.2.post1 -r requirements/llava.txt
"${pip[@]}" --no-deps -e .
