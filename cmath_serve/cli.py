"""`cmath-serve EXPORT_DIR`: the exported model on a real Triton Inference Server, from one command."""

from __future__ import annotations

import ipaddress
import signal
import sys
from pathlib import Path
from typing import Any

import click

from cmath_runtime.errors import CmathError

from .errors import ServeError
from .launcher import Ports, TritonServer, check_port
from .repository import BACKENDS, STREAM_MODES, ServeOptions

PORT = click.IntRange(0, 65535)


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.argument("export_dir", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address Triton listens on (HTTP, gRPC, metrics).")
@click.option("--http-port", type=PORT, default=8000, show_default=True, help="HTTP/REST port (0: any free port).")
@click.option("--grpc-port", type=PORT, default=8001, show_default=True, help="gRPC port (0: any free port).")
@click.option("--metrics-port", type=PORT, default=8002, show_default=True, help="Prometheus metrics port (0: any free).")
@click.option("--max-batch", type=click.IntRange(1), default=None,
              help="Largest batch Triton forms (default: the artifact's max_batch, at most 64).")
@click.option("--queue-delay-us", type=click.IntRange(0, 10_000_000), default=1000, show_default=True,
              help="How long Triton waits to fill a batch (both models).")
@click.option("--max-conversations", type=click.IntRange(1), default=1024, show_default=True,
              help="Live cmath_stream conversations; a new one beyond this gets an error (none is evicted).")
@click.option("--idle-timeout-s", type=click.FloatRange(0, min_open=True), default=600.0, show_default=True,
              help="A cmath_stream conversation without a request for this long is dropped.")
@click.option("--stream-mode", type=click.Choice(STREAM_MODES), default="batched", show_default=True,
              help="cmath_stream: steps of many conversations in one call, one call each, or full recompute.")
@click.option("--backend", type=click.Choice(BACKENDS), default="auto", show_default=True,
              help="cmath_runtime backend inside Triton (auto: CUDA where it works, else CPU).")
@click.option("--precision", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True)
@click.option("--threads", type=click.IntRange(0), default=0, show_default=True,
              help="onnxruntime intra-op threads per model instance (0: onnxruntime's default).")
@click.option("--instances", type=click.IntRange(1), default=1, show_default=True,
              help="Instances of the `cmath` model (cmath_stream always has one: it holds the conversations).")
@click.option("--repo", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Write the model repository here and keep it (default: a temporary folder, removed at exit).")
@click.option("--tritonserver", "binary", type=click.Path(path_type=Path), default=None,
              help="A tritonserver binary to use instead of nvidia-pytriton's (e.g. in NVIDIA's container).")
@click.option("--log-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Keep tritonserver's log here (default: a temporary file, shown when startup fails).")
@click.option("--verbose", is_flag=True, help="tritonserver's log on this terminal, verbose.")
@click.option("--ready-timeout-s", type=click.FloatRange(1), default=180.0, show_default=True,
              help="How long to wait for /v2/health/ready.")
@click.option("--exit-timeout-s", type=click.IntRange(0), default=30, show_default=True,
              help="On SIGTERM/SIGINT, how long in-flight requests may take before Triton exits anyway.")
def main(export_dir: Path, host: str, http_port: int, grpc_port: int, metrics_port: int, max_batch: int | None,
         queue_delay_us: int, max_conversations: int, idle_timeout_s: float, stream_mode: str, backend: str,
         precision: str, threads: int, instances: int, repo: Path | None, binary: Path | None,
         log_file: Path | None, verbose: bool, ready_timeout_s: float, exit_timeout_s: int) -> None:
    """Serve EXPORT_DIR (cmath-export's folder, its export.json, or a run with export/) on Triton Inference
    Server: model `cmath` (whole conversations, dynamic batching) and `cmath_stream` (one utterance per request
    with sequence_id / sequence_start / sequence_end; conversations held on the server). Ctrl-C or SIGTERM
    finishes in-flight requests and exits. See docs/serving.md."""
    from cmath_runtime.manifest import read_manifest

    try:
        manifest = read_manifest(export_dir)
    except CmathError as e:
        raise click.BadParameter(f"{e} (expected cmath-export's output folder: run `cmath-export RUN_DIR` first)",
                                 param_hint="EXPORT_DIR") from None
    options = ServeOptions(max_batch=max_batch or min(manifest.max_batch, 64), queue_delay_us=queue_delay_us,
                           max_conversations=max_conversations, idle_timeout_s=idle_timeout_s,
                           stream_mode=stream_mode, backend=backend, precision=precision, threads=threads,
                           instances=instances)
    try:
        options.check(manifest)
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ServeError(f"--host: expected an IP address (127.0.0.1, 0.0.0.0, ::1), got {host!r}.") from None
        chosen = {"--http-port": http_port, "--grpc-port": grpc_port, "--metrics-port": metrics_port}
        taken = [p for p in chosen.values() if p]
        if len(set(taken)) != len(taken):
            raise ServeError(f"--http-port / --grpc-port / --metrics-port: expected three different ports, got "
                             f"{http_port} / {grpc_port} / {metrics_port}.")
        ports = Ports(*(check_port(host, p, opt) for opt, p in chosen.items()))
    except (ValueError, ServeError) as e:
        raise click.UsageError(str(e)) from None

    server = TritonServer(manifest.directory, options, ports, host, repo, binary, log_file, verbose, exit_timeout_s)
    stopping: list[int] = []

    def on_signal(signum: int, frame: Any) -> None:
        stopping.append(signum)
        if len(stopping) == 1:
            click.echo(f"cmath-serve: {signal.Signals(signum).name}: finishing in-flight requests, then exiting "
                       f"(again to force)", err=True)
            server.terminate()
        elif server.process is not None and server.process.poll() is None:
            server.process.kill()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        server.start(ready_timeout_s)
    except CmathError as e:
        raise click.ClickException(str(e)) from None
    try:
        if stopping:
            sys.exit(server.wait())
        d = server.description
        stream = ("conversation state kept on the server, only the new utterance computed (causal artifact)"
                  if d["stream_path"] == "step" else "each step recomputes the conversation")
        click.echo(f"cmath-serve: ready, serving {manifest.directory} on Triton (Python backend, cmath_runtime "
                   f"backend={backend})\n"
                   f"  HTTP     {server.http_url}   (readiness: {server.http_url}/v2/health/ready)\n"
                   f"  gRPC     {server.grpc_url}\n"
                   f"  metrics  {server.metrics_url}\n"
                   f"  models   cmath (max batch {options.max_batch}, queue delay {queue_delay_us} us); "
                   f"cmath_stream ({stream}; at most {max_conversations} live, idle timeout {idle_timeout_s:g} s)\n"
                   f"  text     raw `text` BYTES input {d['text_input']}\n"
                   f"  repo     {d['repository']}\n"
                   f"Ctrl-C or SIGTERM stops it (in-flight requests finish first).", )
        sys.stdout.flush()
        code = server.wait()
        if stopping:
            click.echo(f"cmath-serve: tritonserver exited with code {code}", err=True)
            sys.exit(code)
        raise click.ClickException(f"tritonserver exited unexpectedly with code {code}{server.log_tail()}")
    finally:
        server.stop()
        server.cleanup()


if __name__ == "__main__":
    main()
