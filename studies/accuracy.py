"""The accuracy results page: runs of `cmath-train` side by side, written from their `metrics.json` files.

    python -m studies.accuracy --run "CMATH=runs/meld" --run "CMATH, causal (--causal)=runs/meld_causal" \\
        --title "MELD text, official splits" --out docs/results/meld_text

writes `meld_text.json` (the rows) and `meld_text.md` (the table). Each run gives its validation and test
weighted-F1 (mean +- std over seeds); after them come the baselines it measured on the same features: the
fine-tuned encoder's own classifier and the context-free logistic regression (each run's). The README's accuracy table is
rendered from the JSON (`python -m studies.readme`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import click

from cmath_runtime.errors import InputError
from cmath_runtime.files import atomic_open, atomic_write_json


@dataclass
class Row:
    model: str
    dev_wf1: float  # percent
    test_wf1: float
    dev_std: float | None = None  # None: one number, not a mean over seeds
    test_std: float | None = None
    seeds: int = 1


def rows_from_run(name: str, run: Path, baselines: bool, qualify: bool = False) -> list[Row]:
    """The run's row, then (with `baselines`) the baselines it measured on its features, named with the run's name
    when `qualify` (several runs on different features)."""
    path = run / "metrics.json"
    if not path.is_file():
        raise InputError("run", f"a cmath-train run directory with metrics.json ({path})", "no such file")
    m: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    spread = m.get("over_seeds", m)  # several seeds: mean +- std; one seed: the run's own numbers
    try:
        val, test = spread["validation"]["weighted_f1"], spread["test"]["weighted_f1"]
    except (KeyError, TypeError) as e:
        raise InputError(f"{path}", "validation and test weighted_f1", f"missing {e}") from None
    seeds = len(spread.get("per_seed") or [0])
    if isinstance(val, dict):
        rows = [Row(name, 100 * val["mean"], 100 * test["mean"], 100 * val["std"], 100 * test["std"], seeds)]
    else:
        rows = [Row(name, 100 * val, 100 * test)]
    if baselines:
        enc = m.get("encoder_classifier")
        if enc:
            rows.append(
                Row(
                    "the fine-tuned encoder's own classifier, no context model"
                    + (f" (beside {name})" if qualify else ""),
                    100 * enc["validation_weighted_f1"],
                    100 * enc["test_weighted_f1"],
                )
            )
        for modality, lr in (m.get("baseline_context_free") or {}).items():
            rows.append(
                Row(
                    f"context-free logistic regression ({modality})"
                    + (f" (beside {name})" if qualify else ""),
                    100 * lr["validation_weighted_f1"],
                    100 * lr["test_weighted_f1"],
                )
            )
    return rows


def _cell(mean: float, std: float | None) -> str:
    return f"{mean:.2f}" if std is None else f"{mean:.2f} +- {std:.2f}"


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| model | seeds | dev weighted-F1 | test weighted-F1 |", "|---|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['seeds']} | {_cell(r['dev_wf1'], r['dev_std'])} | "
            f"{_cell(r['test_wf1'], r['test_std'])} |"
        )
    return "\n".join(lines)


@click.command()
@click.option(
    "--run",
    "runs",
    multiple=True,
    required=True,
    metavar="NAME=RUN_DIR",
    help="A cmath-train run and the name of its row; each run's baselines follow the runs.",
)
@click.option("--title", required=True, help="What the runs were trained and scored on.")
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="Output path without suffix: OUT.json and OUT.md are written.",
)
def main(runs: tuple[str, ...], title: str, out: Path) -> None:
    rows: list[Row] = []
    baselines: list[Row] = []
    for spec in runs:
        name, sep, run = spec.partition("=")
        if not sep or not name or not run:
            raise click.BadParameter(f"expected NAME=RUN_DIR, got {spec!r}", param_hint="--run")
        try:
            found = rows_from_run(name, Path(run), baselines=True, qualify=len(runs) > 1)
            rows.append(found[0])
            baselines += found[1:]
        except InputError as e:
            raise click.ClickException(str(e)) from None
    data = {"title": title, "rows": [asdict(r) for r in rows + baselines]}
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out.with_suffix(".json"), data)
    with atomic_open(out.with_suffix(".md"), "w") as f:
        f.write(
            f"# {title}\n\nWritten by `python -m studies.accuracy` from the runs' metrics.json.\n\n"
            f"{table(data['rows'])}\n"
        )
    click.echo(table(data["rows"]))


if __name__ == "__main__":
    main()
