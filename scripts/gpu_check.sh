#!/usr/bin/env bash
# The GPU check: on a machine with an NVIDIA GPU, after `pip install -e '.[gpu]'` (onnxruntime-gpu beside PyTorch for
# CUDA), runs `python -m cmath_bench.gpu_check`, which trains and exports the meld model on this machine, times and
# compares PyTorch (eager fp32 / fp16 autocast, torch.compile) and the runtime (onnxruntime CUDA EP fp32 / fp16,
# CPU) on CUDA, and writes gpu_check.json and gpu_check.md to OUT, rewritten after every step; this script adds
# gpu_check.log (everything printed). docs/gpu.md says what it measures.
# Without CUDA it is the dry run: the CUDA parts are listed as not run, the rest runs, exit code 3.
#
# Usage: bash scripts/gpu_check.sh [OUT] [--quick]      OUT default: $OUT, else runs/gpu_check/report
#        PYTHON: the interpreter (default: .venv/bin/python when there, else python3)
#        CMATH_GPU_CHECK_BUDGET_S: seconds after which no further step starts (default: no limit)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-runs/gpu_check/report}}
[ $# -gt 0 ] && shift
if [ -z "${PYTHON:-}" ]; then
    PYTHON=python3
    [ -x .venv/bin/python ] && PYTHON=.venv/bin/python
fi
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

main() {
    echo "gpu_check: $("$PYTHON" --version 2>&1) at $(command -v "$PYTHON"), tree $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
    "$PYTHON" -m cmath_bench.gpu_check "$OUT_DIR" "$@"
}

mkdir -p "$OUT_DIR"
main "$@" 2>&1 | tee "$OUT_DIR/gpu_check.log"
exit "${PIPESTATUS[0]}"
