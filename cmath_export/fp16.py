"""fp16 ONNX: fp16 weights and compute, fp32 inputs and outputs (callers change nothing).

Built with onnxruntime's converter (onnxconverter-common's produced invalid Cast types on attention graphs),
then three fixes:
- the input standardisation (x - mean) / std stays fp32: raw features can be large next to their spread
  (audio statistics ~1e3 with std ~1), so rounding x to fp16 first would cancel catastrophically, and a
  tiny std could overflow fp16; the standardised values (~N(0, 1)) are then cast to fp16;
- the converter's Cast(fp32 -> fp16) -> Cast(fp16 -> fp32) round trips around fp32 nodes are removed;
- nodes are re-sorted topologically (the converter appends its Casts at the end), and the value_info it writes
  for initializers (fp16 even for the fp32 mean/std kept above) is dropped: the initializers say their type.
The rest of the graph is fp16-friendly by construction: positions come from a table (graph.py), masked
attention scores are *replaced* by -1e4 (finite in fp16), never added to -1e9/-inf, so padded rows stay finite.
"""

from __future__ import annotations

import onnx

FP32, FP16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
STANDARDISE_OPS = ("Sub", "Div")


def convert_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    model = onnx.ModelProto.FromString(
        model.SerializeToString()
    )  # the converter must not touch the fp32 model
    drop_initializer_value_info(model.graph)
    half = convert_float_to_float16(
        model,
        keep_io_types=True,
        op_block_list=list(DEFAULT_OP_BLOCK_LIST),
        node_block_list=standardisation_nodes(model.graph),
    )
    drop_initializer_value_info(half.graph)
    topological_sort(half.graph)
    remove_cast_round_trips(half)
    remove_dead_nodes(half.graph)
    return half


def _consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    out: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            out.setdefault(name, []).append(node)
    return out


def standardisation_nodes(graph: onnx.GraphProto) -> list[str]:
    """The Sub -> Div chain applied to each float graph input: (x - mean) / std."""
    consumers, blocked = _consumers(graph), []
    for graph_input in graph.input:
        if graph_input.type.tensor_type.elem_type != FP32:
            continue
        frontier = [graph_input.name]
        for op in STANDARDISE_OPS:
            nodes = [n for name in frontier for n in consumers.get(name, []) if n.op_type == op]
            blocked += [n.name for n in nodes]
            frontier = [o for n in nodes for o in n.output]
    return blocked


def drop_initializer_value_info(graph: onnx.GraphProto) -> None:
    initializers = {t.name for t in graph.initializer}
    keep = [v for v in graph.value_info if v.name not in initializers]
    del graph.value_info[:]
    graph.value_info.extend(keep)


def remove_cast_round_trips(model: onnx.ModelProto) -> None:
    """Where x (fp32) -> Cast(fp16) -> Cast(fp32) feeds a node, feed it x itself: same graph, no rounding."""
    graph = model.graph
    inferred = onnx.shape_inference.infer_shapes(model)
    fp32 = {
        v.name
        for v in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]
        if v.type.tensor_type.elem_type == FP32
    } | {t.name for t in graph.initializer if t.data_type == FP32}
    producer = {o: n for n in graph.node for o in n.output}
    outputs = {o.name for o in graph.output}
    rename: dict[str, str] = {}
    for node in graph.node:
        if node.op_type != "Cast" or _cast_to(node) != FP32 or node.output[0] in outputs:
            continue
        first = producer.get(node.input[0])
        if (
            first is not None
            and first.op_type == "Cast"
            and _cast_to(first) == FP16
            and first.input[0] in fp32
        ):
            rename[node.output[0]] = first.input[0]
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]


def _cast_to(node: onnx.NodeProto) -> int:
    return next(a.i for a in node.attribute if a.name == "to")


def remove_dead_nodes(graph: onnx.GraphProto) -> None:
    """Drop nodes whose outputs nobody reads (the Casts left behind by remove_cast_round_trips)."""
    while True:
        used = {name for n in graph.node for name in n.input} | {o.name for o in graph.output}
        live = [n for n in graph.node if any(o in used for o in n.output)]
        if len(live) == len(graph.node):
            return
        del graph.node[:]
        graph.node.extend(live)


def topological_sort(graph: onnx.GraphProto) -> None:
    """Reorder nodes so each comes after the producers of its inputs."""
    ready = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        rest = []
        for node in pending:
            if all(i in ready for i in node.input):
                ordered.append(node)
                ready.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            raise ValueError(f"graph has a cycle or a missing input at node {rest[0].name!r}")
        pending = rest
    del graph.node[:]
    graph.node.extend(ordered)
