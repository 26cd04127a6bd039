"""Concurrency soak: one EmotionModel shared by N threads for a fixed time; every answer must be bit-identical to
the answer the same request got serially before the soak (an exception in a thread counts as an error).

    python -m cmath_bench.soak EXPORT_DIR --threads 8 --seconds 60 [--precision fp32] [--out soak.json]

Requests come from a fixed, seeded list: `predict` on batches of 1-4 conversations and, for an artifact with a step
graph, a `Conversation` fed utterance by utterance.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import cmath_runtime
from cmath_runtime.files import atomic_write_json

from .inputs import InputSpec, conversations


def make_requests(model: cmath_runtime.EmotionModel, count: int, seed: int = 0) -> list[dict[str, Any]]:
    """`count` seeded requests: predict on 1-4 conversations of 1-40 utterances, or (every third, where the
    artifact has a step graph) the first of them fed utterance by utterance."""
    rng, spec = np.random.default_rng(seed), InputSpec.of(model)
    requests = []
    for i in range(count):
        lengths = rng.integers(1, min(40, model.max_len) + 1, int(rng.integers(1, 5)))
        batch = [conversations(spec, 1, int(n), seed=seed + 100 * i + j)[0] for j, n in enumerate(lengths)]
        kind = "stream" if model.step_graph is not None and i % 3 == 0 else "predict"
        requests.append({"kind": kind, "batch": batch if kind == "predict" else batch[:1]})
    return requests


def answer(model: cmath_runtime.EmotionModel, request: dict[str, Any]) -> list[np.ndarray]:
    if request["kind"] == "predict":
        return [p.probs for p in model.predict(request["batch"])]
    conv, out = cmath_runtime.Conversation(model), []
    c = request["batch"][0]
    for i, s in enumerate(c["speakers"]):
        conv.add(int(s), **{m: x[i] for m, x in c["features"].items()})
        out.append(conv.latest.probs)
    return [np.stack(out), conv.probs()]


@dataclass
class Tally:
    """What the threads found: answers checked, mismatches with the serial answer, errors, the largest difference."""

    answers: int = 0
    mismatches: int = 0
    errors: int = 0
    max_abs_diff: float = 0.0
    by_kind: dict[str, int] = field(default_factory=lambda: {"predict": 0, "stream": 0})
    first_problem: str | None = None

    def check(
        self,
        model: cmath_runtime.EmotionModel,
        request: dict[str, Any],
        serial: list[np.ndarray],
        lock: threading.Lock,
    ) -> None:
        """Answer `request` once (outside `lock`) and count how it compares with its serial answer, bit for bit."""
        try:
            got, error = answer(model, request), None
        except Exception as e:  # noqa: BLE001 - counted and reported, the soak goes on
            got, error = [], f"{type(e).__name__}: {e}"
        same = len(got) == len(serial) and all(np.array_equal(a, b) for a, b in zip(got, serial))
        with lock:
            if error is not None:
                self.errors += 1
                self.first_problem = self.first_problem or f"{request['kind']} request: {error}"
                return
            self.answers += 1
            self.by_kind[request["kind"]] += 1
            if same:
                return
            self.mismatches += 1
            diff = max(
                float(np.abs(a - b).max()) if a.shape == b.shape else float("inf")
                for a, b in zip(got, serial)
            )
            self.max_abs_diff = max(self.max_abs_diff, diff)
            self.first_problem = self.first_problem or f"{request['kind']} request: max |diff| {diff:g}"


def soak(
    export_dir: str | Path,
    threads: int = 8,
    seconds: float = 60.0,
    precision: str = "fp32",
    requests: int = 48,
    ort_threads: int = 1,
) -> dict[str, Any]:
    model = cmath_runtime.load(export_dir, backend="cpu", precision=precision, threads=ort_threads)
    reqs = make_requests(model, requests)
    t0 = time.perf_counter()
    serial = [answer(model, r) for r in reqs]
    serial_s = time.perf_counter() - t0
    lock, total = threading.Lock(), Tally()
    stop = time.monotonic() + seconds

    def worker(seed: int) -> None:
        rng = np.random.default_rng(1000 + seed)
        while time.monotonic() < stop:
            k = int(rng.integers(len(reqs)))
            total.check(model, reqs[k], serial[k], lock)

    pool = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(threads)]
    start = time.perf_counter()
    for t in pool:
        t.start()
    for t in pool:
        t.join(seconds + 120)
    return {
        "export": str(export_dir),
        "precision": precision,
        "threads": threads,
        "ort_intra_op_threads": ort_threads,
        "seconds": round(time.perf_counter() - start, 1),
        "requests": len(reqs),
        "step_path": model.step_graph is not None,
        "serial_reference_s": round(serial_s, 2),
        **asdict(total),
        "hung_threads": sum(t.is_alive() for t in pool),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("export_dir")
    p.add_argument("--threads", type=int, default=8)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--precision", default="fp32")
    p.add_argument("--requests", type=int, default=48)
    p.add_argument("--ort-threads", type=int, default=1)
    p.add_argument("--out", default=None, help="also write the report as JSON here")
    args = p.parse_args(argv)
    report = soak(
        args.export_dir, args.threads, args.seconds, args.precision, args.requests, args.ort_threads
    )
    print(json.dumps(report, indent=2))
    if args.out:
        atomic_write_json(args.out, report)
    ok = report["mismatches"] == 0 and report["errors"] == 0 and report["hung_threads"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
