#!/usr/bin/env bash
# Installs cmath (CPU; nothing when .venv is already complete, see install.sh) and runs ruff, mypy and the whole
# test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
.venv/bin/python -m ruff check .
.venv/bin/python -m ruff format --check .
.venv/bin/python -m mypy  # every installed package: [tool.mypy] in pyproject.toml
# One pytest-xdist worker per core (2 on CI); whole test files per worker, so module fixtures (servers, exports)
# start once; the session's shared runs and exports are built once for all workers (tests/conftest.py).
.venv/bin/python -m pytest -q -n "${CMATH_TEST_WORKERS:-2}" --dist loadfile
