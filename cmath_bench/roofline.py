"""This machine's limits and each record's distance to them (a roofline per record).

The limits: copy and read bandwidth (BandwidthProbe, ReadProbe: weight-bound calls use the read rate) and the
fp32 / int8 matmul peaks (PeakProbe). Per record, FLOPs are counted from the graph at its real shapes (FlopCounter)
and weight bytes are the initializer bytes one call reads (weight_bytes, WeightReads):

    floor = max(weight bytes / bandwidth, FLOPs / peak),   latency_x_floor = p50 / floor,

a lower bound for an engine that reads every weight once and runs at the matmul peak.
"""

from __future__ import annotations

import contextlib
import functools
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cmath_runtime.session import open_probe_session

from .inputs import InputSpec, conversations, padded

COPY_MIB = 256
READ_MIB = 256  # at least; read_buffer_mib() makes it 4x the last-level cache where that is larger
MATMUL_N = 2048
PROBE_N = 1024  # the peak probes' MatMul size timed among contenders (2.1 GFLOP a call)
COUNTED_OPS = ("MatMul", "Gemm", "Conv", "MatMulInteger")


@dataclass(frozen=True)
class Machine:
    bandwidth_gb_s: float  # copy bandwidth, read + write bytes per second / 1e9
    fp32_gflop_s: float  # float32 matmul peak
    threads: int
    read_gb_s: float | None = None  # read bandwidth (ReadProbe: the faster median of its two passes)

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


class BandwidthProbe:
    """One call = one numpy copy of a `mib` MiB buffer, split over `threads` Python threads (numpy releases the
    GIL while copying); returns its seconds. Timed among contenders, it measures their floor's bandwidth in the
    same rounds, under the same load, as they are."""

    def __init__(self, threads: int = 1, mib: int = COPY_MIB) -> None:
        n = mib * 2**20 // 4
        self.src = np.ones(n, np.float32)
        self.dst = np.empty_like(self.src)
        bounds = np.linspace(0, n, threads + 1).astype(int)
        self.slices = list(zip(bounds, bounds[1:]))

    def __call__(self) -> float:
        return _timed_threads(
            [threading.Thread(target=np.copyto, args=(self.dst[a:b], self.src[a:b])) for a, b in self.slices]
        )

    def gb_s(self, seconds: list[float], statistic: str = "best") -> float:
        """Copy bandwidth (read + write) of the fastest call ("best") or the median one ("p50")."""
        return _per_s(2 * self.src.nbytes, seconds, statistic)


def measure_bandwidth(threads: int = 1, mib: int = COPY_MIB, repeats: int = 5) -> float:
    """GB/s of numpy copies (read + write), `threads` threads each copying its own slice; best of `repeats`."""
    probe = BandwidthProbe(threads, mib)
    return probe.gb_s([probe() for _ in range(repeats)])


def measure_matmul_peak(threads: int = 1, n: int = MATMUL_N, repeats: int = 5) -> float:
    """GFLOP/s of an n^3 float32 MatMul (PeakProbe), best of `repeats` after one untimed call."""
    probe = PeakProbe("fp32", threads, n)
    probe()
    return probe.gflop_s([probe() for _ in range(repeats)], "best")


class PeakProbe:
    """One call = one n x n x n MatMul in onnxruntime's CPU provider (the runtime's engine) with `threads`
    intra-op threads; returns its seconds. kind "fp32": float32 inputs; kind "int8": MatMulInteger, uint8
    activations x int8 weights -> int32, the kernel int8 graphs run (it can outrun the fp32 peak)."""

    KINDS = ("fp32", "int8")

    def __init__(self, kind: str = "fp32", threads: int = 1, n: int = MATMUL_N) -> None:
        from onnx import TensorProto, helper, numpy_helper

        if kind not in self.KINDS:
            raise ValueError(f"kind: expected one of {self.KINDS}, got {kind!r}")
        self.kind, self.flops = kind, 2.0 * n**3
        rng = np.random.default_rng(0)
        self.feeds: dict[str, np.ndarray]
        if kind == "fp32":
            names = [helper.make_tensor_value_info(x, TensorProto.FLOAT, [n, n]) for x in ("a", "b")]
            node, inits = helper.make_node("MatMul", ["a", "b"], ["c"]), []
            out = helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, n])
            self.feeds = {x: rng.standard_normal((n, n), np.float32) for x in ("a", "b")}
        else:
            names = [helper.make_tensor_value_info("a", TensorProto.UINT8, [n, n])]
            inits = [numpy_helper.from_array(rng.integers(-127, 128, (n, n), dtype=np.int8), "b")]
            node = helper.make_node("MatMulInteger", ["a", "b"], ["c"])
            out = helper.make_tensor_value_info("c", TensorProto.INT32, [n, n])
            self.feeds = {"a": rng.integers(0, 256, (n, n), dtype=np.uint8)}
        self.session = _one_node_session(helper.make_graph([node], "peak", names, [out], inits), threads)

    def __call__(self) -> float:
        return _timed_run(self.session, self.feeds)

    def gflop_s(self, seconds: list[float], statistic: str = "p50") -> float:
        """GFLOP/s (int8: giga integer multiply-adds x 2 per second) of the median call ("p50") or the fastest."""
        return _per_s(self.flops, seconds, statistic)


def measure(threads: int) -> Machine:
    bandwidth, peak = measure_bandwidth(threads), measure_matmul_peak(threads)
    return Machine(bandwidth, peak, threads, measure_read_bandwidth(threads)["read_gb_s"])


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


class ReadProbe:
    """One call = one pass that reads a `mib` MiB float32 buffer and writes (almost) nothing; returns its seconds.
    kind "sum": numpy sums of `threads` slices, one Python thread each; kind "gemv": y = x @ W in onnxruntime, W the
    buffer as (4096, n) fp32 weights: the read rate an fp32 weight pass gets in the runtime's own engine."""

    KINDS = ("sum", "gemv")

    def __init__(self, kind: str = "sum", threads: int = 1, mib: int | None = None) -> None:
        if kind not in self.KINDS:
            raise ValueError(f"kind: expected one of {self.KINDS}, got {kind!r}")
        self.kind = kind
        rows = 4096
        cols = max(1, (mib or read_buffer_mib()) * 2**20 // 4 // rows)
        self.nbytes = rows * cols * 4
        if kind == "sum":
            self.buffer = np.ones(rows * cols, np.float32)
            bounds = np.linspace(0, rows * cols, threads + 1).astype(int)
            self.slices = list(zip(bounds, bounds[1:]))
        else:
            from onnx import TensorProto, helper, numpy_helper

            graph = helper.make_graph(
                [helper.make_node("MatMul", ["x", "w"], ["y"])],
                "gemv",
                [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, rows])],
                [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, cols])],
                [numpy_helper.from_array(np.full((rows, cols), 0.5, np.float32), "w")],
            )
            self.session = _one_node_session(graph, threads)
            self.feeds = {"x": np.ones((1, rows), np.float32)}

    def __call__(self) -> float:
        if self.kind == "gemv":
            return _timed_run(self.session, self.feeds)
        return _timed_threads([threading.Thread(target=self.buffer[a:b].sum) for a, b in self.slices])

    def gb_s(self, seconds: list[float], statistic: str = "p50") -> float:
        """Bytes read per second / 1e9 of the median call ("p50") or of the fastest one ("best")."""
        return _per_s(self.nbytes, seconds, statistic)


def _one_node_session(graph: Any, threads: int) -> Any:
    """An onnxruntime CPU session on a probe's one-node graph (opset 17)."""
    from onnx import helper

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = min(model.ir_version, 9)
    return open_probe_session(model.SerializeToString(), threads)


def _timed_run(session: Any, feeds: dict[str, np.ndarray]) -> float:
    start = time.perf_counter()
    session.run(None, feeds)
    return time.perf_counter() - start


def _per_s(amount: float, seconds: list[float], statistic: str) -> float:
    """amount / 1e9 per second of the fastest call ("best") or the median one (any other statistic: "p50")."""
    t = min(seconds) if statistic == "best" else float(np.median(seconds))
    return amount / t / 1e9


def measure_read_bandwidth(threads: int = 1, mib: int | None = None, repeats: int = 5) -> dict[str, float]:
    """GB/s read by each ReadProbe kind (median of `repeats` passes after one untimed) and "read_gb_s", the faster."""
    out = {}
    for kind in ReadProbe.KINDS:
        probe = ReadProbe(kind, threads, mib)
        probe()
        out[f"read_{kind}_gb_s"] = probe.gb_s([probe() for _ in range(repeats)])
        del probe
    out["read_gb_s"] = max(out.values())
    return out


def weight_bytes(path: str | Path) -> int:
    """Initializer bytes of an ONNX file (external data included when present)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load_model(str(path))
    return int(sum(numpy_helper.to_array(t).nbytes for t in model.graph.initializer))


class WeightReads:
    """Bytes of an ONNX graph's weights that one call reads: every initializer a node uses, except tables read by a
    Gather (axis 0) of run-time indices (embeddings), which count only the distinct rows gathered at the feeds."""

    def __init__(self, path: str | Path) -> None:
        import onnx

        model = onnx.load_model(str(path))
        inits = {t.name: t for t in model.graph.initializer}
        nodes = list(model.graph.node)
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
        self.table_bytes = sum(_nbytes(inits[x]) for x in self.tables)
        wanted = {x for names, _, _ in self.tables.values() for x in names}
        graph_inputs = {i.name for i in model.graph.input}
        self.session = _exposing(model, wanted - graph_inputs) if self.tables else None

    def __call__(self, feeds: dict[str, np.ndarray]) -> int:
        if self.session is None:
            return self.fixed
        values = {**feeds, **_values(self.session, feeds)}
        total = self.fixed
        for names, rows, row_bytes in self.tables.values():
            idx = np.concatenate([np.asarray(values[x]).reshape(-1) for x in names]).astype(np.int64)
            total += len(np.unique(idx % max(rows, 1))) * row_bytes
        return int(total)


def _exposing(model: Any, names: set[str]) -> Any:
    """A session on `model` with every node kept (no optimization) that also outputs the values `names`."""
    import onnx

    for name in sorted(names - {o.name for o in model.graph.output}):
        model.graph.output.append(onnx.ValueInfoProto(name=name))
    return open_probe_session(model.SerializeToString(), 1, optimize=False)


def _values(session: Any, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every output of `session` by name, run on the feeds it takes."""
    inputs = {i.name for i in session.get_inputs()}
    got = session.run(None, {k: v for k, v in feeds.items() if k in inputs})
    return dict(zip([o.name for o in session.get_outputs()], got))


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


class FlopCounter:
    """FLOPs of one call of an ONNX graph at given feeds, from the real shapes of its MatMul/Gemm/Conv nodes."""

    def __init__(self, path: str | Path) -> None:
        import onnx

        model = onnx.load_model(str(path))
        self.nodes = [n for n in model.graph.node if n.op_type in COUNTED_OPS]
        wanted = {x for n in self.nodes for x in (*n.input[:2], n.output[0]) if x}
        inits = {t.name: tuple(t.dims) for t in model.graph.initializer}
        self.const_shapes = {k: v for k, v in inits.items() if k in wanted}
        self.session = _exposing(model, wanted - set(inits))

    def __call__(self, feeds: dict[str, np.ndarray]) -> float:
        shapes = {k: v.shape for k, v in _values(self.session, feeds).items()} | self.const_shapes
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
    spec = InputSpec(
        tuple(manifest["modalities"]), dict(manifest["feature_dims"]), int(manifest["num_speakers"])
    )
    counter = FlopCounter(export_dir / manifest["artifacts"]["fp32"]["file"])
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


def _timed_threads(workers: list[threading.Thread]) -> float:
    """Seconds from starting `workers` together to the last one's end."""
    start = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return time.perf_counter() - start


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


def make_probes(threads: int, read_mib: int | None = None, peak_n: int = PROBE_N) -> dict[str, Any]:
    """The machine's limits as contenders of the same rounds: copy (reported), read (sum, GEMV), fp32 / int8 peak."""
    mib = read_mib or read_buffer_mib()
    return {
        "probe/copy": BandwidthProbe(threads, mib),
        "probe/read-sum": ReadProbe("sum", threads, mib),
        "probe/read-gemv": ReadProbe("gemv", threads, mib),
        "probe/peak-fp32": PeakProbe("fp32", threads, peak_n),
        "probe/peak-int8": PeakProbe("int8", threads, peak_n),
    }


def probe_limits(probes: dict[str, Any], times: dict[str, list[float]]) -> dict[str, Any]:
    """The probes' medians (the floor's rates, like for like with the contenders' p50) and their best calls; the
    copy rate (read + write) is reported only."""

    def rate(name: str, statistic: str) -> float:
        probe, t = probes[name], times[name]
        return probe.gflop_s(t, statistic) if isinstance(probe, PeakProbe) else probe.gb_s(t, statistic)

    keys = {
        "probe/copy": ("copy", "gb_s"),
        "probe/read-sum": ("read_sum", "gb_s"),
        "probe/read-gemv": ("read_gemv", "gb_s"),
        "probe/peak-fp32": ("fp32", "gflop_s"),
        "probe/peak-int8": ("int8", "gop_s"),
    }
    out: dict[str, Any] = {}
    for name, (what, unit) in keys.items():
        if times.get(name):
            out[f"{what}_{unit}"] = rate(name, "p50")
            out[f"{what}_best_{unit}"] = rate(name, "best")
    out["read_gb_s"] = max(out.get("read_sum_gb_s", 0.0), out.get("read_gemv_gb_s", 0.0))
    out["read_best_gb_s"] = max(out.get("read_sum_best_gb_s", 0.0), out.get("read_gemv_best_gb_s", 0.0))
    out.update(
        read_buffer_mib=probes["probe/read-sum"].nbytes / 2**20,
        peak_n=round((probes["probe/peak-fp32"].flops / 2) ** (1 / 3)),
        rule="medians of probes timed in the same rounds as the "
        "contenders; read = the faster of numpy sum and onnxruntime GEMV; int8 calls' FLOPs held to the faster "
        "of the int8 (MatMulInteger) and fp32 peaks",
    )
    return out
