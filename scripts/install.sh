#!/usr/bin/env bash
# Installs cmath with everything for training, export, tests and benchmarks into .venv (CPU only).
# torch==2.13.0 first: it is the local CPU build; a plain `torch` requirement could pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e '.[dev]'
