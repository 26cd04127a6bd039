"""The one comparator (Polygraphy's CompareFunc / compare_accuracy): reference outputs vs an artifact's outputs.

`compare()` takes batches of outputs from both sides ({name: array with leading (batch, utterances) axes}), the
masks of the real rows, and one swappable check per output (`max_abs(tol)`, `min_cosine(bound)`, or your own
`CompareFunc`); it returns one `ParityReport`: per output max / mean / p99 of the absolute and relative error
over the real rows, the check and PASSED/FAILED, plus the argmax agreement of the class output. Any NaN/inf in
an artifact's output (padded rows included) is a failure.

Used for graph parity and step-graph parity at export time, the text encoder's cosine parity, and the benchmark's
agreement with PyTorch. numpy only.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

REL_EPS = 1e-6
Outputs = Mapping[str, np.ndarray]


@dataclass
class OutputComparison:
    name: str
    max_abs: float
    mean_abs: float
    p99_abs: float
    max_rel: float
    mean_rel: float
    p99_rel: float
    tolerance: float | None  # the check's bound; None = reported, not enforced
    nonfinite: int  # NaN/inf values in the artifact's output, padded rows included
    passed: bool
    check: str = "max_abs"  # what `tolerance` bounds: "max_abs" (<=) or "min_cosine" (>=)
    min_cosine: float | None = None  # row-wise cosine similarity, when the check is a cosine
    mean_cosine: float | None = None

    def line(self) -> str:
        if self.tolerance is None:
            tol = "report only"
        else:
            tol = (
                f"min cosine {self.min_cosine:.6f} >= {self.tolerance:g}"
                if self.check == "min_cosine"
                else (f"max_abs <= {self.tolerance:g}")
            )
        return (
            f"  {self.name:<10} abs max {self.max_abs:.3g} mean {self.mean_abs:.3g} p99 {self.p99_abs:.3g} | rel "
            f"max {self.max_rel:.3g} mean {self.mean_rel:.3g} p99 {self.p99_rel:.3g} | {tol}"
            f"{f' | {self.nonfinite} NaN/inf' if self.nonfinite else ''} | {'PASSED' if self.passed else 'FAILED'}"
        )


# A check: (output name, reference rows, artifact rows, non-finite count) -> the comparison of that output.
CompareFunc = Callable[[str, np.ndarray, np.ndarray, int], OutputComparison]


def max_abs(tolerance: float | None) -> CompareFunc:
    """Pass when max |got - ref| <= tolerance (None: report the errors, enforce nothing)."""

    def check(name: str, ref: np.ndarray, got: np.ndarray, nonfinite: int) -> OutputComparison:
        stats = error_stats(ref, got)
        ok = nonfinite == 0 and not np.isnan(stats[0]) and (tolerance is None or stats[0] <= tolerance)
        return OutputComparison(name, *stats, tolerance, nonfinite, bool(ok))

    return check


def min_cosine(bound: float) -> CompareFunc:
    """Pass when every row's cosine similarity with the reference is >= bound (embeddings)."""

    def check(name: str, ref: np.ndarray, got: np.ndarray, nonfinite: int) -> OutputComparison:
        stats = error_stats(ref, got)
        cos = cosines(got.reshape(len(got), -1), ref.reshape(len(ref), -1)) if len(ref) else np.ones(1)
        lo, mean = (float(cos.min()), float(cos.mean())) if np.isfinite(cos).all() else (float("nan"),) * 2
        ok = nonfinite == 0 and not np.isnan(lo) and lo >= bound
        return OutputComparison(name, *stats, bound, nonfinite, bool(ok), "min_cosine", lo, mean)

    return check


@dataclass
class ParityReport:
    artifact: str  # "fp32", "fp16", "tensorrt", "step", "text_encoder", ...
    reference: str
    runtime: str
    data: str
    conversations: int
    rows: int
    outputs: list[OutputComparison]
    argmax_agreement: float
    min_argmax_agreement: float | None
    padded_rows_finite: bool
    passed: bool
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)

    def output(self, name: str) -> OutputComparison:
        return next(o for o in self.outputs if o.name == name)

    def summary(self) -> str:
        """Polygraphy-style lines: one per output, then the verdict."""
        lines = [
            f"[{self.artifact}] {self.runtime} vs {self.reference} on {self.rows} rows "
            f"({self.conversations} conversations; {self.data})"
        ]
        lines += [o.line() for o in self.outputs]
        bound = "" if self.min_argmax_agreement is None else f" (>= {100 * self.min_argmax_agreement:g}%)"
        lines.append(
            f"  argmax agreement {100 * self.argmax_agreement:.2f}%{bound}; padded rows finite: "
            f"{self.padded_rows_finite}"
        )
        lines += [f"  note: {n}" for n in self.notes]
        lines.append(f"  {'PASSED' if self.passed else 'FAILED'}")
        return "\n".join(lines)


def compare(
    reference: Sequence[Outputs],
    got: Sequence[Outputs],
    checks: Mapping[str, CompareFunc],
    masks: Sequence[np.ndarray] | None = None,
    argmax: str | None = "probs",
    min_argmax_agreement: float | None = None,
    *,
    artifact: str = "artifact",
    reference_name: str = "reference",
    runtime: str = "artifact",
    data: str = "",
    conversations: int | None = None,
) -> ParityReport:
    """Compare batch by batch. masks[i] selects the real rows of batch i over the outputs' leading axes (None: all
    rows). `argmax` names the class output whose argmax agreement is reported (None: none)."""
    if len(reference) != len(got):
        raise ValueError(f"compare: {len(reference)} reference batches but {len(got)} artifact batches")
    if masks is None:
        masks = [np.ones(np.asarray(r[next(iter(checks))]).shape[:1], bool) for r in reference]
    outputs = []
    for name, check in checks.items():
        nonfinite = int(sum((~np.isfinite(np.asarray(g[name]))).sum() for g in got))
        ref_rows = _rows([r[name] for r in reference], masks)
        got_rows = _rows([g[name] for g in got], masks)
        outputs.append(check(name, ref_rows, got_rows, nonfinite))
    agreement = 1.0 if argmax is None else _argmax_agreement(reference, got, masks, argmax)
    padded_finite = _padded_rows_finite(got, masks)
    passed = (
        all(o.passed for o in outputs)
        and padded_finite
        and (min_argmax_agreement is None or agreement >= min_argmax_agreement)
    )
    rows = int(sum(int(np.asarray(m).sum()) for m in masks))
    convs = (
        conversations
        if conversations is not None
        else int(sum(np.asarray(m).reshape(len(m), -1).any(-1).sum() for m in masks))
    )
    return ParityReport(
        artifact,
        reference_name,
        runtime,
        data,
        convs,
        rows,
        outputs,
        agreement,
        min_argmax_agreement,
        padded_finite,
        passed,
    )


def _argmax_agreement(
    reference: Sequence[Outputs], got: Sequence[Outputs], masks: Sequence[np.ndarray], name: str
) -> float:
    """The share of real rows whose argmax of output `name` is the reference's (1.0 when there are none)."""
    ref_cls = _rows([r[name] for r in reference], masks).argmax(-1)
    got_cls = _rows([g[name] for g in got], masks).argmax(-1)
    return float((ref_cls == got_cls).mean()) if len(ref_cls) else 1.0


def _padded_rows_finite(got: Sequence[Outputs], masks: Sequence[np.ndarray]) -> bool:
    """Whether every padded row (outside its batch's mask) of every output shaped like the mask is finite."""
    return all(
        np.isfinite(np.asarray(g[k])[~m]).all()
        for g, m in zip(got, masks)
        for k in g
        if np.asarray(g[k]).shape[: m.ndim] == m.shape
    )


def error_stats(ref: np.ndarray, got: np.ndarray) -> tuple[float, float, float, float, float, float]:
    """max / mean / p99 of |got - ref|, then of |got - ref| / (|ref| + 1e-6); NaN when anything is non-finite."""
    r = np.asarray(ref, np.float64).ravel()
    g = np.asarray(got, np.float64).ravel()
    abs_err = np.abs(g - r)
    rel_err = abs_err / (np.abs(r) + REL_EPS)
    return (*_stats(abs_err), *_stats(rel_err))


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two (n, d) arrays."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    num = (a * b).sum(1)
    den = np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
    return num / den


def _rows(arrays: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> np.ndarray:
    parts = [np.asarray(x)[np.asarray(m, bool)] for x, m in zip(arrays, masks)]
    return np.concatenate(parts) if parts else np.zeros((0,))


def _stats(err: np.ndarray) -> tuple[float, float, float]:
    if err.size == 0:
        return 0.0, 0.0, 0.0
    if not np.isfinite(err).all():
        return float("nan"), float("nan"), float("nan")
    return float(err.max()), float(err.mean()), float(np.percentile(err, 99))
