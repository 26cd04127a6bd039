"""The benchmark run: one worker process per contender (import, load, peak memory of each), then latency at
batch 1 and throughput at batch 16 on the same seeded inputs, interleaved shape by shape and round by round."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from cmath_runtime.compare import compare, max_abs
from cmath_runtime.manifest import read_manifest

from . import backends, host
from .timing import Budget, interleaved, percentiles_ms, quiesce
from .worker import REPLY

LENGTHS = (1, 2, 5, 10, 20, 35, 50, 75, 110)  # utterances per conversation: MELD and IEMOCAP's range
QUICK_LENGTHS = (1, 5, 20)
THROUGHPUT_BATCH = 16
PARITY_SHAPE = (2, 10)  # where every contender's probabilities are compared with PyTorch eager's
WORKER_FIELDS = (  # what a contender's process reports that goes on each of its records
    *("import_s", "load_s", "peak_rss_mb", "torch_imported", "threads", "provider", "compile_s"),
    *("max_abs_diff_vs_eager", "argmax_agreement_vs_eager"),
)


@dataclass(frozen=True)
class Plan:
    lengths: tuple[int, ...] = LENGTHS
    throughput_lengths: tuple[int, ...] = (10, 50)
    throughput_batch: int = THROUGHPUT_BATCH
    latency: Budget = Budget()
    throughput: Budget = Budget(warmup=2, iterations=30, seconds=2.0, min_iterations=5, rounds=5)
    contenders: tuple[str, ...] = backends.ALL
    threads: int = 2
    reference: str = f"{backends.EAGER}:fp32"  # every speed-up and the parity are against this contender
    parity_shape: tuple[int, int] = PARITY_SHAPE

    @classmethod
    def quick(cls, **kw: Any) -> Plan:
        fast = Budget(warmup=1, iterations=6, seconds=0.3, min_iterations=3, rounds=2)
        return cls(lengths=QUICK_LENGTHS, throughput_lengths=(5,), latency=fast, throughput=fast, **kw)


@dataclass(frozen=True)
class BenchRequest:
    """What `cmath-bench` was asked: the run, where the pages go, and how to measure."""

    run_dir: Path
    out_dir: Path
    plan: Plan
    quick: bool = False
    stream_lengths: tuple[int, ...] | None = None  # the streaming benchmark's lengths (default: its sweep)
    # MELD-style CSV folder: the raw-text benchmark's dialogues (default: probe texts)
    texts: Path | None = None
    text_parity: int = 0  # dev dialogues replayed against the PyTorch pipeline (needs texts)
    # the plain encoder beside the fine-tuned one (default: the bundled one)
    frozen_encoder: Path | None = None


def bench(request: BenchRequest, export_dir: Path, log: Callable[[str], None] = print) -> str:
    """The whole cmath-bench run on an exported run: the machine's limits, every contender in its own process
    (latency, throughput, load, memory, agreement), each record against the floor, the step graph where the export
    has one, the raw-text path where it has a text encoder; writes bench.json / bench.md / the plots (and
    bench_text.*) in request.out_dir and returns bench.md's text."""
    from . import roofline
    from .report import write
    from .streaming import stream_records
    from .text_path import report_text_path, summary

    start = time.perf_counter()
    r, threads = request, request.plan.threads
    env = host.environment(threads)
    log(f"cmath-bench {r.run_dir}: {threads} threads, load average {env['load_average']}")
    machine = roofline.measure(threads)  # before any contender runs: the machine's limits at these threads
    env["machine"] = machine.to_json()
    log(
        f"machine limits ({threads} threads): copy bandwidth {machine.bandwidth_gb_s:.1f} GB/s, float32 "
        f"matmul peak {machine.fp32_gflop_s:.0f} GFLOP/s"
    )
    records = run_benchmark(r.run_dir, export_dir, r.plan, log=log)
    roofline.annotate(records, machine, export_dir)
    records += stream_records(
        export_dir, threads, r.quick, log=log, machine=machine, lengths=r.stream_lengths
    )
    env["load_average_end"] = host.environment(threads)["load_average"]
    for rec in records:  # every record names its machine
        rec.update(cpu=env["cpu"], isa=env["isa"], cores=env["cores"])
    text = write(records, env, r.out_dir, f"cmath-bench: {r.run_dir.name}{' (quick)' if r.quick else ''}")
    text_options: dict[str, Any] = {
        "csv_dir": r.texts,
        "parity_dialogues": r.text_parity,
        "frozen_dir": r.frozen_encoder,
    }
    text_path = report_text_path(
        r.run_dir, export_dir, threads, r.quick, r.out_dir, machine, log=log, **text_options
    )
    if text_path:
        log(summary(text_path))
    written = ", bench_text.json/.md/.png" if text_path else ""
    log(
        f"\nwrote {r.out_dir / 'bench.json'}, bench.md, bench_latency.png{written} in {time.perf_counter() - start:.0f} s\n"
    )
    return text


class WorkerError(Exception):
    """A contender's process failed, or answered a request with an error."""


@dataclass
class Worker:
    """A contender's process (cmath_bench.worker): one JSON request line in, one reply line out."""

    key: str  # "backend:precision"
    proc: subprocess.Popen
    stderr: IO[str]
    info: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def start(cls, key: str, job: dict[str, Any], env: dict[str, str]) -> Worker:
        stderr = tempfile.TemporaryFile("w+")  # noqa: SIM115  (lives as long as the worker; closed in stop())
        proc = subprocess.Popen(
            [sys.executable, "-m", "cmath_bench.worker", json.dumps(job)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            env=env,
            cwd=Path(__file__).resolve().parents[1],
        )
        worker = cls(key, proc, stderr)
        worker.info = worker.read()
        return worker

    def read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(REPLY):
                return json.loads(line[len(REPLY) :])
        self.stderr.seek(0)
        raise WorkerError(f"worker exited {self.proc.wait()}: {self.stderr.read().strip()[-400:]}")

    def ask(self, **request: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        answer = self.read()
        if "error" in answer:
            raise WorkerError(answer["error"])
        return answer

    def timer(
        self, batch: int, length: int, warm: bool = False
    ) -> Callable[[int, float | None], list[float]]:
        return lambda count, seconds: self.ask(
            op="warmup" if warm else "time", batch=batch, length=length, count=count, seconds=seconds
        )["times"]

    def settle(self) -> float:
        """Wait until this worker's threads stop spinning (timing.quiesce); -> seconds waited."""
        return quiesce(self.proc.pid)

    def stop(self) -> None:
        if self.proc.poll() is None and self.proc.stdin is not None:
            with contextlib.suppress(BrokenPipeError, OSError):
                self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.stderr.close()


def run_benchmark(
    run_dir: Path, export_dir: Path, plan: Plan, log: Callable[[str], None] = print
) -> list[dict]:
    """Every record of one benchmark run: latency (batch 1), throughput (batch 16), skipped or failed contenders."""
    workers, records = [], []
    manifest = read_manifest(export_dir)
    common = {"model_d": manifest.d, "modalities": "".join(manifest.modalities)}
    try:
        for key in plan.contenders:
            worker, skipped = _start(key, run_dir, export_dir, plan, log)
            if worker:
                workers.append(worker)
            else:
                records.append(_record("skipped", key, None, None, **common, note=skipped))
        records += _measure(workers, plan, common, log)
        for w in workers:
            w.info.update(w.ask(op="stats"))
    finally:
        for w in workers:
            w.stop()
    owners = {w.key: w.info for w in workers}
    # load time, memory, threads and parity of each contender, on every one of its records
    for rec in records:
        if info := owners.get(_key(rec)):
            rec.update({k: info[k] for k in WORKER_FIELDS if k in info})
            if info.get("peak_rss_mb") and info.get("base_rss_mb"):
                rec["rss_delta_mb"] = info["peak_rss_mb"] - info["base_rss_mb"]
            rec["note"] = "; ".join(x for x in (rec.get("note"), info.get("note")) if x)
    return records


def _start(
    key: str, run_dir: Path, export_dir: Path, plan: Plan, log: Callable[[str], None]
) -> tuple[Worker | None, str]:
    backend, precision = key.split(":")
    job = {
        "backend": backend,
        "precision": precision,
        "threads": plan.threads,
        "run_dir": str(run_dir),
        "export_dir": str(export_dir),
    }
    # idle threads sleep in every contender (torch: OMP_WAIT_POLICY=PASSIVE, onnxruntime: allow_spinning=0) but
    # onnxruntime-spin, whose threads spin: the same policy for torch's OpenMP pool as for onnxruntime's
    env = {**os.environ, "OMP_NUM_THREADS": str(plan.threads), "MKL_NUM_THREADS": str(plan.threads)}
    env["OMP_WAIT_POLICY"] = "PASSIVE"
    try:
        worker = Worker.start(key, job, env)
    except WorkerError as e:
        log(f"  {key}: failed to start: {e}")
        return None, f"failed to start: {e}"
    if not worker.info.get("ready"):
        worker.stop()
        reason = worker.info.get("skipped") or worker.info.get("error", "unknown")
        log(f"  skipped {key}: {reason}")
        return None, reason
    log(
        f"  {key}: import {worker.info['import_s']:.2f} s, load {worker.info['load_s']:.2f} s "
        f"({worker.info['provider']}, threads {worker.info['threads']})"
    )
    return worker, ""


def _measure(
    workers: list[Worker], plan: Plan, common: dict[str, Any], log: Callable[[str], None]
) -> list[dict]:
    records: list[dict] = []
    failed: dict[str, str] = {}
    by_key = {w.key: w for w in workers}
    shapes = [("latency", 1, n, plan.latency) for n in plan.lengths] + [
        ("throughput", plan.throughput_batch, n, plan.throughput) for n in plan.throughput_lengths
    ]
    for i, (kind, batch, n, budget) in enumerate(shapes):
        live = [w for w in workers if w.key not in failed]
        warm = {w.key: w.timer(batch, n, warm=True) for w in live}
        # each block settles until that contender's process stops using the CPU
        timings = interleaved(
            {w.key: w.timer(batch, n) for w in live}, budget, warm, lambda k: by_key[k].settle()
        )
        failed.update(timings.errors)
        for key, err in timings.errors.items():
            log(f"  {key} failed at batch {batch} x {n}: {err}")
            records.append(_record("failed", key, batch, n, **common, note=err))
        shape_records = []
        for w in [w for w in live if w.key not in failed]:
            stats = percentiles_ms(timings.times[w.key])
            first = timings.first[w.key]  # the warm-up calls: OpenVINO compiles a shape on call 2
            rec = _record(kind, w.key, batch, n, **stats, **common, iterations=len(timings.times[w.key]))
            rec.update(first_call_ms=first[0] * 1e3, warmup_ms=[t * 1e3 for t in first])
            if kind == "throughput":
                rec.update(
                    conversations_per_s=batch / (stats["p50_ms"] / 1e3),
                    utterances_per_s=batch * n / (stats["p50_ms"] / 1e3),
                )
            if i == 0 and w.key.startswith(backends.COMPILE):
                w.info["compile_s"] = first[0]  # the first call: dynamo + inductor
            shape_records.append(rec)
        ref = next((r["p50_ms"] for r in shape_records if _key(r) == plan.reference), None)
        for rec in shape_records:
            rec["speedup_vs_eager"] = ref / rec["p50_ms"] if ref else None
        records += shape_records
        log(
            f"  {kind:10s} batch {batch:2d} x {n:3d}: "
            + "  ".join(f"{r['backend']} {r['precision']} {r['p50_ms']:.2f} ms" for r in shape_records)
        )
    _parity(workers, failed, plan, log)
    return records


def _key(rec: dict[str, Any]) -> str:
    return f"{rec['backend']}:{rec['precision']}"


def _parity(workers: list[Worker], failed: dict[str, str], plan: Plan, log: Callable[[str], None]) -> None:
    """Max |probs - reference probs| and argmax agreement of every contender on one shared input."""
    live = [w for w in workers if w.key not in failed]
    reference = next((w for w in live if w.key == plan.reference), None)
    if reference is None:
        return
    batch, n = plan.parity_shape
    ref = {"probs": np.asarray(reference.ask(op="probs", batch=batch, length=n)["probs"])}
    for w in live:
        try:
            got = {"probs": np.asarray(w.ask(op="probs", batch=batch, length=n)["probs"])}
        except WorkerError as e:
            log(f"  {w.key}: no parity check ({e})")
            continue
        report = compare(
            [ref],
            [got],
            {"probs": max_abs(None)},
            masks=[np.ones(ref["probs"].shape[:-1], bool)],
            artifact=w.key,
            reference_name=reference.key,
            runtime=w.key,
            data=f"{batch}x{n} seeded inputs",
        )
        w.info["max_abs_diff_vs_eager"] = report.output("probs").max_abs
        w.info["argmax_agreement_vs_eager"] = report.argmax_agreement


def _record(kind: str, key: str, batch: int | None, n: int | None, **fields: Any) -> dict[str, Any]:
    backend, precision = key.split(":")
    head = {"kind": kind, "backend": backend, "precision": precision, "batch": batch, "utterances": n}
    return {**head, **dict.fromkeys(("p50_ms", "p90_ms", "p99_ms")), **fields}
