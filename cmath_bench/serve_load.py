"""Load on one real cmath-serve (Triton on free 127.0.0.1 ports, sharing this machine's cores with the client).

    python -m cmath_bench.serve_load EXPORT_DIR [--out DIR] [--quick]

`cmath`: whole conversations of --utterances utterances, one per request, closed loop (each client sends its next
conversation when the last is answered) at each of --levels of concurrency, --requests (at least 4 per client):
conversations/s, p50/p99, errors (must be 0), answered (must be all), Triton's mean batch. `cmath_stream`:
--stream-conversations conversations of --stream-utterances streamed at once, one utterance per request, once per
server mode of --modes: "batched" (one step call per Triton execute), "serial" (one per conversation),
"recompute" (the whole conversation again, what a bidirectional artifact needs): utterances/s, p50/p99, and the
memory of the cmath_stream process, idle and at its peak (what one machine holds). Beside them, `model.predict`
in this process at batch 1 and 16: what the server adds. No request is retried (a failure is an error); every
run is bounded in requests and in --seconds (cmath_stream: 3x that). Writes serve_load.json, serve_load.md and
serve_load.png into --out (default: EXPORT_DIR).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

from cmath_serve.conversation_client import ClientOptions, ServeClient

from . import loadgen
from .loadgen import Conversation
from .timing import percentiles_ms, timed_calls

NO_RETRY = ClientOptions(attempts=1)
DIRECT_ROUNDS = 10
CMATH_ROW = (
    "| {concurrency} | {utterances} | {conversations_per_s:.1f} | {p50_ms:.1f} | {p99_ms:.1f} | {answered} / {sent} "
    "| {errors} | {mean_batch:.1f} |"
)
STREAM_ROW = (
    "| {mode} | {path} | {conversations} x {utterances} | {utterances_per_s:.1f} | {p50_ms:.1f} | {p99_ms:.1f} | "
    "{answered} / {sent_planned} | {errors} | {mean_batch:.1f} | {rss_idle_mib:.0f} -> {rss_peak_mib:.0f} | "
    "{rss_per_conversation_mib:.2f} |"
)
PAGE = """\
# cmath-serve load ({cpu}, ISA class {isa}, {cores} cores shared by server and client; load average \
{loadavg_start:.1f} at start, {loadavg_end:.1f} at end)

Without a server, `model.predict` in one process (same time, same machine): {direct}.

## `cmath`: whole conversations, one per request

| concurrency | utterances | conversations/s | p50 ms | p99 ms | answered / sent | errors | mean batch |
|---|---|---|---|---|---|---|---|
{serve_cmath}

## `cmath_stream`: concurrent conversations, one utterance per request

| mode | path | conversations x utterances | utterances/s | p50 ms | p99 ms | answered / planned | errors \
| mean batch | stub RSS idle -> peak MiB | MiB per live conversation |
|---|---|---|---|---|---|---|---|---|---|---|
{serve_stream}
"""


@dataclass(frozen=True)
class Settings:
    """One option each (--utterances, ...; the module's docstring says what they do)."""

    utterances: int = 20
    levels: str = "1,4,16,64"
    requests: int = 200
    stream_conversations: int = 64
    stream_utterances: int = 50
    modes: str = "batched,serial,recompute"
    threads: int = 0  # onnxruntime threads per model (0: its default)
    queue_delay_us: int = 1000
    seconds: float = 60.0

    def quick(self) -> Settings:
        return replace(
            self, levels="1,4", requests=8, stream_conversations=8, stream_utterances=5, seconds=20
        )


def start_server(export_dir: Path, mode: str, s: Settings) -> Any:
    """One tritonserver on free 127.0.0.1 ports, its cmath_stream in `mode`."""
    from cmath_serve.launcher import Ports, TritonServer, check_port
    from cmath_serve.repository import ServeOptions

    ports = Ports(*(check_port("127.0.0.1", 0, f"port {k}") for k in range(3)))
    n = max(1024, s.stream_conversations)  # live conversations it holds
    options = ServeOptions(
        queue_delay_us=s.queue_delay_us,
        max_conversations=n,
        stream_mode=mode,
        backend="cpu",
        threads=s.threads,
    )
    server = TritonServer(export_dir, options, ports, exit_timeout_s=5)
    server.start()
    return server


def direct_baseline(export_dir: Path, pool: list[Conversation], threads: int) -> list[dict[str, Any]]:
    """model.predict in this process, no server, at batch 1 and 16: what the server adds, measured alongside."""
    import cmath_runtime

    model = cmath_runtime.load(export_dir, backend="cpu", threads=threads or None)
    out = []
    for batch in (1, 16):
        model.predict(pool[:batch], batch_size=batch)  # warm-up
        times = timed_calls(partial(model.predict, pool[:batch], batch_size=batch), DIRECT_ROUNDS)
        rate = {"conversations_per_s": batch * len(times) / sum(times), **percentiles_ms(times)}
        out.append(
            {"benchmark": "direct_predict", "batch": batch, "utterances": len(pool[0]["speakers"]), **rate}
        )
    return out


def _mean_batch(server: Any, model: str, run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """run()'s record and the mean batch Triton executed of `model` meanwhile (inferences / executions)."""
    import tritonclient.grpc as grpc

    client = grpc.InferenceServerClient(server.grpc_url)

    def counts() -> tuple[int, int]:
        stats = client.get_inference_statistics(model).model_stats[0]
        return stats.inference_count, stats.execution_count

    (inf0, ex0), rec, (inf1, ex1) = counts(), run(), counts()
    client.close()
    return {**rec, "mean_batch": (inf1 - inf0) / max(ex1 - ex0, 1)}


def _classify(server: Any, pool: list[Conversation], concurrency: int, s: Settings) -> dict[str, Any]:
    """One closed-loop level of `cmath`: `concurrency` clients, each sending its next whole conversation when the
    last is answered, max(--requests, 4 per client) in all."""
    client = ServeClient(server.grpc_url, NO_RETRY)
    for conv in pool[:4]:  # warm-up
        client.predict([conv])
    load, requests = loadgen.Load(s.seconds), max(s.requests, 4 * concurrency)

    def send(k: int) -> None:
        for i in range(k, requests, concurrency):
            load.timed(partial(client.predict, [pool[i % len(pool)]]))

    rec = _mean_batch(server, "cmath", lambda: load.run(send, concurrency, "conversations"))
    client.close()
    rec.update(benchmark="serve_cmath", concurrency=concurrency, utterances=len(pool[0]["speakers"]))
    return rec


def _stream(server: Any, streams: list[Conversation], mode: str, seconds: float) -> dict[str, Any]:
    """The conversations streamed through `cmath_stream` at once, utterance by utterance, and the resident
    memory of its process (the Python-backend stub below tritonserver) before and at its peak."""
    below = loadgen.processes(server.process.pid)
    stub = next(p for p, cmd in below.items() if "cmath_stream" in cmd and p != server.process.pid)
    loadgen.stream(server.grpc_url, streams[:2], seconds, NO_RETRY)  # warm-up
    idle = loadgen.memory_mib(stub, reset_peak=True)["VmRSS"]
    run = partial(loadgen.stream, server.grpc_url, streams, 3 * seconds, NO_RETRY)
    rec, peak = _mean_batch(server, "cmath_stream", run), loadgen.memory_mib(stub)["VmHWM"]
    rec.update(
        benchmark="serve_stream",
        mode=mode,
        path=server.description["stream_path"],
        sent_planned=rec.pop("planned"),
    )
    rec.update(conversations=len(streams), utterances=len(streams[0]["speakers"]), rss_idle_mib=idle)
    return {**rec, "rss_peak_mib": peak, "rss_per_conversation_mib": (peak - idle) / len(streams)}


def run(export_dir: Path, s: Settings, log: Any = print) -> dict[str, Any]:
    """The direct baseline, then a server per mode: the `cmath` levels on the first, `cmath_stream` on each."""
    pool = loadgen.conversations(export_dir, 32, s.utterances, seed=0)
    streams = loadgen.conversations(export_dir, s.stream_conversations, s.stream_utterances, seed=1)
    records = direct_baseline(export_dir, pool, s.threads)
    log(f"model.predict, no server: {_direct(records)}")
    modes = s.modes.split(",")
    for mode in modes:
        server = start_server(export_dir, mode, s)
        try:
            for c in [int(c) for c in s.levels.split(",")] if mode == modes[0] else []:
                records.append(_classify(server, pool, c, s))
                log(CMATH_ROW.format_map(records[-1]))
            records.append(_stream(server, streams, mode, s.seconds))
            log(STREAM_ROW.format_map(records[-1]))
        finally:
            server.stop()
            server.cleanup()
    return {"records": records}


def _direct(records: list[dict[str, Any]]) -> str:
    direct = [r for r in records if r["benchmark"] == "direct_predict"]
    return ", ".join(f"batch {r['batch']}: {r['conversations_per_s']:.1f} conversations/s" for r in direct)


def markdown(result: dict[str, Any], env: dict[str, Any]) -> str:
    rows = {k: [r for r in result["records"] if r["benchmark"] == k] for k in ("serve_cmath", "serve_stream")}
    tables = {
        k: "\n".join(fmt.format_map(r) for r in rows[k]) for k, fmt in zip(rows, (CMATH_ROW, STREAM_ROW))
    }
    return PAGE.format_map({**env, **tables, "direct": _direct(result["records"])})


def draw(a: Any, b: Any, result: dict[str, Any]) -> None:
    rows = [r for r in result["records"] if r["benchmark"] == "serve_cmath"]
    labels = [r["concurrency"] for r in rows]
    loadgen.rate_and_latency(
        a, labels, rows, "conversations_per_s", "concurrent clients", "cmath (whole conversations)"
    )
    rows = [r for r in result["records"] if r["benchmark"] == "serve_stream"]
    title = f"cmath_stream: {rows[0]['conversations']} conversations x {rows[0]['utterances']} utterances"
    loadgen.rate_and_latency(b, [r["mode"] for r in rows], rows, "utterances_per_s", "server mode", title)


def main(argv: list[str] | None = None) -> None:
    loadgen.main("serve_load", sys.modules[__name__], argv)


if __name__ == "__main__":
    main()
