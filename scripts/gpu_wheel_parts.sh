#!/usr/bin/env bash
# Maintainer script: splits a wheel into checked parts, and joins them back.
#
#   bash scripts/gpu_wheel_parts.sh split [DIR]          downloads onnxruntime-gpu (ORT_GPU_VERSION, default 1.30.0;
#                                                      PY_VERSION, default 3.12; manylinux_2_28 x86_64) into DIR
#                                                      (default gpu_parts/, ignored by git), splits it into parts of
#                                                      PART_MIB MiB (default 59) and writes SHA256SUMS (the wheel's
#                                                      sum and each part's)
#   bash scripts/gpu_wheel_parts.sh join DIR TARGET     checks every part against DIR/SHA256SUMS, reassembles the
#                                                      wheel, checks its sum and installs it with
#                                                      `pip install --no-index --no-deps --target TARGET`
#
# onnxruntime-gpu 1.27.0 and later target CUDA 13 / cuDNN 9 (their "cuda"/"cudnn" extras require
# nvidia-cuda-runtime ~=13.0 and nvidia-cudnn-cu13 ~=9.0; 1.18-1.26 require the -cu12 packages); 1.28 and later name
# the un-suffixed nvidia-* packages that PyTorch's cu130 wheels bring.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

split_wheel() {
    local dir=${1:-gpu_parts} version=${ORT_GPU_VERSION:-1.30.0} py=${PY_VERSION:-3.12} wheel tag
    mkdir -p "$dir"
    rm -f "$dir"/*.part-* "$dir"/SHA256SUMS
    "$PYTHON" -m pip download -q --no-deps onnxruntime-gpu=="$version" --python-version "$py" \
        --implementation cp --only-binary=:all: --platform manylinux_2_28_x86_64 -d "$dir"
    tag="cp${py/./}"
    wheel=$(cd "$dir" && ls onnxruntime_gpu-"$version"-"$tag"-*.whl)
    echo "requires (from the wheel's METADATA):"
    unzip -p "$dir/$wheel" '*.dist-info/METADATA' | grep '^Requires-Dist: nvidia' | sed 's/^/  /'
    (
        cd "$dir"
        split -b "${PART_MIB:-59}M" -d -a 2 "$wheel" "$wheel.part-"
        sha256sum "$wheel" "$wheel".part-* > SHA256SUMS
        rm "$wheel"
    )
    echo "$wheel: $(awk 'NR==1' "$dir/SHA256SUMS" | cut -c1-16)..., $(ls "$dir"/*.part-* | wc -l) parts in $dir:"
    ls -l "$dir"
}

join_wheel() {
    local dir=$1 target=$2 wheel
    wheel=$(awk 'NR == 1 {print $2}' "$dir/SHA256SUMS")
    if ! (cd "$dir" && grep '\.part-' SHA256SUMS | sha256sum -c --quiet -); then
        echo "gpu_wheel_parts: parts in $dir missing or not matching SHA256SUMS" >&2
        return 1
    fi
    cat "$dir/$wheel".part-* > "$dir/$wheel"
    if ! (cd "$dir" && grep " $wheel\$" SHA256SUMS | sha256sum -c --quiet -); then
        echo "gpu_wheel_parts: the reassembled $wheel does not match SHA256SUMS" >&2
        return 1
    fi
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target "$target" "$dir/$wheel"
    echo "installed $wheel (sha256 checked) into $target"
}

case "${1:-}" in
    split) shift; split_wheel "$@" ;;
    join) [ $# -eq 3 ] || { echo "usage: $0 join DIR TARGET" >&2; exit 2; }; join_wheel "$2" "$3" ;;
    *) echo "usage: $0 split [DIR] | join DIR TARGET" >&2; exit 2 ;;
esac
