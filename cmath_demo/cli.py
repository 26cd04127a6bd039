"""`cmath-demo EXPORT_DIR [--port N]`: serve the demo page on 127.0.0.1 until interrupted."""

from __future__ import annotations

import click

from cmath_runtime.errors import CmathError

DEFAULT_PORT = 7860  # the port ML demo pages conventionally use (Gradio's)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("export_dir", type=click.Path(exists=True, path_type=str))
@click.option("--port", type=click.IntRange(0, 65535), default=DEFAULT_PORT, show_default=True)
@click.option(
    "--threads", type=click.IntRange(min=1), default=None, help="onnxruntime CPU threads per model."
)
def main(export_dir: str, port: int, threads: int | None) -> None:
    """Try EXPORT_DIR in a browser: type a dialogue turn by turn or paste a transcript, see each utterance's
    emotion, confidence and probabilities, and the conversation's emotions over its turns."""
    try:
        import uvicorn

        from .app import Demo, make_app
    except ImportError as e:
        raise click.ClickException(f"{e.name} is not installed: pip install 'cmath[demo]'") from None
    try:
        demo = Demo(export_dir, threads)
        if demo.problem is None:
            demo.model(demo.precisions[0])  # load now: a broken export fails here, not on the first turn
    except CmathError as e:
        raise click.ClickException(str(e)) from None
    click.echo(
        f"cmath-demo: {demo.manifest.model_name} from {export_dir} on http://127.0.0.1:{port}/", err=True
    )
    uvicorn.run(make_app(demo), host="127.0.0.1", port=port, log_level="warning")


if __name__ == "__main__":
    main()
