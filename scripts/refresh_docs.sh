#!/usr/bin/env bash
# Maintainer command: refreshes the docs' benchmark pages and the README's generated tables from the main job's runs
# (run `BENCH_ARGS= bash scripts/main.sh` first: the full benchmark sweep). Copies RUN/bench to docs/bench and RUN-causal/bench to docs/bench/causal, then
# rewrites README.md's generated blocks (python -m studies.readme). Review the diff before committing it.
#
# Usage: bash scripts/refresh_docs.sh [RUN]      (default runs/main)
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${1:-runs/main}
for src in "$RUN/bench" "$RUN-causal/bench"; do
    if [ ! -f "$src/bench.json" ]; then
        echo "refresh_docs.sh: $src/bench.json not found; run BENCH_ARGS= bash scripts/main.sh first" >&2
        exit 1
    fi
    if head -1 "$src/bench.md" | grep -q "(quick)"; then
        echo "refresh_docs.sh: $src is a --quick benchmark; the docs' pages come from the full sweep:" \
            "BENCH_ARGS= bash scripts/main.sh" >&2
        exit 1
    fi
done
copy_pages() {  # copy_pages SRC DST: bench.json, bench.md and the plots
    mkdir -p "$2"
    cp "$1"/bench.json "$1"/bench.md "$2"/
    cp "$1"/*.png "$2"/ 2>/dev/null || true
}
copy_pages "$RUN/bench" docs/bench
copy_pages "$RUN-causal/bench" docs/bench/causal
.venv/bin/python -m studies.readme
echo "refreshed docs/bench, docs/bench/causal and README.md's tables from $RUN; see git diff"
