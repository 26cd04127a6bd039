"""model.step.onnx: the incremental step of a causal CMATH (cmath_train/streaming.py) as one ONNX graph.

Design: *growing* caches. The graph takes the past K/V of every attention module as (past, d) tensors with a
dynamic `past` axis (0 at the first utterance) and returns only the new utterance's K/V rows (1, d); the caller
appends them (the runtime keeps preallocated (max_len, d) buffers and passes the contiguous slice [:past], so
nothing is copied back and forth). The conv tail (k-1 standardised rows per modality) goes in and comes out
whole; it is tiny. Positions come from a (max_len, d) table: `max_len` is the cache capacity.

Inputs:  t/a/v (1, d_m) raw features, speaker (1,) int64, position (1,) int64, tail_{m} (k-1, d_m),
         past_key_{cs}, past_value_{cs} (past, d) for every attention module cs (centre, source)
Outputs: probs (1, C), embedding (1, d), new_tail_{m} (k-1, d_m), key_{cs}, value_{cs} (1, d)
Parity against the full graph (model.onnx) is measured at export time and recorded in export.json["step"].
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from cmath_runtime.errors import ArtifactError
from cmath_runtime.files import atomic_write_bytes, sha256_file
from cmath_train.streaming import StepModule

from .graph import TensorSpec, _quiet_exporter, _rename_io, check_io

STEP_FILE = "model.step.onnx"
PAST = "past"
TRACE_PAST = 16
PARITY_LENGTHS = (1, 7, 64)  # utterances per parity conversation (capped at max_len)
PARITY_BOUND = 1e-4  # max |probs diff|, as for model.onnx


def step_specs(step: StepModule) -> tuple[list[TensorSpec], list[TensorSpec], list[dict[str, Any]]]:
    """Inputs, outputs and the state description (name in, name out, shape, how it is updated)."""
    cfg = step.model.cfg
    inputs = [TensorSpec(m, "float32", (1, cfg.feature_dims[m])) for m in step.modalities]
    inputs += [TensorSpec("speaker", "int64", (1,)), TensorSpec("position", "int64", (1,))]
    outputs = [TensorSpec("probs", "float32", (1, cfg.num_classes)), TensorSpec("embedding", "float32", (1, cfg.d))]
    state: list[dict[str, Any]] = [{"input": "position", "output": None, "shape": [1], "dtype": "int64",
                                    "update": "increment"}]
    if step.tail:
        for m in step.modalities:
            shape = (step.tail, cfg.feature_dims[m])
            inputs.append(TensorSpec(f"tail_{m}", "float32", shape))
            outputs.append(TensorSpec(f"new_tail_{m}", "float32", shape))
            state.append({"input": f"tail_{m}", "output": f"new_tail_{m}", "shape": list(shape), "dtype": "float32",
                          "update": "replace"})
    for c, s in step.names:
        for kind in ("key", "value"):
            inputs.append(TensorSpec(f"past_{kind}_{c}{s}", "float32", (PAST, cfg.d)))
            outputs.append(TensorSpec(f"{kind}_{c}{s}", "float32", (1, cfg.d)))
            state.append({"input": f"past_{kind}_{c}{s}", "output": f"{kind}_{c}{s}", "shape": [step.max_len, cfg.d],
                          "dtype": "float32", "update": "append"})
    return inputs, outputs, state


def _example(step: StepModule, past: int) -> tuple[torch.Tensor, ...]:
    cfg, gen = step.model.cfg, torch.Generator().manual_seed(0)
    feats = [torch.randn(1, cfg.feature_dims[m], generator=gen) for m in step.modalities]
    tails = [torch.randn(step.tail, cfg.feature_dims[m], generator=gen) for m in step.modalities] if step.tail else []
    kv = [torch.randn(past, cfg.d, generator=gen) for _ in range(2 * len(step.names))]
    return (*feats, torch.tensor([1]), torch.tensor([past]), *tails, *kv)


def export_step_onnx(model: nn.Module, opset: int, max_len: int) -> tuple[onnx.ModelProto, StepModule]:
    step = StepModule(model, max_len).eval()
    inputs, outputs, _ = step_specs(step)
    past = torch.export.Dim(PAST, min=0, max=max_len)
    dynamic = tuple({0: past} if s.name.startswith("past_") else None for s in inputs)
    with _quiet_exporter(), torch.no_grad():
        program = torch.onnx.export(step, _example(step, TRACE_PAST), dynamo=True, dynamic_shapes=(dynamic,),
                                    opset_version=opset, optimize=True, external_data=False, verbose=False)
    _rename_io(program.model.graph, [s.name for s in inputs], [s.name for s in outputs])
    import onnx_ir

    proto = onnx_ir.serde.serialize_model(program.model)
    check_io(proto, inputs, outputs, STEP_FILE)
    return proto, step


def run_step_graph(session: Any, specs: tuple[list[TensorSpec], list[TensorSpec], list[dict]], max_len: int,
                   features: dict[str, np.ndarray], speakers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Feed one conversation through the step graph, utterance by utterance: (probs (n, C), embedding (n, d))."""
    inputs, outputs, state = specs
    buffers = {s["input"]: np.zeros(s["shape"], np.float32) for s in state if s["update"] != "increment"}
    out_names = [o.name for o in outputs]
    probs, emb = [], []
    for i in range(len(speakers)):
        feeds = {m: features[m][i:i + 1].astype(np.float32) for m in features}
        feeds["speaker"] = np.array([speakers[i]], np.int64)
        feeds["position"] = np.array([i], np.int64)
        for s in state:
            if s["update"] == "replace":
                feeds[s["input"]] = buffers[s["input"]]
            elif s["update"] == "append":
                feeds[s["input"]] = buffers[s["input"]][:i]
        result = dict(zip(out_names, session.run(out_names, feeds)))
        for s in state:
            if s["update"] == "replace":
                buffers[s["input"]] = result[s["output"]]
            elif s["update"] == "append":
                buffers[s["input"]][i] = result[s["output"]][0]
        probs.append(result["probs"][0])
        emb.append(result["embedding"][0])
    return np.stack(probs), np.stack(emb)


def step_parity(step_path: Path, full_path: Path, specs: tuple, max_len: int, model: nn.Module) -> dict[str, Any]:
    """Max |diff| of the step graph vs the full graph's rows on random conversations (onnxruntime CPU, fp32).

    Features are drawn as train mean + train std * N(0, 1) (the model's Standardize buffers): in-distribution.
    Plain N(0, 1) would put a feature that was constant in training (std clamped to 1e-6) at ~1e6 after
    standardisation, where fp32 summation order alone moves the probabilities."""
    cfg = model.cfg
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    step_sess = ort.InferenceSession(str(step_path), opts, providers=["CPUExecutionProvider"])
    full_sess = ort.InferenceSession(str(full_path), opts, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    worst = {"probs": 0.0, "embedding": 0.0}
    lengths = sorted({min(n, max_len) for n in PARITY_LENGTHS})
    for n in lengths:
        feats = {m: (model.standardize[m].mean.numpy() + model.standardize[m].std.numpy()
                     * rng.standard_normal((n, cfg.feature_dims[m]))).astype(np.float32) for m in cfg.modalities}
        speakers = rng.integers(0, cfg.num_speakers, n).astype(np.int64)
        full_probs, full_emb = full_sess.run(["probs", "embedding"], {**{m: x[None] for m, x in feats.items()},
                                                                     "speaker": speakers[None],
                                                                     "mask": np.ones((1, n), bool)})
        probs, emb = run_step_graph(step_sess, specs, max_len, feats, speakers)
        worst["probs"] = max(worst["probs"], float(np.abs(probs - full_probs[0]).max()))
        worst["embedding"] = max(worst["embedding"], float(np.abs(emb - full_emb[0]).max()))
    return {"reference": "model.onnx (onnxruntime CPU)", "data": "train mean + std * N(0, 1)", "lengths": lengths, "probs_max_abs": worst["probs"],
            "embedding_max_abs": worst["embedding"], "tolerance": PARITY_BOUND,
            "passed": bool(worst["probs"] <= PARITY_BOUND)}


def export_step(model: nn.Module, opset: int, max_len: int, staging: Path, say: Any = print) -> dict[str, Any]:
    """Write model.step.onnx into `staging`, check its parity against staging/model.onnx; the export.json entry."""
    proto, step = export_step_onnx(model, opset, max_len)
    onnx.checker.check_model(proto, full_check=True)
    path = staging / STEP_FILE
    atomic_write_bytes(path, proto.SerializeToString())
    specs = step_specs(step)
    parity = step_parity(path, staging / "model.onnx", specs, max_len, model)
    say(f"[step] model.step.onnx vs model.onnx, conversations of {parity['lengths']} utterances: probs max |diff| "
        f"{parity['probs_max_abs']:.3g}, embedding {parity['embedding_max_abs']:.3g} | "
        f"{'PASSED' if parity['passed'] else 'FAILED'}")
    if not parity["passed"]:
        raise ArtifactError(STEP_FILE, f"step graph parity failed: probs max |diff| {parity['probs_max_abs']:.3g} > "
                                       f"{PARITY_BOUND:g} against model.onnx")
    inputs, outputs, state = specs
    return {"file": STEP_FILE, "sha256": sha256_file(path), "bytes": path.stat().st_size, "max_len": max_len,
            "tail": step.tail, "attention": [c + s for c, s in step.names],
            "inputs": [s.to_json() for s in inputs], "outputs": [s.to_json() for s in outputs],
            "state": state, "parity": parity}
