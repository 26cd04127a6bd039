#!/usr/bin/env bash
# The main job: install, train CMATH on the embedded synthetic data, export (fp32 + fp16 + int8 ONNX), benchmark.
# The benchmark pages land in docs/bench/ and the README's generated tables are refreshed from them.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
RUN=${RUN:-runs/main}
BENCH=${BENCH:-docs/bench}
# Streaming: a causal twin (speed does not depend on training, one epoch will do): step graph vs full recompute.
.venv/bin/cmath-train --preset meld --causal --epochs 1 --quiet --out "$RUN-causal"
.venv/bin/cmath-export "$RUN-causal" --int8 --quiet
.venv/bin/cmath-bench "$RUN-causal" --backends onnxruntime:fp32,onnxruntime-spin,onnxruntime:int8,openvino:fp32 --out "$BENCH/causal"
# The main model: train, export fp32 + fp16 + int8 with parity checks, benchmark every contender against PyTorch
# and against this machine's roofline (ends with the table).
.venv/bin/cmath-train --preset meld --epochs "${EPOCHS:-8}" --out "$RUN"
.venv/bin/cmath-export "$RUN" --fp16 --int8
.venv/bin/cmath-bench "$RUN" --out "$BENCH"
if [ "$BENCH" = docs/bench ]; then .venv/bin/python -m benchmarks.readme; fi
