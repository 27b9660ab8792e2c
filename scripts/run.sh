#!/usr/bin/env bash
# The main job, end to end: set up, then prepare -> train -> evaluate -> export -> live service check.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export FEWSHOT_DATA="${FEWSHOT_DATA:-$(cd .. && pwd)/shared/datasets}"
.venv/bin/fewshot pipeline "${1:-configs/quickstart.yaml}" "${@:2}"
