"""Streaming benchmark: latency of one new utterance at history n, step graph vs full recompute (same runtime).

"full" is what a Conversation without a step graph does for each new utterance: model.predict on the whole
conversation of n utterances. "step" is one call of model.step.onnx at position n-1 with a cache of n-1 rows.
`stream_records` is cmath-bench's hook for an export with a step graph (a causal run).
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

import numpy as np

import cmath_runtime
from cmath_runtime.manifest import read_manifest
from cmath_runtime.streaming import Stream

from . import roofline
from .backends import OPENVINO, ORT, ORT_SPIN, Skipped, load_runtime
from .timing import Budget, interleaved, percentiles_ms, quiesce, repeating

LENGTHS = (1, 2, 5, 10, 20, 35, 50, 75, 100, 150, 200)
QUICK_LENGTHS = (1, 10, 50)
# more, shorter rounds: bursts of load hit all alike
BUDGET = Budget(warmup=3, iterations=60, seconds=1.0, min_iterations=10, rounds=6)
QUICK_BUDGET = Budget(warmup=1, iterations=10, seconds=0.2, min_iterations=3, rounds=2)

# (contender, precision); contender names: backends.RUNTIME
STEP_CONTENDERS = ((ORT, "fp32"), (ORT_SPIN, "fp32"), (ORT, "int8"), (OPENVINO, "fp32"), (OPENVINO, "bf16"))
PROBE = "probe/bandwidth"  # cmath_bench.roofline.Probe("copy"), timed among the step contenders


def _load_step_models(
    export_dir: str | Path, threads: int, contenders: tuple[tuple[str, str], ...], log: Any
) -> dict[tuple[str, str], Any]:
    models = {}
    for backend, precision in contenders:
        try:
            model = load_runtime(Path(export_dir), backend, precision, threads)
            graph = model.step_graph
        except (Skipped, cmath_runtime.CmathError) as e:
            log(f"streaming: skipped {backend} {precision}: {e}")
            continue
        if graph is None:
            raise ValueError(
                f"{export_dir}: the artifact has no step graph (export a causal run: cmath-train --causal)"
            )
        models[(backend, precision)] = (model, graph)
    return models


def run_streaming(
    export_dir: str | Path,
    threads: int = 1,
    lengths: tuple[int, ...] = LENGTHS,
    budget: Budget = BUDGET,
    log: Any = print,
    contenders: tuple[tuple[str, str], ...] = STEP_CONTENDERS,
    machine: Any = None,
) -> list[dict[str, Any]]:
    """Records {"benchmark": "streaming", "path", "n", "threads", p50_ms, ...} for every n (capped at max_len):
    the step graph on every (backend, precision) that loads here, and the full recompute (onnxruntime fp32).
    With `machine` (roofline.Machine), each step record carries its floor, its bytes term from the copy bandwidth
    measured at that history length in the same rounds as the steps (_step_floor)."""
    models = _load_step_models(export_dir, threads, contenders, log)
    base, base_graph = models[(ORT, "fp32")]
    rng = np.random.default_rng(0)
    n_max = min(max(lengths), base_graph.max_len)
    feats = {m: rng.standard_normal((n_max, d)).astype(np.float32) for m, d in base.feature_dims.items()}
    speakers = [int(s) for s in rng.integers(0, base.num_speakers, n_max)]
    streams = {k: Stream(g) for k, (_m, g) in models.items()}
    # OpenVINO converts the fp32 weights to bf16 when it compiles for bf16
    wbytes = {
        k: roofline.weight_bytes(g.file) // (2 if k[1] == "bf16" else 1) for k, (_m, g) in models.items()
    }
    counter = roofline.CallWork(base_graph.file).flops if machine else None
    probe = roofline.Probe("copy", threads) if machine is not None else None
    records = []
    for n in sorted({min(n, n_max) for n in lengths}):
        new_row = {m: x[n - 1] for m, x in feats.items()}
        tails, timers = _step_calls(streams, n, speakers, feats)
        conv = {"speakers": speakers[:n], "features": {m: x[:n] for m, x in feats.items()}}
        timers[("full", ORT, "fp32")] = lambda conv=conv: base.predict([conv])
        named = {"/".join(k): repeating(fn) for k, fn in timers.items()}
        if probe is not None:  # the steps' bandwidth floor, measured in the same rounds as they are
            named[PROBE] = repeating(probe)
        timings = interleaved(named, budget, settle=lambda _name: quiesce())
        bandwidth = best = None
        if probe is not None and (probed := timings.times.get(PROBE)):
            # p50 against p50: the steps' median call against the median copy of the same rounds
            bandwidth, best = probe.rate(probed, "p50"), probe.rate(probed, "best")
        flops = counter(_step_feeds(streams[(ORT, "fp32")], n, speakers, new_row)) if counter else None
        for key, stream in streams.items():
            stream.buffers.update(tails[key])
        cache = 4 * (n - 1) * base.manifest.d * len(base_graph.state_spec)
        floor = functools.partial(
            _step_floor, machine=machine, flops=flops, cache_bytes=cache, bandwidth=bandwidth, best=best
        )
        rows = _records(
            list(timers), timings.times, n, threads, wbytes, floor if machine is not None else None
        )
        records += rows
        bw = f"; copy bandwidth p50 {bandwidth:.1f} GB/s, best {best:.1f}" if bandwidth else ""
        log(
            f"streaming n={n:>3}: "
            + ", ".join(f"{r['path']} {r['backend']} {r['precision']} {r['p50_ms']:.3f} ms" for r in rows)
            + bw
        )
    _parity(records, models, speakers, feats)
    return records


def _parity(
    records: list[dict[str, Any]], models: dict[tuple[str, str], Any], speakers: list[int], feats: dict
) -> None:
    """Each engine's step graph fed the whole conversation one utterance at a time, against the full recompute
    (onnxruntime fp32): its max |dp|, argmax agreement and provider, on each of its step records."""
    [full] = models[(ORT, "fp32")][0].predict([{"speakers": speakers, "features": feats}])
    for key, (_model, graph) in models.items():
        got, _ = Stream(graph).catch_up(speakers, {m: list(x) for m, x in feats.items()})
        session = graph.session
        found = {
            "max_abs_diff_vs_full": float(np.abs(got - full.probs).max()),
            "argmax_agreement_vs_full": float((got.argmax(-1) == full.probs.argmax(-1)).mean()),
            "provider": session.get_providers()[0] if hasattr(session, "get_providers") else key[0],
        }
        for r in records:
            if r["path"] == "step" and (r["backend"], r["precision"]) == key:
                r.update(found)


def _records(
    keys: list[tuple[str, ...]],
    times: dict[str, list[float]],
    n: int,
    threads: int,
    weight_bytes: dict[tuple[str, str], int],
    floor: Any,
) -> list[dict[str, Any]]:
    """One record per (path, backend, precision) at history n; step records with `floor(rec, weight bytes)`."""
    rows = []
    for path, backend, precision in keys:
        rec = {"kind": "streaming", "benchmark": "streaming", "path": path, "n": n, "batch": 1}
        rec.update(threads=threads, precision=precision, backend=backend)
        rec.update(percentiles_ms(times[f"{path}/{backend}/{precision}"]))
        if path == "step" and floor is not None:
            rec.update(floor(rec, weight_bytes[(backend, precision)]))
        rows.append(rec)
    return rows


def _step_calls(
    streams: dict[tuple[str, str], Any], n: int, speakers: list[int], feats: dict[str, np.ndarray]
) -> tuple[dict[tuple[str, str], dict], dict[tuple[str, ...], Any]]:
    """Each stream brought to a history of n-1, and the timed call of each: the step at position n-1 on it, the
    same step every time (its tail buffers restored first). -> (tail buffers, calls by ("step", backend, precision))."""
    tails: dict[tuple[str, str], dict] = {}
    calls: dict[tuple[str, ...], Any] = {}
    row = {m: x[n - 1] for m, x in feats.items()}
    for key, stream in streams.items():
        if n > 1:
            stream.catch_up(speakers[: n - 1], {m: list(x[: n - 1]) for m, x in feats.items()})
        tails[key] = {k: v for k, v in stream.buffers.items() if not k.startswith("past_")}

        def step_call(stream: Any = stream, tail: dict = tails[key]) -> None:
            stream.buffers.update(tail)
            stream.graph.run(stream.buffers, n - 1, speakers[n - 1], row)

        calls[("step", key[0], key[1])] = step_call
    return tails, calls


def _step_floor(
    rec: dict[str, Any],
    weight_bytes: int,
    *,
    machine: Any,
    flops: float | None,
    cache_bytes: int,
    bandwidth: float | None,
    best: float | None,
) -> dict[str, Any]:
    """A step record's floor fields: its bytes term from the median copy bandwidth of the same rounds (else the run's
    once-measured one) and, against the fastest copy of those rounds, the stricter latency_x_best_bytes_floor."""
    out = {
        "weight_bytes": weight_bytes,
        "flops": flops,
        "cache_bytes": cache_bytes,
        **machine.floor_ms(weight_bytes, flops, bandwidth),
    }
    out["latency_x_floor"] = rec["p50_ms"] / out["floor_ms"]
    if bandwidth:
        out.update(bandwidth_gb_s=bandwidth, bandwidth_best_gb_s=best)
    if best:
        out["latency_x_best_bytes_floor"] = rec["p50_ms"] * best * 1e6 / weight_bytes
    return out


def _step_feeds(
    stream: Any, n: int, speakers: list[int], row: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """The feeds of the step at position n-1 exactly as StepGraph builds them (for counting its FLOPs)."""
    graph = copy.copy(stream.graph)
    with roofline.recording(graph) as feeds:
        graph.run({k: v.copy() for k, v in stream.buffers.items()}, n - 1, speakers[n - 1], row)
    return dict(feeds)


def stream_records(
    export_dir: Path,
    threads: int,
    quick: bool,
    log: Any = print,
    machine: Any = None,
    lengths: tuple[int, ...] | None = None,
) -> list[dict]:
    """cmath-bench hook: streaming records for an artifact with a step graph, [] otherwise."""
    if not read_manifest(export_dir).step:
        return []
    return run_streaming(
        export_dir,
        threads,
        lengths or (QUICK_LENGTHS if quick else LENGTHS),
        QUICK_BUDGET if quick else BUDGET,
        log,
        machine=machine,
    )
