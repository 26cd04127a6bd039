"""The load generator of the server benchmarks (`serve_load`: one cmath-serve; `replicas`: several behind HAProxy):
seeded conversations, concurrent clients on threads through cmath_serve's own client (every client bounded in
requests and by one deadline), the CPU time and memory of the server's processes from /proc, and their pages."""

from __future__ import annotations

import argparse
import dataclasses
import os
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from cmath_runtime.errors import CmathError

from . import host, inputs
from .report import figure, write_pages
from .timing import percentiles_ms

Conversation = dict[str, Any]  # {"speakers": (n,), "features": {modality: (n, dim)}}


def conversations(export_dir: Path, count: int, utterances: int, seed: int) -> list[Conversation]:
    """`count` seeded conversations of `utterances` utterances in the export's modalities (inputs.conversations)."""
    from cmath_runtime.manifest import read_manifest

    return inputs.conversations(inputs.InputSpec.of(read_manifest(export_dir)), count, utterances, seed)


def add(conv: Any, data: Conversation, i: int, end: bool = False) -> Any:
    """conv.add(utterance i of `data`): its answer (an Emotion)."""
    return conv.add(int(data["speakers"][i]), end=end, **{m: x[i] for m, x in data["features"].items()})


class Load:
    """Concurrent clients, each on its own thread until one deadline: their requests' latencies and errors."""

    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds
        self.sent = 0
        self.latencies: list[float] = []
        self.errors: list[str] = []
        self._lock = threading.Lock()

    def timed(self, call: Callable[[], object]) -> bool:
        """call() timed; False where the deadline has passed (nothing sent) or it raised (its error counted)."""
        if time.monotonic() > self.deadline:
            return False
        with self._lock:
            self.sent += 1
        t0 = time.perf_counter()
        try:
            call()
        except Exception as e:  # noqa: BLE001 (counted: a run must show 0)
            with self._lock:
                self.errors.append(str(e)[:200])
            return False
        with self._lock:
            self.latencies.append(time.perf_counter() - t0)
        return True

    def run(self, client: Callable[[int], None], clients: int, unit: str) -> dict[str, Any]:
        """client(0) ... client(clients - 1) at once, each joined by 180 s past the deadline: the run's record."""
        threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(clients)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join(max(1.0, self.deadline - time.monotonic() + 180))
        wall = time.perf_counter() - start
        return {
            "sent": self.sent,
            "answered": len(self.latencies),
            "errors": len(self.errors),
            "error_samples": self.errors[:3],
            "seconds": wall,
            f"{unit}_per_s": len(self.latencies) / wall,
            **percentiles_ms(self.latencies),
        }


def stream(url: str, convs: list[Conversation], seconds: float, options: Any = None) -> dict[str, Any]:
    """Every conversation at once through one ServeClient (`options`: its ClientOptions), each utterance added
    when the last is answered; per-utterance latency is the add() call, as an agent sees it."""
    from cmath_serve.conversation_client import ServeClient

    client = ServeClient(url, options)
    client.spec  # noqa: B018 (the model description once, before the clock starts)
    load = Load(seconds)

    def converse(k: int) -> None:
        conv, n = client.conversation(), len(convs[k]["speakers"])
        for i in range(n):
            if not load.timed(partial(add, conv, convs[k], i, end=i == n - 1)):
                return

    rec = load.run(converse, len(convs), "utterances")
    client.close()
    planned = sum(len(c["speakers"]) for c in convs)
    return {**rec, "planned": planned, "replays": client.stats.replays}


def _read(pid: int, name: str) -> str:
    """/proc/PID/NAME; "" for a process that has ended."""
    try:
        return Path(f"/proc/{pid}/{name}").read_text(errors="replace")
    except OSError:
        return ""


def _stat(pid: int) -> list[str]:
    """/proc/PID/stat's fields after the command name (state, ppid, ...); [] for a process that has ended."""
    return _read(pid, "stat").rsplit(")", 1)[-1].split()


def processes(pid: int) -> dict[int, str]:
    """pid and every process below it (/proc's parent links) -> its command line."""
    stats = {int(e): _stat(int(e)) for e in os.listdir("/proc") if e.isdigit()}
    links = [(int(f[1]), p) for p, f in stats.items() if f]
    below, todo = {}, [pid]
    while todo:
        p = todo.pop()
        below[p] = _read(p, "cmdline")
        todo += [child for parent, child in links if parent == p]
    return below


def cpu_s(pids: list[int]) -> float:
    """User + system CPU seconds of these processes, their ended threads included (ended processes count 0)."""
    return sum(int(f[11]) + int(f[12]) for f in map(_stat, pids) if f) / os.sysconf("SC_CLK_TCK")


def memory_mib(pid: int, reset_peak: bool = False) -> dict[str, float]:
    """{"VmRSS": resident MiB now, "VmHWM": the most since start or the last reset}; reset_peak: then restart the
    peak from now (/proc/PID/clear_refs), so that a later VmHWM is the peak of what ran in between."""
    status = _read(pid, "status").splitlines()
    out = {
        k: int(line.split()[1]) / 1024 for line in status for k in ("VmRSS", "VmHWM") if line.startswith(k)
    }
    if reset_peak:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    return out


def main(module: str, scenario: ModuleType, argv: list[str] | None) -> None:
    """`python -m cmath_bench.MODULE EXPORT_DIR [--out DIR] [--quick]` of a scenario module, an option per field
    of its Settings dataclass (--quick: of Settings().quick(), but for the options given): its run(export,
    settings) once, then MODULE.json, MODULE.md (its markdown) and MODULE.png (its draw) into --out."""
    defaults = scenario.Settings()
    p = argparse.ArgumentParser(
        description=scenario.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("export_dir", type=Path)
    p.add_argument("--out", type=Path, default=None, help="default: EXPORT_DIR")
    p.add_argument("--quick", action="store_true", help="few, short runs (tests); options given win")
    for f in dataclasses.fields(defaults):
        p.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default)
    if p.parse_args(argv).quick:
        p.set_defaults(**dataclasses.asdict(defaults.quick()))
    args = p.parse_args(argv)
    settings = type(defaults)(**{f.name: getattr(args, f.name) for f in dataclasses.fields(defaults)})
    export = host.export_of(args.export_dir)
    load_start = os.getloadavg()[0]
    try:
        result = scenario.run(export, settings)
    except CmathError as e:  # a bad export, a server that did not start: said, without a traceback
        p.exit(1, f"{module}: {e}\n")
    env = host.server_env(export, settings.threads, settings.queue_delay_us, load_start, module, argv)
    data, text = {"environment": env, **result}, scenario.markdown(result, env)
    plots: dict[str, Callable[[Path], None]] = {f"{module}.png": partial(plot, scenario.draw, result)}
    print(write_pages(args.out or export, module, data, text, plots))


def plot(draw: Callable[[Any, Any, dict[str, Any]], None], result: dict[str, Any], path: Path) -> None:
    """draw(left axes, right axes, result) saved to `path`."""
    with figure(path, (11, 4), cols=2) as (a, b):
        draw(a, b, result)


def rate_and_latency(
    ax: Any, labels: list[Any], rows: list[dict[str, Any]], key: str, xlabel: str, title: str
) -> None:
    """Bars of each row's `key` (a rate: "utterances_per_s", ...) and its p50 / p99 latency on a second axis."""
    x = np.arange(len(rows))
    ax.bar(x, [r[key] for r in rows], color="C2")
    ax.set(xlabel=xlabel, ylabel=key.replace("_per_s", "/s"), xticks=x, xticklabels=labels, title=title)
    t = ax.twinx()
    for p, style, color in (("p50", "s--", "C1"), ("p99", "^--", "C3")):
        t.plot(x, [r[f"{p}_ms"] for r in rows], style, color=color, label=f"{p} ms")
    t.set(ylabel="latency (ms)", yscale="log")
    t.legend(loc="lower right")
