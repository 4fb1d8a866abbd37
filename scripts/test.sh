#!/usr/bin/env bash
# Sets everything up (first run only) and runs the whole test suite, slow tests included.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/setup_browser.sh
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
