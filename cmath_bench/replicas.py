"""Replicas behind HAProxy: throughput and latency with 1, 2, 3 replicas, CPU per utterance, and failover cost.

    python -m cmath_bench.replicas EXPORT_DIR [--out DIR] [--quick]

For each count of --replicas: `cmath_serve.balancer.ReplicaSet` (N tritonservers + HAProxy on free 127.0.0.1
ports), then --conversations conversations of --utterances utterances streamed at once through the balancer
(cmath_bench.loadgen: one thread each, cmath_serve's conversation client): utterances/s, per-utterance p50/p99
(the add() call, as an agent sees it), and CPU seconds per utterance of the replicas (tritonserver and their
Python-backend stubs), of HAProxy and of the client, from /proc. The replicas share this machine's cores, so
throughput stops growing once they are busy; CPU time per utterance is what carries to a bigger machine.

Failover, on the last count (if more than 1): --failover-conversations conversations of 30 utterances, then the
replica that served the most is SIGKILLed and each adds its 31st utterance: for the conversations it held, that
add() detects the loss, replays 30 utterances onto another replica and answers (the failover's cost, the replay
reported apart); for the others it is one ordinary step. Every loop is bounded in count and time. Writes
replicas.json, replicas.md and replicas.png into --out (default: EXPORT_DIR).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from cmath_serve.conversation_client import ClientOptions, ServeClient

from . import loadgen
from .timing import percentiles_ms

FAILOVER_UTTERANCES = 30
ROW = (
    "| {replicas} | {conversations} x {utterances} | {utterances_per_s:.1f} | {p50_ms:.0f} | {p99_ms:.0f} | "
    "{answered} / {planned} | {errors} | {cpu_ms_per_utterance[replicas]:.1f} | "
    "{cpu_ms_per_utterance[balancer]:.2f} | {cpu_ms_per_utterance[client]:.1f} | {spread} |"
)
PAGE = """\
# Replicas behind HAProxy ({cpu}, ISA class {isa}, {cores} cores shared by replicas, balancer and client; load \
average {loadavg_start:.1f} at start, {loadavg_end:.1f} at end)

`{command}`

| replicas | conversations x utterances | utterances/s | p50 ms | p99 ms | answered / planned | errors | \
CPU ms/utterance: replicas | haproxy | client | requests per replica |
|---|---|---|---|---|---|---|---|---|---|---|
{rows}

CPU ms/utterance: user + system CPU time of all replica processes (each tritonserver and its Python-backend \
stubs), of HAProxy and of the client process during the run, over the utterances answered. One core answers \
about 1000 / (replica CPU ms) utterances/s, so that column is what carries to a machine with a core per replica; \
here all replicas, the balancer, the client and the other jobs on the machine share the same cores, which bounds \
the utterances/s column.

Requests per replica: what the balancer sent each one during the run (its stats); the conversations are spread \
by the consistent hash of their id.
"""
FAILOVER = """
Failover: {conversations} conversations of {utterances_before_kill} utterances, replica {killed} SIGKILLed, then \
one more utterance each; {failed_over} were on it and replayed their history onto another replica.

| | p50 ms | p99 ms | mean ms |
|---|---|---|---|
| replay of {utterances_before_kill} utterances | {replay_s[p50_ms]:.0f} | {replay_s[p99_ms]:.0f} | \
{replay_s[mean_ms]:.0f} |
| add() that failed over (detect + replay + step) | {failover_add[p50_ms]:.0f} | {failover_add[p99_ms]:.0f} | \
{failover_add[mean_ms]:.0f} |
| add() on a surviving replica | {ordinary_add[p50_ms]:.0f} | {ordinary_add[p99_ms]:.0f} | \
{ordinary_add[mean_ms]:.0f} |
"""


@dataclass(frozen=True)
class Settings:
    """One option each (the module's docstring says what they do)."""

    conversations: int = 64
    utterances: int = 20
    replicas: str = "1,2,3"
    failover_conversations: int = 12
    threads: int = 1  # onnxruntime threads per replica
    queue_delay_us: int = 2000
    seconds: float = 120.0  # time cap of each replica count's run

    def quick(self) -> Settings:
        return replace(
            self, conversations=8, utterances=4, seconds=30, replicas="1,2", failover_conversations=4
        )


def start_replicas(export_dir: Path, replicas: int, s: Settings) -> Any:
    """`replicas` tritonservers and HAProxy in front, on free 127.0.0.1 ports."""
    from cmath_serve.balancer import BalancerOptions, ReplicaSet
    from cmath_serve.launcher import check_port
    from cmath_serve.repository import ServeOptions

    grpc, http, stats = (check_port("127.0.0.1", 0, "balancer port") for _ in range(3))
    options = ServeOptions(queue_delay_us=s.queue_delay_us, backend="cpu", threads=s.threads)
    balancer = BalancerOptions(grpc_port=grpc, http_port=http, stats_port=stats)
    rs = ReplicaSet(export_dir, options, replicas, balancer, exit_timeout_s=5)
    rs.start()
    return rs


def _requests(rs: Any) -> dict[str, int]:
    """Requests the balancer sent to each replica so far (gRPC)."""
    return {s.name: s.requests for s in rs.stats() if s.backend == "grpc_replicas"}


def _cpu_s(rs: Any, replica_pids: list[int]) -> dict[str, float]:
    """CPU seconds used so far by the replicas (each tritonserver and its stubs), the balancer and this process."""
    t = os.times()
    balancer = loadgen.cpu_s([rs.front.process.pid])
    return {"replicas": loadgen.cpu_s(replica_pids), "balancer": balancer, "client": t.user + t.system}


def measure(rs: Any, convs: list[loadgen.Conversation], seconds: float) -> dict[str, Any]:
    """The conversations streamed through the balancer at once; CPU ms per utterance answered, requests per replica."""
    loadgen.stream(rs.grpc_url, convs[:2], 30)  # warm-up: sessions, first batches
    pids = [p for server in rs.servers for p in loadgen.processes(server.process.pid)]
    cpu, sent = _cpu_s(rs, pids), _requests(rs)
    rec = loadgen.stream(rs.grpc_url, convs, seconds)
    cpu_after, sent_after = _cpu_s(rs, pids), _requests(rs)
    return {
        **rec,
        "cpu_ms_per_utterance": {k: (cpu_after[k] - cpu[k]) / max(rec["answered"], 1) * 1000 for k in cpu},
        "requests_per_replica": {k: sent_after[k] - sent[k] for k in sent_after},
        "loadavg": os.getloadavg()[0],
        "replicas": len(rs.servers),
        "conversations": len(convs),
        "utterances": len(convs[0]["speakers"]),
    }


def failover(rs: Any, export_dir: Path, count: int) -> dict[str, Any]:
    """`count` conversations of 30 utterances, the busiest replica SIGKILLed, then one more utterance each."""
    client = ServeClient(rs.grpc_url, ClientOptions(attempts=8, backoff_s=0.1))
    data = loadgen.conversations(export_dir, count, FAILOVER_UTTERANCES + 1, seed=7)
    convs = [client.conversation() for _ in data]
    for conv, d in zip(convs, data):  # one at a time: nothing else on the machine's replicas
        for i in range(FAILOVER_UTTERANCES):
            loadgen.add(conv, d, i)
    stats = _requests(rs)
    victim = max(stats, key=lambda k: stats[k])
    server = rs.servers[int(victim[1:])]
    os.kill(server.process.pid, signal.SIGKILL)
    server.process.wait(30)
    times: dict[bool, list[float]] = {True: [], False: []}
    for conv, d in zip(convs, data):
        before, t0 = conv.replays, time.perf_counter()
        loadgen.add(conv, d, FAILOVER_UTTERANCES, end=True)
        times[conv.replays > before].append(time.perf_counter() - t0)
    client.close()
    return {
        "conversations": count,
        "utterances_before_kill": FAILOVER_UTTERANCES,
        "killed": victim,
        "failed_over": len(times[True]),
        "replay_s": percentiles_ms(client.stats.replay_seconds),
        "failover_add": percentiles_ms(times[True]),
        "ordinary_add": percentiles_ms(times[False]),
    }


def run(export_dir: Path, s: Settings, log: Any = print) -> dict[str, Any]:
    """Each replica count's run, then the failover on the last count (where it is more than 1)."""
    convs = loadgen.conversations(export_dir, s.conversations, s.utterances, seed=0)
    counts = [int(n) for n in s.replicas.split(",")]
    records, fail = [], {}
    for n in counts:
        rs = start_replicas(export_dir, n, s)
        try:
            records.append(measure(rs, convs, s.seconds))
            log(_row(records[-1]))
            if n == counts[-1] and n > 1:
                fail = failover(rs, export_dir, s.failover_conversations)
                log(FAILOVER.format_map(fail))
        finally:
            rs.stop()
    return {"records": records, "failover": fail}


def _row(rec: dict[str, Any]) -> str:
    return ROW.format_map(
        {**rec, "spread": ", ".join(f"{k} {v}" for k, v in rec["requests_per_replica"].items())}
    )


def markdown(result: dict[str, Any], env: dict[str, Any]) -> str:
    rows = "\n".join(map(_row, result["records"]))
    return PAGE.format_map({**env, "rows": rows}) + (
        FAILOVER.format_map(result["failover"]) if result.get("failover") else ""
    )


def draw(a: Any, b: Any, result: dict[str, Any]) -> None:
    rows = result["records"]
    n = [r["replicas"] for r in rows]
    title = f"{rows[0]['conversations']} concurrent conversations through HAProxy"
    loadgen.rate_and_latency(a, n, rows, "utterances_per_s", "replicas", title)
    for k, (key, color) in enumerate((("replicas", "C0"), ("balancer", "C4"), ("client", "C5"))):
        cpu = [r["cpu_ms_per_utterance"][key] for r in rows]
        b.bar(np.arange(len(n)) + (k - 1) * 0.25, cpu, 0.25, color=color, label=key)
    b.set(xlabel="replicas", ylabel="CPU ms per utterance", xticks=range(len(n)), xticklabels=n)
    b.set_title("where the CPU goes")
    b.legend()


def main(argv: list[str] | None = None) -> None:
    loadgen.main("replicas", sys.modules[__name__], argv)


if __name__ == "__main__":
    main()
