"""`cmath-bench RUN_DIR [--out DIR] [--quick]`: PyTorch eager, torch.compile and the runtime on one checkpoint."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import click

from cmath_runtime.errors import CmathError

from . import backends


def ensure_export(run_dir: Path) -> Path:
    """The run's export folder; exports the run (fp32 + fp16) with cmath_export when it has none yet."""
    export_dir = run_dir / "export"
    if (export_dir / "export.json").is_file():
        return export_dir
    try:
        from cmath_export import export_run
    except ImportError as e:
        raise click.ClickException(
            f"{run_dir} has no export/export.json and cmath_export.export_run is not "
            f"available ({e}); export the run first with `cmath-export {run_dir} --fp16`"
        ) from None
    click.echo(f"exporting {run_dir} (fp32 + fp16) ...")
    export_run(run_dir, fp16=True)
    return export_dir


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where bench.json, bench.md and bench_latency.png go (default: RUN_DIR).",
)
@click.option("--quick", is_flag=True, help="Few lengths and iterations (tests, CI).")
@click.option(
    "--threads", type=int, default=None, help="Threads for every contender (default: the cores available)."
)
@click.option(
    "--backends",
    "only",
    default=None,
    help=f"Comma-separated NAME or NAME:PRECISION from {', '.join(backends.KNOWN)} (default: all but PyTorch on "
    "CUDA; GPU ones skip with a reason where there is none).",
)
@click.option(
    "--lengths",
    default=None,
    help="Comma-separated conversation lengths for latency and streaming, "
    "e.g. 1,10,50 (default: the full sweep; --quick: 1,5,20).",
)
@click.option(
    "--texts",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="Folder with MELD's dev_sent_emo.csv: real dialogues for the raw-text benchmark of an export with a text "
    "encoder (default: the export's probe texts).",
)
@click.option(
    "--text-parity",
    type=click.IntRange(min=0),
    default=0,
    help="Also replay N dev dialogues of --texts utterance by utterance against the PyTorch pipeline.",
)
@click.option(
    "--frozen-encoder",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="Plain sentence-transformers folder timed beside the fine-tuned encoder (default: the bundled one).",
)
def main(
    run_dir: Path,
    out_dir: Path | None,
    quick: bool,
    threads: int | None,
    only: str | None,
    lengths: str | None,
    texts: Path | None,
    text_parity: int,
    frozen_encoder: Path | None,
) -> None:
    """Benchmark a trained run: latency at batch 1 over conversation lengths, throughput at batch 16, load time and
    peak memory, for PyTorch eager, torch.compile and cmath_runtime (onnxruntime fp32/fp16/int8, OpenVINO f32/bf16,
    CUDA, TensorRT), each against this machine's measured limits (roofline); causal runs also time the step graph."""
    from cmath_runtime.session import default_threads

    from .runner import BenchRequest, Plan, bench

    sizes = _lengths(lengths) if lengths else None
    plan = (Plan.quick if quick else Plan)(
        contenders=tuple(_contender_keys(only)) if only else backends.ALL,
        threads=threads or default_threads(),
    )
    if sizes:
        plan = dataclasses.replace(plan, lengths=sizes)
    request = BenchRequest(
        run_dir, out_dir or run_dir, plan, quick, sizes, texts, text_parity, frozen_encoder
    )
    if text_parity and texts is None:
        raise click.BadParameter("needs --texts (the dev dialogues to replay)", param_hint="--text-parity")
    if texts is not None and not (texts / "dev_sent_emo.csv").is_file():
        raise click.BadParameter(
            f"expected a folder holding dev_sent_emo.csv, got {texts}", param_hint="--texts"
        )
    try:
        click.echo(bench(request, ensure_export(run_dir), log=click.echo))
    except CmathError as e:
        click.echo(f"cmath-bench: error: {e}", err=True)
        sys.exit(2)


def _lengths(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(sorted({int(x) for x in text.split(",") if x.strip()}))
    except ValueError:
        raise click.BadParameter(
            f"expected comma-separated integers such as 1,10,50, got {text!r}", param_hint="--lengths"
        ) from None
    if not sizes or min(sizes) < 1:
        raise click.BadParameter(f"expected lengths >= 1, got {text!r}", param_hint="--lengths")
    return sizes


def _contender_keys(names: str) -> list[str]:
    """The contenders of comma-separated NAME:PRECISION or NAME (every precision the benchmark runs NAME with)."""
    keys: dict[str, None] = {}
    for name in filter(None, (n.strip() for n in names.split(","))):
        found = [k for k in backends.KNOWN if name in (k, k.partition(":")[0])]
        if not found:
            raise click.BadParameter(
                f"expected NAME or NAME:PRECISION from {list(backends.KNOWN)}, got {name!r}",
                param_hint="--backends",
            )
        keys.update(dict.fromkeys(found))
    return list(keys)
