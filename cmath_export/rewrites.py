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
from dataclasses import dataclass

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
    for node in graph.node:
        weight = _plain_conv1d_weight(node, inits)
        if weight is None:
            nodes.append(node)
            continue
        replacement, matmul = _conv1d_as_matmul(graph, node, weight)
        nodes += replacement
        made.append(matmul)
    _set_nodes(graph, nodes)
    return model, made


def _plain_conv1d_weight(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> np.ndarray | None:
    """The constant (O, C, k) weight of a 1-D Conv that conv1d_to_matmul rewrites (one group, explicit pads,
    stride and dilation 1); None for any other node."""
    if node.op_type != "Conv" or len(node.input) < 2 or node.input[1] not in inits:
        return None
    weight = numpy_helper.to_array(inits[node.input[1]])
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if (
        weight.ndim != 3
        or attrs.get("group", 1) != 1
        or attrs.get("auto_pad", b"NOTSET") != b"NOTSET"
        or list(attrs.get("strides", [1])) != [1]
        or list(attrs.get("dilations", [1])) != [1]
    ):
        return None
    return weight


def _conv1d_as_matmul(
    graph: onnx.GraphProto, node: onnx.NodeProto, weight: np.ndarray
) -> tuple[list[onnx.NodeProto], str]:
    """The nodes that compute the Conv `node` in MatMul form (conv1d_to_matmul's docstring), and the MatMul's name;
    its constants are added to the graph's initializers."""
    out_ch, in_ch, k = weight.shape
    pads = {a.name: helper.get_attribute_value(a) for a in node.attribute}.get("pads", [0, 0])
    left, right = pads
    p = f"{node.name or node.output[0]}__mm"

    def constant(name: str, values: list[int]) -> str:
        graph.initializer.append(numpy_helper.from_array(np.asarray(values, np.int64), name))
        return name

    graph.initializer.append(
        numpy_helper.from_array(
            np.ascontiguousarray(weight.transpose(2, 1, 0).reshape(k * in_ch, out_ch)), f"{p}_w"
        )
    )
    nodes = [
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
    if len(node.input) > 2 and node.input[2]:
        nodes.append(helper.make_node("Add", [product, node.input[2]], [f"{p}_biased"], name=f"{p}_bias"))
        product = f"{p}_biased"
    nodes.append(helper.make_node("Transpose", [product], [node.output[0]], perm=[0, 2, 1], name=f"{p}_out"))
    return nodes, f"{p}_matmul"


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


def attention_to_mha(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
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
    index = _GraphIndex(graph)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    biases: dict[tuple[str, float, int], str] = {}  # (mask, masked score, heads) -> the bias value
    bias_nodes: dict[
        int | None, list[onnx.NodeProto]
    ] = {}  # id(the mask's producer; None: a graph input) -> nodes
    new_nodes: dict[int, list[onnx.NodeProto]] = {}  # id(the final Reshape) -> what replaces the attention
    dropped: set[int] = set()
    for softmax in graph.node:
        found = _match_attention(index, softmax, opset)
        if found is None:
            continue
        key = (found.mask, found.masked, found.heads)
        if key not in biases:
            biases[key] = _attention_bias(graph, index, key, len(biases), bias_nodes)
        new_nodes[id(found.output)] = [_mha_node(found, biases[key])]
        dropped.update(id(n) for n in found.replaced)
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


class _GraphIndex:
    """Lookups over a graph as it was read: the node that makes each value, the nodes that read it, constants."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.inits = {t.name: t for t in graph.initializer}
        self.producer = {o: n for n in graph.node for o in n.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in graph.node:
            for name in node.input:
                self.consumers[name].append(node)
        self.outputs = {o.name for o in graph.output}

    def const(self, name: str) -> np.ndarray | None:
        """The value of an initializer or a Constant node's output; None for a computed value."""
        if name in self.inits:
            return numpy_helper.to_array(self.inits[name])
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            return numpy_helper.to_array(node.attribute[0].t) if node.attribute[0].name == "value" else None
        return None

    def made_by(self, name: str, op: str, perm: list[int] | None = None) -> onnx.NodeProto | None:
        """The `op` node (Transpose: with permutation `perm`) that makes `name`, when nothing else reads `name`."""
        node = self.producer.get(name)
        if node is None or node.op_type != op or name in self.outputs or len(self.consumers[name]) != 1:
            return None
        if perm is not None and _perms(node) != [perm]:
            return None
        return node

    def only_user(self, name: str, op: str, perm: list[int] | None = None) -> onnx.NodeProto | None:
        """The one node that reads `name`, when it is an `op` node (Transpose: with permutation `perm`)."""
        users = self.consumers[name]
        if name in self.outputs or len(users) != 1 or users[0].op_type != op:
            return None
        return users[0] if perm is None or _perms(users[0]) == [perm] else None

    def heads_of(self, reshape: onnx.NodeProto) -> int | None:
        """The head count h of a Reshape to (B, n, h, d/h): its shape's second-to-last entry, when constant."""
        shape = self.const(reshape.input[1])
        if shape is not None and shape.size == 4:
            return int(shape[2])
        cat = self.producer.get(reshape.input[1])
        if cat is not None and cat.op_type == "Concat" and len(cat.input) == 4:
            part = self.const(cat.input[2])
            return int(part.reshape(-1)[0]) if part is not None and part.size == 1 else None
        return None


def _perms(node: onnx.NodeProto) -> list[list[int]]:
    return [list(a.ints) for a in node.attribute if a.name == "perm"]


def _scalar(value: np.ndarray | None) -> float | None:
    """A one-element constant as a float; None for anything else."""
    return float(value.reshape(-1)[0]) if value is not None and value.size == 1 else None


@dataclass(frozen=True)
class _Attention:
    """One attention of the form attention_to_mha rewrites: what MultiHeadAttention reads, the node whose output
    it writes, and the nodes it replaces."""

    q: str  # (B, S, D) inputs of the head Reshapes
    k: str
    v: str
    mask: str  # the boolean mask the Where reads (True: masked)
    masked: float  # the score a masked key gets
    scale: float
    heads: int
    output: onnx.NodeProto  # the Reshape back to (B, S, D): the op writes its output
    replaced: tuple[onnx.NodeProto, ...]  # the other nodes it replaces


@dataclass(frozen=True)
class _Scores:
    """The score half of an attention: MatMul(q, k^T) -> Mul(scale) -> Where(mask, masked, .) -> Softmax -> MatMul(., v)."""

    scores: onnx.NodeProto
    mul: onnx.NodeProto
    where: onnx.NodeProto
    softmax: onnx.NodeProto
    weighted: onnx.NodeProto
    scale: float
    masked: float


def _match_scores(index: _GraphIndex, softmax: onnx.NodeProto, opset: int) -> _Scores | None:
    """The score chain around a Softmax over the keys, when every value in it has one reader, the scale and the
    masked score are constant scalars, and the masked score is <= -1e4 (attention_to_mha's exactness)."""
    axis = {a.name: a.i for a in softmax.attribute}.get("axis", -1 if opset >= 13 else 1)
    if softmax.op_type != "Softmax" or axis not in (-1, 3):
        return None
    where = index.made_by(softmax.input[0], "Where")
    mul = where and index.made_by(where.input[2], "Mul")
    scores = mul and index.made_by(mul.input[0], "MatMul")
    if where is None or mul is None or scores is None:
        return None
    scale, masked = _scalar(index.const(mul.input[1])), _scalar(index.const(where.input[1]))
    users = index.consumers[softmax.output[0]]
    if (
        scale is None
        or masked is None
        or not masked <= -1e4  # (NaN is not <= -1e4 either)
        or len(users) != 1
        or users[0].op_type != "MatMul"
        or users[0].input[0] != softmax.output[0]
        or softmax.output[0] in index.outputs
    ):
        return None
    return _Scores(scores, mul, where, softmax, users[0], scale, masked)


def _match_attention(index: _GraphIndex, softmax: onnx.NodeProto, opset: int) -> _Attention | None:
    """The attention around `softmax` in the form attention_to_mha rewrites: its score chain (_match_scores), q, k
    and v reshaped and transposed to heads (the same constant head count) and the result transposed and reshaped
    back to (B, S, D); None when any part differs."""
    found = _match_scores(index, softmax, opset)
    if found is None:
        return None
    tq = index.made_by(found.scores.input[0], "Transpose", [0, 2, 1, 3])
    tk = index.made_by(found.scores.input[1], "Transpose", [0, 2, 3, 1])
    tv = index.made_by(found.weighted.input[1], "Transpose", [0, 2, 1, 3])
    to = index.only_user(found.weighted.output[0], "Transpose", [0, 2, 1, 3])
    ro = to and index.only_user(to.output[0], "Reshape")
    if tq is None or tk is None or tv is None or to is None or ro is None:
        return None
    rq, rk, rv = (index.producer.get(t.input[0]) for t in (tq, tk, tv))
    out_shape = index.const(ro.input[1])  # back to (B, S, D): the op's own output layout
    if out_shape is None or out_shape.size != 3:
        return None
    if rq is None or rk is None or rv is None:
        return None
    if any(r.op_type != "Reshape" or r.output[0] in index.outputs for r in (rq, rk, rv)):
        return None
    heads = index.heads_of(rk)
    if heads is None or heads != index.heads_of(rq) or heads != index.heads_of(rv):
        return None
    shared = tuple(r for r in (rq, rk, rv) if len(index.consumers[r.output[0]]) == 1)  # read by nothing else
    return _Attention(
        q=rq.input[0],
        k=rk.input[0],
        v=rv.input[0],
        mask=found.where.input[0],
        masked=found.masked,
        scale=found.scale,
        heads=heads,
        output=ro,
        replaced=(
            tq,
            tk,
            tv,
            found.scores,
            found.mul,
            found.where,
            found.softmax,
            found.weighted,
            to,
            *shared,
        ),
    )


def _attention_bias(
    graph: onnx.GraphProto,
    index: _GraphIndex,
    key: tuple[str, float, int],
    number: int,
    bias_nodes: dict[int | None, list[onnx.NodeProto]],
) -> str:
    """The attention bias of one (mask, masked score, heads): Where(mask, masked, 0) expanded over the heads,
    (B, 1, 1, L) -> (B, h, 1, L); its constants join the graph's initializers and its two nodes `bias_nodes`,
    under the mask's producer (None: a graph input), so the bias is computed right after its mask, before any
    attention reads it. Returns the bias's name."""
    mask, masked, heads = key
    b = f"{mask}__attention_bias_{number}"
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.array(masked, np.float32), f"{b}_masked"),
            numpy_helper.from_array(np.array(0.0, np.float32), f"{b}_zero"),
            numpy_helper.from_array(np.array([1, heads, 1, 1], np.int64), f"{b}_heads"),
        ]
    )
    after = index.producer.get(mask)
    bias_nodes.setdefault(id(after) if after is not None else None, []).extend(
        [
            helper.make_node("Where", [mask, f"{b}_masked", f"{b}_zero"], [f"{b}_1"], name=f"{b}_1"),
            helper.make_node("Expand", [f"{b}_1", f"{b}_heads"], [b], name=b),
        ]
    )
    return b


def _mha_node(found: _Attention, bias: str) -> onnx.NodeProto:
    out = found.output.output[0]
    return helper.make_node(
        "MultiHeadAttention",
        [found.q, found.k, found.v, "", "", bias],
        [out],
        name=f"{out}__mha",
        domain="com.microsoft",
        num_heads=found.heads,
        scale=found.scale,
    )
