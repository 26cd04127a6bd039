"""The exact graph rewrites (cmath_export/rewrites.py): same outputs as the graph they replace, any shape."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from cmath_export.quantize import count_ops
from cmath_export.rewrites import conv1d_to_matmul, fuse_shared_matmuls


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize(
    ("kernel", "pads", "bias"),
    [(3, (2, 0), True), (3, (1, 1), False), (1, (0, 0), True), (2, (0, 0), True), (5, (4, 0), True)],
)
def test_conv1d_to_matmul_is_the_same_arithmetic(kernel: int, pads: tuple[int, int], bias: bool) -> None:
    """The rewrite that lets the reconstruction convs quantize: same outputs as the Conv (fp32), any length."""
    rng = np.random.default_rng(kernel)
    w = rng.standard_normal((6, 5, kernel)).astype(np.float32)
    inits = [numpy_helper.from_array(w, "w")] + (
        [numpy_helper.from_array(rng.standard_normal(6).astype(np.float32), "b")] if bias else []
    )
    graph = helper.make_graph(
        [
            helper.make_node(
                "Conv", ["x", "w"] + (["b"] if bias else []), ["y"], pads=list(pads), kernel_shape=[kernel]
            )
        ],
        "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 5, "L"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 6, "L2"])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    rewritten, made = conv1d_to_matmul(model)
    onnx.checker.check_model(rewritten, full_check=True)
    assert "Conv" not in count_ops(rewritten) and count_ops(model) == {"Conv": 1} and len(made) == 1
    a, b = _session(model), _session(rewritten)
    for shape in ((1, 5, 1), (3, 5, 7), (2, 5, 50)):
        if shape[2] + sum(pads) < kernel:
            continue
        x = rng.standard_normal(shape).astype(np.float32)
        want, got = a.run(None, {"x": x})[0], b.run(None, {"x": x})[0]
        assert got.shape == want.shape and np.abs(got - want).max() <= 1e-5


@pytest.mark.parametrize("bias", [True, False])
def test_fuse_shared_matmuls_is_the_same_arithmetic(bias: bool) -> None:
    """Three projections of x (widths 4, 5, 6) become one MatMul (+ one Add) and a Split; a projection of another
    tensor and one with a different row count stay as they were; every output is unchanged, at any batch shape."""
    rng = np.random.default_rng(1)
    ws = {f"w{i}": rng.standard_normal((8, n)).astype(np.float32) for i, n in enumerate((4, 5, 6))}
    ws["w_other"] = rng.standard_normal((8, 3)).astype(np.float32)
    ws["w_rows"] = rng.standard_normal((5, 3)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", f"w{i}"], [f"p{i}"]) for i in range(3)]
    nodes += [
        helper.make_node("MatMul", ["z", "w_other"], ["y_other"]),
        helper.make_node("Slice", ["x", "zero", "five", "last"], ["x5"]),
        helper.make_node("MatMul", ["x5", "w_rows"], ["y_rows"]),
    ]
    consts = [
        numpy_helper.from_array(np.array(v, np.int64), k)
        for k, v in (("zero", [0]), ("five", [5]), ("last", [-1]))
    ]
    if bias:
        nodes += [helper.make_node("Add", [f"p{i}", f"b{i}"], [f"y{i}"]) for i in range(3)]
        consts += [
            numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), f"b{i}")
            for i, n in enumerate((4, 5, 6))
        ]
    else:
        nodes += [helper.make_node("Relu", [f"p{i}"], [f"y{i}"]) for i in range(3)]
    outputs = [f"y{i}" for i in range(3)] + ["y_other", "y_rows"]
    graph = helper.make_graph(
        nodes,
        "shared",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["B", "N", 8]) for n in ("x", "z")],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["B", "N", f"w_{n}"]) for n in outputs],
        [numpy_helper.from_array(w, k) for k, w in ws.items()] + consts,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    fused, count = fuse_shared_matmuls(model)
    onnx.checker.check_model(fused, full_check=True)
    ops = count_ops(fused)
    assert count == 3 and ops["MatMul"] == 3 and ops["Split"] == 1 and ops.get("Add", 0) == (1 if bias else 0)
    a, b = _session(model), _session(fused)
    for shape in ((1, 1, 8), (3, 7, 8)):
        feeds = {n: rng.standard_normal(shape).astype(np.float32) for n in ("x", "z")}
        for want, got in zip(a.run(outputs, feeds), b.run(outputs, feeds)):
            assert got.shape == want.shape and np.abs(got - want).max() <= 1e-5


def test_fuse_shared_matmuls_keeps_graph_outputs_bias_first_adds_and_nameless_nodes() -> None:
    """A MatMul product that is also a graph output stays an output (no bias fusion then), an Add with the bias as
    its first input is recognised, and nodes without names get unique fused names."""
    rng = np.random.default_rng(2)
    ws = [
        numpy_helper.from_array(rng.standard_normal((6, n)).astype(np.float32), f"w{i}")
        for i, n in enumerate((3, 4))
    ]
    bs = [
        numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), f"b{i}")
        for i, n in enumerate((3, 4))
    ]
    for product_is_output in (False, True):
        nodes = [
            helper.make_node("MatMul", ["x", "w0"], ["p0"]),
            helper.make_node("MatMul", ["x", "w1"], ["p1"]),
            helper.make_node("Add", ["b0", "p0"], ["y0"]),
            helper.make_node("Add", ["p1", "b1"], ["y1"]),
        ]
        outputs = ["y0", "y1"] + (["p0"] if product_is_output else [])
        graph = helper.make_graph(
            nodes,
            "named-less",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 6])],
            [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["B", f"w_{n}"]) for n in outputs],
            ws + bs,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 9
        fused, count = fuse_shared_matmuls(
            fuse_shared_matmuls(model)[0]
        )  # twice: the second pass finds nothing
        onnx.checker.check_model(fused, full_check=True)
        assert count == 0 and count_ops(fused)["MatMul"] == 1
        assert count_ops(fused)["Add"] == (
            2 if product_is_output else 1
        )  # biases fused only when they can be
        x = {"x": rng.standard_normal((3, 6)).astype(np.float32)}
        for want, got in zip(_session(model).run(outputs, x), _session(fused).run(outputs, x)):
            assert np.abs(got - want).max() <= 1e-5


def test_attention_to_mha_is_exact_on_the_step_graph(causal_export) -> None:
    """Every attention of the exported step graph becomes one MultiHeadAttention op; every output is the same
    (a batch of 2 conversations at different positions, several history lengths, masked past rows included)."""
    from cmath_export.rewrites import attention_to_mha

    plain = onnx.load(str(causal_export / "model.step.onnx"))
    rewritten, n = attention_to_mha(plain)
    onnx.checker.check_model(rewritten, full_check=True)
    ops, before = count_ops(rewritten), count_ops(plain)
    assert n == ops["MultiHeadAttention"] == 9  # t, a, v: each its self-attention and two cross-attentions
    assert (
        before.get("Transpose", 0) - ops.get("Transpose", 0) >= 4 * n and "MultiHeadAttention" not in before
    )
    a, b = _session(plain), _session(rewritten)
    rng = np.random.default_rng(0)
    for past in (0, 1, 6, 20):  # 0: a stream's first step
        feeds = {}
        for i in a.get_inputs():
            shape = [2 if d == "batch" else past if isinstance(d, str) else d for d in i.shape]
            feeds[i.name] = (
                np.array([past, past // 2], np.int64)
                if i.name == "position"
                else rng.integers(0, 3, shape)
                if i.type == "tensor(int64)"
                else rng.standard_normal(shape).astype(np.float32)
            )
        for name, x, y in zip([o.name for o in a.get_outputs()], a.run(None, feeds), b.run(None, feeds)):
            assert np.abs(x - y).max() <= 1e-6, (name, past)
    assert attention_to_mha(rewritten)[1] == 0  # nothing left to rewrite
