"""Latency timing (nanoGPT bench.py style): warm-up, time.perf_counter per call, percentiles."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Budget:
    """How long to measure one (backend, shape): `iterations` calls and `seconds` at most, at least
    `min_iterations`, split into `rounds` interleaved across contenders (against machine-load drift)."""

    warmup: int = 3
    iterations: int = 100
    seconds: float = 1.5
    min_iterations: int = 10
    rounds: int = 10


Timer = Callable[[int, "float | None"], list[float]]  # (calls, seconds budget or None) -> each call's seconds


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


def timer(make_call: Callable[[], Callable[[], object]], cap: int | None = None) -> Timer:
    """The Timer of a contender: each block first makes its calls (untimed: `make_call()` may copy a live
    conversation), then times them one by one until the block's budget is spent; at most `cap` calls a block."""

    def run(count: int, seconds: float | None) -> list[float]:
        calls = iter([make_call() for _ in range(min(count, cap or count))])
        deadline = None if seconds is None else time.perf_counter() + seconds
        return timed_calls(lambda: next(calls)(), min(count, cap or count), deadline)

    return run


def repeating(call: Callable[[], object], cap: int | None = None) -> Timer:
    """The Timer of one prepared call, timed again and again (the full model on the same batch, a probe)."""
    return timer(lambda: call, cap)


def percentiles_ms(seconds: list[float]) -> dict[str, float]:
    """p50/p90/p99/mean/min in ms; NaN for each when nothing was timed (a load level that got no answer)."""
    keys = ("p50_ms", "p90_ms", "p99_ms", "mean_ms", "min_ms")
    if not seconds:
        return dict.fromkeys(keys, float("nan"))
    ms = np.asarray(seconds) * 1e3
    return {k: float(v) for k, v in zip(keys, (*np.percentile(ms, [50, 90, 99]), ms.mean(), ms.min()))}


def cpu_seconds(pid: int | str = "self", skip_tid: int | None = None) -> float | None:
    """CPU seconds used so far by every thread of process `pid` (but `skip_tid`), from /proc/PID/task/*/schedstat;
    None where there is no /proc (not Linux)."""
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return None
    total = 0
    for task in tasks:
        if task.name != str(skip_tid):
            try:
                total += int((task / "schedstat").read_text().split()[0])
            except (OSError, ValueError, IndexError):  # a thread that just ended
                continue
    return total / 1e9


def quiesce(pid: int | str = "self", window_s: float = 0.005, limit_s: float = 0.5) -> float:
    """Wait until process `pid`'s threads (the calling one excepted) stop using the CPU; -> seconds waited.

    Why: an engine whose idle threads spin (onnxruntime allow_spinning=1, OpenMP ACTIVE, TBB) keeps a core busy
    for a while after its last call; the next contender would be timed on a core it does not have, which no
    deployment running one engine sees. Two windows in a row with no CPU time (schedstat moves in scheduler ticks)
    count as quiet; at most `limit_s`."""
    skip = threading.get_native_id() if pid == "self" else None
    start = last_busy = time.perf_counter()
    before = cpu_seconds(pid, skip)
    if before is None:
        time.sleep(window_s * 10)  # no /proc: a fixed pause longer than a spin tail
        return time.perf_counter() - start
    while time.perf_counter() - start < limit_s:
        time.sleep(window_s)
        now = cpu_seconds(pid, skip)
        if now is None:  # the process ended
            break
        if now - before > 1e-4:
            last_busy = time.perf_counter()
        elif time.perf_counter() - last_busy >= 2 * window_s:
            break
        before = now
    return time.perf_counter() - start


@dataclass
class Timings:
    times: dict[str, list[float]] = field(default_factory=dict)  # measured calls
    first: dict[str, list[float]] = field(default_factory=dict)  # warm-up calls (the first one may compile)
    errors: dict[str, str] = field(default_factory=dict)  # contenders that failed on this shape
    settle_s: float = 0.0  # seconds spent waiting for contenders' idle threads to stop spinning (quiesce)


def interleaved(
    timers: dict[str, Timer],
    budget: Budget,
    warmups: dict[str, Timer] | None = None,
    settle: Callable[[str], float] | None = None,
) -> Timings:
    """Time several contenders on the same input in rounds (A B C, A B C, ...) so that a change in the machine's
    load hits all of them alike. Each first gets `budget.warmup` untimed calls (by `warmups`, default `timers`),
    then its share of the budget. A contender that raises is dropped with its error. `settle(name)`, called after
    each of a contender's blocks (e.g. `quiesce` of its process), returns the seconds it waited."""
    out = Timings()
    live = dict(timers)

    def attempt(name: str, count: int, seconds: float | None, warm: bool = False) -> list[float]:
        try:
            return (warmups or live)[name](count, seconds) if warm else live[name](count, seconds)
        except Exception as e:  # recorded, the others go on
            out.errors[name] = f"{type(e).__name__}: {e}"
            del live[name]
            return []
        finally:
            if settle is not None:
                out.settle_s += settle(name)

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
