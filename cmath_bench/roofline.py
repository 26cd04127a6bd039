"""This machine's limits and each record's distance to them (a roofline per record).

The limits come from one probe type, one kind per limit (Probe): copy and read bandwidth (weight-bound calls use the
read rate) and the fp32 / int8 matmul peaks; `rates` turns any probes' timed calls into those rates. Per record,
FLOPs are counted from the graph at its real shapes and weight bytes are the initializer bytes one call reads
(CallWork; weight_bytes: every initializer of a file):

    floor = max(weight bytes / bandwidth, FLOPs / peak),   latency_x_floor = p50 / floor,

a lower bound for an engine that reads every weight once and runs at the matmul peak.
"""

from __future__ import annotations

import contextlib
import functools
import json
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cmath_runtime.manifest import read_manifest
from cmath_runtime.session import open_probe_session

from .inputs import InputSpec, conversations, padded
from .timing import timed_calls

READ_MIB = (
    256  # the bandwidth probes' buffer at least; read_buffer_mib() makes it 4x the last-level cache if larger
)
MATMUL_N = 2048  # the peak probe's MatMul size before any contender runs (measure)
PROBE_N = 1024  # the peak probes' MatMul size timed among contenders (2.1 GFLOP a call)
COUNTED_OPS = ("MatMul", "Gemm", "Conv", "MatMulInteger")
# Probe kind -> its rate's unit: bytes ("copy": read + write) or operations (2 n^3 a MatMul) per second / 1e9
UNITS = {"copy": "gb_s", "read_sum": "gb_s", "read_gemv": "gb_s", "fp32": "gflop_s", "int8": "gop_s"}


@dataclass(frozen=True)
class Machine:
    bandwidth_gb_s: float  # copy bandwidth, read + write bytes per second / 1e9 (the fastest call)
    fp32_gflop_s: float  # float32 matmul peak (the fastest call)
    threads: int
    read_gb_s: float | None = None  # read bandwidth (the faster median of the two read kinds)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def floor_ms(self, weight_bytes: float, flops: float, gb_s: float | None = None) -> dict[str, Any]:
        """The floor of a call; `gb_s` (default: this machine's bandwidth) when it was measured beside the call."""
        return floor_ms(weight_bytes, flops, gb_s or self.bandwidth_gb_s, self.fp32_gflop_s)


def floor_ms(weight_bytes: float, flops: float, gb_s: float, gflop_s: float) -> dict[str, Any]:
    """max(weight bytes / bandwidth, FLOPs / peak) of one call, both terms and which one bounds it."""
    bw_ms = weight_bytes / (gb_s * 1e9) * 1e3
    fl_ms = flops / (gflop_s * 1e9) * 1e3
    return {
        "bytes_floor_ms": bw_ms,
        "flops_floor_ms": fl_ms,
        "floor_ms": max(bw_ms, fl_ms),
        "bound": "bandwidth" if bw_ms >= fl_ms else "compute",
    }


class Probe:
    """One call = one pass of the kernel that meets one of this machine's limits; `amount`: the bytes one call moves
    or the operations it does. Kinds (UNITS): "copy" and "read_sum", numpy copies / sums of a `mib` MiB float32
    buffer, one Python thread per slice (numpy releases the GIL); "read_gemv", y = x @ W in onnxruntime, W the buffer
    as (4096, cols) fp32 weights: the read rate a weight pass gets in the runtime's engine; "fp32" and "int8", an
    n x n x n MatMul in onnxruntime (int8: MatMulInteger, uint8 activations x int8 weights -> int32, the kernel int8
    graphs run; it can outrun the fp32 peak). Timed among contenders, a probe measures their floor's rates in the
    same rounds, under the same load, as they are."""

    def __init__(self, kind: str, threads: int = 1, mib: int | None = None, n: int = PROBE_N) -> None:
        if kind not in UNITS:
            raise ValueError(f"kind: expected one of {tuple(UNITS)}, got {kind!r}")
        self.kind, self.n, self.session = kind, n, None
        rows, cols = 4096, (mib or read_buffer_mib()) * 2**20 // 4 // 4096
        self.amount = (
            (2.0 * n**3) if kind in ("fp32", "int8") else (2 if kind == "copy" else 1) * rows * cols * 4
        )
        self.feeds: dict[str, np.ndarray] = {}
        rng = np.random.default_rng(0)
        if kind == "fp32":
            self.feeds = {x: rng.standard_normal((n, n), np.float32) for x in ("a", "b")}
            self.session = _one_node_session("MatMul", self.feeds, {}, threads)
        elif kind == "int8":
            self.feeds = {"a": rng.integers(0, 256, (n, n), dtype=np.uint8)}
            b = rng.integers(-127, 128, (n, n), dtype=np.int8)
            self.session = _one_node_session("MatMulInteger", self.feeds, {"b": b}, threads)
        elif kind == "read_gemv":
            self.feeds = {"a": np.ones((1, rows), np.float32)}
            self.session = _one_node_session(
                "MatMul", self.feeds, {"b": np.ones((rows, cols), np.float32)}, threads
            )
        else:
            flat, out = (
                np.ones(rows * cols, np.float32),
                np.empty(rows * cols if kind == "copy" else 0, np.float32),
            )
            bounds = np.linspace(0, flat.size, threads + 1).astype(int)
            self.jobs = [
                (np.copyto, (out[a:b], flat[a:b])) if kind == "copy" else (flat[a:b].sum, ())
                for a, b in zip(bounds, bounds[1:])
            ]

    def __call__(self) -> None:
        if self.session is not None:
            self.session.run(None, self.feeds)
            return
        workers = [threading.Thread(target=f, args=args) for f, args in self.jobs]
        for w in workers:
            w.start()
        for w in workers:
            w.join()

    def rate(self, seconds: list[float], statistic: str = "p50") -> float:
        """amount / 1e9 per second of the median call ("p50") or of the fastest one ("best")."""
        return self.amount / (min(seconds) if statistic == "best" else float(np.median(seconds))) / 1e9


def make_probes(
    threads: int, mib: int | None = None, n: int = PROBE_N, kinds: tuple[str, ...] = tuple(UNITS)
) -> dict[str, Probe]:
    """One probe of each kind, by kind; the bandwidth kinds over the same `mib` MiB (default read_buffer_mib())."""
    mib = mib or read_buffer_mib()
    return {kind: Probe(kind, threads, mib, n) for kind in kinds}


def rates(probes: dict[str, Probe], times: dict[str, list[float]]) -> dict[str, float]:
    """Each timed probe's rate from its median call ("KIND_UNIT") and its fastest ("KIND_best_UNIT"); "read_gb_s" /
    "read_best_gb_s": the faster read kind."""
    out: dict[str, float] = {}
    for kind, probe in probes.items():
        if times.get(kind):
            out[f"{kind}_{UNITS[kind]}"] = probe.rate(times[kind], "p50")
            out[f"{kind}_best_{UNITS[kind]}"] = probe.rate(times[kind], "best")
    for stat in ("", "best_"):
        out[f"read_{stat}gb_s"] = max(
            out.get(f"read_sum_{stat}gb_s", 0.0), out.get(f"read_gemv_{stat}gb_s", 0.0)
        )
    return out


def measure(threads: int, repeats: int = 5, mib: int | None = None, n: int = MATMUL_N) -> Machine:
    """The machine's limits before any contender runs: each probe called once untimed, then `repeats` times; the copy
    bandwidth and the fp32 peak of the fastest call, the read bandwidth of the medians."""
    probes = make_probes(threads, mib, n, ("copy", "read_sum", "read_gemv", "fp32"))
    times = {}
    for kind, probe in probes.items():
        probe()
        times[kind] = timed_calls(probe, repeats)
    r = rates(probes, times)
    return Machine(r["copy_best_gb_s"], r["fp32_best_gflop_s"], threads, r["read_gb_s"])


def last_level_cache_bytes() -> int | None:
    """The largest CPU cache of this machine (Linux sysfs), None where it cannot be read."""
    sizes = []
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = f.read_text().strip().upper()
        scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
        try:
            sizes.append(int(text.rstrip("KMG")) * scale)
        except ValueError:
            continue
    return max(sizes) if sizes else None


def read_buffer_mib() -> int:
    """READ_MIB, or 4x the last-level cache where that is larger: no pass may be served from the cache."""
    llc = last_level_cache_bytes() or 0
    return max(READ_MIB, -(-4 * llc // 2**20))


def _one_node_session(
    op: str, feeds: dict[str, np.ndarray], weights: dict[str, np.ndarray], threads: int
) -> Any:
    """An onnxruntime CPU session on one node c = op(a, b), a and b among `feeds` (graph inputs) and `weights`."""
    import onnx
    from onnx import helper, numpy_helper

    inputs = [
        helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
        for k, v in feeds.items()
    ]
    inits = [numpy_helper.from_array(v, k) for k, v in weights.items()]
    node = helper.make_node(op, ["a", "b"], ["c"])
    graph = helper.make_graph([node], op, inputs, [onnx.ValueInfoProto(name="c")], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = min(model.ir_version, 9)
    return open_probe_session(model.SerializeToString(), threads)


def weight_bytes(path: str | Path) -> int:
    """Initializer bytes of an ONNX file (external data included when present)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load_model(str(path))
    return int(sum(numpy_helper.to_array(t).nbytes for t in model.graph.initializer))


class CallWork:
    """The work of one call of an ONNX graph at given feeds, from the values that call computes: `flops` of its
    MatMul/Gemm/Conv nodes at their real shapes, and `weight_bytes` it reads: every initializer a node uses, except
    tables read by a Gather (axis 0) of run-time indices (embeddings), which count only the distinct rows gathered."""

    def __init__(self, path: str | Path) -> None:
        import onnx

        model = onnx.load_model(str(path))
        inits = {t.name: t for t in model.graph.initializer}
        nodes = list(model.graph.node)
        self.matmuls = [n for n in nodes if n.op_type in COUNTED_OPS]
        gathers = {
            k
            for k, n in enumerate(nodes)
            if n.op_type == "Gather"
            and n.input[0] in inits
            and n.input[1] not in inits
            and next((a.i for a in n.attribute if a.name == "axis"), 0) == 0
        }
        whole = {
            x
            for k, n in enumerate(nodes)
            for i, x in enumerate(n.input)
            if x in inits and not (k in gathers and i == 0)
        }
        # table name -> (index tensors, rows, bytes per row)
        self.tables: dict[str, tuple[list[str], int, int]] = {}
        for n in (nodes[k] for k in sorted(gathers)):
            table = inits[n.input[0]]
            if n.input[0] not in whole and table.dims:
                names, rows, _ = self.tables.get(n.input[0], ([], int(table.dims[0]), 0))
                self.tables[n.input[0]] = ([*names, n.input[1]], rows, _nbytes(table) // max(rows, 1))
        self.fixed = sum(_nbytes(inits[x]) for x in whole)
        self.shapes = {k: tuple(t.dims) for k, t in inits.items()}
        wanted = {x for n in self.matmuls for x in (*n.input[:2], n.output[0]) if x}
        wanted |= {x for names, _, _ in self.tables.values() for x in names}
        # exposed as outputs; the session keeps every node (no optimizing)
        for name in sorted(wanted - set(inits) - {o.name for o in [*model.graph.input, *model.graph.output]}):
            model.graph.output.append(onnx.ValueInfoProto(name=name))
        self.session = open_probe_session(model.SerializeToString(), 1, optimize=False)

    def values(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The feeds and every output of the call by name."""
        inputs = {i.name for i in self.session.get_inputs()}
        got = self.session.run(None, {k: v for k, v in feeds.items() if k in inputs})
        return {**feeds, **dict(zip([o.name for o in self.session.get_outputs()], got))}

    def weight_bytes(self, feeds: dict[str, np.ndarray]) -> int:
        values = self.values(feeds) if self.tables else {}
        total = self.fixed
        for names, rows, row_bytes in self.tables.values():
            idx = np.concatenate([np.asarray(values[x]).reshape(-1) for x in names]).astype(np.int64)
            total += len(np.unique(idx % max(rows, 1))) * row_bytes
        return int(total)

    def flops(self, feeds: dict[str, np.ndarray]) -> float:
        shapes = {k: np.shape(v) for k, v in self.values(feeds).items()} | self.shapes
        total = 0.0
        for n in self.matmuls:
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


@contextlib.contextmanager
def recording(holder: Any) -> Iterator[dict[str, np.ndarray]]:
    """While inside, `holder.session.run` records its last feeds into the yielded dict (to count the work of a real
    call)."""
    session, feeds = holder.session, dict[str, np.ndarray]()

    class Recorder:
        def run(self, names: Any, inputs: dict[str, np.ndarray]) -> Any:
            feeds.clear()
            feeds.update(inputs)
            return session.run(names, inputs)

        def __getattr__(self, name: str) -> Any:
            return getattr(session, name)

    holder.session = Recorder()
    try:
        yield feeds
    finally:
        holder.session = session


def _nbytes(tensor: Any) -> int:
    from onnx import helper

    return (
        int(np.prod(tensor.dims, dtype=np.int64)) * helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    )


ARTIFACT_OF = {"fp32": "fp32", "fp16": "fp16", "int8": "int8", "bf16": "fp32"}  # precision -> artifact


def contender_weight_bytes(
    export_dir: Path, manifest: dict[str, Any], precision: str
) -> tuple[int | None, str]:
    """(bytes one call must read at least once, how they were counted) for a contender's precision."""
    key = ARTIFACT_OF.get(precision)
    art = (manifest.get("artifacts") or {}).get(key or "")
    if not art or not (Path(export_dir) / art["file"]).is_file():
        return None, "no artifact"
    n = weight_bytes(Path(export_dir) / art["file"])
    if precision == "bf16":  # OpenVINO converts the fp32 weights to bf16 when it compiles for bf16
        return n // 2, f"{art['file']} initializers / 2 (bf16)"
    return n, f"{art['file']} initializers"


def annotate(records: list[dict[str, Any]], machine: Machine, export_dir: Path) -> None:
    """Add flops, weight_bytes, the floor and latency_x_floor to every timed full-graph record (in place)."""
    export_dir = Path(export_dir)
    manifest = json.loads((export_dir / "export.json").read_text())
    spec = InputSpec.of(read_manifest(export_dir))
    counter = CallWork(export_dir / manifest["artifacts"]["fp32"]["file"]).flops
    weights = functools.cache(functools.partial(contender_weight_bytes, export_dir, manifest))

    @functools.cache
    def flops_at(batch: int, utterances: int) -> float:
        feats, speaker, mask = padded(spec, conversations(spec, batch, utterances))
        return counter({**feats, "speaker": speaker, "mask": mask})

    for rec in records:
        if rec.get("kind") not in ("latency", "throughput") or rec.get("p50_ms") is None:
            continue
        wbytes, how = weights(rec["precision"])
        if wbytes is None:
            continue
        flops = flops_at(rec["batch"], rec["utterances"])
        floor = machine.floor_ms(wbytes, flops)
        rec.update(flops=flops, weight_bytes=wbytes, weight_bytes_from=how, **floor)
        rec["latency_x_floor"] = rec["p50_ms"] / floor["floor_ms"]


def record_floor(rec: dict[str, Any], limits: dict[str, Any]) -> dict[str, Any]:
    """A record's floor at the probes' median rates (like for like with its p50) and its p50 against the floor at
    their best rates. int8 calls' FLOPs are held to the faster of the int8 and fp32 peaks (a bound either way)."""

    def peak(stat: str) -> float:  # stat: "" (median) or "best_"
        fp32 = limits[f"fp32_{stat}gflop_s"]
        return max(fp32, limits.get(f"int8_{stat}gop_s", 0.0)) if rec["precision"] == "int8" else fp32

    out = {
        **floor_ms(rec["weight_bytes"], rec["flops"], limits["read_gb_s"], peak("")),
        "read_gb_s": limits["read_gb_s"],
        "peak_gflop_s": peak(""),
    }
    out["latency_x_floor"] = rec["p50_ms"] / out["floor_ms"]
    best = floor_ms(rec["weight_bytes"], rec["flops"], limits["read_best_gb_s"], peak("best_"))
    out.update(best_floor_ms=best["floor_ms"], latency_x_best_floor=rec["p50_ms"] / best["floor_ms"])
    return out
