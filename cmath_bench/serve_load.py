"""Load on a real Triton (cmath-serve): a bounded asyncio + tritonclient load generator.

    python -m cmath_bench.serve_load EXPORT_DIR [--out DIR] [--quick]

* `cmath`: whole conversations of --utterances utterances, one per request, at concurrency 1, 4, 16, 64
  (closed loop: each client sends its next conversation when the last one is answered): conversations/s,
  p50/p99 latency, errors (must be 0) and requests answered (must be all).
* `cmath_stream`: --stream-conversations concurrent conversations of --stream-utterances utterances each, one
  utterance per request with sequence_id/start/end: per-utterance p50/p99 and utterances/s, once per server
  mode: "batched" (the steps Triton put in one execute go through one step call), "serial" (one step call per
  conversation) and "recompute" (the whole conversation again, what a bidirectional artifact needs). The
  memory of the cmath_stream process is sampled meanwhile (what one machine holds).

Every level is bounded in requests and in seconds. The servers run on this machine, started with
cmath_serve.launcher on free 127.0.0.1 ports, and share its cores with the client.
Writes serve_load.json, serve_load.md and serve_load.png into --out (default: EXPORT_DIR).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from cmath_serve.client import infer_inputs

from . import host
from .report import figure, write_pages
from .timing import percentiles_ms

CONCURRENCY = (1, 4, 16, 64)


def start_server(
    export_dir: Path, stream_mode: str, threads: int, queue_delay_us: int, max_conversations: int
) -> Any:
    from cmath_serve.launcher import Ports, TritonServer, check_port
    from cmath_serve.repository import ServeOptions

    ports = Ports(*(check_port("127.0.0.1", 0, f"port {k}") for k in range(3)))
    options = ServeOptions(
        queue_delay_us=queue_delay_us,
        max_conversations=max_conversations,
        stream_mode=stream_mode,
        backend="cpu",
        threads=threads,
    )
    server = TritonServer(Path(export_dir), options, ports, exit_timeout_s=5)
    server.start()
    return server


def _conversation_arrays(dims: dict[str, int], num_speakers: int, n: int, rng: np.random.Generator) -> dict:
    arrays = {m: rng.standard_normal((1, n, d)).astype(np.float32) for m, d in dims.items()}
    arrays["speaker"] = rng.integers(0, num_speakers, (1, n)).astype(np.int64)
    arrays["mask"] = np.ones((1, n), bool)
    return arrays


async def _classify_level(url: str, pool: list[dict], concurrency: int, total: int, seconds: float) -> dict:
    import tritonclient.grpc.aio as grpc

    client = grpc.InferenceServerClient(url)
    latencies: list[float] = []
    errors: list[str] = []
    sent = 0
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal sent
        while sent < total and time.perf_counter() < deadline:
            arrays = pool[sent % len(pool)]
            sent += 1
            t0 = time.perf_counter()
            try:
                await client.infer("cmath", infer_inputs(grpc, arrays), client_timeout=60)
                latencies.append(time.perf_counter() - t0)
            except Exception as e:  # noqa: BLE001 (counted; the level must show 0)
                errors.append(str(e)[:200])

    for arrays in pool[:4]:  # warm-up
        await client.infer("cmath", infer_inputs(grpc, arrays))
    start = time.perf_counter()
    await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(concurrency))), seconds + 120)
    wall = time.perf_counter() - start
    await client.close()
    return {
        "sent": sent,
        "answered": len(latencies),
        "errors": len(errors),
        "error_samples": errors[:3],
        "seconds": wall,
        "conversations_per_s": len(latencies) / wall,
        **percentiles_ms(latencies),
    }


async def _stream_run(url: str, convs: list[dict], seconds: float, base_id: int) -> dict:
    """Every conversation at once, each sending its next utterance when the previous one is answered."""
    import tritonclient.grpc.aio as grpc

    client = grpc.InferenceServerClient(url)
    latencies: list[float] = []
    errors: list[str] = []
    deadline = time.perf_counter() + seconds

    async def conversation(j: int, arrays: dict) -> None:
        n = arrays["speaker"].shape[1]
        for i in range(n):
            if time.perf_counter() > deadline:
                return
            step = {
                **{m: arrays[m][0, i : i + 1] for m in arrays if m not in ("speaker", "mask")},
                "speaker": arrays["speaker"][:, i : i + 1],
            }
            t0 = time.perf_counter()
            try:
                await client.infer(
                    "cmath_stream",
                    infer_inputs(grpc, step),
                    sequence_id=base_id + j,
                    sequence_start=i == 0,
                    sequence_end=i == n - 1,
                    client_timeout=120,
                )
                latencies.append(time.perf_counter() - t0)
            except Exception as e:  # noqa: BLE001
                errors.append(str(e)[:200])
                return

    start = time.perf_counter()
    await asyncio.wait_for(asyncio.gather(*(conversation(j, c) for j, c in enumerate(convs))), seconds + 180)
    wall = time.perf_counter() - start
    await client.close()
    total = sum(c["speaker"].shape[1] for c in convs)
    return {
        "sent_planned": total,
        "answered": len(latencies),
        "errors": len(errors),
        "error_samples": errors[:3],
        "seconds": wall,
        "utterances_per_s": len(latencies) / wall,
        **percentiles_ms(latencies),
    }


def _stream_pid(server: Any) -> int | None:
    """The Python-backend stub process of cmath_stream (a child of tritonserver)."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            stat = Path(f"/proc/{pid}/stat").read_text().split()
        except OSError:
            continue
        if int(stat[3]) == server.process.pid and any(b"cmath_stream" in c for c in cmd):
            return int(pid)
    return None


def _rss_mib(pid: int | None) -> float:
    if pid is None:
        return float("nan")
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class _PeakRss(threading.Thread):
    def __init__(self, pid: int | None) -> None:
        super().__init__(daemon=True)
        self.pid, self.peak, self._halt = pid, 0.0, threading.Event()

    def run(self) -> None:
        while not self._halt.wait(0.1):
            try:
                self.peak = max(self.peak, _rss_mib(self.pid))
            except OSError:
                return

    def stop(self) -> float:
        self._halt.set()
        self.join(2)
        return self.peak


def _stats(server: Any, model: str) -> tuple[int, int]:
    import tritonclient.grpc as grpc

    s = grpc.InferenceServerClient(server.grpc_url).get_inference_statistics(model).model_stats[0]
    return s.inference_count, s.execution_count


def direct_baseline(export_dir: Path, pool: list[dict], threads: int, rounds: int, log: Any) -> list[dict]:
    """model.predict in this process, no server, at batch 1 and 16: what the server adds, measured alongside."""
    import cmath_runtime

    model = cmath_runtime.load(export_dir, backend="cpu", threads=threads or None)
    convs = [{"speakers": a["speaker"][0], "features": {m: a[m][0] for m in model.modalities}} for a in pool]
    out = []
    for batch in (1, 16):
        model.predict(convs[:batch], batch_size=batch)
        times = []
        for k in range(rounds):
            group = [convs[(k * batch + j) % len(convs)] for j in range(batch)]
            t0 = time.perf_counter()
            model.predict(group, batch_size=batch)
            times.append(time.perf_counter() - t0)
        rec = {
            "benchmark": "direct_predict",
            "batch": batch,
            "utterances": len(convs[0]["speakers"]),
            "conversations_per_s": batch * len(times) / sum(times),
            **percentiles_ms(times),
        }
        out.append(rec)
        log(f"direct predict batch {batch:>2}: {rec['conversations_per_s']:.1f} conversations/s (no server)")
    return out


def run(
    export_dir: Path,
    quick: bool = False,
    utterances: int = 20,
    stream_conversations: int = 64,
    stream_utterances: int = 50,
    threads: int = 0,
    queue_delay_us: int = 1000,
    seconds: float = 60.0,
    modes: tuple[str, ...] = ("batched", "serial", "recompute"),
    log: Any = print,
) -> list[dict]:
    from cmath_runtime.manifest import read_manifest

    manifest = read_manifest(export_dir)
    rng = np.random.default_rng(0)
    dims, spk = dict(manifest.feature_dims), manifest.num_speakers
    records: list[dict] = []
    levels = (1, 4) if quick else CONCURRENCY
    per_level = 8 if quick else 200
    if quick:
        stream_conversations, stream_utterances, seconds = (
            min(stream_conversations, 8),
            min(stream_utterances, 5),
            20,
        )
    pool = [_conversation_arrays(dims, spk, utterances, rng) for _ in range(32)]
    streams = [_conversation_arrays(dims, spk, stream_utterances, rng) for _ in range(stream_conversations)]
    records += direct_baseline(export_dir, pool, threads, 3 if quick else 10, log)
    for mode in modes:
        server = start_server(export_dir, mode, threads, queue_delay_us, max(1024, stream_conversations))
        try:
            if mode == modes[0]:
                records += [
                    _classify(server, pool, c, max(per_level, 4 * c), seconds, utterances, log)
                    for c in levels
                ]
            records.append(_stream(server, streams, mode, seconds, stream_utterances, log))
        finally:
            server.stop()
            server.cleanup()
    return records


def _classify(
    server: Any, pool: list[dict], concurrency: int, requests: int, seconds: float, utterances: int, log: Any
) -> dict[str, Any]:
    """One closed-loop level of whole-conversation requests to `cmath`."""
    before = _stats(server, "cmath")
    rec = asyncio.run(_classify_level(server.grpc_url, pool, concurrency, requests, seconds))
    inf, ex = (a - b for a, b in zip(_stats(server, "cmath"), before))
    rec.update(
        benchmark="serve_cmath",
        concurrency=concurrency,
        utterances=utterances,
        mean_batch=(inf - 4) / max(ex - 4, 1),
    )
    log(
        f"cmath  concurrency {concurrency:>2}: {rec['conversations_per_s']:.1f} conversations/s, p50 "
        f"{rec['p50_ms']:.1f} ms, p99 {rec['p99_ms']:.1f} ms, answered {rec['answered']}/{rec['sent']}, "
        f"errors {rec['errors']}, mean batch {rec['mean_batch']:.1f}"
    )
    return rec


def _stream(
    server: Any, streams: list[dict], mode: str, seconds: float, utterances: int, log: Any
) -> dict[str, Any]:
    """The concurrent conversations streamed through `cmath_stream`, utterance by utterance, with the memory of
    its process sampled meanwhile."""
    pid = _stream_pid(server)
    asyncio.run(_stream_run(server.grpc_url, streams[:2], seconds, base_id=900_000))  # warm-up
    idle_rss = _rss_mib(pid)
    before = _stats(server, "cmath_stream")
    sampler = _PeakRss(pid)
    sampler.start()
    rec = asyncio.run(_stream_run(server.grpc_url, streams, 3 * seconds, base_id=1))
    peak = sampler.stop()
    inf, ex = (a - b for a, b in zip(_stats(server, "cmath_stream"), before))
    rec.update(
        benchmark="serve_stream",
        mode=mode,
        path=server.description["stream_path"],
        conversations=len(streams),
        utterances=utterances,
        mean_batch=inf / max(ex, 1),
        rss_idle_mib=idle_rss,
        rss_peak_mib=peak,
        rss_per_conversation_mib=(peak - idle_rss) / len(streams),
    )
    log(
        f"stream {mode:>9}: {rec['utterances_per_s']:.1f} utterances/s, p50 {rec['p50_ms']:.1f} ms, p99 "
        f"{rec['p99_ms']:.1f} ms, answered {rec['answered']}/{rec['sent_planned']}, errors {rec['errors']}, "
        f"mean batch {rec['mean_batch']:.1f}, stub RSS {idle_rss:.0f} -> {peak:.0f} MiB"
    )
    return rec


def markdown(records: list[dict], env: dict) -> str:
    lines = [
        f"# cmath-serve load ({env['cpu']}, ISA class {env.get('isa', '-')}, {env['cores']} cores shared by server and client; load average "
        f"{env['loadavg_start']:.1f} at start, {env['loadavg_end']:.1f} at end)",
        "",
        "Without a server, `model.predict` in one process (same time, same machine): "
        + ", ".join(
            f"batch {r['batch']}: {r['conversations_per_s']:.1f} conversations/s"
            for r in records
            if r["benchmark"] == "direct_predict"
        )
        + ".",
        "",
        "## `cmath`: whole conversations, one per request",
        "",
        "| concurrency | utterances | conversations/s | p50 ms | p99 ms | answered / sent | errors | mean batch |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        if r["benchmark"] == "serve_cmath":
            lines.append(
                f"| {r['concurrency']} | {r['utterances']} | {r['conversations_per_s']:.1f} | {r['p50_ms']:.1f} | "
                f"{r['p99_ms']:.1f} | {r['answered']} / {r['sent']} | {r['errors']} | {r['mean_batch']:.1f} |"
            )
    lines += [
        "",
        "## `cmath_stream`: concurrent conversations, one utterance per request",
        "",
        "| mode | path | conversations x utterances | utterances/s | p50 ms | p99 ms | answered / planned | errors "
        "| mean batch | stub RSS idle -> peak MiB | MiB per live conversation |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        if r["benchmark"] == "serve_stream":
            lines.append(
                f"| {r['mode']} | {r['path']} | {r['conversations']} x {r['utterances']} | "
                f"{r['utterances_per_s']:.1f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['answered']} / "
                f"{r['sent_planned']} | {r['errors']} | {r['mean_batch']:.1f} | {r['rss_idle_mib']:.0f} -> "
                f"{r['rss_peak_mib']:.0f} | {r['rss_per_conversation_mib']:.2f} |"
            )
    return "\n".join(lines) + "\n"


def plot(records: list[dict], path: Path) -> None:
    with figure(path, (11, 4), cols=2) as (a, b):
        _draw(a, b, records)


def _draw(a: Any, b: Any, records: list[dict]) -> None:
    rows = [r for r in records if r["benchmark"] == "serve_cmath"]
    if rows:
        c = [r["concurrency"] for r in rows]
        a.plot(c, [r["conversations_per_s"] for r in rows], "o-", color="C0", label="conversations/s")
        a.set(
            xscale="log",
            xlabel="concurrent clients",
            ylabel="conversations/s",
            title="cmath (whole conversations)",
        )
        a.set_xticks(c, [str(x) for x in c])
        t = a.twinx()
        t.plot(c, [r["p50_ms"] for r in rows], "s--", color="C1", label="p50 ms")
        t.plot(c, [r["p99_ms"] for r in rows], "^--", color="C3", label="p99 ms")
        t.set(ylabel="latency (ms)", yscale="log")
        a.legend(loc="upper left")
        t.legend(loc="lower right")
    rows = [r for r in records if r["benchmark"] == "serve_stream"]
    if rows:
        x = np.arange(len(rows))
        b.bar(x, [r["utterances_per_s"] for r in rows], color="C2")
        b.set_xticks(x, [f"{r['mode']}\np50 {r['p50_ms']:.0f} ms\np99 {r['p99_ms']:.0f} ms" for r in rows])
        b.set(
            ylabel="utterances/s",
            title=f"cmath_stream: {rows[0]['conversations']} conversations x "
            f"{rows[0]['utterances']} utterances",
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export_dir", type=Path)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--quick", action="store_true", help="2 levels, few requests (tests, CI)")
    parser.add_argument("--utterances", type=int, default=20, help="utterances per `cmath` conversation")
    parser.add_argument("--stream-conversations", type=int, default=64)
    parser.add_argument("--stream-utterances", type=int, default=50)
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime threads per model (0: default)")
    parser.add_argument("--queue-delay-us", type=int, default=1000)
    parser.add_argument(
        "--seconds",
        type=float,
        default=60.0,
        help="time cap of each cmath level (cmath_stream runs: 3x this)",
    )
    parser.add_argument("--modes", default="batched,serial,recompute")
    args = parser.parse_args()
    export = host.export_of(args.export_dir)
    load_start = os.getloadavg()[0]
    records = run(
        export,
        args.quick,
        args.utterances,
        args.stream_conversations,
        args.stream_utterances,
        args.threads,
        args.queue_delay_us,
        args.seconds,
        tuple(args.modes.split(",")),
    )
    env = host.server_env(export, args.threads, args.queue_delay_us, load_start, "serve_load")
    print(
        write_pages(
            args.out or export,
            "serve_load",
            {"environment": env, "records": records},
            markdown(records, env),
            {"serve_load.png": lambda path: plot(records, path)},
        )
    )


if __name__ == "__main__":
    main()
