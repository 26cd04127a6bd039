"""This machine's limits and each record's distance to them (a roofline per record).

Measured once per benchmark run, with the run's thread count (the streaming benchmark measures the bandwidth
again at every history length, interleaved with the step contenders, and uses its median for the step's floor):
- memory bandwidth: numpy copies of a 256 MiB buffer, split over `threads` Python threads (numpy releases the
  GIL while copying); bytes read + bytes written per second, best of a few repeats;
- float32 matmul peak: one 2048 x 2048 x 2048 MatMul in onnxruntime with `threads` intra-op threads (the engine
  the runtime uses), 2 * 2048^3 FLOPs per call, best of a few.

Per record: FLOPs are counted from the graph itself at that record's shape (every MatMul/Gemm/Conv, attention
included: the graph is run once with those nodes' inputs and outputs exposed, so their real shapes are read, not
guessed), weight bytes are the artifact's initializer bytes (what one call must read at least once), and

    floor = max(weight bytes / bandwidth, FLOPs / peak),   latency_x_floor = p50 / floor.

The floor is a lower bound for an engine that reads every weight once and runs at the fp32 matmul peak; int8
arithmetic can run above the fp32 peak (VNNI), so for int8 records the FLOPs term is only indicative.

A second, engine-level floor for the step graph (one row per call, so every weight matrix is a GEMV): its
"MatMul twin", a graph holding nothing but the same 2-D weight MatMuls fed one row each, timed on the same engine
with the same threads and idle policy. What the step costs above its twin is the rest of the graph (attention,
layer norms, small ops); what the twin costs above weight bytes / bandwidth is the engine's GEMV kernel.
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cmath_runtime.session import open_probe_session

COPY_MIB = 256
MATMUL_N = 2048
COUNTED_OPS = ("MatMul", "Gemm", "Conv", "MatMulInteger")


@dataclass(frozen=True)
class Machine:
    bandwidth_gb_s: float  # copy bandwidth, read + write bytes per second / 1e9
    fp32_gflop_s: float  # float32 matmul peak
    threads: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def floor_ms(self, weight_bytes: float, flops: float, bandwidth_gb_s: float | None = None) -> dict[str, float]:
        """The floor of a call; `bandwidth_gb_s` (default: this machine's) when it was measured beside the call."""
        bw_ms = weight_bytes / ((bandwidth_gb_s or self.bandwidth_gb_s) * 1e9) * 1e3
        fl_ms = flops / (self.fp32_gflop_s * 1e9) * 1e3
        return {"bytes_floor_ms": bw_ms, "flops_floor_ms": fl_ms, "floor_ms": max(bw_ms, fl_ms),
                "bound": "bandwidth" if bw_ms >= fl_ms else "compute"}


class BandwidthProbe:
    """One call = one numpy copy of a `mib` MiB buffer, split over `threads` Python threads (numpy releases the
    GIL while copying); returns its seconds. `gb_s` turns the fastest of some calls into copy bandwidth (read +
    write). The streaming benchmark times it among the step contenders, so their floor is measured in the same
    rounds, under the same load, as they are (and with the same statistic: their p50 against its p50)."""

    def __init__(self, threads: int = 1, mib: int = COPY_MIB) -> None:
        n = mib * 2**20 // 4
        self.src = np.ones(n, np.float32)
        self.dst = np.empty_like(self.src)
        bounds = np.linspace(0, n, threads + 1).astype(int)
        self.slices = list(zip(bounds, bounds[1:]))

    def __call__(self) -> float:
        workers = [threading.Thread(target=np.copyto, args=(self.dst[a:b], self.src[a:b])) for a, b in self.slices]
        start = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        return time.perf_counter() - start

    def gb_s(self, seconds: list[float], statistic: str = "best") -> float:
        """Copy bandwidth of the fastest call ("best", the machine's limit) or of the median one ("p50", like for
        like with a contender's p50 timed in the same rounds)."""
        t = min(seconds) if statistic == "best" else float(np.median(seconds))
        return 2 * self.src.nbytes / t / 1e9


def measure_bandwidth(threads: int = 1, mib: int = COPY_MIB, repeats: int = 5) -> float:
    """GB/s of numpy copies (read + write), `threads` threads each copying its own slice; best of `repeats`."""
    probe = BandwidthProbe(threads, mib)
    return probe.gb_s([probe() for _ in range(repeats)])


def measure_matmul_peak(threads: int = 1, n: int = MATMUL_N, repeats: int = 5) -> float:
    """GFLOP/s of an n^3 float32 MatMul in onnxruntime's CPU provider with `threads` intra-op threads."""
    from onnx import TensorProto, helper

    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, [n, n])
    b = helper.make_tensor_value_info("b", TensorProto.FLOAT, [n, n])
    c = helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, n])
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "peak", [a, b], [c])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = min(model.ir_version, 9)
    sess = open_probe_session(model.SerializeToString(), threads)
    rng = np.random.default_rng(0)
    feeds = {"a": rng.standard_normal((n, n), np.float32), "b": rng.standard_normal((n, n), np.float32)}
    sess.run(None, feeds)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        sess.run(None, feeds)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def matmul_twin(path: str | Path) -> tuple[bytes, dict[str, np.ndarray], int]:
    """(graph, feeds, weight bytes): every 2-D weight MatMul/Gemm of the ONNX file at `path`, each fed one row."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load_model(str(path))
    inits = {t.name: t for t in model.graph.initializer}
    weights = [numpy_helper.to_array(inits[x]) for n in model.graph.node if n.op_type in ("MatMul", "Gemm")
               for x in n.input[1:2] if x in inits and len(inits[x].dims) == 2]
    rows = sorted({w.shape[0] for w in weights})
    graph = helper.make_graph(
        [helper.make_node("MatMul", [f"x{w.shape[0]}", f"w{i}"], [f"y{i}"]) for i, w in enumerate(weights)], "twin",
        [helper.make_tensor_value_info(f"x{k}", TensorProto.FLOAT, [1, k]) for k in rows],
        [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [1, w.shape[1]]) for i, w in enumerate(weights)],
        [numpy_helper.from_array(w.astype(np.float32), f"w{i}") for i, w in enumerate(weights)])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    feeds = {f"x{k}": np.random.default_rng(k).standard_normal((1, k)).astype(np.float32) for k in rows}
    return proto.SerializeToString(), feeds, int(sum(w.nbytes for w in weights))


def time_matmul_twin(path: str | Path, threads: int, spinning: bool, iterations: int = 200) -> dict[str, float]:
    """p50 ms of the MatMul twin of an fp32 graph on onnxruntime CPU (same threads and idle policy)."""
    from .timing import percentiles_ms, timed_calls

    graph, feeds, nbytes = matmul_twin(path)
    session = open_probe_session(graph, threads, spinning=spinning)
    timed_calls(lambda: session.run(None, feeds), 10)  # warm-up
    p50 = percentiles_ms(timed_calls(lambda: session.run(None, feeds), iterations))["p50_ms"]
    return {"twin_ms": p50, "twin_weight_bytes": nbytes, "twin_read_gb_s": nbytes / p50 / 1e6}


def measure(threads: int) -> Machine:
    return Machine(measure_bandwidth(threads), measure_matmul_peak(threads), threads)


def weight_bytes(path: str | Path) -> int:
    """Initializer bytes of an ONNX file (external data included when present)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load_model(str(path))
    return int(sum(numpy_helper.to_array(t).nbytes for t in model.graph.initializer))


class FlopCounter:
    """FLOPs of one call of an ONNX graph at given feeds, from the real shapes of its MatMul/Gemm/Conv nodes."""

    def __init__(self, path: str | Path) -> None:
        import onnx

        model = onnx.load_model(str(path))
        self.nodes = [n for n in model.graph.node if n.op_type in COUNTED_OPS]
        outputs = {o.name for o in model.graph.output}
        wanted = {x for n in self.nodes for x in (*n.input[:2], n.output[0]) if x}
        inits = {t.name: tuple(t.dims) for t in model.graph.initializer}
        self.const_shapes = {k: v for k, v in inits.items() if k in wanted}
        for name in sorted(wanted - outputs - set(inits)):
            model.graph.output.append(onnx.ValueInfoProto(name=name))
        self.session = open_probe_session(model.SerializeToString(), 1, optimize=False)  # every node visible
        self.names = [o.name for o in self.session.get_outputs()]
        self.inputs = [i.name for i in self.session.get_inputs()]

    def __call__(self, feeds: dict[str, np.ndarray]) -> float:
        got = dict(zip(self.names, self.session.run(None, {k: v for k, v in feeds.items() if k in self.inputs})))
        shapes = {k: v.shape for k, v in got.items()} | self.const_shapes
        total = 0.0
        for n in self.nodes:
            out, a = shapes[n.output[0]], shapes[n.input[0]]
            if n.op_type in ("MatMul", "MatMulInteger"):
                total += 2.0 * np.prod(out) * a[-1]
            elif n.op_type == "Gemm":
                trans_a = next((at.i for at in n.attribute if at.name == "transA"), 0)
                total += 2.0 * np.prod(out) * (a[0] if trans_a else a[1])
            else:  # Conv: out (B, C_out, *spatial), weight (C_out, C_in/group, *kernel)
                w = shapes[n.input[1]]
                total += 2.0 * np.prod(out) * np.prod(w[1:])
        return float(total)


ARTIFACT_OF = {"fp32": "fp32", "fp16": "fp16", "int8": "int8", "bf16": "fp32"}  # precision -> export.json artifact


def contender_weight_bytes(export_dir: Path, manifest: dict[str, Any], precision: str) -> tuple[int | None, str]:
    """(bytes one call must read at least once, how they were counted) for a contender's precision."""
    key = ARTIFACT_OF.get(precision)
    art = (manifest.get("artifacts") or {}).get(key or "")
    if not art or not (Path(export_dir) / art["file"]).is_file():
        return None, "no artifact"
    n = weight_bytes(Path(export_dir) / art["file"])
    if precision == "bf16":  # OpenVINO converts the fp32 weights to bf16 when it compiles for bf16
        return n // 2, f"{art['file']} initializers / 2 (bf16)"
    return n, f"{art['file']} initializers"


def annotate(records: list[dict[str, Any]], machine: Machine, export_dir: Path,
             flops: Any | None = None) -> None:
    """Add flops, weight_bytes, the floor and latency_x_floor to every timed full-graph record (in place)."""
    import json

    from .inputs import InputSpec, conversations, padded

    export_dir = Path(export_dir)
    manifest = json.loads((export_dir / "export.json").read_text())
    spec = InputSpec(tuple(manifest["modalities"]), dict(manifest["feature_dims"]), int(manifest["num_speakers"]))
    counter = flops or FlopCounter(export_dir / manifest["artifacts"]["fp32"]["file"])
    per_shape: dict[tuple[int, int], float] = {}
    per_precision: dict[str, tuple[int | None, str]] = {}
    for rec in records:
        if rec.get("kind") not in ("latency", "throughput") or rec.get("p50_ms") is None:
            continue
        shape = (rec["batch"], rec["utterances"])
        if shape not in per_shape:
            feats, speaker, mask = padded(spec, conversations(spec, *shape))
            per_shape[shape] = counter({**feats, "speaker": speaker, "mask": mask})
        if rec["precision"] not in per_precision:
            per_precision[rec["precision"]] = contender_weight_bytes(export_dir, manifest, rec["precision"])
        wbytes, how = per_precision[rec["precision"]]
        if wbytes is None:
            continue
        floor = machine.floor_ms(wbytes, per_shape[shape])
        rec.update(flops=per_shape[shape], weight_bytes=wbytes, weight_bytes_from=how, **floor,
                   latency_x_floor=rec["p50_ms"] / floor["floor_ms"])
