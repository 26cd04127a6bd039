"""`cmath-serve EXPORT_DIR`: the exported model on a real Triton Inference Server, from one command."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import click

from cmath_runtime.errors import CmathError

from .errors import ServeError
from .group import ServeRequest, serve
from .launcher import Ports
from .repository import BACKENDS, STREAM_MODES, ServeOptions

if TYPE_CHECKING:
    from cmath_runtime.manifest import Manifest

PORT = click.IntRange(0, 65535)


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.argument("export_dir", type=click.Path(path_type=Path))
@click.option(
    "--host", default="127.0.0.1", show_default=True, help="Address Triton listens on (HTTP, gRPC, metrics)."
)
@click.option(
    "--http-port", type=PORT, default=8000, show_default=True, help="HTTP/REST port (0: any free port)."
)
@click.option("--grpc-port", type=PORT, default=8001, show_default=True, help="gRPC port (0: any free port).")
@click.option(
    "--metrics-port",
    type=PORT,
    default=8002,
    show_default=True,
    help="Prometheus metrics port (0: any free).",
)
@click.option(
    "--max-batch",
    type=click.IntRange(1),
    default=None,
    help="Largest batch Triton forms (default: the artifact's max_batch, at most 64).",
)
@click.option(
    "--queue-delay-us",
    type=click.IntRange(0, 10_000_000),
    default=1000,
    show_default=True,
    help="How long Triton waits to fill a batch (both models).",
)
@click.option(
    "--max-conversations",
    type=click.IntRange(1),
    default=1024,
    show_default=True,
    help="Live cmath_stream conversations; a new one beyond this gets an error (none is evicted).",
)
@click.option(
    "--idle-timeout-s",
    type=click.FloatRange(0, min_open=True),
    default=600.0,
    show_default=True,
    help="A cmath_stream conversation without a request for this long is dropped.",
)
@click.option(
    "--stream-mode",
    type=click.Choice(STREAM_MODES),
    default="batched",
    show_default=True,
    help="cmath_stream: steps of many conversations in one call, one call each, or full recompute.",
)
@click.option(
    "--backend",
    type=click.Choice(BACKENDS),
    default="auto",
    show_default=True,
    help="cmath_runtime backend inside Triton (auto: CUDA where it works, else CPU).",
)
@click.option("--precision", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True)
@click.option(
    "--threads",
    type=click.IntRange(0),
    default=0,
    show_default=True,
    help="onnxruntime intra-op threads per model instance (0: onnxruntime's default).",
)
@click.option(
    "--instances",
    type=click.IntRange(1),
    default=1,
    show_default=True,
    help="Instances of the `cmath` model (cmath_stream always has one: it holds the conversations).",
)
@click.option(
    "--repo",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Write the model repository here and keep it (default: a temporary folder, removed at exit).",
)
@click.option(
    "--tritonserver",
    "binary",
    type=click.Path(path_type=Path),
    default=None,
    help="A tritonserver binary to use instead of nvidia-pytriton's (e.g. in NVIDIA's container).",
)
@click.option(
    "--log-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Keep tritonserver's log here (default: a temporary file, shown when startup fails).",
)
@click.option("--verbose", is_flag=True, help="tritonserver's log on this terminal, verbose.")
@click.option(
    "--ready-timeout-s",
    type=click.FloatRange(1),
    default=180.0,
    show_default=True,
    help="How long to wait for /v2/health/ready.",
)
@click.option(
    "--exit-timeout-s",
    type=click.IntRange(0),
    default=30,
    show_default=True,
    help="On SIGTERM/SIGINT, how long in-flight requests may take before Triton exits anyway.",
)
@click.option(
    "--replicas",
    type=click.IntRange(1, 64),
    default=None,
    help="Start N servers on free 127.0.0.1 ports behind HAProxy; the ports above are the balancer's "
    "(metrics: its /stats and /metrics). See docs/scaling.md.",
)
@click.option(
    "--haproxy",
    type=click.Path(path_type=Path),
    default=None,
    help="With --replicas: the haproxy binary (default: haproxy on PATH).",
)
@click.option(
    "--balancer-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="With --replicas: keep haproxy.cfg, haproxy.log and the replicas' logs here (default: temporary).",
)
def main(
    export_dir: Path,
    host: str,
    http_port: int,
    grpc_port: int,
    metrics_port: int,
    max_batch: int | None,
    queue_delay_us: int,
    max_conversations: int,
    idle_timeout_s: float,
    stream_mode: str,
    backend: str,
    precision: str,
    threads: int,
    instances: int,
    repo: Path | None,
    binary: Path | None,
    log_file: Path | None,
    verbose: bool,
    ready_timeout_s: float,
    exit_timeout_s: int,
    replicas: int | None,
    haproxy: Path | None,
    balancer_dir: Path | None,
) -> None:
    """Serve EXPORT_DIR (cmath-export's folder, its export.json, or a run with export/) on Triton Inference
    Server: model `cmath` (whole conversations, dynamic batching) and `cmath_stream` (one utterance per request
    with sequence_id / sequence_start / sequence_end; conversations held on the server). With --replicas N,
    N servers behind HAProxy (conversations hashed on the x-cmath-conversation header). Ctrl-C or SIGTERM
    finishes in-flight requests and exits. See docs/serving.md and docs/scaling.md."""
    manifest = _read_export(export_dir)
    options = ServeOptions(
        max_batch=max_batch or min(manifest.max_batch, 64),
        queue_delay_us=queue_delay_us,
        max_conversations=max_conversations,
        idle_timeout_s=idle_timeout_s,
        stream_mode=stream_mode,
        backend=backend,
        precision=precision,
        threads=threads,
        instances=instances,
    )
    request = ServeRequest(
        manifest.directory,
        options,
        Ports(http_port, grpc_port, metrics_port),
        host,
        replicas,
        repo,
        binary,
        log_file,
        verbose,
        haproxy,
        balancer_dir,
        ready_timeout_s,
        exit_timeout_s,
    )
    _serve(request, manifest)


def _read_export(export_dir: Path) -> Manifest:
    from cmath_runtime.manifest import read_manifest

    try:
        return read_manifest(export_dir)
    except CmathError as e:
        raise click.BadParameter(
            f"{e} (expected cmath-export's output folder: run `cmath-export RUN_DIR` first)",
            param_hint="EXPORT_DIR",
        ) from None


def _serve(request: ServeRequest, manifest: Manifest) -> NoReturn:
    """Check the request (a usage error names the option), serve it, exit with its code."""
    try:
        request = request.checked(manifest)
    except (ValueError, ServeError) as e:
        raise click.UsageError(str(e)) from None
    try:
        code = serve(request)
    except CmathError as e:
        raise click.ClickException(str(e)) from None
    sys.exit(code)


if __name__ == "__main__":
    main()
