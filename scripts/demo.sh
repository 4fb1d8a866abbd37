#!/usr/bin/env bash
# Sets everything up (first run only) and runs the main job: `secateur demo` on real MNIST.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/secateur demo "$@"
