"""The mean-path graph: CMATH in eval mode as one ONNX function (features per modality, speaker, mask) -> probs, embedding.

Exported with the dynamo exporter, traced at batch 2 x 16 utterances with both axes declared dynamic (tracing at
batch 1 silently fixes the batch axis), with the exporter's graph optimisation on (constant folding, no
leftover Identity/Transpose-of-weight nodes), weights inside the one file.

The sinusoidal positions P (6-7) enter the graph as the model's own (max_len, d) fp32 table
(cmath_train.layers.SinusoidalPositions, a non-persistent buffer), looked up with a Gather, instead of
Range -> Mul -> Sin/Cos: in fp16 the angle `position * frequency` would be rounded to 0.25 rad near position 300
(and the frequencies themselves to 1e-3), blurring the positions of long conversations; table entries in [-1, 1]
lose at most 2.4e-4. `position_rows` sizes every table to max_len while exporting (at least the 16 rows the trace
needs), so positions past max_len fail in the Gather instead of silently computing something the artifact was
never checked for. Nothing is patched: the graph is the model's forward.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import onnx
import torch
from torch import Tensor, nn

from cmath_runtime.errors import ArtifactError, InputError
from cmath_train.config import ModelConfig
from cmath_train.layers import SinusoidalPositions

if TYPE_CHECKING:
    import onnx_ir

BATCH, UTTERANCES = "batch", "utterances"
TRACE_SHAPE = (2, 16)  # (batch, utterances) of the example inputs: both >= 2, so neither axis specialises
PROTOBUF_LIMIT = 2**31 - 1
ONNX_DTYPES = {
    onnx.TensorProto.FLOAT: "float32",
    onnx.TensorProto.INT64: "int64",
    onnx.TensorProto.BOOL: "bool",
    onnx.TensorProto.FLOAT16: "float16",
}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy name: float32, int64, bool
    shape: tuple[str | int, ...]  # "batch" / "utterances" are dynamic

    def to_json(self) -> dict:
        return {**asdict(self), "shape": list(self.shape)}


def model_config(model: nn.Module) -> ModelConfig:
    """The config a model was built with: every registered model, and the CDaT wrapper, carry it as `cfg`."""
    cfg = getattr(model, "cfg", None)
    if not isinstance(cfg, ModelConfig):
        raise InputError("model.cfg", "a ModelConfig (a model built by cmath_train)", type(cfg).__name__)
    return cfg


def io_specs(cfg: ModelConfig) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The graph's inputs and outputs, in order (docs/artifact-format.md)."""
    inputs = [TensorSpec(m, "float32", (BATCH, UTTERANCES, cfg.feature_dims[m])) for m in cfg.modalities]
    inputs += [
        TensorSpec("speaker", "int64", (BATCH, UTTERANCES)),
        TensorSpec("mask", "bool", (BATCH, UTTERANCES)),
    ]
    outputs = [
        TensorSpec("probs", "float32", (BATCH, UTTERANCES, cfg.num_classes)),
        TensorSpec("embedding", "float32", (BATCH, UTTERANCES, cfg.d)),
    ]
    return inputs, outputs


class MeanPathGraph(nn.Module):
    """CMATH's deterministic eval path: H'_x = mu_x, no sampling, no losses, no reconstruction decoder."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model.eval()
        self.modalities: tuple[str, ...] = tuple(model_config(model).modalities)

    def forward(self, *inputs: Tensor) -> tuple[Tensor, Tensor]:
        *features, speaker, mask = inputs  # (B, N, d_m) per modality, (B, N) int64, (B, N) bool
        out = self.model(dict(zip(self.modalities, features)), speaker, mask, reconstruct=False)
        return torch.softmax(out.logits, dim=-1), out.embedding  # (B, N, C), (B, N, d)


def example_inputs(cfg: ModelConfig, shape: tuple[int, int] = TRACE_SHAPE) -> tuple[Tensor, ...]:
    b, n = shape
    gen = torch.Generator().manual_seed(0)
    feats = tuple(torch.randn(b, n, cfg.feature_dims[m], generator=gen) for m in cfg.modalities)
    mask = torch.ones(b, n, dtype=torch.bool)
    mask[-1, n // 2 :] = False  # one right-padded conversation, like real batches
    speaker = torch.randint(0, cfg.num_speakers, (b, n), generator=gen) * mask
    return (*feats, speaker, mask)


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporter logs progress, 'torchvision is not installed' and axis-renaming notes: none concern users."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


@contextlib.contextmanager
def position_rows(model: nn.Module, max_len: int) -> Iterator[None]:
    """While exporting, every position table of the model has exactly max(max_len, trace length) rows (see the
    module docstring); restored afterwards. A model that reads no positions (encoder_head) has none to size; the
    runtime still refuses conversations longer than the manifest's max_len."""
    tables = [mod for mod in model.modules() if isinstance(mod, SinusoidalPositions)]
    before = [t.rows for t in tables]
    try:
        for t in tables:
            t.set_rows(max(max_len, TRACE_SHAPE[1]))
        yield
    finally:
        for t, rows in zip(tables, before):
            t.set_rows(rows)


def dynamo_export(
    module: nn.Module,
    example: tuple[Tensor, ...],
    dynamic: tuple[dict[int, Any], ...],
    opset: int,
    max_len: int,
) -> onnx_ir.Model:
    """`module` (a graph around a model) through the dynamo exporter: optimised, weights inside, quietly, with its
    position tables sized to max_len (position_rows)."""
    with _quiet_exporter(), torch.no_grad(), position_rows(module, max_len):
        program = torch.onnx.export(
            module,
            example,
            dynamo=True,
            dynamic_shapes=(dynamic,),
            opset_version=opset,
            optimize=True,
            external_data=False,
            verbose=False,
        )
    if program is None:  # only the legacy TorchScript exporter (dynamo=False) returns None
        raise ArtifactError(type(module).__name__, "the dynamo exporter returned no ONNX program")
    return program.model


def export_onnx(model: nn.Module, opset: int, max_len: int) -> onnx.ModelProto:
    """Export the mean path of a CMATH model; inputs and outputs named and typed as io_specs(model.cfg) says."""
    cfg = model_config(model)
    inputs, outputs = io_specs(cfg)
    graph = MeanPathGraph(model).eval()
    batch, utterances = torch.export.Dim(BATCH), torch.export.Dim(UTTERANCES)
    dynamic = tuple({0: batch, 1: utterances} for _ in inputs)
    ir_model = dynamo_export(graph, example_inputs(cfg), dynamic, opset, max_len)
    _rename_io(ir_model.graph, [s.name for s in inputs], [s.name for s in outputs])
    size = sum(
        v.const_value.nbytes for v in ir_model.graph.initializers.values() if v.const_value is not None
    )
    if size > PROTOBUF_LIMIT:
        raise ArtifactError(
            "model.onnx",
            f"weights take {size / 2**30:.1f} GiB, over protobuf's 2 GiB limit for "
            "a single-file ONNX model; this exporter writes single files only",
        )
    import onnx_ir

    proto = onnx_ir.serde.serialize_model(ir_model)
    check_io(proto, inputs, outputs, "model.onnx")
    return proto


def _rename_io(graph: onnx_ir.Graph, inputs: list[str], outputs: list[str]) -> None:
    """Give graph inputs/outputs the contract's names; internal values that already carry one (the speaker
    lookup is called 'embedding' by the exporter) are renamed first, so every name stays unique."""
    io_values = {id(v) for v in [*graph.inputs, *graph.outputs]}
    wanted = set(inputs) | set(outputs)
    for node in graph:
        for value in node.outputs:
            if value.name in wanted and id(value) not in io_values:
                value.name = f"{value.name}__internal"
    for value in graph.initializers.values():
        if value.name in wanted:
            raise ArtifactError(
                "model.onnx", f"a weight is named {value.name!r}, like a graph input or output"
            )
    if len(graph.inputs) != len(inputs) or len(graph.outputs) != len(outputs):
        raise ArtifactError(
            "model.onnx",
            f"exported graph has {len(graph.inputs)} inputs and {len(graph.outputs)} "
            f"outputs, expected {len(inputs)} and {len(outputs)}",
        )
    for value, name in zip([*graph.inputs, *graph.outputs], [*inputs, *outputs]):
        value.name = name


def _dims(value_info: onnx.ValueInfoProto) -> tuple[str | int, ...]:
    return tuple(d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim)


def check_io(proto: onnx.ModelProto, inputs: list[TensorSpec], outputs: list[TensorSpec], where: str) -> None:
    """The graph's inputs/outputs are exactly the specs: names, order, dtypes, and batch/utterance axes dynamic."""
    for kind, got, want in (("input", proto.graph.input, inputs), ("output", proto.graph.output, outputs)):
        actual = [
            TensorSpec(
                v.name,
                ONNX_DTYPES.get(v.type.tensor_type.elem_type, str(v.type.tensor_type.elem_type)),
                _dims(v),
            )
            for v in got
        ]
        if actual != list(want):
            raise ArtifactError(
                where,
                f"graph {kind}s {[s.to_json() for s in actual]} differ from the contract "
                f"{[s.to_json() for s in want]}",
            )
