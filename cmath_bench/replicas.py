"""Replicas behind HAProxy: throughput and latency with 1, 2, 3 replicas, CPU per utterance, and failover cost.

    python -m cmath_bench.replicas EXPORT_DIR [--out DIR] [--quick]

For each replica count: `cmath_serve.balancer.ReplicaSet` (N tritonservers on free 127.0.0.1 ports + HAProxy),
then --conversations concurrent conversations (one thread each, `cmath_serve.conversation_client`) of
--utterances utterances streamed through the balancer: utterances/s, per-utterance p50/p99 (the `add()` call,
as an agent sees it), and CPU seconds per utterance of the replicas (tritonserver + their Python-backend stubs),
of HAProxy and of the client, read from /proc before and after. On one machine the replicas share its cores, so
throughput stops growing once the cores are busy; CPU time per utterance is what carries to a bigger machine
(utterances/s per core = 1 / replica CPU seconds per utterance, while a core is free for each replica).

Failover: on the largest replica count, --failover-conversations conversations of 30 utterances each, then the
replica that served the most is SIGKILLed and every conversation adds its 31st utterance: for the
conversations it held, that add() detects the loss, replays 30 utterances onto another replica and answers
(its time is the failover's cost, replay time reported apart); for the others it is one ordinary step.

Every loop is bounded in count and time. Writes replicas.json, replicas.md and replicas.png into --out.
"""

from __future__ import annotations

import argparse
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from . import host
from .report import figure, write_pages
from .timing import percentiles_ms

REPLICA_COUNTS = (1, 2, 3)
FAILOVER_UTTERANCES = 30
TICK = os.sysconf("SC_CLK_TCK")


def _descendants(pid: int) -> list[int]:
    """pid and every process below it (/proc's parent links)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def _cpu_s(pids: list[int]) -> float:
    """User + system CPU seconds of these processes (those that have exited count 0)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / TICK


class CpuMeter:
    """CPU seconds used by the replicas (each tritonserver and its stubs), the balancer and this process."""

    def __init__(self, rs: Any) -> None:
        self.replicas = [_descendants(s.process.pid) for s in rs.servers]
        self.balancer = [rs.front.process.pid]

    def read(self) -> dict[str, float]:
        t = os.times()
        return {
            "replicas": sum(_cpu_s(p) for p in self.replicas),
            "balancer": _cpu_s(self.balancer),
            "client": t.user + t.system,
        }


def _conversations(
    dims: dict[str, int], speakers: int, count: int, n: int, seed: int
) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    return [
        {
            "features": {m: rng.standard_normal((n, d)).astype(np.float32) for m, d in dims.items()},
            "speakers": rng.integers(0, speakers, n),
        }
        for _ in range(count)
    ]


def stream(
    url: str, convs: list[dict[str, Any]], seconds: float, client_options: Any = None
) -> dict[str, Any]:
    """Every conversation on its own thread through one client, each utterance sent when the last is answered;
    stops early at `seconds`."""
    from cmath_serve.conversation_client import ServeClient

    client = ServeClient(url, client_options)
    client.spec  # noqa: B018 (the model description once, before the clock starts)
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def run(data: dict[str, Any]) -> None:
        conv = client.conversation()
        n = len(data["speakers"])
        try:
            for i in range(n):
                if time.monotonic() > deadline:
                    return
                t0 = time.perf_counter()
                conv.add(
                    int(data["speakers"][i]), end=i == n - 1, **{m: x[i] for m, x in data["features"].items()}
                )
                with lock:
                    latencies.append(time.perf_counter() - t0)
        except Exception as e:  # noqa: BLE001 (counted: a run must show 0)
            with lock:
                errors.append(str(e)[:200])

    threads = [threading.Thread(target=run, args=(c,), daemon=True) for c in convs]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(1.0, deadline - time.monotonic() + 180))
    wall = time.perf_counter() - start
    client.close()
    return {
        "answered": len(latencies),
        "planned": sum(len(c["speakers"]) for c in convs),
        "errors": len(errors),
        "error_samples": errors[:3],
        "seconds": wall,
        "utterances_per_s": len(latencies) / wall,
        "replays": client.stats.replays,
        **percentiles_ms(latencies),
    }


def start_replicas(export_dir: Path, replicas: int, threads: int, queue_delay_us: int) -> Any:
    from cmath_serve.balancer import BalancerOptions, ReplicaSet
    from cmath_serve.launcher import check_port
    from cmath_serve.repository import ServeOptions

    ports = [check_port("127.0.0.1", 0, "balancer port") for _ in range(3)]
    rs = ReplicaSet(
        export_dir,
        ServeOptions(queue_delay_us=queue_delay_us, backend="cpu", threads=threads),
        replicas,
        BalancerOptions(grpc_port=ports[0], http_port=ports[1], stats_port=ports[2]),
        exit_timeout_s=5,
    )
    rs.start()
    return rs


def _requests(rs: Any) -> dict[str, int]:
    """Requests the balancer sent to each replica so far (gRPC)."""
    return {s.name: s.requests for s in rs.stats() if s.backend == "grpc_replicas"}


def failover(rs: Any, dims: dict[str, int], speakers: int, count: int, log: Any) -> dict[str, Any]:
    """`count` conversations of 30 utterances, the busiest replica SIGKILLed, then one more utterance each."""
    from cmath_serve.conversation_client import ClientOptions, ServeClient

    client = ServeClient(rs.grpc_url, ClientOptions(attempts=8, backoff_s=0.1))
    data = _conversations(dims, speakers, count, FAILOVER_UTTERANCES + 1, seed=7)
    convs = [client.conversation() for _ in data]
    for conv, d in zip(convs, data):  # one at a time: nothing else on the machine's replicas
        for i in range(FAILOVER_UTTERANCES):
            conv.add(int(d["speakers"][i]), **{m: x[i] for m, x in d["features"].items()})
    stats = _requests(rs)
    victim = max(stats, key=lambda k: stats[k])
    index = int(victim[1:])
    os.kill(rs.servers[index].process.pid, signal.SIGKILL)
    rs.servers[index].process.wait(30)
    times: dict[bool, list[float]] = {True: [], False: []}
    last = FAILOVER_UTTERANCES
    for conv, d in zip(convs, data):
        before = conv.replays
        t0 = time.perf_counter()
        conv.add(int(d["speakers"][last]), end=True, **{m: x[last] for m, x in d["features"].items()})
        times[conv.replays > before].append(time.perf_counter() - t0)
    replay = client.stats.replay_seconds
    client.close()
    out: dict[str, Any] = {
        "conversations": count,
        "utterances_before_kill": FAILOVER_UTTERANCES,
        "killed": victim,
        "failed_over": len(times[True]),
        "replay_s": percentiles_ms(replay),
        "failover_add": percentiles_ms(times[True]),
        "ordinary_add": percentiles_ms(times[False]),
    }
    log(
        f"failover: {victim} killed; {len(times[True])}/{count} conversations replayed "
        f"{FAILOVER_UTTERANCES} utterances, replay p50 {out['replay_s']['p50_ms']:.0f} ms, that add() p50 "
        f"{out['failover_add']['p50_ms']:.0f} ms vs {out['ordinary_add']['p50_ms']:.0f} ms for the others"
    )
    return out


def run(
    export_dir: Path,
    quick: bool = False,
    conversations: int = 64,
    utterances: int = 20,
    threads: int = 1,
    queue_delay_us: int = 2000,
    seconds: float = 120.0,
    counts: tuple[int, ...] = REPLICA_COUNTS,
    failover_conversations: int = 12,
    log: Any = print,
) -> dict[str, Any]:
    from cmath_runtime.manifest import read_manifest

    manifest = read_manifest(export_dir)
    if quick:
        conversations, utterances, seconds, counts, failover_conversations = 8, 4, 30, (1, 2), 4
    dims, speakers = dict(manifest.feature_dims), manifest.num_speakers
    convs = _conversations(dims, speakers, conversations, utterances, seed=0)
    records, fail = [], {}
    for n in counts:
        rs = start_replicas(export_dir, n, threads, queue_delay_us)
        try:
            stream(rs.grpc_url, convs[:2], 30)  # warm-up: sessions, first batches
            meter = CpuMeter(rs)
            before, sent_before = meter.read(), _requests(rs)
            rec = stream(rs.grpc_url, convs, seconds)
            after, sent_after = meter.read(), _requests(rs)
            cpu = {k: (after[k] - before[k]) / max(rec["answered"], 1) * 1000 for k in before}
            per_replica = {k: sent_after[k] - sent_before[k] for k in sent_after}
            rec.update(
                replicas=n,
                conversations=conversations,
                utterances=utterances,
                cpu_ms_per_utterance=cpu,
                requests_per_replica=per_replica,
                loadavg=os.getloadavg()[0],
            )
            records.append(rec)
            log(
                f"{n} replica(s): {rec['utterances_per_s']:.1f} utterances/s, p50 {rec['p50_ms']:.0f} ms, p99 "
                f"{rec['p99_ms']:.0f} ms, answered {rec['answered']}/{rec['planned']}, errors {rec['errors']}; CPU ms "
                f"per utterance: replicas {cpu['replicas']:.1f}, haproxy {cpu['balancer']:.2f}, client "
                f"{cpu['client']:.1f}; requests per replica {per_replica}"
            )
            if n == counts[-1] and n > 1:
                fail = failover(rs, dims, speakers, failover_conversations, log)
        finally:
            rs.stop()
    return {"records": records, "failover": fail}


def markdown(result: dict[str, Any], env: dict[str, Any]) -> str:
    lines = [
        f"# Replicas behind HAProxy ({env['cpu']}, ISA class {env.get('isa', '-')}, {env['cores']} cores shared by replicas, balancer and "
        f"client; load average {env['loadavg_start']:.1f} at start, {env['loadavg_end']:.1f} at end)",
        "",
        f"`{env['command']}`",
        "",
        "| replicas | conversations x utterances | utterances/s | p50 ms | p99 ms | answered / planned | errors | "
        "CPU ms/utterance: replicas | haproxy | client | requests per replica |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    notes = [
        "",
        "CPU ms/utterance: user + system CPU time of all replica processes (each tritonserver and its "
        "Python-backend stubs), of HAProxy and of the client process during the run, over the utterances "
        "answered. One core answers about 1000 / (replica CPU ms) utterances/s, so that column is what "
        "carries to a machine with a core per replica; here all replicas, the balancer, the client and "
        "the other jobs on the machine share the same cores, which bounds the utterances/s column.",
        "",
        "Requests per replica: what the balancer sent each one during the run (its stats); the conversations "
        "are spread by the consistent hash of their id.",
    ]
    for r in result["records"]:
        c = r["cpu_ms_per_utterance"]
        lines.append(
            f"| {r['replicas']} | {r['conversations']} x {r['utterances']} | {r['utterances_per_s']:.1f} | "
            f"{r['p50_ms']:.0f} | {r['p99_ms']:.0f} | {r['answered']} / {r['planned']} | {r['errors']} | "
            f"{c['replicas']:.1f} | {c['balancer']:.2f} | {c['client']:.1f} | "
            f"{', '.join(f'{k} {v}' for k, v in r['requests_per_replica'].items())} |"
        )
    lines += notes
    f = result.get("failover") or {}
    if f:
        lines += [
            "",
            f"Failover: {f['conversations']} conversations of {f['utterances_before_kill']} utterances, "
            f"replica {f['killed']} SIGKILLed, then one more utterance each; {f['failed_over']} were on "
            f"it and replayed their history onto another replica.",
            "",
            "| | p50 ms | p99 ms | mean ms |",
            "|---|---|---|---|",
        ]
        for key, name in (
            ("replay_s", f"replay of {f['utterances_before_kill']} utterances"),
            ("failover_add", "add() that failed over (detect + replay + step)"),
            ("ordinary_add", "add() on a surviving replica"),
        ):
            p = f[key]
            lines.append(f"| {name} | {p['p50_ms']:.0f} | {p['p99_ms']:.0f} | {p['mean_ms']:.0f} |")
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    with figure(path, (11, 4), cols=2) as (a, b):
        _draw(a, b, result["records"])


def _draw(a: Any, b: Any, rows: list[dict[str, Any]]) -> None:
    n = [r["replicas"] for r in rows]
    a.bar(n, [r["utterances_per_s"] for r in rows], color="C2")
    a.set(
        xlabel="replicas",
        ylabel="utterances/s",
        xticks=n,
        title=f"{rows[0]['conversations']} concurrent conversations through HAProxy",
    )
    t = a.twinx()
    t.plot(n, [r["p50_ms"] for r in rows], "s--", color="C1", label="p50 ms")
    t.plot(n, [r["p99_ms"] for r in rows], "^--", color="C3", label="p99 ms")
    t.set(ylabel="latency per utterance (ms)")
    t.legend(loc="upper right")
    width = 0.25
    for k, (key, color) in enumerate((("replicas", "C0"), ("balancer", "C4"), ("client", "C5"))):
        b.bar(
            np.array(n) + (k - 1) * width,
            [r["cpu_ms_per_utterance"][key] for r in rows],
            width,
            color=color,
            label=key,
        )
    b.set(xlabel="replicas", ylabel="CPU ms per utterance", xticks=n, title="where the CPU goes")
    b.legend()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("export_dir", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="default: EXPORT_DIR")
    parser.add_argument("--quick", action="store_true", help="1 and 2 replicas, few utterances (tests)")
    parser.add_argument("--conversations", type=int, default=64)
    parser.add_argument("--utterances", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime threads per replica")
    parser.add_argument("--queue-delay-us", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=120.0, help="time cap of each replica count's run")
    parser.add_argument("--replicas", default="1,2,3", help="replica counts, comma-separated")
    parser.add_argument("--failover-conversations", type=int, default=12)
    args = parser.parse_args(argv)
    export = host.export_of(args.export_dir)
    load_start = os.getloadavg()[0]
    result = run(
        export,
        args.quick,
        args.conversations,
        args.utterances,
        args.threads,
        args.queue_delay_us,
        args.seconds,
        tuple(int(x) for x in args.replicas.split(",")),
        args.failover_conversations,
    )
    env = host.server_env(export, args.threads, args.queue_delay_us, load_start, "replicas", argv)
    print(
        write_pages(
            args.out or export,
            "replicas",
            {"environment": env, **result},
            markdown(result, env),
            {"replicas.png": lambda path: plot(result, path)},
        )
    )


if __name__ == "__main__":
    main()
