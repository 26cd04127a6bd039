"""The GPU check: the CUDA and fp16 paths of the meld model run for real, measured against PyTorch on the same GPU.

    python -m cmath_bench.gpu_check OUT [--work DIR] [--quick]     (scripts/gpu_check.sh runs it; docs/gpu.md)

One run, in order: the environment (GPU, driver, CUDA, torch.cuda, onnxruntime and the providers a session it
creates really got); `cmath-train --preset meld --epochs 1` + `cmath-export --fp16`; p50 latency at batch 1 x
1/10/50 utterances and batch 16 x 10 of PyTorch eager fp32, fp16 (torch.autocast) and torch.compile on CUDA, the
runtime on onnxruntime's CUDA EP (fp32, fp16) and, for scale, PyTorch and the runtime on the CPU; the parity of each
with PyTorch eager fp32 (cmath_runtime.compare); a causal twin's step graph on CUDA; the bars; what could not run,
and why. gpu_check.json and gpu_check.md are rewritten after every step, so a run cut short still leaves its report.
Without CUDA the CUDA parts are listed as not run and everything else runs (the CPU dry run); exit code 3.
"""

from __future__ import annotations

import argparse
import copy
import os
import re
import shutil
import subprocess
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cmath_runtime.compare import compare, max_abs
from cmath_runtime.errors import first_line

from . import report
from .backends import Contender, Skipped
from .inputs import InputSpec, conversations
from .timing import Budget, interleaved, percentiles_ms, repeating

ROOT = Path(__file__).resolve().parents[1]
SHAPES = ((1, 1), (1, 10), (1, 50), (16, 10))  # (conversations, utterances each), timed
PARITY_ONLY = (16, 50)  # more rows for the argmax agreement, not timed
STEP_LENGTHS = (1, 10, 50)
SPEEDUP, MAX_ABS, AGREEMENT = 3.0, 1e-2, 0.995  # the bars: ort CUDA fp16 vs eager fp32 at 1 x 10; parity
BUDGET = Budget(warmup=10, iterations=200, seconds=2.0, min_iterations=20, rounds=5)
QUICK = Budget(warmup=2, iterations=8, seconds=0.3, min_iterations=3, rounds=2)
CUDA_EP = "CUDAExecutionProvider"
TENSORRT = (
    "not measured by this check: the tensorrt package installs its libraries from NVIDIA's own package index, "
    "not PyPI, so onnxruntime's TensorRT EP and `cmath-export --tensorrt` are left out"
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
    records: list[dict[str, Any]] = field(
        default_factory=list
    )  # cmath_bench.report's keys (kind, backend, ...)
    parity: list[dict[str, Any]] = field(default_factory=list)
    not_run: list[dict[str, str]] = field(default_factory=list)  # {"what", "why"}
    bars: list[dict[str, Any]] = field(default_factory=list)

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
    from .runner import environment as host

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


def cuda_missing(env: dict[str, Any]) -> tuple[str | None, str | None]:
    """(why PyTorch cannot use CUDA, why onnxruntime cannot); None where it can."""
    t, o = env["torch"], env["onnxruntime"]
    torch_why = (
        None
        if t["cuda_available"]
        else (
            f"torch {t['version']} sees no CUDA device (torch.cuda.is_available() is False"
            + (f"; built for CUDA {t['cuda_build']})" if t["cuda_build"] else "; a CPU build)")
        )
    )
    ort_why = o["cuda_session"].get("error")
    return torch_why, ort_why


# --- preparation: train and export on this machine ---------------------------------------------------------------


def cli(module: str, *args: str) -> None:
    """Run a cmath command-line tool (python -m, this tree's packages); RuntimeError with its last line if it fails."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
    }
    proc = subprocess.run(
        [sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=ROOT, env=env
    )
    output = (proc.stdout + proc.stderr).strip()
    print("\n".join("   | " + line for line in output.splitlines()[-12:]), flush=True)
    if proc.returncode:
        last = output.splitlines()[-1] if output else "no output"
        raise RuntimeError(f"{module} exited {proc.returncode}: {last}")


def train_and_export(run_dir: Path, train: tuple[str, ...], export: tuple[str, ...]) -> str:
    """`cmath-train --preset meld --epochs 1 ...` then `cmath-export ...` into run_dir (reused when exported)."""
    if (run_dir / "export" / "export.json").is_file():
        return "reused"
    shutil.rmtree(run_dir, ignore_errors=True)  # what a cut run left
    cli("cmath_train.cli", "--preset", "meld", "--epochs", "1", "--quiet", "--out", str(run_dir), *train)
    cli("cmath_export.cli", str(run_dir), *export)
    return "ok"


# --- the contenders, timed and compared ---------------------------------------------------------------------------


def contenders(check: GpuCheck, run_dir: Path, threads: int, torch_why: str | None) -> dict[str, Contender]:
    """Every contender that loads here, by label ("backend precision"); the others go to check.not_run."""
    from . import backends

    model, spec, _ = backends.torch_model(run_dir)
    gpu = None if torch_why else copy.deepcopy(model).to("cuda")
    export = run_dir / "export"

    def on_gpu(make: Callable[[Any], Contender]) -> Callable[[], Contender]:
        def load() -> Contender:
            if gpu is None:
                raise Skipped(torch_why or "no CUDA")
            return make(gpu)

        return load

    makers: list[tuple[str, str, Callable[[], Contender]]] = [
        ("pytorch-eager-cuda", "fp32", on_gpu(lambda m: backends.eager(m, spec, "cuda"))),
        ("pytorch-eager-cuda", "fp16", on_gpu(lambda m: backends.eager(m, spec, "cuda", "fp16"))),
        ("torch-compile-cuda", "fp32", on_gpu(lambda m: backends.compiled(m, spec, "cuda"))),
        ("onnxruntime-cuda", "fp32", lambda: backends.runtime(export, backends.ORT_CUDA, "fp32", threads)),
        ("onnxruntime-cuda", "fp16", lambda: backends.runtime(export, backends.ORT_CUDA, "fp16", threads)),
        ("pytorch-eager-cpu", "fp32", lambda: backends.eager(model, spec)),
        ("onnxruntime", "fp32", lambda: backends.runtime(export, backends.ORT, "fp32", threads)),
    ]
    out = {}
    for backend, precision, make in makers:
        label = f"{backend} {precision}"
        try:
            c = make()
        except Skipped as e:
            check.skip(label, str(e))
            continue
        except Exception as e:  # noqa: BLE001
            check.skip(label, f"failed to load: {type(e).__name__}: {first_line(e)}")
            continue
        c.backend = backend
        c.info["spec"] = spec
        out[label] = c
        print(f"   {label}: {c.provider}{f' ({c.note})' if c.note else ''}", flush=True)
    return out


def measure(
    check: GpuCheck, live: dict[str, Contender], budget: Budget
) -> dict[str, dict[tuple, np.ndarray]]:
    """p50 of every contender at every shape, interleaved round by round (timing.interleaved); the probabilities
    of each at each shape (and PARITY_ONLY) for the parity. Contenders that fail are dropped with the error."""
    live = dict(live)
    spec: InputSpec = next(iter(live.values())).info["spec"]
    probs: dict[str, dict[tuple, np.ndarray]] = {name: {} for name in live}
    for shape in (*SHAPES, PARITY_ONLY):
        batch, n = shape
        convs = conversations(spec, batch, n)
        calls, first = {}, {}
        for name, c in list(live.items()):
            try:
                calls[name] = c.prepare(convs)
                start = time.perf_counter()
                probs[name][shape] = c.probs(
                    calls[name]()
                )  # the first call at this shape (torch.compile compiles)
                first[name] = time.perf_counter() - start
            except Exception as e:  # noqa: BLE001
                check.skip(f"{name} from {batch} x {n} on", f"{type(e).__name__}: {first_line(e)}")
                del live[name]
                calls.pop(name, None)
        if shape == PARITY_ONLY:
            break
        timers = {name: repeating(call) for name, call in calls.items()}
        timings = interleaved(timers, budget)
        for name, err in timings.errors.items():
            check.skip(f"{name} from {batch} x {n} on", err)
            del live[name]
        records = [
            record(live[name], batch, n, timings.times[name], first[name]) for name in calls if name in live
        ]
        ref_label = reference_of(records)
        ref = next((r["p50_ms"] for r in records if report.label(r) == ref_label), None)
        for r in records:
            r["speedup_vs_eager"] = ref / r["p50_ms"] if ref and report.label(r) != ref_label else None
        check.records += records
        print(
            f"   {batch:2d} x {n:2d}: "
            + ", ".join(f"{report.label(r)} {r['p50_ms']:.2f} ms" for r in records),
            flush=True,
        )
        check.write()
    return probs


def record(c: Contender, batch: int, n: int, times: list[float], first_s: float) -> dict[str, Any]:
    stats = percentiles_ms(times)
    rec = {
        "kind": "latency" if batch == 1 else "throughput",
        "backend": c.backend,
        "precision": c.precision,
        "provider": c.provider,
        "batch": batch,
        "utterances": n,
        **stats,
        "iterations": len(times),
        "first_call_ms": first_s * 1e3,
    }
    if batch > 1:
        rec.update(
            conversations_per_s=batch / (stats["p50_ms"] / 1e3),
            utterances_per_s=batch * n / (stats["p50_ms"] / 1e3),
        )
    return rec


def reference_of(rows: list[dict[str, Any]] | dict[str, Any]) -> str:
    """The label every contender is compared with: PyTorch eager fp32 on CUDA, or on the CPU without CUDA."""
    labels = set(rows) if isinstance(rows, dict) else {report.label(r) for r in rows}
    return "pytorch-eager-cuda fp32" if "pytorch-eager-cuda fp32" in labels else "pytorch-eager-cpu fp32"


def parity(probs: dict[str, dict[tuple, np.ndarray]]) -> list[dict[str, Any]]:
    """Max |dp| and argmax agreement of each contender with the reference over every shape both ran."""
    ref_name = reference_of(probs)
    ref = probs.get(ref_name, {})
    rows = []
    for name, got in probs.items():
        shapes = [s for s in ref if s in got]
        if name == ref_name or not shapes:
            continue
        rep = compare(
            [{"probs": ref[s]} for s in shapes],
            [{"probs": got[s]} for s in shapes],
            {"probs": max_abs(MAX_ABS)},
            masks=[np.ones(s, bool) for s in shapes],
            min_argmax_agreement=AGREEMENT,
            artifact=name,
            reference_name=ref_name,
            runtime=name,
        )
        top2 = np.sort(np.concatenate([ref[s].reshape(-1, ref[s].shape[-1]) for s in shapes]), -1)[:, -2:]
        rows.append(
            {
                "contender": name,
                "reference": ref_name,
                "rows": rep.rows,
                "max_abs": rep.output("probs").max_abs,
                "mean_abs": rep.output("probs").mean_abs,
                "argmax_agreement": rep.argmax_agreement,
                "passed": rep.passed,
                "near_ties": int((top2[:, 1] - top2[:, 0] < 1e-3).sum()),
                "shapes": [f"{b}x{n}" for b, n in shapes],
            }
        )
    return rows


# --- streaming: the step graph -------------------------------------------------------------------------------------


def streaming(check: GpuCheck, export: Path, threads: int, ort_why: str | None) -> None:
    """One new utterance at history 1/10/50 through the step graph, on CUDA and (for scale) the CPU; each engine's
    step probabilities over 50 utterances against the full recompute (the runtime on the CPU), and its provider."""
    import cmath_runtime
    from cmath_runtime.streaming import Stream

    from .backends import ORT, ORT_CUDA, RUNTIME
    from .streaming import BUDGET as STEP_BUDGET
    from .streaming import QUICK_BUDGET, run_streaming

    engines = ((ORT_CUDA, "fp32"), (ORT, "fp32")) if ort_why is None else ((ORT, "fp32"),)
    if ort_why:
        check.skip("step graph on onnxruntime-cuda", ort_why)
    check.records += run_streaming(
        export,
        threads,
        STEP_LENGTHS,
        QUICK_BUDGET if check.quick else STEP_BUDGET,
        log=lambda line: print("   " + line, flush=True),
        contenders=engines,
    )
    full = cmath_runtime.load(export, backend="cpu", threads=threads)
    spec = InputSpec(tuple(full.modalities), full.feature_dims, full.num_speakers)
    [conv] = conversations(spec, 1, max(STEP_LENGTHS), seed=1)
    [ref] = full.predict([conv])
    for contender, precision in engines:
        backend = RUNTIME[contender][0]
        try:
            model = cmath_runtime.load(export, backend=backend, threads=threads)
            graph = model.step_graph
            if graph is None:
                raise cmath_runtime.ArtifactError(export, "the causal export has no step graph")
            got, _ = Stream(graph).catch_up([int(s) for s in conv["speakers"]], conv["features"])
        except cmath_runtime.CmathError as e:
            check.skip(f"step graph parity on {backend}", str(e))
            continue
        rep = compare(
            [{"probs": ref.probs}],
            [{"probs": got}],
            {"probs": max_abs(MAX_ABS)},
            min_argmax_agreement=AGREEMENT,
        )
        check.parity.append(
            {
                "contender": f"step {model.backend} {precision}",
                "reference": "full recompute onnxruntime fp32",
                "rows": rep.rows,
                "max_abs": rep.output("probs").max_abs,
                "mean_abs": rep.output("probs").mean_abs,
                "argmax_agreement": rep.argmax_agreement,
                "passed": rep.passed,
                "provider": graph.session.get_providers()[0],
                "shapes": [f"1x{max(STEP_LENGTHS)}"],
            }
        )


# --- the bars ----------------------------------------------------------------------------------------------------


def bars(check: GpuCheck) -> list[dict[str, Any]]:
    """The bars, each PASS / FAIL, or None (not measured) with the reason."""
    rec = {
        (report.label(r), r["batch"], r["utterances"]): r for r in check.records if r["kind"] != "streaming"
    }
    par = {p["contender"]: p for p in check.parity}
    ort16, eager = rec.get(("onnxruntime-cuda fp16", 1, 10)), rec.get(("pytorch-eager-cuda fp32", 1, 10))
    ratio = eager["p50_ms"] / ort16["p50_ms"] if ort16 and eager else None
    value = f"{ratio:.2f}x ({eager['p50_ms']:.3f} / {ort16['p50_ms']:.3f} ms)" if ort16 and eager else None
    out = [
        {
            "bar": f"onnxruntime CUDA fp16 >= {SPEEDUP:g}x PyTorch eager fp32 on CUDA, batch 1 x 10, p50",
            "value": value,
            "passed": None if ratio is None else ratio >= SPEEDUP,
        }
    ]
    for label in ("onnxruntime-cuda fp32", "onnxruntime-cuda fp16", "step cuda fp32"):
        p = par.get(label)
        out.append(
            {
                "bar": f"{label}: max |dp| <= {MAX_ABS:g} vs {p['reference'] if p else 'the reference'}",
                "value": p and f"{p['max_abs']:.2e}",
                "passed": p and p["max_abs"] <= MAX_ABS,
            }
        )
        out.append(
            {
                "bar": f"{label}: argmax agreement >= {100 * AGREEMENT:g}%",
                "value": p and f"{100 * p['argmax_agreement']:.2f}% of {p['rows']} rows",
                "passed": p and p["argmax_agreement"] >= AGREEMENT,
            }
        )
        provider = (p or {}).get("provider") or next(
            (r["provider"] for r in check.records if report.label(r) == label and "provider" in r), None
        )
        out.append(
            {
                "bar": f"{label}: the runtime reports {CUDA_EP} (session.get_providers(), read back)",
                "value": provider,
                "passed": None if provider is None else provider == CUDA_EP,
            }
        )
    return out


def verdict(passed: bool | None) -> str:
    return "not measured" if passed is None else ("PASS" if passed else "FAIL")


# --- the report --------------------------------------------------------------------------------------------------


def markdown(check: GpuCheck) -> str:
    lines = ["# GPU check: the meld model's CUDA and fp16 paths against PyTorch on the same GPU", ""]
    if check.quick:
        lines += ["**Quick run** (few repetitions): the numbers show that each path runs, not its speed.", ""]
    lines += ["## Bars", ""] + [
        f"- {b['bar']}: {b['value'] or '-'}: **{verdict(b['passed'])}**" for b in check.bars
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
    gpu, tor, ort = env.get("gpu", {}), env.get("torch", {}), env.get("onnxruntime", {})
    return [
        "",
        "## Environment",
        "",
        "| | |",
        "|---|---|",
        f"| GPU | {gpu.get('name', gpu.get('error', '-'))}, {gpu.get('memory', '-')} |",
        f"| driver / its CUDA | {gpu.get('driver', '-')} / {gpu.get('driver_cuda', '-')} |",
        f"| torch | {tor.get('version', '-')}, built for CUDA {tor.get('cuda_build')}, cuDNN {tor.get('cudnn')}, "
        f"torch.cuda.is_available() {tor.get('cuda_available')}"
        + (
            f", {tor.get('device')} (sm {tor.get('capability')}, {tor.get('memory_gib')} GiB, "
            f"{tor.get('multiprocessors')} SMs)"
            if tor.get("device")
            else ""
        )
        + " |",
        f"| onnxruntime | {ort.get('version', '-')} ({ort.get('device', '-')}, CUDA build "
        f"{ort.get('cuda_build')}), providers listed: {', '.join(ort.get('available_providers', []))} |",
        f"| a session, backend auto | {', '.join(ort.get('auto_session', {}).get('providers', []))} "
        f"{ort.get('auto_session', {}).get('note', '')} |",
        f"| a session, backend cuda | {_cell(ort.get('cuda_session', {}))} |",
        f"| host | {env.get('host', {}).get('cpu', '-')} ({env.get('host', {}).get('isa', '-')}), {env.get('host', {}).get('cores', '-')} cores, "
        f"python {env.get('host', {}).get('python', '-')}, load {env.get('host', {}).get('load_average')} |",
        "",
    ]


def timing_lines(timed: list[dict[str, Any]]) -> list[str]:
    return [
        "",
        f"## Latency, batch 1 (p50 ms; speed-up vs {reference_of(timed)})",
        "",
        "PyTorch: inputs made on the device once; each call ends with the probabilities copied to numpy "
        "and torch.cuda.synchronize(). cmath_runtime: EmotionModel.predict on numpy conversations "
        "(validation, padding and copies included). Contenders interleaved round by round "
        "(cmath_bench/timing.py), first calls (compilation) not timed.",
        "",
        report.latency_table(timed),
        "",
        "## Batch 16 x 10",
        "",
        report.detail_table(timed, "throughput"),
        "",
        "## First call at each shape (ms; torch.compile compiles here; not in the timings above)",
        "",
        first_calls_table(timed),
    ]


def parity_lines(parity: list[dict[str, Any]]) -> list[str]:
    return [
        "",
        "## Parity",
        "",
        "| contender | reference | shapes | rows | max abs dp | mean abs dp "
        "| argmax agreement | reference rows with top-2 margin < 1e-3 | verdict |",
        "|---|---|---|---:|---:|---:|---:|---:|---|",
    ] + [
        f"| {p['contender']} | {p['reference']} | {', '.join(p['shapes'])} | {p['rows']} | "
        f"{p['max_abs']:.2e} | {p['mean_abs']:.2e} | {100 * p['argmax_agreement']:.2f}% | "
        f"{p.get('near_ties', '-')} | {'PASS' if p['passed'] else 'FAIL'} |"
        for p in parity
    ]


def first_calls_table(records: list[dict[str, Any]]) -> str:
    shapes = list(dict.fromkeys((r["batch"], r["utterances"]) for r in records))
    first = {(report.label(r), r["batch"], r["utterances"]): r.get("first_call_ms") for r in records}
    lines = [
        "| contender | " + " | ".join(f"{b} x {n}" for b, n in shapes) + " |",
        "|---|" + "---:|" * len(shapes),
    ]
    for name in dict.fromkeys(report.label(r) for r in records):
        cells = (first.get((name, *s)) for s in shapes)
        lines.append(f"| {name} | " + " | ".join("-" if ms is None else f"{ms:.1f}" for ms in cells) + " |")
    return "\n".join(lines)


def _cell(d: dict[str, Any]) -> str:
    return ", ".join(d["providers"]) if "providers" in d else str(d.get("error", "-")).replace("|", "/")


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
    torch_why, ort_why = (
        cuda_missing(check.environment) if check.environment else ("the environment step failed",) * 2
    )
    if torch_why or ort_why:
        print(
            f"!! CUDA is missing here: {torch_why or 'torch: CUDA available'}; "
            f"{(ort_why or 'onnxruntime: CUDA EP available').rstrip('.')}.\n!! The CUDA parts are not run (listed under "
            f"'Not run' in gpu_check.md); everything else runs.",
            flush=True,
        )
    meld, causal = work / "meld", work / "meld-causal"
    check.step("train + export meld (fp32 + fp16)", lambda: train_and_export(meld, (), ("--fp16",)))
    live = check.step("load contenders", lambda: contenders(check, meld, threads, torch_why)) or {}
    probs = (
        check.step("time + compare", lambda: measure(check, live, QUICK if quick else BUDGET))
        if live
        else None
    )
    check.parity += parity(probs or {})
    check.step("train + export causal meld (step graph)", lambda: train_and_export(causal, ("--causal",), ()))
    if (causal / "export" / "export.json").is_file():
        check.step("streaming step", lambda: streaming(check, causal / "export", threads, ort_why))
    else:
        check.skip("streaming step", "no causal export (its step above did not complete)")
    check.bars = bars(check)
    check.write()
    code = (
        1 if any(s.status in ("failed", "cut") for s in check.steps) else 3 if (torch_why or ort_why) else 0
    )
    return check, code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    out = Path(os.environ.get("OUT") or ROOT / "runs" / "gpu_check" / "report")
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
        default=ROOT / "runs" / "gpu_check",
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
    print("\n".join(f"{verdict(b['passed']):>12}  {b['bar']}: {b['value'] or '-'}" for b in check.bars))
    print(
        f"{len(check.not_run)} things not run (see 'Not run'); wrote {args.out / 'gpu_check.json'} and "
        f"gpu_check.md in {time.perf_counter() - start:.0f} s; exit {code}"
    )
    return code


if __name__ == "__main__":
    sys.exit(main())
