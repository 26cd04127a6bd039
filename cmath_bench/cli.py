"""`cmath-bench RUN_DIR [--out DIR] [--quick]`: PyTorch eager, torch.compile and the runtime on one checkpoint."""

from __future__ import annotations

import dataclasses
import sys
import time
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
    help=f"Comma-separated NAME or NAME:PRECISION from {', '.join(backends.ALL)} (default: all; GPU ones "
    "skip with a reason).",
)
@click.option(
    "--spin/--no-spin",
    default=False,
    show_default=True,
    help="Let idle threads spin (torch OpenMP default, onnxruntime allow_spinning=1) instead of sleeping.",
)
@click.option(
    "--lengths",
    default=None,
    help="Comma-separated conversation lengths for latency and streaming, "
    "e.g. 1,10,50 (default: the full sweep; --quick: 1,5,20).",
)
def main(
    run_dir: Path,
    out_dir: Path | None,
    quick: bool,
    threads: int | None,
    only: str | None,
    spin: bool,
    lengths: str | None,
) -> None:
    """Benchmark a trained run: latency at batch 1 over conversation lengths, throughput at batch 16, load time and
    peak memory, for PyTorch eager, torch.compile and cmath_runtime (onnxruntime fp32/fp16/int8, OpenVINO f32/bf16,
    CUDA, TensorRT), each against this machine's measured limits (roofline); causal runs also time the step graph."""
    from cmath_runtime.session import default_threads

    from .report import write
    from .runner import Plan, environment, run_benchmark

    start = time.perf_counter()
    contenders = backends.ALL
    if only:
        contenders = tuple(
            dict.fromkeys(
                k for name in only.split(",") if name.strip() for k in _contender_keys(name.strip())
            )
        )
    threads = threads or default_threads()
    options = {"contenders": contenders, "threads": threads, "spinning": spin}
    plan = Plan.quick(**options) if quick else Plan(**options)
    sizes = None
    if lengths:
        try:
            sizes = tuple(sorted({int(x) for x in lengths.split(",") if x.strip()}))
        except ValueError:
            raise click.BadParameter(
                f"expected comma-separated integers such as 1,10,50, got {lengths!r}", param_hint="--lengths"
            ) from None
        if not sizes or min(sizes) < 1:
            raise click.BadParameter(f"expected lengths >= 1, got {lengths!r}", param_hint="--lengths")
        plan = dataclasses.replace(plan, lengths=sizes)
    try:
        export_dir = ensure_export(run_dir)
        env = environment(threads)
        click.echo(
            f"cmath-bench {run_dir}: {threads} threads ({'spinning' if spin else 'sleeping'} when idle), "
            f"load average {env['load_average']}"
        )
        from . import roofline

        machine = roofline.measure(
            threads
        )  # before any contender runs: the machine's limits at these threads
        env["machine"] = machine.to_json()
        env["parity"] = _parity_records(export_dir)
        click.echo(
            f"machine limits ({threads} threads): copy bandwidth {machine.bandwidth_gb_s:.1f} GB/s, float32 "
            f"matmul peak {machine.fp32_gflop_s:.0f} GFLOP/s"
        )
        records = run_benchmark(run_dir, export_dir, plan, log=click.echo)
        roofline.annotate(records, machine, export_dir)
        from .streaming import stream_records  # causal runs with a step graph: step vs full per new utterance

        records += stream_records(export_dir, threads, quick, log=click.echo, machine=machine, lengths=sizes)
    except CmathError as e:
        click.echo(f"cmath-bench: error: {e}", err=True)
        sys.exit(2)
    env["load_average_end"] = environment(threads)["load_average"]
    out = out_dir or run_dir
    text = write(records, env, out, f"cmath-bench: {run_dir.name}{' (quick)' if quick else ''}")

    # artifacts with a text encoder: raw text -> emotion for one new utterance into a live 20-turn conversation,
    # runtime fp32 / int8 vs the PyTorch pipeline vs the frozen sentence encoder, against the text path's floor
    from .text_path import report_text_path, summary

    text_path = report_text_path(
        run_dir, export_dir, threads, quick, out_dir=out, machine=machine, log=click.echo
    )
    if text_path:
        click.echo(summary(text_path))
    written = ", bench_text.json/.md/.png" if text_path else ""
    click.echo(
        f"\nwrote {out / 'bench.json'}, bench.md, bench_latency.png{written} in {time.perf_counter() - start:.0f} s\n"
    )
    click.echo(text)


def _parity_records(export_dir: Path) -> dict:
    """export.json's agreement records (argmax agreement, max |dp|, passed) per artifact, for the bars."""
    import json

    manifest = json.loads((export_dir / "export.json").read_text())
    out = {}
    for key, rep in (manifest.get("parity") or {}).items():
        probs = next((o for o in rep.get("outputs", []) if o.get("name") == "probs"), {})
        out[key] = {
            "argmax_agreement": rep.get("argmax_agreement"),
            "probs_max_abs": probs.get("max_abs"),
            "passed": rep.get("passed"),
            "rows": rep.get("rows"),
        }
    return out


def _contender_keys(name: str) -> list[str]:
    """NAME:PRECISION, or NAME for every precision the benchmark runs NAME with."""
    keys = [k for k in backends.ALL if name in (k, k.partition(":")[0])]
    if not keys:
        raise click.BadParameter(
            f"expected NAME or NAME:PRECISION from {list(backends.ALL)}, got {name!r}",
            param_hint="--backends",
        )
    return keys
