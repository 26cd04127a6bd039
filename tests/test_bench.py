"""cmath-bench: --quick writes bench.json (required fields), bench.md and bench_latency.png; timing, report and
failure handling in isolation."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from benchmarks import backends, report
from benchmarks.cli import main
from benchmarks.timing import Budget, interleaved, percentiles_ms

REQUIRED = ("kind", "backend", "precision", "batch", "utterances", "p50_ms", "p90_ms", "p99_ms", "threads", "provider",
            "speedup_vs_eager")


@pytest.fixture(scope="module")
def bench_out(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """`cmath-bench RUN --quick` on a copy of the tiny run without an export (the benchmark exports it)."""
    run = tmp_path_factory.mktemp("bench_run")
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_run / name, run / name)
    out = run / "bench"
    result = CliRunner().invoke(main, [str(run), "--quick", "--out", str(out), "--threads", "1",
                                       "--backends", "eager,ort,ort-fp16,tensorrt"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return out, result.output


def test_quick_bench_writes_json_md_png(bench_out: tuple[Path, str]) -> None:
    out, printed = bench_out
    records = json.loads((out / "bench.json").read_text())
    assert isinstance(records, list)
    measured = [r for r in records if r["kind"] in ("latency", "throughput")]
    assert {(r["backend"], r["precision"]) for r in measured} == {
        ("pytorch-eager", "fp32"), ("onnxruntime", "fp32"), ("onnxruntime", "fp16")}
    for r in measured:
        assert all(k in r for k in REQUIRED), sorted(set(REQUIRED) - set(r))
        assert 0 < r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"]
        assert r["speedup_vs_eager"] > 0 and r["iterations"] >= 3
        assert r["load_s"] > 0 and r["peak_rss_mb"] > 0
        assert {k: r["threads"][k] for k in ("torch", "ort_intra_op")} == (
            {"torch": 1, "ort_intra_op": 0} if r["backend"] == "pytorch-eager" else {"torch": 0, "ort_intra_op": 1})
        assert r["threads"]["idle"].startswith("sleep")
        assert r["max_abs_diff_vs_eager"] < (1e-4 if r["precision"] == "fp32" else 5e-2)
    lat = [r for r in measured if r["kind"] == "latency"]
    assert {r["utterances"] for r in lat} == {1, 5, 20} and {r["batch"] for r in lat} == {1}
    thr = [r for r in measured if r["kind"] == "throughput"]
    assert thr and all(r["batch"] == 16 and r["utterances_per_s"] > 0 and r["conversations_per_s"] > 0 for r in thr)
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

    t = interleaved({"a": timer("a"), "b": timer("b"), "bad": timer("bad")},
                    Budget(warmup=1, iterations=4, seconds=1.0, min_iterations=4, rounds=2))
    assert len(t.times["a"]) == len(t.times["b"]) == 4 and t.first["a"] == [0.001]
    assert t.errors == {"bad": "RuntimeError: compile failed"}
    assert calls[:3] == ["a", "b", "bad"] and calls[3:7] == ["a", "a", "b", "b"]  # warm-up, then rounds


def test_compile_failure_is_recorded_not_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    """A torch.compile that fails on the first call makes a 'failed' record with the error (the run goes on)."""
    from benchmarks import runner

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

    plan = runner.Plan.quick(contenders=("pytorch-eager:fp32", "torch-compile:fp32"))
    workers = [FakeWorker("pytorch-eager:fp32", False), FakeWorker("torch-compile:fp32", True)]
    records = runner._measure(workers, plan, {}, lambda _m: None)  # type: ignore[arg-type]
    failed = [r for r in records if r["kind"] == "failed"]
    assert len(failed) == 1 and failed[0]["backend"] == "torch-compile" and "no C++ compiler" in failed[0]["note"]
    assert all(r["backend"] == "pytorch-eager" for r in records if r["kind"] == "latency")


def test_bar_check_and_tables() -> None:
    def rec(backend: str, n: int, p50: float) -> dict:
        return {"kind": "latency", "backend": backend, "precision": "fp32", "batch": 1, "utterances": n, "p50_ms": p50,
                "p90_ms": p50, "p99_ms": p50, "iterations": 10, "speedup_vs_eager": None}

    records = [rec("pytorch-eager", 1, 10.0), rec("torch-compile", 1, 8.0), rec("onnxruntime", 1, 3.0),
               rec("pytorch-eager", 50, 30.0), rec("torch-compile", 50, 15.0), rec("onnxruntime", 50, 25.0)]
    lines = report.bar_check(records)
    assert "3.33x" in lines[0] and lines[0].endswith("PASS")
    assert "1.20x" in lines[1] and lines[1].endswith("FAIL")
    table = report.latency_table(records)
    assert table.splitlines()[0] == "| utterances | pytorch-eager fp32 p50 ms | torch-compile fp32 p50 ms | onnxruntime fp32 p50 ms |"


def test_unknown_backend_name(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, [str(tmp_path), "--backends", "jax"])
    assert result.exit_code != 0 and "expected names from" in result.output
    assert backends.ALL[0] == "pytorch-eager:fp32"
