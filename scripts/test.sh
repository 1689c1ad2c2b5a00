#!/usr/bin/env bash
# Installs everything, then runs the whole test suite: lint, types, unit, integration.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
.venv/bin/ruff check src tests bench
.venv/bin/mypy
.venv/bin/python -m pytest -q tests "$@"
