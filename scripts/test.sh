#!/usr/bin/env bash
# Installs cmath (CPU) and runs the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
.venv/bin/python -m ruff check .
.venv/bin/python -m pytest -q
