#!/usr/bin/env bash
# Sets up .venv if needed, then runs the whole test suite (GPU tests skip without CUDA), in two
# processes (pytest-xdist), a test file's tests together in one of them (module fixtures, file
# order); tests/conftest.py gives each half the cores for torch's threads.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -n 2 --dist loadfile --durations=10 "$@"
