#!/usr/bin/env bash
# Sets up .venv if needed, then runs the whole test suite (GPU tests skip without CUDA).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest --durations=10 "$@"
