#!/usr/bin/env bash
# Sets up .venv if needed, then runs the whole test suite (GPU tests skip without CUDA), in two
# processes (pytest-xdist): tests/conftest.py groups each file's tests (module fixtures, file
# order) and the files that share the SmolLM2 session fixtures, and gives each process half the
# cores for torch's threads.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -n 2 --dist loadfile --durations=10 "$@"
