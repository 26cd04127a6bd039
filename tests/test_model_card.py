"""MODEL_CARD.md (cmath_export/model_card.py): written by every export from the run's own records; its numbers,
parsed back from the YAML front matter and from the Markdown tables, equal the run's metrics.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from cmath_export.model_card import CARD

SCORE_KEYS = ("accuracy", "weighted_f1", "macro_f1")


def read_card(export_dir: Path) -> tuple[dict[str, Any], str]:
    """(front matter, Markdown body) of the export's model card."""
    text = (export_dir / CARD).read_text(encoding="utf-8")
    assert text.startswith("---\n")
    head, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(head), body


def table_rows(body: str, section: str) -> list[list[str]]:
    """The cells of the first Markdown table under `## section` (header and rule left out)."""
    part = body.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in part.splitlines() if line.startswith("|")]
    return [[c.strip() for c in r.strip("|").split("|")] for r in rows[2:]]


def pct(x: float) -> str:
    return f"{100 * x:.2f}"


def assert_card_matches_metrics(export_dir: Path, run_dir: Path) -> dict[str, Any]:
    """Every score of the card equals metrics.json's: exactly in the front matter, to 2 decimals (percent) in the
    tables; the seeds, baselines and the shipped model as recorded. Returns metrics.json."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    manifest = json.loads((export_dir / "export.json").read_text())
    front, body = read_card(export_dir)
    shipped = metrics.get("shipped", "cmath")
    if shipped == "encoder_classifier":
        enc = metrics["encoder_classifier"]
        want = {s: {k: enc[f"{s}_{k}"] for k in ("accuracy", "weighted_f1")} for s in ("validation", "test")}
    else:
        want = {s: {k: metrics[s][k] for k in SCORE_KEYS} for s in ("validation", "test") if s in metrics}
    (entry,) = front["model-index"]
    assert entry["name"] == manifest["model_name"]
    got = {r["dataset"]["split"]: {m["type"]: m["value"] for m in r["metrics"]} for r in entry["results"]}
    assert got == want
    rows = {(r[0], r[1]): r[2:] for r in table_rows(body, "Scores")}
    for split, scores in want.items():
        assert rows[("shipped", split)] == [pct(scores[k]) if k in scores else "n/a" for k in SCORE_KEYS]
    for mod, base in (metrics.get("baseline_context_free") or {}).items():
        name = f"context-free logistic regression, {mod} (baseline)"
        assert rows[(name, "test")] == [pct(base["test_accuracy"]), pct(base["test_weighted_f1"]), "n/a"]
        assert rows[(name, "validation")][1] == pct(base["validation_weighted_f1"])
    spread = metrics.get("over_seeds")
    if spread:
        assert f"Seeds: {spread['seeds']}; the export holds seed {spread['selected']}" in body
        part = body.split("Over the seeds (mean +- std):", 1)[1]
        seed_rows = {
            r[0]: r[1:]
            for r in ([c.strip() for c in line.strip("|").split("|")] for line in part.splitlines()[4:])
            if r[0] in spread
        }
        for split in ("validation", "test"):
            if split in spread:
                assert seed_rows[split] == [
                    f"{pct(spread[split][k]['mean'])} +- {pct(spread[split][k]['std'])}" for k in SCORE_KEYS
                ]
    else:
        config = json.loads((run_dir / "config.json").read_text())
        assert f"Seeds: one training run, seed {config['train']['seed']}." in body
    files = {r[0]: r for r in table_rows(body, "Artifacts and their agreement records")}
    for key, art in manifest["artifacts"].items():
        assert files[art["file"]][1] == art["precision"]
        agreement = manifest["parity"][key]["argmax_agreement"]
        assert files[art["file"]][3] == f"{pct(agreement)}%"
    assert front["datasets"] and "## Intended use and limits" in body
    assert f"{len(manifest['label_names'])} labels: {', '.join(manifest['label_names'])}" in body
    return metrics


def test_every_shared_export_has_a_card_of_its_runs_numbers(
    tiny_export: tuple[Path, dict], causal_export: Path
) -> None:
    for export in (tiny_export[0], causal_export):
        assert_card_matches_metrics(export, export.parent)
        front, body = read_card(export)
        assert front["datasets"] == ["synthetic"]
        assert "predictions mean nothing on real conversations" in body
    assert "model.step.onnx" in (causal_export / CARD).read_text()


def test_text_run_card_names_its_encoder_data_and_twins(context_run: tuple[Path, Path]) -> None:
    _, export = context_run
    assert_card_matches_metrics(export, export.parent)
    front, body = read_card(export)
    manifest = json.loads((export / "export.json").read_text())
    assert front["pipeline_tag"] == "text-classification"
    assert f"`{manifest['text_encoder']['name']}`" in body
    assert "with up to 2 past turns" in body  # CONTEXT_TURNS
    files = {r[0]: r for r in table_rows(body, "Artifacts and their agreement records")}
    assert {"text_encoder.onnx", *(v["file"] for v in manifest["text_encoder"]["variants"].values())} <= set(
        files
    )
    assert "| train | train.csv |" in body and str(export.parent.parent) not in body  # file names, no paths
