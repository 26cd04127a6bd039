#!/usr/bin/env bash
# Downloads the onnxruntime-gpu wheel for the lent GPU machine, splits it into parts that each fit in one device
# call, and writes their sha256 list. Run it here (it needs PyPI); nothing it writes is committed (gpu_parts/ is
# ignored). scripts/gpu_check.sh, on the GPU machine, reassembles the parts, checks the sums and installs the wheel.
#
# Which wheel: onnxruntime-gpu targets CUDA 13 / cuDNN 9 from 1.27.0 on (its "cuda"/"cudnn" extras require
# nvidia-cuda-runtime ~=13.0 and nvidia-cudnn-cu13 ~=9.0; 1.18-1.26 require the -cu12 packages). 1.28+ name the
# un-suffixed nvidia-* packages that the GPU machine's image holds (nvidia-cuda-runtime, nvidia-cufft,
# nvidia-curand, nvidia-cuda-nvrtc, nvidia-cudnn-cu13, next to torch cu130). 1.30.0 is also the version of the CPU
# onnxruntime in that image. The image's python3 is 3.12 (docs/gpu.md); PY_VERSION overrides it.
#
# The device call sequence (each call carries at most 64 MiB: the work tree plus what `carry` names; a machine
# stays warm ~30 s after a call, and files written outside the work tree survive between warm calls):
#   1. bash scripts/gpu_wheel_parts.sh                       (here)
#   2. one `run` per part, back to back, each carrying that part and the sum list, e.g.
#        carry: ["gpu_parts/SHA256SUMS", "gpu_parts/<wheel>.part-00"]
#        command: mkdir -p /tmp/cmath_gpu_parts && cp gpu_parts/* /tmp/cmath_gpu_parts/
#   3. in the last part's call, the check too (timeout_s 560): ... && bash scripts/gpu_check.sh "$OUT"
#      (it finds the parts in /tmp/cmath_gpu_parts, checks them against SHA256SUMS, reassembles the wheel and
#      installs it with pip --no-index --no-deps). Run this script in the checkout the device calls send.
# Usage: bash scripts/gpu_wheel_parts.sh [DIR]   (default gpu_parts/; ORT_GPU_VERSION, PY_VERSION, PART_MIB)
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-gpu_parts}
VERSION=${ORT_GPU_VERSION:-1.30.0}
PY_VERSION=${PY_VERSION:-3.12}
# Parts of 59 MiB (4 for the 235 MiB wheel) leave room for the work tree (~2 MiB) under the 64 MiB a call carries.
PART_MIB=${PART_MIB:-59}
PYTHON=${PYTHON:-python3}

mkdir -p "$DIR"
rm -f "$DIR"/*.part-* "$DIR"/SHA256SUMS
"$PYTHON" -m pip download -q --no-deps onnxruntime-gpu=="$VERSION" --python-version "$PY_VERSION" \
    --implementation cp --only-binary=:all: --platform manylinux_2_28_x86_64 -d "$DIR"
tag="cp${PY_VERSION/./}"
wheel=$(cd "$DIR" && ls onnxruntime_gpu-"$VERSION"-"$tag"-*.whl)
echo "requires (from the wheel's METADATA):"
unzip -p "$DIR/$wheel" '*.dist-info/METADATA' | grep '^Requires-Dist: nvidia' | sed 's/^/  /'
(
    cd "$DIR"
    split -b "${PART_MIB}M" -d -a 2 "$wheel" "$wheel.part-"
    sha256sum "$wheel" "$wheel".part-* > SHA256SUMS
    rm "$wheel"  # the parts are what travels; gpu_check.sh rebuilds the wheel from them
)
echo "$wheel: $(awk 'NR==1' "$DIR/SHA256SUMS" | cut -c1-16)..., $(ls "$DIR"/*.part-* | wc -l) parts in $DIR:"
ls -l "$DIR"
