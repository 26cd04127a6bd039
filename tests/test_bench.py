"""cmath-bench: --quick writes bench.json (required fields), bench.md and bench_latency.png; timing, report and
failure handling in isolation."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from cmath_bench import backends, report
from cmath_bench.cli import main
from cmath_bench.timing import Budget, interleaved, percentiles_ms

REQUIRED = (
    "kind",
    "backend",
    "precision",
    "batch",
    "utterances",
    "p50_ms",
    "p90_ms",
    "p99_ms",
    "threads",
    "provider",
    "speedup_vs_eager",
)


@pytest.fixture(scope="module")
def bench_out(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """`cmath-bench RUN --quick` on a copy of the tiny run without an export (the benchmark exports it)."""
    run = tmp_path_factory.mktemp("bench_run")
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_run / name, run / name)
    out = run / "bench"
    result = CliRunner().invoke(
        main,
        [
            str(run),
            "--quick",
            "--out",
            str(out),
            "--threads",
            "1",
            "--backends",
            "pytorch-eager,onnxruntime:fp32,onnxruntime:fp16,tensorrt",
        ],
    )
    assert result.exit_code == 0, result.output + repr(result.exception)
    return out, result.output


def test_quick_bench_writes_json_md_png(bench_out: tuple[Path, str]) -> None:
    out, printed = bench_out
    records = json.loads((out / "bench.json").read_text())
    assert isinstance(records, list)
    measured = [r for r in records if r["kind"] in ("latency", "throughput")]
    assert {(r["backend"], r["precision"]) for r in measured} == {
        ("pytorch-eager", "fp32"),
        ("onnxruntime", "fp32"),
        ("onnxruntime", "fp16"),
    }
    for r in measured:
        assert all(k in r for k in REQUIRED), sorted(set(REQUIRED) - set(r))
        assert 0 < r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"]
        assert r["speedup_vs_eager"] > 0 and r["iterations"] >= 3
        assert r["load_s"] > 0 and r["peak_rss_mb"] > 0
        assert {k: r["threads"][k] for k in ("torch", "ort_intra_op")} == (
            {"torch": 1, "ort_intra_op": 0}
            if r["backend"] == "pytorch-eager"
            else {"torch": 0, "ort_intra_op": 1}
        )
        assert r["threads"]["idle"].startswith("sleep")
        assert r["max_abs_diff_vs_eager"] < (1e-4 if r["precision"] == "fp32" else 5e-2)
    lat = [r for r in measured if r["kind"] == "latency"]
    assert {r["utterances"] for r in lat} == {1, 5, 20} and {r["batch"] for r in lat} == {1}
    thr = [r for r in measured if r["kind"] == "throughput"]
    assert thr and all(
        r["batch"] == 16 and r["utterances_per_s"] > 0 and r["conversations_per_s"] > 0 for r in thr
    )
    ort = [r for r in measured if r["backend"] == "onnxruntime"]
    assert all(r["torch_imported"] is False and r["provider"] == "CPUExecutionProvider" for r in ort)
    assert all("weight rounding" in r["note"] for r in ort if r["precision"] == "fp16")
    [trt] = [r for r in records if r["backend"] == "tensorrt"]
    assert trt["kind"] == "skipped" and "TensorrtExecutionProvider" in trt["note"] and trt["p50_ms"] is None
    md = (out / "bench.md").read_text()
    assert "| utterances | pytorch-eager fp32 p50 ms |" in md and "## Throughput" in md and "x)" in md
    assert (out / "bench_latency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| utterances |" in printed  # the table is printed at the end
    assert (out.parent / "export" / "export.json").is_file()  # exported by the benchmark


def test_percentiles_and_interleaving() -> None:
    stats = percentiles_ms([0.001] * 98 + [0.002, 0.010])
    assert stats["p50_ms"] == pytest.approx(1.0) and stats["p99_ms"] > stats["p90_ms"] >= 1.0
    calls: list[str] = []

    def timer(name: str):
        def run(count: int, seconds: float | None) -> list[float]:
            calls.extend([name] * count)
            if name == "bad" and seconds is not None:
                raise RuntimeError("compile failed")
            return [0.001] * count

        return run

    t = interleaved(
        {"a": timer("a"), "b": timer("b"), "bad": timer("bad")},
        Budget(warmup=1, iterations=4, seconds=1.0, min_iterations=4, rounds=2),
    )
    assert len(t.times["a"]) == len(t.times["b"]) == 4 and t.first["a"] == [0.001]
    assert t.errors == {"bad": "RuntimeError: compile failed"}
    assert calls[:3] == ["a", "b", "bad"] and calls[3:7] == ["a", "a", "b", "b"]  # warm-up, then rounds


def test_settle_runs_after_every_block_and_quiesce_waits_for_a_busy_process(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Contenders are timed on a quiet machine: `settle` after each block; `quiesce` returns only once a process
    stops using the CPU. The CPU readings are scripted (busy for 6 polls, then still), so the verdict does not
    depend on how busy this machine is; a real sleeping process is quiet at once."""
    import subprocess
    import sys

    from cmath_bench import timing

    settled: list[str] = []
    t = interleaved(
        {"a": lambda c, s: [0.001] * c, "b": lambda c, s: [0.001] * c},
        Budget(warmup=1, iterations=4, seconds=1.0, min_iterations=4, rounds=2),
        settle=lambda name: settled.append(name) or 0.01,
    )
    assert settled == ["a", "b"] * 3 and t.settle_s == pytest.approx(0.06)  # warm-up + 2 rounds

    readings = iter([0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6] + [0.6] * 1000)
    polls: list[float] = []

    def scripted(pid: object, skip: object = None) -> float:
        polls.append(value := next(readings))
        return value

    monkeypatch.setattr(timing, "cpu_seconds", scripted)
    timing.quiesce(1234, window_s=0.001, limit_s=60.0)
    assert polls[:7] == [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6] and len(polls) < 1000  # waited out the busy polls
    monkeypatch.undo()

    idle = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert timing.quiesce(idle.pid, limit_s=60.0) < 60.0  # quiet long before the limit
    finally:
        idle.kill()
        idle.wait()


def test_compile_failure_is_recorded_not_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    """A torch.compile that fails on the first call makes a 'failed' record with the error (the run goes on)."""
    from cmath_bench import runner

    class FakeWorker:
        def __init__(self, key: str, fail: bool) -> None:
            self.key, self.fail, self.info = key, fail, {}

        def timer(self, batch: int, length: int, warm: bool = False):
            def run(count: int, seconds: float | None) -> list[float]:
                if self.fail:
                    raise runner.WorkerError("BackendCompilerFailed: no C++ compiler")
                return [0.002] * count

            return run

        def ask(self, **req: object) -> dict:
            return {"probs": [[[0.5, 0.5]]]}

        def settle(self) -> float:
            return 0.0

    plan = runner.Plan.quick(contenders=("pytorch-eager:fp32", "torch-compile:fp32"))
    workers = [FakeWorker("pytorch-eager:fp32", False), FakeWorker("torch-compile:fp32", True)]
    records = runner._measure(workers, plan, {}, lambda _m: None)  # type: ignore[arg-type]
    failed = [r for r in records if r["kind"] == "failed"]
    assert (
        len(failed) == 1
        and failed[0]["backend"] == "torch-compile"
        and "no C++ compiler" in failed[0]["note"]
    )
    assert all(r["backend"] == "pytorch-eager" for r in records if r["kind"] == "latency")


def test_latency_table() -> None:
    def rec(backend: str, n: int, p50: float) -> dict:
        return {
            "kind": "latency",
            "backend": backend,
            "precision": "fp32",
            "batch": 1,
            "utterances": n,
            "p50_ms": p50,
            "p90_ms": p50,
            "p99_ms": p50,
            "iterations": 10,
            "speedup_vs_eager": None,
        }

    records = [
        rec("pytorch-eager", 1, 10.0),
        rec("torch-compile", 1, 8.0),
        rec("onnxruntime", 1, 3.0),
        rec("pytorch-eager", 50, 30.0),
        rec("torch-compile", 50, 15.0),
        rec("onnxruntime", 50, 25.0),
    ]
    table = report.latency_table(records)
    assert (
        table.splitlines()[0]
        == "| utterances | pytorch-eager fp32 p50 ms | torch-compile fp32 p50 ms | onnxruntime fp32 p50 ms |"
    )


def test_unknown_backend_name(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, [str(tmp_path), "--backends", "jax"])
    assert result.exit_code != 0 and "expected NAME or NAME:PRECISION from" in result.output
    assert backends.ALL[0] == "pytorch-eager:fp32"


def test_every_contender_has_one_name() -> None:
    """Each runtime contender is one name in backends.RUNTIME, used as is by the format table and the records."""
    from cmath_bench.cli import _contender_keys
    from cmath_export.formats import bench_contenders

    assert {name for _, name, _ in bench_contenders()} <= set(backends.RUNTIME)
    assert _contender_keys("onnxruntime-spin") == ["onnxruntime-spin:fp32"]
    assert _contender_keys("onnxruntime") == ["onnxruntime:fp32", "onnxruntime:fp16", "onnxruntime:int8"]
    assert _contender_keys("openvino:bf16") == ["openvino:bf16"]


def test_roofline_flops_and_floor(tmp_path: Path) -> None:
    """FLOPs come from the graph's real shapes (weight MatMul and activation x activation MatMul alike)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from cmath_bench.roofline import CallWork, Machine, weight_bytes

    w = numpy_helper.from_array(np.ones((8, 4), np.float32), "w")
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["y"]),
        helper.make_node("Transpose", ["x"], ["xt"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["x", "xt"], ["s"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "N", 8])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
            helper.make_tensor_value_info("s", TensorProto.FLOAT, None),
        ],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    path = tmp_path / "g.onnx"
    onnx.save(model, str(path))
    assert (
        CallWork(path).flops({"x": np.zeros((2, 5, 8), np.float32)}) == 2 * 2 * 5 * 8 * 4 + 2 * 2 * 5 * 5 * 8
    )
    assert weight_bytes(path) == 8 * 4 * 4
    floor = Machine(bandwidth_gb_s=10, fp32_gflop_s=100, threads=1).floor_ms(1e9, 1e9)
    assert floor == {"bytes_floor_ms": 100.0, "flops_floor_ms": 10.0, "floor_ms": 100.0, "bound": "bandwidth"}


def test_probes_and_measure() -> None:
    """One probe type, one kind per limit: copy and read bandwidth over the same buffer (at least 4x the last-level
    cache), the fp32 / int8 matmul peaks (2 n^3 operations a call); rates from the median or the fastest call; measure
    (the machine's limits before any contender) from the same probes."""
    from cmath_bench.roofline import (
        READ_MIB,
        UNITS,
        Probe,
        last_level_cache_bytes,
        make_probes,
        measure,
        rates,
        read_buffer_mib,
    )

    probes = make_probes(threads=2, mib=4, n=64)
    assert list(probes) == list(UNITS)
    assert probes["copy"].amount == 2 * 4 * 2**20
    assert probes["read_sum"].amount == probes["read_gemv"].amount == 4 * 2**20
    assert probes["fp32"].amount == probes["int8"].amount == 2 * 64**3
    times = {kind: [0.002, 0.001, 0.004] for kind in probes}
    for kind, probe in probes.items():
        probe()
        assert probe.rate(times[kind]) == pytest.approx(probe.amount / 0.002 / 1e9)
        assert probe.rate(times[kind], "best") == pytest.approx(probe.amount / 0.001 / 1e9)
    got = rates(probes, times)
    assert got["fp32_gflop_s"] == pytest.approx(2 * 64**3 / 0.002 / 1e9) and "int8_best_gop_s" in got
    assert got["read_gb_s"] == max(got["read_sum_gb_s"], got["read_gemv_gb_s"])
    assert read_buffer_mib() >= max(READ_MIB, 4 * (last_level_cache_bytes() or 0) / 2**20)
    machine = measure(1, repeats=1, mib=4, n=64)
    assert machine.bandwidth_gb_s > 0 and machine.fp32_gflop_s > 0 and machine.read_gb_s
    with pytest.raises(ValueError, match="kind"):
        Probe("peak")


def test_streaming_records_carry_their_floor(causal_export: Path) -> None:
    """The streaming benchmark on a causal export: step records per engine (sleeping and spinning onnxruntime) with
    their roofline floor and their agreement with the full recompute, and the full-recompute records beside them."""
    from cmath_bench.roofline import Machine
    from cmath_bench.streaming import QUICK_BUDGET, run_streaming

    records = run_streaming(
        causal_export,
        threads=1,
        lengths=(1, 3),
        budget=QUICK_BUDGET,
        log=lambda _m: None,
        contenders=(("onnxruntime", "fp32"), ("onnxruntime-spin", "fp32"), ("onnxruntime", "int8")),
        machine=Machine(bandwidth_gb_s=10.0, fp32_gflop_s=100.0, threads=1),
    )
    steps = [r for r in records if r["path"] == "step"]
    assert {(r["backend"], r["precision"], r["n"]) for r in steps} == {
        (b, p, n)
        for b, p in (("onnxruntime", "fp32"), ("onnxruntime-spin", "fp32"), ("onnxruntime", "int8"))
        for n in (1, 3)
    }
    assert {r["n"] for r in records if r["path"] == "full"} == {1, 3}
    for r in steps:
        assert (
            r["p50_ms"] > 0
            and r["floor_ms"] > 0
            and r["latency_x_floor"] == pytest.approx(r["p50_ms"] / r["floor_ms"])
        )
        # the bytes floor uses the bandwidth measured in the same rounds (not the run's once-measured 10 GB/s), the
        # same for every engine at one history length
        assert r["bandwidth_gb_s"] != 10.0 and r["bandwidth_gb_s"] > 0.1
        assert r["bytes_floor_ms"] == pytest.approx(r["weight_bytes"] / r["bandwidth_gb_s"] / 1e6)
        assert r["bandwidth_best_gb_s"] >= r["bandwidth_gb_s"]  # the fastest copy vs the median one
        assert r["latency_x_best_bytes_floor"] == pytest.approx(
            r["p50_ms"] * r["bandwidth_best_gb_s"] * 1e6 / r["weight_bytes"]
        )
        # fed the whole conversation one utterance at a time, each engine's step agrees with the full recompute
        exact = r["precision"] == "fp32"
        assert (
            r["max_abs_diff_vs_full"] < (1e-4 if exact else 3e-2) and r["provider"] == "CPUExecutionProvider"
        )
        assert r["argmax_agreement_vs_full"] == 1.0 or not exact
        assert r["bandwidth_gb_s"] == next(s["bandwidth_gb_s"] for s in steps if s["n"] == r["n"])


def test_soak_answers_from_many_threads_equal_the_serial_ones(causal_export: Path, tmp_path: Path) -> None:
    """`python -m cmath_bench.soak`: a model shared by 3 threads for 2 s (predict and the step path) gives every
    answer bit for bit as serially, and the report says so."""
    import json
    import subprocess
    import sys

    out = tmp_path / "soak.json"
    cmd = [sys.executable, "-m", "cmath_bench.soak", str(causal_export), "--threads", "3", "--seconds", "2"]
    proc = subprocess.run(
        [*cmd, "--requests", "8", "--out", str(out)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    assert report["answers"] > 0 and report["by_kind"]["stream"] > 0 and report["by_kind"]["predict"] > 0
    assert report["mismatches"] == report["errors"] == report["hung_threads"] == 0
    assert report["first_problem"] is None and report["step_path"] is True
