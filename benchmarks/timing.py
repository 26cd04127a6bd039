"""Latency timing (nanoGPT bench.py style): warm-up, time.perf_counter per call, percentiles."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Budget:
    """How long to measure one (backend, shape): `iterations` calls at most, `seconds` at most, at least `min_iterations`."""

    warmup: int = 3
    iterations: int = 100
    seconds: float = 1.5
    min_iterations: int = 10
    rounds: int = 10  # measurement split into rounds, interleaved across contenders against machine-load drift


def timed_calls(fn: Callable[[], object], count: int, deadline: float | None = None) -> list[float]:
    """Call fn up to `count` times (stopping at `deadline`, a perf_counter time); return each call's seconds."""
    times = []
    for _ in range(count):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
        if deadline is not None and time.perf_counter() > deadline:
            break
    return times


def percentiles_ms(seconds: list[float]) -> dict[str, float]:
    ms = np.asarray(seconds) * 1e3
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return {"p50_ms": float(p50), "p90_ms": float(p90), "p99_ms": float(p99), "mean_ms": float(ms.mean()),
            "min_ms": float(ms.min())}


Timer = Callable[[int, "float | None"], list[float]]  # (calls, seconds budget or None) -> seconds of each call


@dataclass
class Timings:
    times: dict[str, list[float]] = field(default_factory=dict)  # measured calls
    first: dict[str, list[float]] = field(default_factory=dict)  # warm-up calls (the first one may compile)
    errors: dict[str, str] = field(default_factory=dict)  # contenders that failed on this shape


def interleaved(timers: dict[str, Timer], budget: Budget, warmups: dict[str, Timer] | None = None) -> Timings:
    """Time several contenders on the same input in rounds (A B C, A B C, ...) so that a change in the machine's
    load hits all of them alike. Each first gets `budget.warmup` untimed calls, then its share of the budget.
    `warmups` (default: `timers`) run the untimed calls. A contender that raises is dropped with its error."""
    out = Timings()
    live = dict(timers)

    def attempt(name: str, count: int, seconds: float | None, warm: bool = False) -> list[float]:
        try:
            return (warmups or live)[name](count, seconds) if warm else live[name](count, seconds)
        except Exception as e:  # recorded, the others go on
            out.errors[name] = f"{type(e).__name__}: {e}"
            del live[name]
            return []

    for name in list(live):
        out.first[name] = attempt(name, max(1, budget.warmup), None, warm=True)
        out.times[name] = []
    per_round = max(1, -(-budget.iterations // budget.rounds))
    for _ in range(budget.rounds):
        for name in list(live):
            out.times[name] += attempt(name, per_round, budget.seconds / budget.rounds)
    for name in list(live):  # top up whatever a slow contender missed of its minimum
        if len(out.times[name]) < budget.min_iterations:
            out.times[name] += attempt(name, budget.min_iterations - len(out.times[name]), None)
    return out
