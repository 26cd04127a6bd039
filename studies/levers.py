"""The accuracy levers of one data set, each scored on dev: written from the records cmath-prepare and cmath-train
leave (features meta, encoder_classifier.npz, metrics.json), never from a test score.

    python -m studies.levers --features data/meld --run "CMATH=runs/meld" \\
        --run "CMATH, causal=runs/meld-causal" --title "MELD text" --out docs/results/meld_levers

writes OUT.json and OUT.md: per encoder cmath-prepare fine-tuned (the whole-conversation one and its causal twin),
what it reads, whether it was distilled and its classifier's dev weighted-F1 per epoch; per run, the context
model's dev weighted-F1 over seeds against its encoder's classifier, and the decision rule's cross-fitted dev
halves. Test scores are reported by cmath-train once per final configuration; this page holds none.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
import numpy as np

from cmath_runtime.errors import InputError
from cmath_runtime.files import atomic_open, atomic_write_json
from cmath_train.data import CAUSAL_SUBDIR


def encoder_rows(features: Path) -> list[dict[str, Any]]:
    """One row per fine-tuned encoder in `features` (and its causal twin)."""
    rows = []
    for name, path in (("whole conversation", features), ("causal twin", features / CAUSAL_SUBDIR)):
        meta_path = path / "meta.json"
        if not meta_path.is_file():
            continue
        enc = json.loads(meta_path.read_text(encoding="utf-8"))["meta"].get("text_encoder") or {}
        ft = enc.get("finetune")
        if not ft:
            raise InputError("--features", "features from a fine-tuned encoder (cmath-prepare)", str(path))
        turns = enc.get("turns") or {}
        history = [h["dev_weighted_f1"] for h in ft["history"] if h.get("dev_weighted_f1") is not None]
        rows.append(
            {
                "encoder": name,
                "reads": f"{turns.get('window', 0)} past + {turns.get('future', 0)} future turns, "
                f"{turns.get('max_tokens')} tokens",
                "distilled": bool(ft.get("distilled_from")),
                "dev_per_epoch": [round(100 * h, 2) for h in history],
                "selected_epoch": ft["best_epoch"],
                "dev_wf1": round(100 * max(history), 2) if history else None,
            }
        )
    return rows


def run_row(name: str, run: Path) -> dict[str, Any]:
    path = run / "metrics.json"
    if not path.is_file():
        raise InputError("--run", f"a cmath-train run directory with metrics.json ({path})", "no such file")
    m = json.loads(path.read_text(encoding="utf-8"))
    seeds = ((m.get("over_seeds") or {}).get("per_seed") or {}).values()
    per_seed = [100 * s["validation"]["weighted_f1"] for s in seeds]
    per_seed = per_seed or [100 * m["validation"]["weighted_f1"]]
    rule = m.get("decision_rule") or {}
    cross = rule.get("cross_fitted") or {}
    enc = (m.get("encoder_classifier") or {}).get("validation_weighted_f1")
    return {
        "run": name,
        "seeds": len(per_seed),
        "dev_wf1": round(float(np.mean(per_seed)), 2),
        "dev_std": round(float(np.std(per_seed, ddof=1)) if len(per_seed) > 1 else 0.0, 2),
        "encoder_classifier_dev_wf1": None if enc is None else round(100 * enc, 2),
        "shipped": m.get("shipped"),
        "decision_rule": {
            "applied": rule.get("applied"),
            "halves_before": None if not cross else round(100 * cross["before"], 2),
            "halves_after": None if not cross else round(100 * cross["after"], 2),
        },
    }


def markdown(title: str, encoders: list[dict[str, Any]], runs: list[dict[str, Any]]) -> str:
    lines = [
        f"# {title}: the levers on dev",
        "",
        "Written by `python -m studies.levers` from the features' and runs' records; dev weighted-F1 (%) only.",
        "",
        "| encoder | reads | distilled from the whole-conversation encoder | dev per epoch | selected |",
        "|---|---|---|---|---:|",
    ]
    for e in encoders:
        epochs = ", ".join(f"{x:.2f}" for x in e["dev_per_epoch"])
        lines.append(
            f"| {e['encoder']} | {e['reads']} | {'yes' if e['distilled'] else 'no'} | {epochs} | "
            f"{e['dev_wf1']:.2f} (epoch {e['selected_epoch']}) |"
        )
    lines += [
        "",
        "| run | seeds | context model, dev | its encoder's classifier, dev | shipped | decision rule: dev halves |",
        "|---|---:|---:|---:|---|---|",
    ]
    for r in runs:
        rule = r["decision_rule"]
        halves = (
            f"{rule['halves_before']:.2f} -> {rule['halves_after']:.2f} "
            f"({'applied' if rule['applied'] else 'not applied'})"
            if rule["halves_before"] is not None
            else "-"
        )
        enc = "-" if r["encoder_classifier_dev_wf1"] is None else f"{r['encoder_classifier_dev_wf1']:.2f}"
        lines.append(
            f"| {r['run']} | {r['seeds']} | {r['dev_wf1']:.2f} +- {r['dev_std']:.2f} | {enc} | {r['shipped']} | "
            f"{halves} |"
        )
    return "\n".join(lines) + "\n"


@click.command()
@click.option("--features", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option(
    "--run", "runs", multiple=True, metavar="NAME=RUN_DIR", help="A cmath-train run on those features."
)
@click.option("--title", required=True)
@click.option(
    "--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="OUT.json and OUT.md."
)
def main(features: Path, runs: tuple[str, ...], title: str, out: Path) -> None:
    try:
        encoders = encoder_rows(features)
        run_rows = []
        for spec in runs:
            name, sep, run = spec.partition("=")
            if not sep or not name or not run:
                raise click.BadParameter(f"expected NAME=RUN_DIR, got {spec!r}", param_hint="--run")
            run_rows.append(run_row(name, Path(run)))
    except InputError as e:
        raise click.ClickException(str(e)) from None
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out.with_suffix(".json"), {"title": title, "encoders": encoders, "runs": run_rows})
    text = markdown(title, encoders, run_rows)
    with atomic_open(out.with_suffix(".md"), "w") as f:
        f.write(text)
    click.echo(text)


if __name__ == "__main__":
    main()
