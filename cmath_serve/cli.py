"""`cmath-serve EXPORT_DIR`: the exported model on a real Triton Inference Server, from one command."""

from __future__ import annotations

import ipaddress
import signal
import sys
import time
from pathlib import Path
from typing import Any

import click

from cmath_runtime.errors import CmathError

from .balancer import BalancerOptions, ReplicaSet, find_haproxy, server_name
from .errors import ServeError
from .launcher import Ports, TritonServer, check_port
from .repository import BACKENDS, STREAM_MODES, ServeOptions

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
    from cmath_runtime.manifest import read_manifest

    try:
        manifest = read_manifest(export_dir)
    except CmathError as e:
        raise click.BadParameter(
            f"{e} (expected cmath-export's output folder: run `cmath-export RUN_DIR` first)",
            param_hint="EXPORT_DIR",
        ) from None
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
    try:
        options.check(manifest)
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ServeError(
                f"--host: expected an IP address (127.0.0.1, 0.0.0.0, ::1), got {host!r}."
            ) from None
        chosen = {"--http-port": http_port, "--grpc-port": grpc_port, "--metrics-port": metrics_port}
        taken = [p for p in chosen.values() if p]
        if len(set(taken)) != len(taken):
            raise ServeError(
                f"--http-port / --grpc-port / --metrics-port: expected three different ports, got "
                f"{http_port} / {grpc_port} / {metrics_port}."
            )
        ports = Ports(*(check_port(host, p, opt) for opt, p in chosen.items()))
        if replicas is None and (haproxy is not None or balancer_dir is not None):
            raise ServeError("--haproxy / --balancer-dir: expected with --replicas N, got them without it.")
        if replicas is not None:
            extra = [
                name
                for name, value in (("--repo", repo), ("--log-file", log_file), ("--verbose", verbose))
                if value
            ]
            if extra:
                raise ServeError(
                    f"{' / '.join(extra)}: not with --replicas (each replica has its own; the "
                    f"replicas' logs and haproxy.cfg go to --balancer-dir)."
                )
            find_haproxy(haproxy)
    except (ValueError, ServeError) as e:
        raise click.UsageError(str(e)) from None
    if replicas is not None:
        serve_replicas(
            manifest.directory,
            options,
            replicas,
            host,
            ports,
            binary,
            haproxy,
            balancer_dir,
            ready_timeout_s,
            exit_timeout_s,
        )
        return

    server = TritonServer(
        manifest.directory, options, ports, host, repo, binary, log_file, verbose, exit_timeout_s
    )
    stopping: list[int] = []

    def on_signal(signum: int, frame: Any) -> None:
        stopping.append(signum)
        if len(stopping) == 1:
            click.echo(
                f"cmath-serve: {signal.Signals(signum).name}: finishing in-flight requests, then exiting "
                f"(again to force)",
                err=True,
            )
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
        stream = (
            "conversation state kept on the server, only the new utterance computed (causal artifact)"
            if d["stream_path"] == "step"
            else "each step recomputes the conversation"
        )
        click.echo(
            f"cmath-serve: ready, serving {manifest.directory} on Triton (Python backend, cmath_runtime "
            f"backend={backend})\n"
            f"  HTTP     {server.http_url}   (readiness: {server.http_url}/v2/health/ready)\n"
            f"  gRPC     {server.grpc_url}\n"
            f"  metrics  {server.metrics_url}\n"
            f"  models   cmath (max batch {options.max_batch}, queue delay {queue_delay_us} us); "
            f"cmath_stream ({stream}; at most {max_conversations} live, idle timeout {idle_timeout_s:g} s)\n"
            f"  text     raw `text` BYTES input {d['text_input']}\n"
            f"  repo     {d['repository']}\n"
            f"Ctrl-C or SIGTERM stops it (in-flight requests finish first).",
        )
        sys.stdout.flush()
        code = server.wait()
        if stopping:
            click.echo(f"cmath-serve: tritonserver exited with code {code}", err=True)
            sys.exit(code)
        raise click.ClickException(f"tritonserver exited unexpectedly with code {code}{server.log_tail()}")
    finally:
        server.stop()
        server.cleanup()


def serve_replicas(
    export_dir: Path,
    options: ServeOptions,
    replicas: int,
    host: str,
    ports: Ports,
    binary: Path | None,
    haproxy: Path | None,
    balancer_dir: Path | None,
    ready_timeout_s: float,
    exit_timeout_s: int,
) -> None:
    """N replicas behind HAProxy until SIGTERM/SIGINT; a replica that dies is reported and routed around."""
    rs = ReplicaSet(
        export_dir,
        options,
        replicas,
        BalancerOptions(bind=host, grpc_port=ports.grpc, http_port=ports.http, stats_port=ports.metrics),
        workdir=balancer_dir,
        tritonserver=binary,
        haproxy=haproxy,
        exit_timeout_s=exit_timeout_s,
    )
    stopping: list[int] = []
    started = False

    def on_signal(signum: int, frame: Any) -> None:
        stopping.append(signum)
        if not started:  # still starting: unwind start(), which stops whatever it started
            raise SystemExit(128 + signum)
        if len(stopping) == 1:
            click.echo(
                f"cmath-serve: {signal.Signals(signum).name}: stopping the balancer, then the replicas "
                f"(in-flight requests finish)",
                err=True,
            )

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        rs.start(ready_timeout_s)
    except CmathError as e:
        raise click.ClickException(str(e)) from None
    started = True
    try:
        assert rs.front is not None and rs.workdir is not None
        lines = [
            f"cmath-serve: ready, {replicas} replica(s) of {export_dir} behind HAProxy",
            f"  gRPC     {rs.grpc_url}   (x-cmath-conversation hashed: cmath_stream; no header: round robin)",
            f"  HTTP     {rs.http_url}   (readiness: {rs.http_url}/v2/health/ready)",
            f"  stats    {rs.front.stats_url}   (Prometheus: /metrics on the same port)",
        ]
        for i, s in enumerate(rs.servers):
            assert s.process is not None
            lines.append(
                f"  replica  {server_name(i)} pid {s.process.pid}  gRPC {s.grpc_url}  HTTP {s.http_url}  "
                f"metrics {s.metrics_url}"
            )
        lines += [
            f"  config   {rs.front.config_path}   (logs: {rs.workdir})",
            "Ctrl-C or SIGTERM stops it (in-flight requests finish first).",
        ]
        click.echo("\n".join(lines))
        sys.stdout.flush()
        reported: set[int] = set()
        while not stopping:
            time.sleep(0.5)
            if rs.front.process is not None and rs.front.process.poll() is not None:
                raise click.ClickException(
                    f"haproxy exited unexpectedly with code {rs.front.process.returncode}; "
                    f"its log: {rs.front.log_path}"
                )
            for i, s in enumerate(rs.servers):
                if i not in reported and s.process is not None and s.process.poll() is not None:
                    reported.add(i)
                    s.stop()  # what a killed tritonserver leaves: its stubs and shared memory
                    click.echo(
                        f"cmath-serve: replica {server_name(i)} exited with code {s.process.returncode}; "
                        f"the balancer routes around it",
                        err=True,
                    )
    finally:
        codes = rs.stop()
    click.echo(f"cmath-serve: stopped ({', '.join(f'{k} {v}' for k, v in codes.items())})", err=True)


if __name__ == "__main__":
    main()
