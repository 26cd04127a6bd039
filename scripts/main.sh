#!/usr/bin/env bash
# The main job: install, then train -> export (with parity checks) -> benchmark on the embedded synthetic data.
# It writes only under runs/ (RUN, default runs/main, and RUN-causal) and prints each stage's time and where its
# outputs are. Speed does not depend on how long a model trained, so the demo trains briefly (EPOCHS, default 1,
# like the causal twin), without the weighted-F1 decision rule: on a barely trained model its offsets move many
# utterances next to a decision boundary, where the int8 artifact's rounding flips more of them than its bound
# allows. The benchmarks run with --quick (three conversation lengths, short budgets), which shows every engine
# against PyTorch and the floor in minutes; BENCH_ARGS= (empty) runs the full sweep, which the docs' pages are made
# from (then scripts/refresh_docs.sh, a separate maintainer command).
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${RUN:-runs/main}
START=$SECONDS
TIMES=()
CPU_FILE=$(mktemp)
trap 'rm -f "$CPU_FILE"' EXIT
children_cpu() {  # CPU: seconds (user + system) of this shell's finished children so far (`times` in this shell)
    times > "$CPU_FILE"
    CPU=$(awk 'NR == 2 { split($1, u, /[ms]/); split($2, s, /[ms]/); printf "%d", u[1] * 60 + u[2] + s[1] * 60 + s[2] }' "$CPU_FILE")
}
stage() {  # stage NAME COMMAND...: runs it and records its wall time and CPU time
    local name=$1 t0=$SECONDS c0 line
    shift
    echo "== main.sh: $name"
    children_cpu
    c0=$CPU
    "$@"
    children_cpu
    line=$(printf '%-28s %5d s wall %6d s CPU' "$name" $((SECONDS - t0)) $((CPU - c0)))
    TIMES+=("$line")
    echo "== main.sh: $line"
}

stage "install" bash scripts/install.sh
# Streaming: a causal twin: the step graph vs the full recompute per new utterance.
stage "train (causal, 1 epoch)" .venv/bin/cmath-train --preset meld --causal --epochs 1 --no-decision-rule --quiet \
    --out "$RUN-causal"
stage "export (causal, int8)" .venv/bin/cmath-export "$RUN-causal" --int8 --quiet
BENCH_ARGS=${BENCH_ARGS---quick}
# shellcheck disable=SC2086  # BENCH_ARGS is a list of options
stage "benchmark (causal)" .venv/bin/cmath-bench "$RUN-causal" $BENCH_ARGS \
    --backends onnxruntime:fp32,onnxruntime-spin,onnxruntime:int8,openvino:fp32 --out "$RUN-causal/bench"
# The main model: train, export fp32 + fp16 + int8 (each artifact checked against PyTorch, or not written), then
# every contender against PyTorch and this machine's floor.
stage "train (${EPOCHS:-1} epoch(s))" .venv/bin/cmath-train --preset meld --epochs "${EPOCHS:-1}" --no-decision-rule \
    --out "$RUN"
stage "export + parity" .venv/bin/cmath-export "$RUN" --fp16 --int8
# shellcheck disable=SC2086
stage "benchmark" .venv/bin/cmath-bench "$RUN" $BENCH_ARGS --out "$RUN/bench"

echo
children_cpu
echo "main.sh: done in $((SECONDS - START)) s wall, $CPU s CPU"
printf '  %s\n' "${TIMES[@]}"
cat <<DONE
Outputs:
  $RUN/                   checkpoint, metrics.json (validation and test scores)
  $RUN/export/            model.onnx, model.fp16.onnx, model.int8.onnx, export.json (parity records)
  $RUN/bench/bench.md     every engine against PyTorch and this machine's floor (bench.json, plots beside)
  $RUN-causal/export/     the streaming model and its step graph
  $RUN-causal/bench/      the step graph against the full recompute
DONE
