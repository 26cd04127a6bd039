#!/usr/bin/env bash
# The main job: install, train CMATH on the embedded synthetic data, export (fp32 + fp16 ONNX), benchmark.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
RUN=${RUN:-runs/main}
.venv/bin/cmath-train --preset meld --epochs "${EPOCHS:-8}" --out "$RUN"
.venv/bin/cmath-export "$RUN" --fp16
.venv/bin/cmath-bench "$RUN"
