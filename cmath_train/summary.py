"""The end-of-run summary `cmath-train` prints: the run's scores, the spread over seeds, the baselines, which model
ships and the decision rule, then a warning when context does not beat the context-free baseline."""

from __future__ import annotations

from pathlib import Path
from typing import Any

SPLITS = ("validation", "test")


def summary_text(metrics: dict[str, Any], out: Path, seconds: float) -> str:
    lines = [f"run: {out.resolve()}  ({seconds:.0f} s)"]
    spread = metrics.get("over_seeds") or {}
    if spread:
        lines.append(
            f"the run's model: seed {spread['selected']} of {spread['seeds']}, selected on validation"
        )
    for split in SPLITS:
        if split in metrics:
            m = metrics[split]
            lines.append(
                f"{split:10s} accuracy {100 * m['accuracy']:.2f}  weighted-F1 {100 * m['weighted_f1']:.2f}"
            )
    if spread:
        lines += _seed_lines(spread)
    lines += _baseline_lines(metrics)
    enc = metrics.get("encoder_classifier")
    if enc:
        lines += _encoder_lines(enc, metrics.get("shipped"), out)
    rule = metrics.get("decision_rule")
    if rule:
        lines.append(_decision_rule_line(rule))
    lines.extend(baseline_warnings(metrics))
    return "\n".join(lines)


def _seed_lines(spread: dict[str, Any]) -> list[str]:
    """Mean +- std over the seeds, the teachers of distilled students, the seeds' ensemble."""
    lines = [
        f"{split:10s} over seeds: accuracy {100 * s['accuracy']['mean']:.2f} +- "
        f"{100 * s['accuracy']['std']:.2f}  weighted-F1 {100 * s['weighted_f1']['mean']:.2f} +- "
        f"{100 * s['weighted_f1']['std']:.2f}"
        for split in SPLITS
        if split in spread
        for s in [spread[split]]
    ]
    if "distilled" in spread:
        t = spread["teachers"]
        parts = [
            f"{split} weighted-F1 {100 * t[split]['weighted_f1']['mean']:.2f} +- {100 * t[split]['weighted_f1']['std']:.2f}"
            for split in SPLITS
            if split in t
        ]
        lines.append(
            f"(the students are distilled from the seeds' ensemble, weight {spread['distilled']['weight']:g}; "
            "the seeds themselves: " + "  ".join(parts) + ")"
        )
    ens = spread.get("ensemble", {})
    if "test" in ens or "validation" in ens:
        parts = [
            f"{split} weighted-F1 {100 * ens[split]['weighted_f1']:.2f}" for split in SPLITS if split in ens
        ]
        lines.append(
            f"ensemble of the {len(ens['seeds'])} seeds (averaged probabilities, not the exported model): "
            + "  ".join(parts)
        )
    return lines


def _baseline_lines(metrics: dict[str, Any]) -> list[str]:
    lines = []
    for m, b in metrics.get("baseline_context_free", {}).items():
        test = (
            f"; test accuracy {100 * b['test_accuracy']:.2f}  weighted-F1 {100 * b['test_weighted_f1']:.2f}"
            if b.get("test_weighted_f1") is not None
            else ""
        )
        lines.append(
            f"context-free logistic regression ({m}): validation weighted-F1 "
            f"{100 * b['validation_weighted_f1']:.2f}{test}"
        )
    return lines


def _encoder_lines(enc: dict[str, Any], shipped: str | None, out: Path) -> list[str]:
    """The fine-tuned encoder's own classifier and which model the run ships."""
    from .shipped import CONTEXT_MODEL_DIR

    parts = [
        f"{split} weighted-F1 {100 * enc[f'{split}_weighted_f1']:.2f}"
        for split in SPLITS
        if f"{split}_weighted_f1" in enc
    ]
    return [
        "the fine-tuned encoder's own classifier (no context model): " + "  ".join(parts),
        "shipped: the trained model (it beats the encoder's classifier on validation)"
        if shipped == "cmath"
        else "shipped: the encoder's own classifier, better on validation than the trained model (context adds "
        f"nothing here as trained): {out.resolve()} holds it (model encoder_head), the trained model is in "
        f"{(out / CONTEXT_MODEL_DIR).resolve()}",
    ]


def _decision_rule_line(rule: dict[str, Any]) -> str:
    test = (
        f"; test {100 * rule['test_weighted_f1_before']:.2f} -> {100 * rule['test_weighted_f1_after']:.2f}"
        if rule.get("test_weighted_f1_after") is not None
        else ""
    )
    cross = rule.get("cross_fitted") or {}
    return (
        f"decision rule: {'offsets folded into the shipped model' if rule['applied'] else 'none'} ("
        + (
            f"validation halves {100 * cross['before']:.2f} -> {100 * cross['after']:.2f}"
            if cross
            else "validation too small to cut in halves"
        )
        + f"); the shipped model's weighted-F1: validation {100 * rule['validation_weighted_f1_before']:.2f} -> "
        f"{100 * rule['validation_weighted_f1_after']:.2f}{test}"
    )


def baseline_warnings(metrics: dict[str, Any]) -> list[str]:
    """A warning when the selected model is below the context-free baseline on validation (the split it was chosen on)."""
    val = metrics.get("validation", {}).get("weighted_f1")
    if val is None:
        return []
    out = []
    for m, b in metrics.get("baseline_context_free", {}).items():
        if b.get("validation_weighted_f1") is not None and val < b["validation_weighted_f1"]:
            out.append(
                f"WARNING: the selected model's validation weighted-F1 {100 * val:.2f} is below the context-free "
                f"logistic regression on {m!r} ({100 * b['validation_weighted_f1']:.2f}): conversation context "
                "does not help here as trained; try --tune N or another --preset"
            )
    return out
