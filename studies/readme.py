"""Writes the README's generated tables from their one source each, between marker comments:

- `formats`: the export format table (`cmath_export.formats.format_table`, also `cmath-export --list-formats`);
- `accuracy`: `docs/results/meld_text.json` (written by `python -m studies.accuracy`);
- `speed`: `docs/bench/bench.json` (written by `cmath-bench`), batch 1 at 1, 10 and 50 utterances.

    python -m studies.readme            # rewrite README.md's blocks
    python -m studies.readme --check    # exit 1 if a block is not what its source says (the tests run this)
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from cmath_export.formats import format_table
from cmath_runtime.files import atomic_open
from studies.accuracy import table as accuracy_table

ROOT = Path(__file__).resolve().parent.parent
SPEED_LENGTHS = (1, 10, 50)
SPEED_CONTENDERS = (
    ("pytorch-eager", "fp32"),
    ("torch-compile", "fp32"),
    ("onnxruntime", "fp32"),
    ("openvino", "fp32"),
    ("onnxruntime", "int8"),
    ("openvino", "bf16"),
)


def speed_table(records: list[dict[str, Any]]) -> str:
    """p50 ms (speed-up vs PyTorch eager) per contender and length, and each p50 as a multiple of its floor."""
    latency = {
        (r["backend"], r["precision"], r["utterances"]): r
        for r in records
        if r.get("kind") == "latency" and r.get("batch") == 1
    }
    head = " | ".join(f"{n} utt. p50 ms" for n in SPEED_LENGTHS)
    machine = latency.get(("onnxruntime", "fp32", SPEED_LENGTHS[0]), {})
    lines = [
        f"Measured on {machine.get('cpu', 'an unrecorded CPU')} (ISA class {machine.get('isa', 'unrecorded')}), "
        f"{machine.get('cores', '?')} cores, {(machine.get('threads') or {}).get('ort_intra_op', '?')} threads.",
        "",
        f"| engine | precision | {head} | x floor at {SPEED_LENGTHS[-1]} |",
        "|---|---|" + "---:|" * (len(SPEED_LENGTHS) + 1),
    ]
    for backend, precision in SPEED_CONTENDERS:
        cells = []
        for n in SPEED_LENGTHS:
            r = latency.get((backend, precision, n))
            if r is None:
                cells.append("-")
                continue
            speed = r.get("speedup_vs_eager")
            cells.append(
                f"{r['p50_ms']:.2f}" + (f" ({speed:.2f}x)" if speed and backend != "pytorch-eager" else "")
            )
        if all(c == "-" for c in cells):
            continue
        last = latency.get((backend, precision, SPEED_LENGTHS[-1]), {})
        floor = f"{last['latency_x_floor']:.1f}" if last.get("latency_x_floor") else "-"
        lines.append(f"| {backend} | {precision} | " + " | ".join(cells) + f" | {floor} |")
    return "\n".join(lines)


def _accuracy(root: Path) -> str:
    return accuracy_table(
        json.loads((root / "docs/results/meld_text.json").read_text(encoding="utf-8"))["rows"]
    )


def _speed(root: Path) -> str:
    return speed_table(json.loads((root / "docs/bench/bench.json").read_text(encoding="utf-8")))


BLOCKS: dict[str, Callable[[Path], str]] = {
    "formats": lambda _root: format_table(),
    "accuracy": _accuracy,
    "speed": _speed,
}


def render(text: str, root: Path) -> str:
    """`text` with every block between `<!-- NAME:begin ... -->` and `<!-- NAME:end -->` regenerated."""
    for name, make in BLOCKS.items():
        pattern = re.compile(rf"(<!-- {name}:begin[^>]*-->\n)(.*?)(<!-- {name}:end -->)", re.S)
        if not pattern.search(text):
            raise click.ClickException(f"README.md: no <!-- {name}:begin --> ... <!-- {name}:end --> block")
        table = make(root)
        text = pattern.sub(lambda m, t=table: f"{m.group(1)}{t}\n{m.group(3)}", text)
    return text


@click.command()
@click.option("--check", is_flag=True, help="Do not write; exit 1 if README.md is out of date.")
@click.option(
    "--readme",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=ROOT / "README.md",
    show_default=True,
)
def main(check: bool, readme: Path) -> None:
    old = readme.read_text(encoding="utf-8")
    new = render(old, ROOT)
    if check:
        if new != old:
            raise click.ClickException(
                f"{readme}: generated tables are out of date; run `python -m studies.readme`"
            )
        click.echo(f"{readme}: generated tables up to date")
        return
    with atomic_open(readme, "w") as f:
        f.write(new)
    click.echo(f"{readme}: {', '.join(BLOCKS)} tables written")


if __name__ == "__main__":
    main()
