"""cmath_bench/gpu_check.py: the report writer and its checks on made-up GPU numbers, and the whole check on the
shared tiny runs with CUDA hidden (the CPU dry run: CUDA parts listed as not run with the reason, exit code 3)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cmath_bench import gpu_check
from cmath_bench.backends import Skipped
from cmath_bench.gpu_check import GpuCheck


def _rec(backend: str, precision: str, batch: int, n: int, p50: float, provider: str) -> dict:
    return {
        "kind": "latency" if batch == 1 else "throughput",
        "backend": backend,
        "precision": precision,
        "provider": provider,
        "batch": batch,
        "utterances": n,
        "p50_ms": p50,
        "p90_ms": p50,
        "p99_ms": p50,
        "iterations": 20,
        "speedup_vs_eager": None,
    }


def _par(contender: str, max_abs: float, agreement: float, **extra: object) -> dict:
    return {
        "contender": contender,
        "reference": "pytorch-eager-cuda fp32",
        "rows": 1021,
        "max_abs": max_abs,
        "argmax_agreement": agreement,
        "passed": True,
        "shapes": ["1x10"],
        **extra,
    }


def test_checks_and_report_on_made_up_gpu_numbers(tmp_path: Path) -> None:
    cuda = "CUDAExecutionProvider"
    check = GpuCheck(
        tmp_path,
        records=[
            _rec("pytorch-eager-cuda", "fp32", 1, 10, 6.0, "cuda (torch)"),
            _rec("onnxruntime-cuda", "fp16", 1, 10, 1.5, cuda),
            _rec("onnxruntime-cuda", "fp32", 1, 10, 2.5, "CPUExecutionProvider"),
            _rec("onnxruntime-cuda", "fp16", 16, 10, 3.0, cuda),
        ],
        parity=[_par("onnxruntime-cuda fp32", 2e-6, 1.0), _par("onnxruntime-cuda fp16", 3e-3, 0.99)],
    )
    check.not_run.append({"what": "TensorRT", "why": gpu_check.TENSORRT})
    check.checks = gpu_check.checks(check)
    by = [(c["check"], c["passed"]) for c in check.checks]
    assert ("onnxruntime-cuda fp16: argmax agreement >= 99.5%", False) in by  # 99% < 99.5%
    assert ("onnxruntime-cuda fp16: max |dp| <= 0.01 vs pytorch-eager-cuda fp32", True) in by
    assert (f"onnxruntime-cuda fp32: runs on {cuda} (session.get_providers(), read back)", False) in by
    assert all(
        passed is None for c, passed in by if c.startswith("step cuda")
    )  # no step record: not measured
    check.write()
    md = (tmp_path / "gpu_check.md").read_text()
    assert "**PASS**" in md and "**FAIL**" in md and "**not measured**" in md
    assert "## Latency, batch 1 (p50 ms; speed-up vs pytorch-eager-cuda fp32)" in md and "| 10 |" in md
    assert "## Batch 16 x 10" in md and "## Parity" in md and "- TensorRT: not measured by this check" in md
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    assert set(data) == {"quick", "environment", "steps", "records", "parity", "not_run", "checks"}


def _exported_only(run_dir: Path, **_: object) -> str:
    """gpu_check.train_and_export for tests: reuses what is exported, trains nothing."""
    if not (run_dir / "export" / "export.json").is_file():
        raise Skipped("not trained in this test")
    return "reused"


def test_dry_run_without_cuda(
    tiny_export: tuple[Path, dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check on the tiny run, CUDA hidden from torch and onnxruntime (here and in the runner's contender
    processes): every CPU part runs, every CUDA part is listed as not run with its reason, the report is written,
    exit code 3, no traceback."""
    import torch

    from cmath_runtime import session

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(session, "available_providers", lambda: ["CPUExecutionProvider"])

    monkeypatch.setattr(gpu_check, "train_and_export", _exported_only)
    work = tmp_path / "work"
    work.mkdir()
    (work / "meld").symlink_to(tiny_export[0].parent)
    check, code = gpu_check.run(tmp_path / "out", work, quick=True, threads=1)
    assert code == 3
    assert {s.name: s.status for s in check.steps} == {
        "environment": "ok",
        "train + export meld (fp32 + fp16)": "reused",
        "time + compare": "ok",
        "train + export causal meld (step graph)": "not run",
    }, check.steps
    why = {x["what"]: x["why"] for x in check.not_run}
    for label in ("pytorch-eager-cuda fp32", "pytorch-eager-cuda fp16", "torch-compile-cuda fp32"):
        assert "torch.cuda.is_available() is False" in why[label]
    for label in ("onnxruntime-cuda fp32", "onnxruntime-cuda fp16"):
        assert "CUDAExecutionProvider" in why[label]
    assert "TensorRT" in why and "streaming step" in why
    timed = {(r["backend"], r["batch"], r["utterances"]) for r in check.records}
    shapes = {(1, n) for n in gpu_check.LENGTHS} | {gpu_check.THROUGHPUT}
    assert timed == {(b, *s) for b in ("pytorch-eager", "onnxruntime") for s in shapes}
    [ort] = check.parity
    assert ort["contender"] == "onnxruntime fp32" and ort["reference"] == "pytorch-eager fp32"
    assert ort["max_abs"] < 1e-4 and ort["rows"] == 800 and ort["passed"]
    assert all(c["passed"] is None for c in check.checks)  # nothing on CUDA: every check "not measured"
    assert check.environment["onnxruntime"]["auto_session"]["providers"] == ["CPUExecutionProvider"]
    md = (tmp_path / "out" / "gpu_check.md").read_text()
    assert "## Not run" in md and "**not measured**" in md and "**Quick run**" in md and "| 50 |" in md
    assert json.loads((tmp_path / "out" / "gpu_check.json").read_text())["steps"][0]["name"] == "environment"


def test_streaming_step_without_cuda(causal_export: Path, tmp_path: Path) -> None:
    """The step graph on the CPU (timed, its probabilities against the full recompute); CUDA listed as not run."""
    check = GpuCheck(tmp_path, quick=True)
    gpu_check.streaming(check, causal_export, 1, "no CUDA here (test)")
    assert {(r["path"], r["backend"], r["n"]) for r in check.records} == {
        (path, "onnxruntime", n) for path in ("step", "full") for n in gpu_check.STEP_LENGTHS
    }
    [step] = check.parity
    assert step["contender"] == "step cpu fp32" and step["provider"] == "CPUExecutionProvider"
    assert step["passed"] and step["rows"] == max(gpu_check.STEP_LENGTHS) and step["max_abs"] < 1e-4
    assert check.not_run == [{"what": "step graph on onnxruntime-cuda", "why": "no CUDA here (test)"}]


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs an NVIDIA GPU (CUDA in torch)")
def test_check_on_a_gpu(
    tiny_export: tuple[Path, dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a GPU machine with onnxruntime-gpu: the CUDA contenders run and the runtime says it ran on CUDA."""
    monkeypatch.setattr(gpu_check, "train_and_export", _exported_only)
    work = tmp_path / "work"
    work.mkdir()
    (work / "meld").symlink_to(tiny_export[0].parent)
    check, code = gpu_check.run(tmp_path / "out", work, quick=True)
    assert code == 0, check.not_run
    assert {p["contender"] for p in check.parity} >= {
        "onnxruntime-cuda fp32",
        "onnxruntime-cuda fp16",
        "pytorch-eager-cuda fp16",
        "torch-compile-cuda fp32",
    }
    assert all(c["passed"] for c in check.checks if c["check"].startswith("onnxruntime-cuda"))
