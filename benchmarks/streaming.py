"""Streaming benchmark: latency of one new utterance at history n, step graph vs full recompute (same runtime).

    python -m benchmarks.streaming RUN_OR_EXPORT_DIR [--out DIR] [--threads N] [--quick]

"full" is what a Conversation without a step graph does for each new utterance: model.predict on the whole
conversation of n utterances. "step" is one call of model.step.onnx at position n-1 with a cache of n-1 rows.
Records carry "path": "step" | "full"; `extend_bench` appends them to an existing bench.json (cmath-bench).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from .timing import Budget, interleaved, percentiles_ms

LENGTHS = (1, 2, 5, 10, 20, 35, 50, 75, 100, 150, 200)
QUICK_LENGTHS = (1, 10, 50)
BUDGET = Budget(warmup=3, iterations=60, seconds=1.0, min_iterations=10, rounds=3)
QUICK_BUDGET = Budget(warmup=1, iterations=10, seconds=0.2, min_iterations=3, rounds=2)


def run_streaming(export_dir: str | Path, threads: int = 1, lengths: tuple[int, ...] = LENGTHS,
                  budget: Budget = BUDGET, log: Any = print) -> list[dict[str, Any]]:
    """Records {"benchmark": "streaming", "path", "n", "threads", p50_ms, ...} for every n (capped at max_len)."""
    import cmath_runtime
    from cmath_runtime.streaming import Stream, step_graph

    model = cmath_runtime.load(export_dir, backend="cpu", threads=threads)
    graph = step_graph(model)
    if graph is None:
        raise ValueError(f"{export_dir}: the artifact has no step graph (export a causal run: cmath-train --causal)")
    rng = np.random.default_rng(0)
    n_max = min(max(lengths), graph.max_len)
    feats = {m: rng.standard_normal((n_max, d)).astype(np.float32) for m, d in model.feature_dims.items()}
    speakers = [int(s) for s in rng.integers(0, model.num_speakers, n_max)]
    stream = Stream(graph)
    records = []
    for n in sorted({min(n, n_max) for n in lengths}):
        if n > 1:
            stream.catch_up(speakers[:n - 1], {m: list(x[:n - 1]) for m, x in feats.items()})  # history n-1
        tails = {k: v for k, v in stream.buffers.items() if not k.startswith("past_")}
        new_row = {m: x[n - 1] for m, x in feats.items()}
        conv = {"speakers": speakers[:n], "features": {m: x[:n] for m, x in feats.items()}}

        def step_call(tails: dict = tails, n: int = n, row: dict = new_row) -> None:
            stream.buffers.update(tails)  # the same step each time: position n-1 on a history of n-1
            graph.run(stream.buffers, n - 1, speakers[n - 1], row)

        def full_call(conv: dict = conv) -> None:
            model.predict([conv])

        timers = {p: (lambda count, seconds, fn=fn: _timed(fn, count, seconds))
                  for p, fn in (("step", step_call), ("full", full_call))}
        timings = interleaved(timers, budget)
        stream.buffers.update(tails)
        for path in ("step", "full"):
            rec = {"benchmark": "streaming", "path": path, "n": n, "batch": 1, "threads": threads,
                   "precision": "fp32", "backend": model.backend, **percentiles_ms(timings.times[path])}
            records.append(rec)
        step_ms, full_ms = records[-2]["p50_ms"], records[-1]["p50_ms"]
        log(f"streaming n={n:>3}: step {step_ms:.3f} ms, full {full_ms:.3f} ms, speed-up {full_ms / step_ms:.1f}x")
    return records


def _timed(fn: Any, count: int, seconds: float | None) -> list[float]:
    import time

    from .timing import timed_calls

    return timed_calls(fn, count, None if seconds is None else time.perf_counter() + seconds)


def plot_streaming(records: list[dict[str, Any]], path: str | Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for p, style in (("full", "o-"), ("step", "s-")):
        rows = sorted((r["n"], r["p50_ms"]) for r in records if r.get("benchmark") == "streaming" and r["path"] == p)
        if rows:
            ax.plot(*zip(*rows), style, label=f"{p} ({'whole conversation' if p == 'full' else 'model.step.onnx'})")
    threads = {r["threads"] for r in records if r.get("benchmark") == "streaming"}
    ax.set(xlabel="history n (utterances, the new one included)", ylabel="latency of one new utterance, p50 (ms)",
           yscale="log", title=title or f"streaming: step vs full recompute (onnxruntime CPU, threads {', '.join(map(str, sorted(threads)))})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def extend_bench(out_dir: Path, export_dir: Path, threads: int, quick: bool, log: Any = print) -> list[dict]:
    """cmath-bench hook: for an artifact with a step graph, append streaming records to bench.json and write
    bench_streaming.png; does nothing (returns []) otherwise."""
    from cmath_runtime.manifest import read_manifest

    if not read_manifest(export_dir).step:
        return []
    records = run_streaming(export_dir, threads, QUICK_LENGTHS if quick else LENGTHS,
                            QUICK_BUDGET if quick else BUDGET, log)
    bench = Path(out_dir) / "bench.json"
    existing = json.loads(bench.read_text()) if bench.is_file() else []
    from cmath_runtime.files import atomic_write_json

    atomic_write_json(bench, [*existing, *records])
    plot_streaming(records, Path(out_dir) / "bench_streaming.png")
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export_dir", type=Path)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    export = args.export_dir / "export" if (args.export_dir / "export" / "export.json").is_file() else args.export_dir
    out = args.out or export
    out.mkdir(parents=True, exist_ok=True)
    records = run_streaming(export, args.threads, QUICK_LENGTHS if args.quick else LENGTHS,
                            QUICK_BUDGET if args.quick else BUDGET)
    from cmath_runtime.files import atomic_write_json

    atomic_write_json(out / "bench_streaming.json", records)
    plot_streaming(records, out / "bench_streaming.png")
    print(f"wrote {out / 'bench_streaming.json'} and bench_streaming.png")


if __name__ == "__main__":
    main()
