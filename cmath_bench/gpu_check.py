"""The GPU check: the CUDA and fp16 paths of the meld model run for real, measured against PyTorch on the same GPU.

    python -m cmath_bench.gpu_check OUT [--work DIR] [--quick]     (scripts/gpu_check.sh runs it; docs/gpu.md)

One run, in order: the environment (GPU, driver, CUDA, torch.cuda, onnxruntime and the providers a session it
creates really got); `cmath-train --preset meld --epochs 1` + `cmath-export --fp16`; the benchmark's runner on the
GPU contender set (PyTorch eager fp32, fp16 autocast and torch.compile on CUDA, the runtime on onnxruntime's CUDA EP
fp32 and fp16, and for scale PyTorch and the runtime on the CPU: p50 at batch 1 x 1/10/50 and batch 16 x 10, each
one's parity with PyTorch eager fp32 on CUDA); a causal twin's step graph on CUDA; the checks; what could not run,
and why. gpu_check.json and gpu_check.md are rewritten after every step, so a run cut short still leaves its report.
Without CUDA the CUDA parts are listed as not run and everything else runs (the CPU dry run); exit code 3.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cmath_runtime.errors import first_line

from . import backends, report
from .backends import Skipped
from .runner import Plan, run_benchmark
from .timing import Budget

LENGTHS, THROUGHPUT = (1, 10, 50), (16, 10)  # batch 1 x LENGTHS, and THROUGHPUT = (conversations, utterances)
PARITY_SHAPE = (16, 50)
STEP_LENGTHS = (1, 10, 50)
MAX_ABS, AGREEMENT = 1e-2, 0.995  # the parity tolerances of every CUDA path
BUDGET = Budget(warmup=10, iterations=200, seconds=2.0, min_iterations=20, rounds=5)
QUICK = Budget(warmup=2, iterations=8, seconds=0.3, min_iterations=3, rounds=2)
CUDA_EP = "CUDAExecutionProvider"
REFERENCE, CPU_REFERENCE = "pytorch-eager-cuda:fp32", "pytorch-eager:fp32"
ORT_CUDA = ("onnxruntime-cuda:fp32", "onnxruntime-cuda:fp16")
CONTENDERS = (*backends.TORCH_CUDA, *ORT_CUDA, CPU_REFERENCE, "onnxruntime:fp32")
TENSORRT = (
    "not measured by this check: the tensorrt package's libraries come from NVIDIA's own index, not PyPI"
)


@dataclass
class Step:
    name: str
    status: str  # "ok", "reused", "failed", "not run" (it cannot run here) or "cut" (out of time)
    seconds: float = 0.0
    detail: str = ""


@dataclass
class GpuCheck:
    """Everything one run found; `write()` renders it as gpu_check.json and gpu_check.md in `out`."""

    out: Path
    quick: bool = False
    deadline: float | None = None  # time.perf_counter() after which no step starts (CMATH_GPU_CHECK_BUDGET_S)
    environment: dict[str, Any] = field(default_factory=dict)
    steps: list[Step] = field(default_factory=list)
    records: list[dict[str, Any]] = field(default_factory=list)  # the runner's records (cmath_bench.report)
    parity: list[dict[str, Any]] = field(default_factory=list)
    not_run: list[dict[str, str]] = field(default_factory=list)  # {"what", "why"}
    checks: list[dict[str, Any]] = field(default_factory=list)

    def skip(self, what: str, why: str) -> None:
        self.not_run.append({"what": what, "why": why})
        print(f"   not run: {what}: {why}", flush=True)

    def step(self, name: str, fn: Callable[[], Any]) -> Any:
        """Run one step and record how it went (a step that raises is recorded, never fatal); None unless ok."""
        print(f"== {name}", flush=True)
        start, result, detail = time.perf_counter(), None, ""
        try:
            if self.deadline is not None and start > self.deadline:
                status, detail = "cut", "the run's time budget (CMATH_GPU_CHECK_BUDGET_S) was spent before it"
                self.not_run.append({"what": name, "why": detail})
            else:
                result = fn()
                status = "reused" if result == "reused" else "ok"
        except Skipped as e:
            status, detail = "not run", str(e)
            self.not_run.append({"what": name, "why": detail})
        except Exception as e:  # noqa: BLE001  (recorded; the steps that do not need its result still run)
            traceback.print_exc()
            status, detail = "failed", f"{type(e).__name__}: {first_line(e)}"
        self.steps.append(Step(name, status, round(time.perf_counter() - start, 1), detail))
        print(f"   {status} in {self.steps[-1].seconds:.1f} s{': ' + detail if detail else ''}", flush=True)
        self.write()
        return result

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k not in ("out", "deadline")}

    def write(self) -> None:
        report.write_pages(self.out, "gpu_check", self.to_json(), markdown(self))


# --- environment ------------------------------------------------------------------------------------------------


def environment(work: Path, threads: int) -> dict[str, Any]:
    from .host import environment as host

    return {
        "gpu": nvidia_smi(),
        "torch": torch_info(),
        "onnxruntime": onnxruntime_info(work),
        "host": host(threads),
    }


def nvidia_smi() -> dict[str, Any]:
    if shutil.which("nvidia-smi") is None:
        return {"error": "nvidia-smi is not on the PATH (no NVIDIA driver here)"}
    try:
        query = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        banner = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as e:
        return {"error": f"nvidia-smi failed: {first_line(e)}"}
    name, driver, memory = (x.strip() for x in query.stdout.splitlines()[0].split(",", 2))
    cuda = re.search(r"CUDA Version:\s*([\d.]+)", banner)
    return {"name": name, "driver": driver, "memory": memory, "driver_cuda": cuda.group(1) if cuda else None}


def torch_info() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "version": torch.__version__,
        "cuda_build": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "cuda_available": torch.cuda.is_available(),
    }
    if info["cuda_available"]:
        p = torch.cuda.get_device_properties(0)
        info.update(
            devices=torch.cuda.device_count(),
            device=p.name,
            capability=f"{p.major}.{p.minor}",
            memory_gib=round(p.total_memory / 2**30, 1),
            multiprocessors=p.multi_processor_count,
        )
    return info


def onnxruntime_info(work: Path) -> dict[str, Any]:
    """Version, listed providers, and the providers that sessions on a two-node probe graph really got
    (backend "auto", and "cuda" or the reason it cannot start), read back through open_session."""
    import onnxruntime as ort

    from cmath_runtime.errors import BackendUnavailableError
    from cmath_runtime.session import open_session

    build = getattr(getattr(ort, "capi", None), "build_and_package_info", None)
    info: dict[str, Any] = {
        "version": ort.__version__,
        "device": ort.get_device(),
        "cuda_build": getattr(build, "cuda_version", None),
        "available_providers": ort.get_available_providers(),
    }
    if CUDA_EP in info["available_providers"] and hasattr(ort, "preload_dlls"):
        try:  # CUDA and cuDNN from the nvidia-* packages (torch has usually loaded them already)
            ort.preload_dlls()
            info["preload_dlls"] = "ok"
        except Exception as e:  # noqa: BLE001
            info["preload_dlls"] = f"{type(e).__name__}: {first_line(e)}"
    probe = probe_graph(work / "probe.onnx")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        auto = open_session(probe, "auto", what="probe graph")
    info["auto_session"] = {
        "providers": list(auto.providers),
        "note": auto.note or "; ".join(map(str, caught)),
    }
    try:
        info["cuda_session"] = {"providers": list(open_session(probe, "cuda", what="probe graph").providers)}
    except BackendUnavailableError as e:
        info["cuda_session"] = {"error": str(e)}
    return info


def probe_graph(path: Path) -> Path:
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2])
    graph = helper.make_graph([helper.make_node("Add", ["x", "x"], ["y"])], "probe", [x], [y])
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
    return path


# --- preparation: train and export on this machine ---------------------------------------------------------------


def train_and_export(run_dir: Path, causal: bool, fp16: bool) -> str:
    """`cmath-train --preset meld --epochs 1 [--causal]` then `cmath-export [--fp16]` into run_dir, as the commands
    do (reused when exported)."""
    from cmath_export import export_run
    from cmath_train.run import RecipeOverrides, TrainRequest, run_training

    if (run_dir / "export" / "export.json").is_file():
        return "reused"
    shutil.rmtree(run_dir, ignore_errors=True)  # what a cut run left
    overrides = RecipeOverrides(epochs=1)
    run_training(
        TrainRequest(preset="meld", overrides=overrides, causal=causal, out_dir=run_dir, progress=False)
    )
    export_run(run_dir, fp16=fp16)
    return "ok"


# --- the contenders, timed and compared: the benchmark's runner --------------------------------------------------


def measure(check: GpuCheck, run_dir: Path, threads: int, torch_why: str | None, ort_why: str | None) -> None:
    """Every contender of CONTENDERS that can run here in its own process (runner.run_benchmark): p50 at each
    shape, interleaved round by round, and its parity with the reference (PyTorch eager fp32 on CUDA, on the CPU
    without CUDA)."""
    budget = QUICK if check.quick else BUDGET
    missing = {**dict.fromkeys(backends.TORCH_CUDA, torch_why), **dict.fromkeys(ORT_CUDA, ort_why)}
    for key in CONTENDERS:
        if why := missing.get(key):
            check.skip(key.replace(":", " "), why)
    plan = Plan(
        lengths=LENGTHS,
        throughput_lengths=(THROUGHPUT[1],),
        throughput_batch=THROUGHPUT[0],
        latency=budget,
        throughput=budget,
        contenders=tuple(k for k in CONTENDERS if not missing.get(k)),
        threads=threads,
        reference=CPU_REFERENCE if torch_why else REFERENCE,
        parity_shape=PARITY_SHAPE,
    )
    records = run_benchmark(
        run_dir, run_dir / "export", plan, log=lambda line: print("   " + line, flush=True)
    )
    for r in records:
        if r["kind"] in ("skipped", "failed"):
            at = f" from {r['batch']} x {r['utterances']} on" if r["kind"] == "failed" else ""
            check.skip(report.label(r) + at, r["note"])
    check.records += [r for r in records if r["kind"] in ("latency", "throughput")]
    check.parity += parity(check.records, plan.reference)


def parity(records: list[dict[str, Any]], reference: str) -> list[dict[str, Any]]:
    """One row per contender: max |dp| and argmax agreement with the reference on a PARITY_SHAPE batch."""
    ref, (batch, n), rows = reference.replace(":", " "), PARITY_SHAPE, {}
    for r in records:
        if r.get("max_abs_diff_vs_eager") is None or report.label(r) == ref:
            continue
        diff, agreement = r["max_abs_diff_vs_eager"], r["argmax_agreement_vs_eager"]
        rows[report.label(r)] = {
            "contender": report.label(r),
            "reference": ref,
            "rows": batch * n,
            "max_abs": diff,
            "argmax_agreement": agreement,
            "passed": diff <= MAX_ABS and agreement >= AGREEMENT,
            "shapes": [f"{batch}x{n}"],
        }
    return list(rows.values())


# --- streaming: the step graph -------------------------------------------------------------------------------------


def streaming(check: GpuCheck, export: Path, threads: int, ort_why: str | None) -> None:
    """One new utterance at history 1/10/50 through the step graph, on CUDA and (for scale) the CPU; each engine's
    step probabilities over 50 utterances against the full recompute on the CPU (streaming.run_streaming)."""
    from .backends import ORT, ORT_CUDA, RUNTIME
    from .streaming import BUDGET as STEP_BUDGET
    from .streaming import QUICK_BUDGET, run_streaming

    engines = ((ORT_CUDA, "fp32"), (ORT, "fp32")) if ort_why is None else ((ORT, "fp32"),)
    if ort_why:
        check.skip("step graph on onnxruntime-cuda", ort_why)
    budget, log = QUICK_BUDGET if check.quick else STEP_BUDGET, lambda line: print("   " + line, flush=True)
    records = run_streaming(export, threads, STEP_LENGTHS, budget, log=log, contenders=engines)
    check.records += records
    for r in records:
        if r["path"] == "step" and r["n"] == max(STEP_LENGTHS):
            diff, agreement = r["max_abs_diff_vs_full"], r["argmax_agreement_vs_full"]
            check.parity.append(
                {
                    "contender": f"step {RUNTIME[r['backend']][0]} {r['precision']}",
                    "reference": "full recompute onnxruntime fp32",
                    "rows": r["n"],
                    "max_abs": diff,
                    "argmax_agreement": agreement,
                    "passed": diff <= MAX_ABS and agreement >= AGREEMENT,
                    "provider": r["provider"],
                    "shapes": [f"1x{r['n']}"],
                }
            )


# --- the checks --------------------------------------------------------------------------------------------------


def checks(check: GpuCheck) -> list[dict[str, Any]]:
    """Each CUDA path of the runtime within the parity tolerances and on CUDAExecutionProvider (read back from its
    session): passed True / False, or None where it did not run."""
    par = {p["contender"]: p for p in check.parity}
    providers = {report.label(r): r["provider"] for r in check.records if "provider" in r}
    out = []
    for label in ("onnxruntime-cuda fp32", "onnxruntime-cuda fp16", "step cuda fp32"):
        p = par.get(label)
        provider = (p or {}).get("provider") or providers.get(label)
        out += [
            {
                "check": f"{label}: max |dp| <= {MAX_ABS:g} vs {p['reference'] if p else 'the reference'}",
                "value": p and f"{p['max_abs']:.2e}",
                "passed": p and p["max_abs"] <= MAX_ABS,
            },
            {
                "check": f"{label}: argmax agreement >= {100 * AGREEMENT:g}%",
                "value": p and f"{100 * p['argmax_agreement']:.2f}% of {p['rows']} rows",
                "passed": p and p["argmax_agreement"] >= AGREEMENT,
            },
            {
                "check": f"{label}: runs on {CUDA_EP} (session.get_providers(), read back)",
                "value": provider,
                "passed": None if provider is None else provider == CUDA_EP,
            },
        ]
    return out


def verdict(passed: bool | None) -> str:
    return "not measured" if passed is None else ("PASS" if passed else "FAIL")


# --- the report --------------------------------------------------------------------------------------------------


def markdown(check: GpuCheck) -> str:
    lines = ["# GPU check: the meld model's CUDA and fp16 paths against PyTorch on the same GPU", ""]
    if check.quick:
        lines += ["**Quick run** (few repetitions): the numbers show that each path runs, not its speed.", ""]
    lines += ["## Checks", ""] + [
        f"- {c['check']}: {c['value'] or '-'}: **{verdict(c['passed'])}**" for c in check.checks
    ]
    lines += environment_lines(check.environment)
    lines += ["## Steps", "", "| step | status | s | detail |", "|---|---|---:|---|"]
    lines += [
        f"| {s.name} | {s.status} | {s.seconds:.1f} | {s.detail.replace('|', '/')} |" for s in check.steps
    ]
    timed = [r for r in check.records if r["kind"] in ("latency", "throughput")]
    if timed:
        lines += timing_lines(timed)
    if check.parity:
        lines += parity_lines(check.parity)
    if any(r["kind"] == "streaming" for r in check.records):
        lines += [
            "",
            "## Streaming: one new utterance at history n (step graph; full = whole conversation on CPU)",
            "",
            report.streaming_table(check.records),
        ]
    lines += ["", "## Not run", ""] + [f"- {x['what']}: {x['why']}" for x in check.not_run]
    if timed:
        lines += ["", "## Latency detail", "", report.detail_table(timed, "latency")]
    return "\n".join(lines) + "\n"


def environment_lines(env: dict[str, Any]) -> list[str]:
    """The environment step's findings as a table, one row per value (nested names joined: "torch cuda_build")."""

    def rows(name: str, value: Any) -> Iterator[str]:
        if isinstance(value, dict):
            for key, inner in value.items():
                yield from rows(f"{name} {key}".strip(), inner)
        else:
            text = ", ".join(map(str, value)) if isinstance(value, list) else str(value)
            yield f"| {name} | {text.replace('|', '/')} |"

    return ["", "## Environment", "", "| | |", "|---|---|", *rows("", env), ""]


def timing_lines(timed: list[dict[str, Any]]) -> list[str]:
    labels = {report.label(r) for r in timed}
    ref = next(
        (x.replace(":", " ") for x in (REFERENCE, CPU_REFERENCE) if x.replace(":", " ") in labels), "-"
    )
    return [
        "",
        f"## Latency, batch 1 (p50 ms; speed-up vs {ref})",
        "",
        "Each contender in its own process (the benchmark's runner). PyTorch: inputs made on the device once; each "
        "call ends with the probabilities copied to numpy and torch.cuda.synchronize(). cmath_runtime: "
        "EmotionModel.predict on numpy conversations (validation, padding and copies included). Contenders "
        "interleaved round by round (cmath_bench/timing.py), first calls (compilation) not timed.",
        "",
        report.latency_table(timed),
        "",
        f"## Batch {THROUGHPUT[0]} x {THROUGHPUT[1]}",
        "",
        report.detail_table(timed, "throughput"),
        "",
        "## Contenders: provider, load, compile (first call), memory",
        "",
        report.contender_table(timed),
    ]


def parity_lines(parity: list[dict[str, Any]]) -> list[str]:
    return [
        "",
        "## Parity",
        "",
        "| contender | reference | shapes | rows | max abs dp | argmax agreement | verdict |",
        "|---|---|---|---:|---:|---:|---|",
    ] + [
        f"| {p['contender']} | {p['reference']} | {', '.join(p['shapes'])} | {p['rows']} | "
        f"{p['max_abs']:.2e} | {100 * p['argmax_agreement']:.2f}% | {'PASS' if p['passed'] else 'FAIL'} |"
        for p in parity
    ]


# --- the run -----------------------------------------------------------------------------------------------------


def run(
    out: Path, work: Path, quick: bool = False, threads: int | None = None, budget_s: float | None = None
) -> tuple[GpuCheck, int]:
    """The whole check; (what it found, exit code: 0 all ran, 1 a step failed or was cut by `budget_s` seconds,
    3 no CUDA and the rest ran)."""
    from cmath_runtime.session import default_threads

    threads = threads or default_threads()
    check = GpuCheck(out, quick, None if budget_s is None else time.perf_counter() + budget_s)
    check.skip("TensorRT", TENSORRT)
    check.environment = check.step("environment", lambda: environment(work, threads)) or {}
    # why PyTorch, and why onnxruntime, cannot use CUDA here (None where it can)
    env, failed = check.environment, "the environment step failed"
    torch_why = backends.cuda_missing() if env else failed
    ort_why = env["onnxruntime"]["cuda_session"].get("error") if env else failed
    meld, causal = work / "meld", work / "meld-causal"
    check.step("train + export meld (fp32 + fp16)", lambda: train_and_export(meld, causal=False, fp16=True))
    check.step("time + compare", lambda: measure(check, meld, threads, torch_why, ort_why))
    check.step(
        "train + export causal meld (step graph)", lambda: train_and_export(causal, causal=True, fp16=False)
    )
    if (causal / "export" / "export.json").is_file():
        check.step("streaming step", lambda: streaming(check, causal / "export", threads, ort_why))
    else:
        check.skip("streaming step", "no causal export (its step above did not complete)")
    check.checks = checks(check)
    check.write()
    code = (
        1 if any(s.status in ("failed", "cut") for s in check.steps) else 3 if (torch_why or ort_why) else 0
    )
    return check, code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    out = Path(os.environ.get("OUT") or "runs/gpu_check/report")
    parser.add_argument(
        "out",
        type=Path,
        nargs="?",
        default=out,
        help="where gpu_check.json and gpu_check.md go (default: $OUT, else runs/gpu_check/report)",
    )
    parser.add_argument(
        "--work",
        type=Path,
        default=Path("runs/gpu_check"),
        help="where the trained runs and exports go (reused when already exported)",
    )
    parser.add_argument("--quick", action="store_true", help="few repetitions (a dry run)")
    parser.add_argument(
        "--threads", type=int, default=None, help="CPU threads (default: the cores available)"
    )
    args = parser.parse_args(argv)
    start = time.perf_counter()
    budget = os.environ.get("CMATH_GPU_CHECK_BUDGET_S")
    check, code = run(
        args.out,
        args.work,
        args.quick or bool(os.environ.get("CMATH_GPU_CHECK_QUICK")),
        args.threads,
        float(budget) if budget else None,
    )
    print("\n".join(f"{verdict(c['passed']):>12}  {c['check']}: {c['value'] or '-'}" for c in check.checks))
    print(
        f"{len(check.not_run)} things not run (see 'Not run'); wrote {args.out / 'gpu_check.json'} and "
        f"gpu_check.md in {time.perf_counter() - start:.0f} s; exit {code}"
    )
    return code


if __name__ == "__main__":
    sys.exit(main())
