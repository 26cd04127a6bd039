"""Parity of an artifact against PyTorch eval, with the runtime's one comparator (cmath_runtime/compare.py).

Per output: max / mean / p99 of the absolute and relative error over real (unpadded) rows, the tolerance,
PASSED/FAILED. Any NaN/inf anywhere in an output (padded rows included) is a failure. Relative error is
|got - ref| / (|ref| + 1e-6). The fused prediction also reports its argmax agreement.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from cmath_runtime.compare import OutputComparison, ParityReport, max_abs
from cmath_runtime.compare import compare as compare_outputs

from .graph import model_config
from .parity_data import Feeds, ParityData

Outputs = dict[str, np.ndarray]  # "probs" (B, N, C), "embedding" (B, N, d)
__all__ = [
    "Bounds",
    "BOUNDS",
    "OutputComparison",
    "ParityReport",
    "torch_outputs",
    "onnx_outputs",
    "compare",
    "check_parity",
]


@dataclass(frozen=True)
class Bounds:
    """What an artifact must meet. None = reported, not enforced."""

    probs_max_abs: float
    embedding_max_abs: float | None = None
    min_argmax_agreement: float | None = None


# What each artifact must meet against PyTorch on the run's validation rows: fp32 is the same arithmetic (only
# rounding differs); fp16 and int8 change the numbers, so the argmax must agree on 99.5% of the rows.
BOUNDS = {
    "fp32": Bounds(probs_max_abs=1e-4, embedding_max_abs=1e-3),
    "fp16": Bounds(probs_max_abs=1e-2, min_argmax_agreement=0.995),
    "int8": Bounds(probs_max_abs=3e-2, min_argmax_agreement=0.995),
}


@torch.no_grad()
def torch_outputs(model: torch.nn.Module, batches: Sequence[Feeds], threads: int = 1) -> list[Outputs]:
    """PyTorch eval (the mean path) on each batch: the reference. One thread by default: the batches are small,
    and on a shared machine two spinning OpenMP threads measured 7x slower than one (10 s vs 1.4 s CPU)."""
    model.eval()
    mods = model_config(model).modalities
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = []
        for feeds in batches:
            res = model(
                {m: torch.from_numpy(feeds[m]) for m in mods},
                torch.from_numpy(feeds["speaker"]),
                torch.from_numpy(feeds["mask"]),
                reconstruct=False,
            )
            out.append({"probs": torch.softmax(res.logits, -1).numpy(), "embedding": res.embedding.numpy()})
        return out
    finally:
        torch.set_num_threads(before)


def onnx_outputs(path: str, batches: Sequence[Feeds], threads: int = 1) -> tuple[list[Outputs], str]:
    """Run an ONNX file in onnxruntime's CPU provider on each batch; -> (outputs, the runtime in words)."""
    import onnxruntime as ort

    from cmath_runtime.session import open_session

    info = open_session(path, "cpu", threads=threads, what="exported model")
    names = [o.name for o in info.session.get_outputs()]
    out = [dict(zip(names, info.session.run(None, dict(feeds)))) for feeds in batches]
    return out, f"onnxruntime {ort.__version__} {info.providers[0]}"


def compare(
    artifact: str,
    data: ParityData,
    reference: list[Outputs],
    got: list[Outputs],
    bounds: Bounds,
    runtime: str,
    reference_name: str = "PyTorch eval (fp32, CPU)",
) -> ParityReport:
    """The runtime's comparator (cmath_runtime.compare) with this artifact's bounds, over the real rows."""
    checks = {"probs": max_abs(bounds.probs_max_abs), "embedding": max_abs(bounds.embedding_max_abs)}
    return compare_outputs(
        reference,
        got,
        checks,
        [feeds["mask"] for feeds in data.batches],
        "probs",
        bounds.min_argmax_agreement,
        artifact=artifact,
        reference_name=reference_name,
        runtime=runtime,
        data=data.source,
        conversations=data.conversations,
    )


def check_parity(
    artifact: str,
    data: ParityData,
    reference: list[Outputs],
    run: Callable[[Sequence[Feeds]], tuple[list[Outputs], str]],
    bounds: Bounds,
) -> ParityReport:
    got, runtime = run(data.batches)
    return compare(artifact, data, reference, got, bounds, runtime)
