#!/usr/bin/env bash
# Installs everything, then runs corral's main job against a local demo world (examples/demo.py).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/python examples/demo.py "$@"
