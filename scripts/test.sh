#!/usr/bin/env bash
# Set up, then lint (ruff), type-check (mypy) and run the test suite (pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export FEWSHOT_DATA="${FEWSHOT_DATA:-$(cd .. && pwd)/shared/datasets}"
.venv/bin/ruff check src tests benchmarks
.venv/bin/mypy
.venv/bin/python -m pytest "$@"
