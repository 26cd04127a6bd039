"""model.step.onnx: the incremental step of a causal CMATH (its forward with a cache, cmath_train/streaming.py)
as one ONNX graph, for a batch of conversations at different positions.

Design: *growing* caches. The graph takes the past K/V of every attention module as (batch, past, d) tensors with
dynamic `batch` and `past` axes (past 0 at the first utterance), padded to the longest history in the batch (key j
of row b is real iff j < position[b]; the graph masks the rest itself), and returns only the new utterance's K/V
rows (batch, d); the caller appends them (the runtime keeps preallocated (max_len, d) buffers per conversation
and, at batch 1, passes the contiguous slice [:past], so nothing is copied). The conv tail (k-1 standardised rows
per modality) goes in and comes out whole; it is tiny. Positions come from the model's (max_len, d) table.

Inputs:  t/a/v (batch, d_m) raw features, speaker (batch,) int64, position (batch,) int64,
         tail_{m} (batch, k-1, d_m) [only when k-1 > 0], past_key_{cs}, past_value_{cs} (batch, past, d)
         for every attention module cs (centre, source)
Outputs: probs (batch, C), embedding (batch, d), new_tail_{m} (batch, k-1, d_m), key_{cs}, value_{cs} (batch, d)
export.json["step"]["state"] describes one conversation's state (no batch axis) and how each part is updated.

The file holds the exported graph after two exact rewrites (cmath_export/rewrites.py; a step reads every weight
once for one row, so it is bound by bandwidth and by the number of small GEMVs): each Conv1D' of the one new
window runs as one GEMV (`conv1d_to_matmul`), and the 9 projections that read each modality's hidden row run as one
400 x 3600 GEMV (`fuse_shared_matmuls`). Measured on the trained meld model at history 50, 2 threads, interleaved
p50: 4.25 -> 3.81 ms spinning, 5.49 -> 4.64 ms sleeping (max |dp| 7e-8). The int8 twin starts from the graph as
exported (STEP_PLAIN_FILE, staged and never promoted): its schemes make their own rewrites (the convs as blockwise
int8 MatMuls, the projections fused or not, quantize.SCHEMES), and each needs the unrewritten graph to start from.
Parity against the full graph (model.onnx) is measured at export time with the runtime's own streaming code
(cmath_runtime.streaming), one conversation at a time and all of them batched, and recorded in export.json.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
import torch
from torch import nn

from cmath_runtime.errors import ArtifactError
from cmath_runtime.files import atomic_write_bytes, sha256_file
from cmath_train.streaming import StepModule

from .graph import BATCH, TRACE_SHAPE, TensorSpec, _rename_io, check_io, dynamo_export, model_config
from .parity_data import drawn_features
from .rewrites import conv1d_to_matmul, fuse_shared_matmuls

if TYPE_CHECKING:
    from cmath_runtime.streaming import StepGraph

STEP_FILE = "model.step.onnx"
STEP_PLAIN_FILE = ".model.step.plain.onnx"  # the graph as exported, before the rewrites (staging only)
PAST = "past"
TRACE_PAST = 16
PARITY_LENGTHS = (1, 7, 64)  # utterances per parity conversation (capped at max_len)
PARITY_BOUND = 1e-4  # max |probs diff|, as for model.onnx


def has_step(ctx: Any) -> bool:
    """A step graph is exported for causal CMATH runs, CDaT-wrapped or not (StepModule runs CMATH's own forward
    with a cache)."""
    from cmath_train.streaming import streamable

    return streamable(ctx.ckpt.model)


def step_specs(step: StepModule) -> tuple[list[TensorSpec], list[TensorSpec], list[dict[str, Any]]]:
    """Inputs, outputs and the state of one conversation (name in, name out, shape, how it is updated)."""
    cfg = step.model.cfg
    inputs = [TensorSpec(m, "float32", (BATCH, cfg.feature_dims[m])) for m in step.modalities]
    inputs += [TensorSpec("speaker", "int64", (BATCH,)), TensorSpec("position", "int64", (BATCH,))]
    outputs = [
        TensorSpec("probs", "float32", (BATCH, cfg.num_classes)),
        TensorSpec("embedding", "float32", (BATCH, cfg.d)),
    ]
    state: list[dict[str, Any]] = [
        {"input": "position", "output": None, "shape": [1], "dtype": "int64", "update": "increment"}
    ]
    if step.tail:
        for m in step.modalities:
            shape = (step.tail, cfg.feature_dims[m])
            inputs.append(TensorSpec(f"tail_{m}", "float32", (BATCH, *shape)))
            outputs.append(TensorSpec(f"new_tail_{m}", "float32", (BATCH, *shape)))
            state.append(
                {
                    "input": f"tail_{m}",
                    "output": f"new_tail_{m}",
                    "shape": list(shape),
                    "dtype": "float32",
                    "update": "replace",
                }
            )
    for name in step.names:
        for kind in ("key", "value"):
            inputs.append(TensorSpec(f"past_{kind}_{name}", "float32", (BATCH, PAST, cfg.d)))
            outputs.append(TensorSpec(f"{kind}_{name}", "float32", (BATCH, cfg.d)))
            state.append(
                {
                    "input": f"past_{kind}_{name}",
                    "output": f"{kind}_{name}",
                    "shape": [step.max_len, cfg.d],
                    "dtype": "float32",
                    "update": "append",
                }
            )
    return inputs, outputs, state


def _example(step: StepModule, past: int) -> tuple[torch.Tensor, ...]:
    """Two conversations (so the batch axis stays dynamic) at different positions, the second one padded."""
    cfg, gen = step.model.cfg, torch.Generator().manual_seed(0)
    feats = [torch.randn(2, cfg.feature_dims[m], generator=gen) for m in step.modalities]
    tails = (
        [torch.randn(2, step.tail, cfg.feature_dims[m], generator=gen) for m in step.modalities]
        if step.tail
        else []
    )
    kv = [torch.randn(2, past, cfg.d, generator=gen) for _ in range(2 * len(step.names))]
    return (*feats, torch.tensor([1, 2]), torch.tensor([past, past // 2]), *tails, *kv)


def export_step_onnx(model: nn.Module, opset: int, max_len: int) -> tuple[onnx.ModelProto, StepModule]:
    step = StepModule(model, max_len).eval()
    inputs, outputs, _ = step_specs(step)
    batch, past = torch.export.Dim(BATCH), torch.export.Dim(PAST, min=0, max=max(max_len, TRACE_SHAPE[1]))
    dynamic = tuple({0: batch, 1: past} if s.name.startswith("past_") else {0: batch} for s in inputs)
    ir_model = dynamo_export(step, _example(step, min(TRACE_PAST, max_len - 1)), dynamic, opset, max_len)
    _rename_io(ir_model.graph, [s.name for s in inputs], [s.name for s in outputs])
    import onnx_ir

    proto = onnx_ir.serde.serialize_model(ir_model)
    check_io(proto, inputs, outputs, STEP_FILE)
    return proto, step


def _conversations(model: nn.Module, max_len: int) -> list[tuple[dict[str, np.ndarray], np.ndarray]]:
    """Parity conversations of PARITY_LENGTHS utterances, features drawn around the model's train mean/std."""
    cfg, rng, state = model_config(model), np.random.default_rng(0), model.state_dict()
    out = []
    for n in sorted({min(n, max_len) for n in PARITY_LENGTHS}):
        feats = drawn_features(state, cfg, n, rng)
        out.append((feats, rng.integers(0, cfg.num_speakers, n).astype(np.int64)))
    return out


def step_parity(step_path: Path, full_path: Path, entry: dict[str, Any], model: nn.Module) -> dict[str, Any]:
    """The step graph vs the full graph's rows on random conversations (onnxruntime CPU, fp32), run through the
    runtime's own streaming code (StepGraph.run_batch): each conversation alone, and all of them in one batch at
    different positions. Compared with the one comparator (cmath_runtime.compare)."""
    from cmath_runtime.compare import compare, max_abs
    from cmath_runtime.session import open_session
    from cmath_runtime.streaming import StepGraph

    names = [i["name"] for i in entry["inputs"]]
    session = open_session(step_path, "cpu", threads=1, inputs=names, what="step graph").session
    graph = StepGraph(session, entry, step_path)
    full_sess = open_session(full_path, "cpu", threads=1, what="model").session
    conversations = _conversations(model, graph.max_len)
    reference = _full_graph_rows(full_sess, conversations)
    checks = {"probs": max_abs(PARITY_BOUND), "embedding": max_abs(None)}
    reference_name, data = "model.onnx (onnxruntime CPU)", "train mean + std * N(0, 1)"
    single, together = (
        compare(
            reference,
            got,
            checks,
            artifact=artifact,
            reference_name=reference_name,
            runtime="model.step.onnx (onnxruntime CPU)",
            data=data,
        )
        for artifact, got in (
            ("step", _stepped_alone(graph, conversations)),
            ("step (batched)", _stepped_together(graph, conversations)),
        )
    )
    return {
        "reference": reference_name,
        "data": data,
        "lengths": [len(s) for _, s in conversations],
        "probs_max_abs": single.output("probs").max_abs,
        "embedding_max_abs": single.output("embedding").max_abs,
        "batched_probs_max_abs": together.output("probs").max_abs,
        "tolerance": PARITY_BOUND,
        "passed": single.passed and together.passed,
        "report": single.to_json(),
        "batched_report": together.to_json(),
        "summary": f"{single.summary()}\n{together.summary()}",
    }


def _full_graph_rows(
    full_sess: Any, conversations: list[tuple[dict[str, np.ndarray], np.ndarray]]
) -> list[dict[str, np.ndarray]]:
    """probs and embedding of every utterance of each conversation, from the full graph (one conversation a run)."""
    reference = []
    for feats, speakers in conversations:
        probs, emb = full_sess.run(
            ["probs", "embedding"],
            {
                **{m: x[None] for m, x in feats.items()},
                "speaker": speakers[None],
                "mask": np.ones((1, len(speakers)), bool),
            },
        )
        reference.append({"probs": probs[0], "embedding": emb[0]})
    return reference


def _stepped_alone(
    graph: StepGraph, conversations: list[tuple[dict[str, np.ndarray], np.ndarray]]
) -> list[dict[str, np.ndarray]]:
    """The same rows from the step graph, each conversation stepped on its own, one utterance a run."""
    alone = []
    for feats, speakers in conversations:
        state = graph.empty_state()
        rows = [
            graph.run(state, i, int(speakers[i]), {m: x[i] for m, x in feats.items()})
            for i in range(len(speakers))
        ]
        alone.append({"probs": np.stack([p for p, _ in rows]), "embedding": np.stack([e for _, e in rows])})
    return alone


def _stepped_together(
    graph: StepGraph, conversations: list[tuple[dict[str, np.ndarray], np.ndarray]]
) -> list[dict[str, np.ndarray]]:
    """The same rows from the step graph, all conversations stepped in one batch: utterance i of every
    conversation that has one in the same run, so the batch holds different positions and history lengths."""
    rows: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in conversations]
    states = [graph.empty_state() for _ in conversations]
    for i in range(max(len(s) for _, s in conversations)):
        live = [b for b, (_, s) in enumerate(conversations) if i < len(s)]
        probs, emb = graph.run_batch(
            [states[b] for b in live],
            [i] * len(live),
            [int(conversations[b][1][i]) for b in live],
            [{m: x[i] for m, x in conversations[b][0].items()} for b in live],
        )
        for row, b in enumerate(live):
            rows[b].append((probs[row], emb[row]))
    return [{"probs": np.stack([p for p, _ in r]), "embedding": np.stack([e for _, e in r])} for r in rows]


def export_step(
    model: nn.Module, opset: int, max_len: int, staging: Path, say: Any = print
) -> dict[str, Any]:
    """Write model.step.onnx into `staging`, check its parity against staging/model.onnx; the export.json entry."""
    proto, step = export_step_onnx(model, opset, max_len)
    onnx.checker.check_model(proto, full_check=True)
    atomic_write_bytes(staging / STEP_PLAIN_FILE, proto.SerializeToString())
    fast, convs = conv1d_to_matmul(proto)
    fast, fused = fuse_shared_matmuls(fast)
    onnx.checker.check_model(fast, full_check=True)
    path = staging / STEP_FILE
    atomic_write_bytes(path, fast.SerializeToString())
    inputs, outputs, state = step_specs(step)
    entry = {
        "file": STEP_FILE,
        "sha256": sha256_file(path),
        "bytes": path.stat().st_size,
        "max_len": max_len,
        "tail": step.tail,
        "attention": list(step.names),
        "rewrites": {"convs_as_matmul": len(convs), "matmuls_fused": fused},
        "inputs": [s.to_json() for s in inputs],
        "outputs": [s.to_json() for s in outputs],
        "state": state,
    }
    parity = step_parity(path, staging / "model.onnx", entry, model)
    say(parity.pop("summary"))
    if not parity["passed"]:
        raise ArtifactError(
            STEP_FILE,
            f"step graph parity failed: probs max |diff| {parity['probs_max_abs']:.3g} > "
            f"{PARITY_BOUND:g} against model.onnx",
        )
    return {**entry, "parity": parity}
