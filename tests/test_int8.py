"""int8: cmath-export --int8 proves agreement or writes nothing; the runtime runs model.int8.onnx and
model.step.int8.onnx at every shape, finite and padding-invariant within the int8 bound, and refuses an int8
artifact whose agreement record failed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import cmath_runtime
from cmath_runtime.errors import ArtifactError
from tests.conftest import TINY_DIMS

SHAPES = ((1, 1), (1, 7), (3, 50), (2, 257))
INT8_MAX_ABS = 0.03  # the export's bound on max |dp| vs PyTorch


def _conversations(batch: int, n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng([seed, batch, n])
    return [
        {
            "speakers": rng.integers(0, 3, n),
            "features": {m: rng.standard_normal((n, d)).astype(np.float32) for m, d in TINY_DIMS.items()},
        }
        for _ in range(batch)
    ]


@pytest.fixture(scope="module")
def int8_model(int8_causal_export: Path) -> cmath_runtime.EmotionModel:
    return cmath_runtime.load(int8_causal_export, backend="cpu", precision="int8", threads=1)


@pytest.fixture(scope="module")
def fp32_model(int8_causal_export: Path) -> cmath_runtime.EmotionModel:
    return cmath_runtime.load(int8_causal_export, backend="cpu", threads=1)


def test_export_records_agreement(int8_causal_export: Path) -> None:
    manifest = json.loads((int8_causal_export / "export.json").read_text())
    art = manifest["artifacts"]["int8"]
    assert art["file"] == "model.int8.onnx" and art["precision"] == "int8"
    assert any("scheme" in n and "dynamic" in n for n in manifest["parity"]["int8"]["notes"])
    assert art["bytes"] < manifest["artifacts"]["fp32"]["bytes"]
    for key in ("int8", "step_int8"):
        rep = manifest["parity"][key]
        assert (
            rep["passed"] and rep["argmax_agreement"] >= 0.95 and rep["min_argmax_agreement"] == 0.95
        )  # conftest
        assert next(o for o in rep["outputs"] if o["name"] == "probs")["max_abs"] <= INT8_MAX_ABS
    step = manifest["step"]["int8"]
    assert step["parity"]["passed"] and (int8_causal_export / step["file"]).is_file()
    assert step["scheme"]["method"] == "dynamic" and step["precision"] == "int8"


def test_int8_graph_is_quantized(int8_causal_export: Path) -> None:
    import onnx

    from cmath_export import quantize as quant
    from cmath_export.quantize import count_ops, weight_bytes, weight_matmuls

    for name, fp32_name in (("model.int8.onnx", "model.onnx"), ("model.step.int8.onnx", "model.step.onnx")):
        q = onnx.load(str(int8_causal_export / name))
        ops = count_ops(q)
        assert ops.get("MatMulInteger", 0) + ops.get("DynamicQuantizeMatMul", 0) > 0, name
        # every linear layer became int8: MatMuls with a constant weight, and the step graph's Gemms (rewritten)
        assert not weight_matmuls(q.graph, ("MatMul", "Gemm")), name
        fp32 = onnx.load(str(int8_causal_export / fp32_name))
        assert weight_bytes(q) < 0.5 * weight_bytes(fp32), name
        # the reconstruction convs run as blockwise int8 MatMuls (MatMulNBits, 8 bits)
        convs = count_ops(onnx.load(str(int8_causal_export / "model.onnx"))).get(
            "Conv", 0
        )  # the step's fp32 file has
        assert convs == ops.get("MatMulNBits", 0) > 0 and "Conv" not in ops, (
            name
        )  # them as GEMVs (rewrites.py)
        assert all(
            a.i == 8
            for n in q.graph.node
            if n.op_type == "MatMulNBits"
            for a in n.attribute
            if a.name == "bits"
        )
    # the first scheme fuses the projections that read the same hidden rows (one MatMulInteger + Split each); it
    # meets the bound on this fixture, so a quiet fallback to the unfused scheme would fail here
    step_scheme = json.loads((int8_causal_export / "export.json").read_text())["step"]["int8"]["scheme"]
    assert step_scheme == json.loads(json.dumps(quant.SCHEMES[0].to_json())) and step_scheme["fuse_shared"]
    step_ops = count_ops(onnx.load(str(int8_causal_export / "model.step.int8.onnx")))
    assert step_ops.get("Split", 0) >= 3
    # ... and its attentions run as one op each (rewrites.attention_to_mha), as export.json records
    step = json.loads((int8_causal_export / "export.json").read_text())["step"]["int8"]
    assert step["rewrites"] == {"attention_to_mha": 9} and step_ops["MultiHeadAttention"] == 9


@pytest.mark.parametrize("shape", SHAPES)
def test_int8_shapes_finite_close_padding_invariant(int8_model, fp32_model, shape: tuple[int, int]) -> None:
    batch, n = shape
    convs = _conversations(batch, n, 0)
    # conversations of different lengths in one batch: padding for all but the longest
    convs = [
        {
            "speakers": c["speakers"][: n - i * (n // 3)],
            "features": {m: x[: n - i * (n // 3)] for m, x in c["features"].items()},
        }
        for i, c in enumerate(convs)
    ]
    together = int8_model.predict(convs, batch_size=batch)
    alone = [int8_model.predict([c])[0] for c in convs]
    exact = fp32_model.predict(convs, batch_size=batch)
    for t, a, e, c in zip(together, alone, exact, convs):
        assert t.probs.shape == (len(c["speakers"]), 6) and np.isfinite(t.probs).all()
        # dynamic quantization scales activations per tensor, so batch-mates move results by quantization noise
        # only: within the int8 bound, never beyond it
        assert np.abs(t.probs - a.probs).max() <= INT8_MAX_ABS
        assert np.abs(t.probs - e.probs).max() <= 0.1  # random (out-of-distribution) inputs, tiny model


def test_int8_step_path(int8_model) -> None:
    from cmath_runtime import Conversation

    [conv] = _conversations(1, 40, 3)
    stream = Conversation(int8_model)
    assert stream.path == "step"
    for i in range(40):
        stream.add(int(conv["speakers"][i]), **{m: x[i] for m, x in conv["features"].items()})
    [full] = int8_model.predict([conv])
    assert np.isfinite(stream.probs()).all() and np.abs(stream.probs() - full.probs).max() <= INT8_MAX_ABS


@pytest.mark.parametrize("case", ["failed", "missing"])
def test_runtime_refuses_failed_agreement(int8_causal_export: Path, tmp_path: Path, case: str) -> None:
    copy = tmp_path / "export"
    shutil.copytree(int8_causal_export, copy)
    manifest = json.loads((copy / "export.json").read_text())
    if case == "failed":
        manifest["parity"]["int8"].update(passed=False, argmax_agreement=0.98)
    else:
        del manifest["parity"]["int8"]
    (copy / "export.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="agreement" if case == "missing" else "failed its agreement"):
        cmath_runtime.load(copy, precision="int8")
    cmath_runtime.load(copy, precision="fp32")  # the fp32 model of the same export still loads


def test_failed_bound_writes_nothing(tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cmath_export import export_run, parity
    from cmath_export.export import ParityError

    run = (
        tmp_path / "run"
    )  # the bidirectional run: one graph to trace, and the int8 bound checked the same way
    run.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_run / name, run / name)
    assert parity.BOUNDS["int8"] == parity.Bounds(probs_max_abs=0.03, min_argmax_agreement=0.995)
    # a bound no int8 graph can meet (exact probabilities): the export must fail and write nothing
    monkeypatch.setitem(parity.BOUNDS, "int8", parity.Bounds(probs_max_abs=0.0, min_argmax_agreement=1.0))
    with pytest.raises(ParityError, match="int8"):
        export_run(run, int8=True, text_encoder=False)
    assert not (run / "export" / "model.int8.onnx").exists() and not (run / "export" / "export.json").exists()


def test_int8_falls_back_to_the_next_scheme(
    tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A scheme whose graph misses the bound is not written: the next one (projections not fused) is, and export.json
    says which scheme made the artifact and what was tried first."""
    import onnx
    from onnx import numpy_helper

    from cmath_export import export_run, parity
    from cmath_export import quantize as quant

    # the tiny model's bound, as conftest sets it for the shared int8 exports (its probabilities sit close together)
    monkeypatch.setitem(parity.BOUNDS, "int8", parity.Bounds(probs_max_abs=0.03, min_argmax_agreement=0.95))
    run = tmp_path / "run"
    run.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_run / name, run / name)
    real = quant.quantize_int8

    def first_one_broken(model: onnx.ModelProto, scheme: quant.Scheme | None = None) -> onnx.ModelProto:
        q = real(model, scheme)
        if scheme == quant.SCHEMES[0]:  # a graph far off the bound: every int8 weight zero
            for t in q.graph.initializer:
                if t.data_type == onnx.TensorProto.INT8:
                    t.CopyFrom(numpy_helper.from_array(np.zeros_like(numpy_helper.to_array(t)), t.name))
        return q

    monkeypatch.setattr(quant, "quantize_int8", first_one_broken)
    export_run(run, int8=True, text_encoder=False)
    manifest = json.loads((run / "export" / "export.json").read_text())
    notes = manifest["parity"]["int8"]["notes"]
    assert manifest["parity"]["int8"]["passed"] and any("missed the int8 bound" in n for n in notes)
    second = str(quant.SCHEMES[1].to_json())  # the next scheme in order, not any later one
    assert any(n.startswith("weight-int8 MatMuls, scheme") and second in n for n in notes)


def test_precision_backend_combinations(int8_causal_export: Path) -> None:
    with pytest.raises(ValueError, match="bf16"):
        cmath_runtime.load(int8_causal_export, backend="cpu", precision="bf16")
    with pytest.raises(ValueError, match="openvino"):
        cmath_runtime.load(int8_causal_export, backend="openvino", precision="int8")
