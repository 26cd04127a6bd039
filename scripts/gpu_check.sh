#!/usr/bin/env bash
# The GPU check in one run (about 5-8 minutes on a lent GPU machine): installs onnxruntime-gpu from the wheel's
# parts when they are there, then runs `python -m benchmarks.gpu_check`, which trains and exports the meld model
# on this machine, times and compares PyTorch (eager fp32 / fp16 autocast, torch.compile) and the runtime
# (onnxruntime CUDA EP fp32 / fp16, CPU) on CUDA, and writes gpu_check.json and gpu_check.md to OUT, rewritten after
# every step; this script adds gpu_check.log (everything printed). docs/gpu.md says what it measures.
# Without CUDA it is the dry run: the CUDA parts are listed as not run, the rest runs, exit code 3.
#
# Usage: bash scripts/gpu_check.sh [OUT] [--quick]      OUT default: $OUT, else runs/gpu_check/report
#        PYTHON (default python3, the GPU image's PyTorch), CMATH_GPU_PARTS (default /tmp/cmath_gpu_parts)
#
# On a lent GPU machine (the `run` tool; one call carries at most 64 MiB, the machine stays warm ~30 s after a
# call and keeps files outside the work tree between warm calls):
#   here:   bash scripts/gpu_wheel_parts.sh      (gpu_parts/: the wheel in 4 parts + SHA256SUMS, ignored)
#   device: one call per part, back to back, each with carry ["gpu_parts/SHA256SUMS", "gpu_parts/<wheel>.part-NN"]:
#             mkdir -p /tmp/cmath_gpu_parts && cp gpu_parts/* /tmp/cmath_gpu_parts/
#           and in the last part's call (timeout_s 560) the check as well:
#             mkdir -p /tmp/cmath_gpu_parts && cp gpu_parts/* /tmp/cmath_gpu_parts/ && bash scripts/gpu_check.sh "$OUT"
#           A rerun while the machine is warm reuses the installed wheel and the trained runs (runs/gpu_check/).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-runs/gpu_check/report}}
[ $# -gt 0 ] && shift
PYTHON=${PYTHON:-python3}
PARTS=${CMATH_GPU_PARTS:-/tmp/cmath_gpu_parts}
SITE=/tmp/cmath_ort_gpu  # onnxruntime-gpu goes here, ahead of the image's CPU onnxruntime on PYTHONPATH
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# On a GPU machine no step starts after 480 s, so that the report is complete inside a 10-minute device call.
if command -v nvidia-smi > /dev/null; then export CMATH_GPU_CHECK_BUDGET_S=${CMATH_GPU_CHECK_BUDGET_S:-480}; fi

# onnxruntime-gpu from the parts in $PARTS (or gpu_parts/ of this tree): all listed parts present and matching
# SHA256SUMS, reassembled, the wheel's own sum checked, then pip install --no-index --no-deps. Any failure is
# printed and the check goes on with the installed onnxruntime (its report then says why CUDA EP did not run).
install_onnxruntime_gpu() {
    local dir="" d wheel
    if [ -d "$SITE/onnxruntime" ]; then
        echo "onnxruntime-gpu: already installed in $SITE"
        export PYTHONPATH="$SITE:$PYTHONPATH"
        return 0
    fi
    for d in "$PARTS" gpu_parts; do
        if [ -f "$d/SHA256SUMS" ]; then dir=$d; break; fi
    done
    if [ -z "$dir" ]; then
        echo "onnxruntime-gpu: no parts in $PARTS or gpu_parts/ (make them with scripts/gpu_wheel_parts.sh);" \
             "going on with the installed onnxruntime"
        return 0
    fi
    wheel=$(awk 'NR == 1 {print $2}' "$dir/SHA256SUMS")
    if ! (cd "$dir" && grep '\.part-' SHA256SUMS | sha256sum -c --quiet -); then
        echo "onnxruntime-gpu: parts in $dir missing or not matching SHA256SUMS (copy every part); not installed"
        return 1
    fi
    cat "$dir/$wheel".part-* > "$dir/$wheel"
    if ! (cd "$dir" && grep " $wheel\$" SHA256SUMS | sha256sum -c --quiet -); then
        echo "onnxruntime-gpu: the reassembled $wheel does not match SHA256SUMS; not installed"
        return 1
    fi
    if ! "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$dir/$wheel"; then
        echo "onnxruntime-gpu: pip could not install $wheel with $("$PYTHON" --version 2>&1)"
        return 1
    fi
    export PYTHONPATH="$SITE:$PYTHONPATH"
    echo "onnxruntime-gpu: installed $wheel (sha256 checked) into $SITE"
}

main() {
    echo "gpu_check: $("$PYTHON" --version 2>&1) at $(command -v "$PYTHON"), tree $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
    install_onnxruntime_gpu
    "$PYTHON" -m benchmarks.gpu_check "$OUT_DIR" "$@"
}

mkdir -p "$OUT_DIR"
main "$@" 2>&1 | tee "$OUT_DIR/gpu_check.log"
exit "${PIPESTATUS[0]}"
