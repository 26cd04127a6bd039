"""Weight-int8 ONNX graphs: onnxruntime's dynamic quantization of the MatMuls whose weight is a constant.

Graph-agnostic: it rewrites any fp32 ONNX graph (model.onnx, model.step.onnx), so batch axes and cache layouts do
not matter. A batch-1 call of this model is bound by reading its weights (cmath_bench/roofline.py), so 4x fewer
weight bytes is where the speed comes from. What is quantized, and why:

- every MatMul whose second input is an initializer (the linear layers) gets int8 weights, one scale per tensor,
  and runs as DynamicQuantizeLinear -> MatMulInteger (activations quantized to uint8 per call, int32
  accumulation). With `fuse_shared` the MatMuls that read the same activation are fused first
  (rewrites.fuse_shared_matmuls): fewer, larger MatMuls are faster, at the price of one scale for several
  projections;
- the reconstruction convolutions (Conv1D along the utterance axis) are rewritten as the same arithmetic in MatMul
  form (rewrites.conv1d_to_matmul) and run as MatMulNBits with one scale per block of `block` input rows:
  their input is the raw standardised features, whose outliers one per-call activation scale cannot hold, and
  onnxruntime's int8 Conv is slower than fp32;
- the attention MatMuls between two activations (Q K^T, A V) stay fp32: they have no weight to shrink;
- everything else (LayerNorm, softmax, input standardisation, embeddings) stays fp32;
- method "blockwise" runs every constant-weight MatMul as MatMulNBits (8-bit weights and activations, one scale per
  `block` input rows of each weight column and of each activation row): far closer to fp32 than one activation
  scale per call, but without VNNI (AVX2 only) onnxruntime's blockwise int8 kernels are slower than fp32 ones;
- the int8 step graph's attentions run as one com.microsoft.MultiHeadAttention op each (rewrites.attention_to_mha,
  exact; only onnxruntime runs int8 graphs, so no other engine must read it).

Accuracy is proven per export on the run's validation rows (cmath_export/parity.py, the int8 bounds) and recorded
in export.json; SCHEMES are tried fastest first and the first that meets the bounds is written.
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from .rewrites import attention_to_mha, conv1d_to_matmul, fuse_shared_matmuls, gemm_to_matmul
from .step_graph import STEP_PLAIN_FILE


@dataclass(frozen=True)
class Scheme:
    """The quantization recipe (recorded in export.json so an artifact says how it was made)."""

    # "dynamic": onnxruntime.quantization.quantize_dynamic; "blockwise": every MatMul as MatMulNBits
    method: str = "dynamic"
    op_types: tuple[str, ...] = ("MatMul",)  # Gemms with a constant weight are rewritten to MatMul first
    conv_as_matmul: bool = (
        True  # 1-D Convs with a constant weight rewritten to MatMul first (conv1d_to_matmul)
    )
    # MatMulNBits (the convs, every MatMul with "blockwise"): one scale per this many input rows
    block: int = 16
    fuse_shared: bool = True  # MatMuls reading the same activation fused first (rewrites.fuse_shared_matmuls)
    weight_type: str = "QInt8"
    per_channel: bool = False
    # 7-bit weights: x86 CPUs without VNNI multiply u8 activations by s8 weights in 16-bit pairs (vpmaddubsw), which
    # saturate with full 8-bit weights and move the outputs far from fp32
    reduce_range: bool = True
    weights_only: bool = True  # MatMuls between two activations stay fp32

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# Tried in this order, fastest first; the first whose graph meets the int8 bounds is written (export.json says which,
# and what was tried). Each later scheme keeps more of the graph exact and is slower.
SCHEMES = (Scheme(), Scheme(fuse_shared=False), Scheme(conv_as_matmul=False, fuse_shared=False))


def quantize_int8(model: onnx.ModelProto, scheme: Scheme | None = None) -> onnx.ModelProto:
    """An int8-weight copy of `model` (which is not modified)."""
    import logging

    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    # matmul_nbits_quantizer calls logging.basicConfig(INFO) when first imported
    from onnxruntime.quantization import QuantType, matmul_nbits_quantizer, quantize_dynamic  # noqa: F401

    for handler in [
        h for h in root.handlers if h not in handlers
    ]:  # ... which we undo: our output stays ours
        root.removeHandler(handler)
    scheme = scheme or SCHEMES[0]
    root.setLevel(
        max(level, logging.ERROR)
    )  # onnxruntime logs a "run pre-processing" hint on the root logger
    try:
        return _quantize(model, scheme, quantize_dynamic, QuantType)
    finally:
        root.setLevel(level)


def _quantize(
    model: onnx.ModelProto, scheme: Scheme, quantize_dynamic: Any, QuantType: Any
) -> onnx.ModelProto:  # noqa: N803
    model = gemm_to_matmul(model)
    if scheme.conv_as_matmul:
        model, conv_matmuls = conv1d_to_matmul(model)
        model = blockwise_int8(model, conv_matmuls, scheme.block)
    if scheme.fuse_shared:
        model, _ = fuse_shared_matmuls(model)
    if scheme.method == "blockwise":
        return blockwise_int8(model, weight_matmuls(model.graph, scheme.op_types), scheme.block)
    nodes = weight_matmuls(model.graph, scheme.op_types) if scheme.weights_only else None
    with tempfile.TemporaryDirectory(prefix="cmath-int8-") as tmp:
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        onnx.save_model(model, str(src))
        quantize_dynamic(
            str(src),
            str(dst),
            op_types_to_quantize=list(scheme.op_types),
            nodes_to_quantize=nodes,
            per_channel=scheme.per_channel,
            reduce_range=scheme.reduce_range,
            weight_type=getattr(QuantType, scheme.weight_type),
            extra_options={"MatMulConstBOnly": scheme.weights_only},
        )
        return onnx.load_model(str(dst))


def blockwise_int8(model: onnx.ModelProto, names: list[str], block: int) -> onnx.ModelProto:
    """The MatMuls `names` (constant weights) as onnxruntime MatMulNBits: symmetric 8-bit weights with one scale per
    `block` input rows, activations quantized per block (accuracy_level 4: int8 arithmetic)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    if not names:
        return model
    model = onnx.ModelProto.FromString(model.SerializeToString())  # the quantizer edits its model in place
    others = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.name not in names]
    quantizer = MatMulNBitsQuantizer(
        model,
        bits=8,
        block_size=block,
        is_symmetric=True,
        accuracy_level=4,
        nodes_to_include=names,
        nodes_to_exclude=others,
    )
    quantizer.process()
    return quantizer.model.model


def weight_matmuls(graph: onnx.GraphProto, op_types: tuple[str, ...] = ("MatMul",)) -> list[str]:
    """Names of the `op_types` nodes whose second input is a constant (an initializer or a Constant node)."""
    constants = {t.name for t in graph.initializer}
    constants |= {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    return [
        n.name for n in graph.node if n.op_type in op_types and len(n.input) > 1 and n.input[1] in constants
    ]


def weight_bytes(model: onnx.ModelProto) -> int:
    """Bytes of every initializer: what one call must at least read once (the bandwidth floor's numerator)."""
    from onnx import numpy_helper

    return int(sum(numpy_helper.to_array(t).nbytes for t in model.graph.initializer))


def count_ops(model: onnx.ModelProto) -> dict[str, int]:
    out: dict[str, int] = {}
    for n in model.graph.node:
        out[n.op_type] = out.get(n.op_type, 0) + 1
    return out


STEP_INT8_FILE = "model.step.int8.onnx"  # one of the files of formats' "step" row


def quantize_within_bounds(
    ctx: Any, key: str, fp32: onnx.ModelProto, path: Path, run: Any, then: Any = None
) -> tuple[onnx.ModelProto, Scheme, Any]:
    """Each scheme of SCHEMES in turn: quantize `fp32` (then rewrite it with `then`, if given), write it to `path`,
    check its parity against PyTorch with `run` (cmath_export.parity); the first within the int8 bounds is kept.
    -> (graph, scheme, report); the report of the last scheme when none passed (the export then fails and writes
    nothing)."""
    from cmath_runtime.files import atomic_write_bytes

    from . import parity

    tried = []
    for scheme in SCHEMES:
        q = quantize_int8(fp32, scheme)
        if then is not None:
            q = then(q)
        onnx.checker.check_model(q, full_check=True)
        atomic_write_bytes(path, q.SerializeToString())
        report = ctx.check(key, run, parity.BOUNDS["int8"])
        if report.passed or scheme == SCHEMES[-1]:
            break
        probs = next(o for o in report.outputs if o.name == "probs")
        tried.append(
            f"scheme {scheme.to_json()} missed the int8 bound (probs max |dp| {probs.max_abs:.4f}, "
            f"argmax agreement {report.argmax_agreement:.2%}): the next scheme was tried"
        )
        ctx.say(f"{path.name}: {tried[-1]}")
    report.notes += tried
    return q, scheme, report


def step_outputs(
    path: str | Path, entry: dict[str, Any], batches: list[dict[str, np.ndarray]], threads: int = 1
) -> tuple[list[dict[str, np.ndarray]], str]:
    """Run a step graph over every conversation of padded batches, one utterance at a time, with the runtime's
    own Stream (so any step layout the runtime runs is checked as it runs); -> outputs shaped like the full
    graph's (B, N, .), padded rows zero, and the runtime in words."""
    import onnxruntime as ort

    from cmath_runtime.session import open_session
    from cmath_runtime.streaming import StepGraph, Stream

    session = open_session(path, "cpu", threads=threads, what="step graph").session
    graph = StepGraph(session, entry, Path(path))
    modalities = [m for m in batches[0] if m not in ("speaker", "mask")] if batches else []
    out = []
    for feeds in batches:
        mask = feeds["mask"]
        got: dict[str, np.ndarray] = {}
        for b in range(mask.shape[0]):
            n = int(mask[b].sum())
            if n == 0:
                continue
            probs, emb = Stream(graph).catch_up(
                [int(s) for s in feeds["speaker"][b, :n]], {m: list(feeds[m][b, :n]) for m in modalities}
            )
            for k, v in (("probs", probs), ("embedding", emb)):
                got.setdefault(k, np.zeros((*mask.shape, v.shape[-1]), np.float32))[b, :n] = v
        out.append(got)
    return out, f"onnxruntime {ort.__version__} CPUExecutionProvider, step by step (cmath_runtime Stream)"


def build_step_int8(ctx: Any, step_entry: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    """Step twin of the int8 row: model.step.int8.onnx from the step graph as exported (before the fp32 rewrites,
    step_graph.STEP_PLAIN_FILE), its parity vs PyTorch on the validation rows (fed one utterance at a time);
    -> (export.json["step"]["int8"], the report)."""
    from cmath_runtime.files import sha256_file

    path = ctx.staging / STEP_INT8_FILE
    q, scheme, report = quantize_within_bounds(  # onnxruntime alone runs int8: its attention op may be used
        ctx,
        "step_int8",
        onnx.load_model(str(ctx.staging / STEP_PLAIN_FILE)),
        path,
        lambda b: step_outputs(path, step_entry, b),
        lambda q: attention_to_mha(q)[0],
    )
    attentions = count_ops(q).get("MultiHeadAttention", 0)
    report.notes.append(
        f"model.step.int8.onnx fed one utterance at a time; scheme {scheme.to_json()}; "
        f"{attentions} attentions as one MultiHeadAttention op each"
    )
    entry = {
        "file": STEP_INT8_FILE,
        "sha256": sha256_file(path),
        "bytes": path.stat().st_size,
        "precision": "int8",
        "scheme": scheme.to_json(),
        "rewrites": {"attention_to_mha": attentions},
        "parity": report.to_json(),
    }
    return entry, report
