"""Exact ONNX graph rewrites: the same arithmetic in a form a CPU engine runs faster or quantizes better.

Each returns a rewritten copy (the input is not modified); each output element is the same sum of the same
products, only the kernel's summation order may differ (measured max |diff| ~1e-7). Parity against PyTorch is
still checked by whoever writes the result (the step export, the int8 builder).

- `gemm_to_matmul`: Gemm with a constant weight -> MatMul + Add (onnxruntime's dynamic quantizer has no Gemm);
- `conv1d_to_matmul`: a 1-D Conv with a constant weight -> pad, k shifted windows, one MatMul (used by the int8
  schemes, and by the step graph, where the window is one row and the Conv becomes one GEMV);
- `fuse_shared_matmuls`: the MatMuls that read the same activation with constant weights -> one MatMul over the
  concatenated weights (+ one bias Add) and a Split. In the step graph every modality's hidden row feeds 9 such
  400 x 400 projections (Q/K/V of its self-attention, Q of its cross-attentions, K/V as the source of the
  others'); fused, the 27 small GEMVs become 3 of 400 x 3600.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx
from onnx import helper, numpy_helper


def gemm_to_matmul(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy where every Gemm(A, W, bias) with a constant W (alpha = beta = 1, transA = 0) is MatMul(A, W') + bias,
    W' = W transposed when transB: the same arithmetic, in the op onnxruntime's dynamic quantizer handles (the
    exporter writes linear layers on 2-D rows, as in the step graph, as Gemm; it has no integer Gemm)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    nodes = []
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if (
            node.op_type != "Gemm"
            or len(node.input) < 2
            or node.input[1] not in inits
            or attrs.get("transA", 0)
            or attrs.get("alpha", 1.0) != 1.0
            or attrs.get("beta", 1.0) != 1.0
        ):
            nodes.append(node)
            continue
        weight = numpy_helper.to_array(inits[node.input[1]])
        name = f"{node.input[1]}__matmul"
        if name not in inits:
            inits[name] = numpy_helper.from_array(
                np.ascontiguousarray(weight.T if attrs.get("transB", 0) else weight), name
            )
            graph.initializer.append(inits[name])
        has_bias = len(node.input) > 2 and node.input[2]
        product = f"{node.output[0]}__matmul" if has_bias else node.output[0]
        nodes.append(
            helper.make_node(
                "MatMul", [node.input[0], name], [product], name=f"{node.name or node.output[0]}__matmul"
            )
        )
        if has_bias:
            nodes.append(
                helper.make_node("Add", [product, node.input[2]], [node.output[0]], name=f"{node.name}__bias")
            )
    _set_nodes(graph, nodes)
    return model


def _set_nodes(graph: onnx.GraphProto, nodes: list[onnx.NodeProto]) -> None:
    """Replace the graph's nodes with `nodes` and drop the initializers no node (or graph output) uses any more."""
    used = {i for n in nodes for i in n.input} | {o.name for o in graph.output}
    keep = [t for t in graph.initializer if t.name in used]
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.initializer[:]
    graph.initializer.extend(keep)


def conv1d_to_matmul(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """(a copy, the names of the MatMuls made) where every 1-D Conv(X, W, bias) with a constant W (O, C, k), one
    group, stride and dilation 1, pads (l, r) runs as the same arithmetic in MatMul form: X (B, C, L) -> transpose (B, L, C) -> zero-pad l/r rows ->
    the k shifted windows concatenated (B, L', k*C) -> MatMul with W' (k*C, O), W'[j*C + c, o] = W[o, c, j] -> + bias
    -> transpose (B, O, L'). onnxruntime cancels the transposes against the exporter's own around the conv."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    nodes, made = [], []

    def constant(name: str, values: list[int]) -> str:
        graph.initializer.append(numpy_helper.from_array(np.asarray(values, np.int64), name))
        return name

    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        weight = (
            numpy_helper.to_array(inits[node.input[1]])
            if (node.op_type == "Conv" and len(node.input) > 1 and node.input[1] in inits)
            else None
        )
        if (
            weight is None
            or weight.ndim != 3
            or attrs.get("group", 1) != 1
            or attrs.get("auto_pad", b"NOTSET") != b"NOTSET"
            or list(attrs.get("strides", [1])) != [1]
            or list(attrs.get("dilations", [1])) != [1]
        ):
            nodes.append(node)
            continue
        out_ch, in_ch, k = weight.shape
        left, right = attrs.get("pads", [0, 0])
        p = f"{node.name or node.output[0]}__mm"
        graph.initializer.append(
            numpy_helper.from_array(
                np.ascontiguousarray(weight.transpose(2, 1, 0).reshape(k * in_ch, out_ch)), f"{p}_w"
            )
        )
        nodes += [
            helper.make_node("Transpose", [node.input[0]], [f"{p}_rows"], perm=[0, 2, 1], name=f"{p}_rows"),
            helper.make_node(
                "Pad",
                [f"{p}_rows", constant(f"{p}_pads", [0, left, 0, 0, right, 0])],
                [f"{p}_padded"],
                name=f"{p}_pad",
            ),
        ]
        axis = constant(f"{p}_axis", [1])
        for j in range(k):  # window j: rows j .. j + L' - 1, i.e. up to -(k - 1 - j) from the end
            end = -(k - 1 - j) if j < k - 1 else np.iinfo(np.int64).max
            nodes.append(
                helper.make_node(
                    "Slice",
                    [f"{p}_padded", constant(f"{p}_start{j}", [j]), constant(f"{p}_end{j}", [end]), axis],
                    [f"{p}_win{j}"],
                    name=f"{p}_win{j}",
                )
            )
        nodes.append(
            helper.make_node(
                "Concat", [f"{p}_win{j}" for j in range(k)], [f"{p}_cols"], axis=-1, name=f"{p}_cols"
            )
        )
        product = f"{p}_product"
        nodes.append(helper.make_node("MatMul", [f"{p}_cols", f"{p}_w"], [product], name=f"{p}_matmul"))
        made.append(f"{p}_matmul")
        if len(node.input) > 2 and node.input[2]:
            nodes.append(helper.make_node("Add", [product, node.input[2]], [f"{p}_biased"], name=f"{p}_bias"))
            product = f"{p}_biased"
        nodes.append(
            helper.make_node("Transpose", [product], [node.output[0]], perm=[0, 2, 1], name=f"{p}_out")
        )
    _set_nodes(graph, nodes)
    return model, made


def fuse_shared_matmuls(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """(a copy, how many MatMuls were fused) where every group of >= 2 MatMuls reading the same activation X with
    constant 2-D weights of the same row count runs as one: MatMul(X, [W1 | W2 | ...]) -> Split into their outputs.
    When each of them feeds exactly one Add with a constant 1-D bias, the biases are concatenated too (one Add
    before the Split) and the Split writes the Adds' outputs."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    groups: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    graph_outputs = {o.name for o in graph.output}
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)
        if node.op_type == "MatMul" and node.input[1] in inits and len(inits[node.input[1]].dims) == 2:
            groups[node.input[0]].append(node)
    replaced: dict[int, list[onnx.NodeProto]] = {}  # id(first node of a group) -> the fused nodes
    dropped: set[int] = set()
    fused = 0
    for x, matmuls in groups.items():
        weights = [numpy_helper.to_array(inits[n.input[1]]) for n in matmuls]
        if len(matmuls) < 2 or len({w.shape[0] for w in weights}) != 1:
            continue
        found = [_bias_add(n, consumers, inits, graph_outputs) for n in matmuls]
        biases = [b for b in found if b is not None]
        p = f"{matmuls[0].output[0]}__fused"  # value names are unique; node names need not be
        graph.initializer.append(numpy_helper.from_array(np.concatenate(weights, axis=1), f"{p}_w"))
        nodes = [helper.make_node("MatMul", [x, f"{p}_w"], [f"{p}_y"], name=f"{p}_matmul")]
        outputs, y = [n.output[0] for n in matmuls], f"{p}_y"
        if len(biases) == len(matmuls):
            graph.initializer.append(
                numpy_helper.from_array(
                    np.concatenate([numpy_helper.to_array(inits[bias]) for _, bias in biases]), f"{p}_b"
                )
            )
            nodes.append(helper.make_node("Add", [y, f"{p}_b"], [f"{p}_yb"], name=f"{p}_bias"))
            outputs, y = [add.output[0] for add, _ in biases], f"{p}_yb"
            dropped.update(id(add) for add, _ in biases)
        graph.initializer.append(
            numpy_helper.from_array(np.array([w.shape[1] for w in weights], np.int64), f"{p}_sizes")
        )
        nodes.append(helper.make_node("Split", [y, f"{p}_sizes"], outputs, axis=-1, name=f"{p}_split"))
        replaced[id(matmuls[0])] = nodes
        dropped.update(id(n) for n in matmuls[1:])
        fused += len(matmuls)
    out: list[onnx.NodeProto] = []
    for node in graph.node:
        if id(node) in replaced:
            out += replaced[id(node)]
        elif id(node) not in dropped:
            out.append(node)
    _set_nodes(graph, out)
    return model, fused


def _bias_add(
    matmul: onnx.NodeProto,
    consumers: dict[str, list[onnx.NodeProto]],
    inits: dict[str, onnx.TensorProto],
    graph_outputs: set[str],
) -> tuple[onnx.NodeProto, str] | None:
    """(the Add, its bias) when the MatMul's only use is an Add of a constant 1-D tensor of its width (its product
    is neither a graph output nor read anywhere else)."""
    users = consumers[matmul.output[0]]
    if matmul.output[0] in graph_outputs or len(users) != 1 or users[0].op_type != "Add":
        return None
    others = [i for i in users[0].input if i != matmul.output[0]]
    width = inits[matmul.input[1]].dims[1]
    if len(others) == 1 and others[0] in inits and list(inits[others[0]].dims) == [width]:
        return users[0], others[0]
    return None


def attention_to_mha(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:  # noqa: C901  (to split; pyproject's [tool.ruff.lint.mccabe])
    """(a copy, how many attentions were rewritten) where each attention of a step graph as our models export it

        q (B, 1, D), k, v (B, P+1, D) -> Reshape + Transpose to heads -> MatMul(q, k^T) -> Mul(scale)
        -> Where(masked, m, .) -> Softmax -> MatMul(., v) -> Transpose + Reshape (B, 1, D)

    runs as one com.microsoft.MultiHeadAttention(q, k, v, attention_bias = Where(masked, m, 0)): 12 nodes -> 1.
    onnxruntime only (OpenVINO cannot read the op), so only the int8 step graph, which onnxruntime alone runs, gets
    it: one fused kernel instead of a dozen small ops is where a one-row step spends its time; the full graph's
    attentions are large enough that the fusion gains nothing there. The head count is read from the graph (the
    constant head count of the k Reshape). The masked score m is added instead of replacing the score: with
    m <= -1e4 both give a masked key exactly zero weight in fp32 on a query row with an unmasked key, which a
    step's row always has (its own key), so the outputs are bit-identical. Exact only where every query row keeps an unmasked key: callers must guarantee it
    (the step graph's mask always allows the new row's own key). The mask (B, 1, 1, P+1) becomes a bias expanded
    over the heads, (B, h, 1, P+1): older onnxruntime (< 1.20) does not broadcast the bias over heads."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)
    graph_outputs = {o.name for o in graph.output}
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)

    def const(name: str) -> np.ndarray | None:
        if name in inits:
            return numpy_helper.to_array(inits[name])
        node = producer.get(name)
        if node is not None and node.op_type == "Constant":
            return numpy_helper.to_array(node.attribute[0].t) if node.attribute[0].name == "value" else None
        return None

    def made_by(name: str, op: str, perm: list[int] | None = None) -> onnx.NodeProto | None:
        node = producer.get(name)
        if node is None or node.op_type != op or name in graph_outputs or len(consumers[name]) != 1:
            return None
        if perm is not None and [list(a.ints) for a in node.attribute if a.name == "perm"] != [perm]:
            return None
        return node

    def only_user(name: str, op: str, perm: list[int] | None = None) -> onnx.NodeProto | None:
        users = consumers[name]
        if name in graph_outputs or len(users) != 1 or users[0].op_type != op:
            return None
        return (
            users[0]
            if perm is None or [list(a.ints) for a in users[0].attribute if a.name == "perm"] == [perm]
            else None
        )

    def heads_of(reshape: onnx.NodeProto) -> int | None:
        """The head count h of a Reshape to (B, n, h, d/h): its shape's second-to-last entry, when constant."""
        shape = const(reshape.input[1])
        if shape is not None and shape.size == 4:
            return int(shape[2])
        cat = producer.get(reshape.input[1])
        if cat is not None and cat.op_type == "Concat" and len(cat.input) == 4:
            part = const(cat.input[2])
            return int(part.reshape(-1)[0]) if part is not None and part.size == 1 else None
        return None

    biases: dict[tuple[str, float, int], str] = {}
    bias_nodes: dict[
        int | None, list[onnx.NodeProto]
    ] = {}  # id(the mask's producer; None: a graph input) -> nodes
    new_nodes: dict[int, list[onnx.NodeProto]] = {}  # id(the final Reshape) -> what replaces the attention
    dropped: set[int] = set()
    for softmax in graph.node:
        axis = {a.name: a.i for a in softmax.attribute}.get("axis", -1 if opset >= 13 else 1)
        if softmax.op_type != "Softmax" or axis not in (-1, 3):
            continue
        where = made_by(softmax.input[0], "Where")
        mul = where and made_by(where.input[2], "Mul")
        scale = mul and const(mul.input[1])
        scores = mul and made_by(mul.input[0], "MatMul")
        mask_value = where and const(where.input[1])
        users = consumers[softmax.output[0]]
        if not (
            scores
            and scale is not None
            and scale.size == 1
            and mask_value is not None
            and mask_value.size == 1
            and mask_value.reshape(-1)[0] <= -1e4
            and len(users) == 1
            and users[0].op_type == "MatMul"
            and users[0].input[0] == softmax.output[0]
            and softmax.output[0] not in graph_outputs
        ):
            continue
        weighted = users[0]
        tq, tk = (
            made_by(scores.input[0], "Transpose", [0, 2, 1, 3]),
            made_by(scores.input[1], "Transpose", [0, 2, 3, 1]),
        )
        tv = made_by(weighted.input[1], "Transpose", [0, 2, 1, 3])
        to = only_user(weighted.output[0], "Transpose", [0, 2, 1, 3])
        ro = to and only_user(to.output[0], "Reshape")
        rq, rk, rv = (t and producer.get(t.input[0]) for t in (tq, tk, tv))
        out_shape = ro and const(ro.input[1])  # back to (B, S, D): the op's own output layout
        if not (
            to
            and ro
            and out_shape is not None
            and out_shape.size == 3
            and all(
                r is not None and r.op_type == "Reshape" and r.output[0] not in graph_outputs
                for r in (rq, rk, rv)
            )
        ):
            continue
        heads = heads_of(rk)
        if heads is None or heads != heads_of(rq) or heads != heads_of(rv):
            continue
        mask, masked = where.input[0], float(mask_value.reshape(-1)[0])
        if (mask, masked, heads) not in biases:
            b = f"{mask}__attention_bias_{len(biases)}"
            graph.initializer.extend(
                [
                    numpy_helper.from_array(np.array(masked, np.float32), f"{b}_masked"),
                    numpy_helper.from_array(np.array(0.0, np.float32), f"{b}_zero"),
                    numpy_helper.from_array(np.array([1, heads, 1, 1], np.int64), f"{b}_heads"),
                ]
            )
            after = producer.get(
                mask
            )  # the bias is computed right after its mask, before any attention reads it
            bias_nodes.setdefault(id(after) if after is not None else None, []).extend(
                [
                    helper.make_node("Where", [mask, f"{b}_masked", f"{b}_zero"], [f"{b}_1"], name=f"{b}_1"),
                    helper.make_node("Expand", [f"{b}_1", f"{b}_heads"], [b], name=b),
                ]
            )  # (B, 1, 1, L) -> (B, h, 1, L)
            biases[(mask, masked, heads)] = b
        new_nodes[id(ro)] = [
            helper.make_node(
                "MultiHeadAttention",
                [rq.input[0], rk.input[0], rv.input[0], "", "", biases[(mask, masked, heads)]],
                [ro.output[0]],
                name=f"{ro.output[0]}__mha",
                domain="com.microsoft",
                num_heads=heads,
                scale=float(scale.reshape(-1)[0]),
            )
        ]
        dropped.update(id(n) for n in (tq, tk, tv, scores, mul, where, softmax, weighted, to))
        dropped.update(id(r) for r in (rq, rk, rv) if len(consumers[r.output[0]]) == 1)
    if not new_nodes:
        return model, 0
    out: list[onnx.NodeProto] = list(bias_nodes.get(None, []))
    for node in graph.node:
        if id(node) in new_nodes:
            out += new_nodes[id(node)]
        elif id(node) not in dropped:
            out.append(node)
        out += bias_nodes.get(id(node), [])
    _set_nodes(graph, out)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return model, len(new_nodes)
