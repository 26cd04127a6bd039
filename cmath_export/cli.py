"""`cmath-export RUN_DIR`: freeze a trained run into ONNX (fp32, fp16), TensorRT and Triton artifacts.

Exit codes: 0 done; 1 an artifact failed its parity bounds (report printed, nothing written); 2 bad options, a
missing/corrupt/foreign checkpoint or an unwritable output folder; 3 --tensorrt without TensorRT or a GPU.
"""

from __future__ import annotations

import sys
import time

import click

from cmath_runtime.errors import BackendUnavailableError, CmathError

from .formats import DEFAULT_OPSET, format_table


def _list_formats(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value and not ctx.resilient_parsing:
        click.echo(format_table())
        ctx.exit()


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=str))
@click.option(
    "--fp16", is_flag=True, help="Also write model.fp16.onnx (fp16 weights/compute, fp32 inputs/outputs)."
)
@click.option(
    "--int8",
    is_flag=True,
    help="Also write model.int8.onnx (int8 weights; + model.step.int8.onnx for causal "
    "runs), agreement with PyTorch proven on the validation rows.",
)
@click.option(
    "--tensorrt", is_flag=True, help="Also build model.plan (NVIDIA GPU + tensorrt; FP16 with --fp16)."
)
@click.option("--opset", type=int, default=None, help=f"ONNX opset (default {DEFAULT_OPSET}).")
@click.option(
    "--max-len", type=int, default=512, show_default=True, help="Most utterances per conversation promised."
)
@click.option(
    "--max-batch", type=int, default=64, show_default=True, help="Most conversations per batch promised."
)
@click.option(
    "--triton",
    "triton",
    type=click.Path(path_type=str),
    default=None,
    help="Also write a Triton model repository here (REPO/cmath/config.pbtxt + 1/model.*).",
)
@click.option(
    "--out", "out_dir", type=click.Path(path_type=str), default=None, help="Output folder [RUN_DIR/export]."
)
@click.option(
    "--list-formats",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=_list_formats,
    help="Print the table of export formats and exit.",
)
@click.option(
    "--no-text-encoder", is_flag=True, help="Do not bundle the run's text encoder (text_encoder.onnx)."
)
@click.option("--quiet", is_flag=True, help="Print only errors.")
def main(
    run_dir: str,
    fp16: bool,
    int8: bool,
    tensorrt: bool,
    opset: int | None,
    max_len: int,
    max_batch: int,
    triton: str | None,
    out_dir: str | None,
    no_text_encoder: bool,
    quiet: bool,
) -> None:
    """Export RUN_DIR (a cmath-train run) to model.onnx (+ --fp16, --tensorrt, --triton) and export.json.

    Every artifact's parity with PyTorch is measured on the run's validation rows before anything is written.
    Exit codes: 1 parity failed (nothing written), 2 bad option / checkpoint / output folder, 3 no TensorRT or GPU.
    """
    from .export import ParityError, export_run

    say = (lambda _msg: None) if quiet else (lambda msg: click.echo(msg, err=True))
    t0 = time.perf_counter()
    try:
        manifest = export_run(
            run_dir,
            out_dir,
            fp16=fp16,
            int8=int8,
            tensorrt=tensorrt,
            opset=opset,
            max_len=max_len,
            max_batch=max_batch,
            triton=triton,
            log=say,
            text_encoder=not no_text_encoder,
        )
    except (
        CmathError
    ) as e:  # exit 1 parity failed, 3 no TensorRT/GPU, 2 anything else (option, checkpoint, folder)
        click.echo(f"cmath-export: error: {e}", err=True)
        sys.exit(1 if isinstance(e, ParityError) else 3 if isinstance(e, BackendUnavailableError) else 2)
    if not quiet:
        files = ", ".join(
            f"{a['file']} ({a['bytes'] / 2**20:.1f} MiB)" for a in manifest["artifacts"].values()
        )
        where = out_dir or f"{run_dir}/export"
        click.echo(
            f"cmath-export: wrote {files} and export.json to {where} in {time.perf_counter() - t0:.1f} s "
            f"(parity PASSED: {', '.join(manifest['parity'])})"
        )


if __name__ == "__main__":
    main()
