"""What `cmath-serve` runs: one tritonserver, or N replicas behind HAProxy, supervised until a signal.

`ServeRequest` is the command's options, checked (`ServeRequest.checked`); `serve(request)` starts the servers,
prints where they listen, watches them and stops them. `ServerGroup` is that supervisor, for one server and for
replicas alike, with one signal path: SIGTERM/SIGINT while starting unwinds the start (everything started is
stopped); once serving, the first one stops the group (the balancer first, then every tritonserver, whose
in-flight requests finish), a second one kills the tritonservers. A server the group cannot do without (the
single tritonserver, HAProxy) exiting on its own is a ServeError; a replica that exits is reported once and the
balancer routes around it.
"""

from __future__ import annotations

import ipaddress
import signal
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .balancer import BalancerOptions, ReplicaSet, find_haproxy, server_name
from .errors import ServeError
from .launcher import Ports, TritonServer, check_port
from .repository import ServeOptions

if TYPE_CHECKING:
    from cmath_runtime.manifest import Manifest

POLL_S = 0.5  # how often the supervisor looks at its processes


@dataclass(frozen=True)
class ServeRequest:
    """One `cmath-serve` run: the export, the models' options and where the servers listen. `ports` are the single
    server's (replicas: the balancer's, with its stats on `ports.metrics`); 0 picks a free port (`checked`)."""

    export_dir: Path  # the export folder (Manifest.directory)
    options: ServeOptions
    ports: Ports
    host: str = "127.0.0.1"
    replicas: int | None = None  # None: one tritonserver on `ports`; N: N on free ports behind HAProxy
    repo: Path | None = None  # one server: keep its model repository here
    binary: Path | None = None  # a tritonserver binary instead of nvidia-pytriton's
    log_file: Path | None = None  # one server: keep tritonserver's log here
    verbose: bool = False  # one server: tritonserver's verbose log on this terminal
    haproxy: Path | None = None  # replicas: the haproxy binary
    balancer_dir: Path | None = None  # replicas: keep haproxy.cfg and every log here
    ready_timeout_s: float = 180.0
    exit_timeout_s: int = 30

    def checked(self, manifest: Manifest) -> ServeRequest:
        """This request with free ports chosen for the 0s; ValueError or ServeError naming the option that is
        wrong (the options against the artifact, the host, the ports, options that need or exclude --replicas)."""
        self.options.check(manifest)
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            raise ServeError(
                f"--host: expected an IP address (127.0.0.1, 0.0.0.0, ::1), got {self.host!r}."
            ) from None
        self._check_replica_options()
        return replace(self, ports=self._free_ports())

    def _free_ports(self) -> Ports:
        p = self.ports
        chosen = {"--http-port": p.http, "--grpc-port": p.grpc, "--metrics-port": p.metrics}
        taken = [port for port in chosen.values() if port]
        if len(set(taken)) != len(taken):
            raise ServeError(
                f"--http-port / --grpc-port / --metrics-port: expected three different ports, got "
                f"{p.http} / {p.grpc} / {p.metrics}."
            )
        return Ports(*(check_port(self.host, port, opt) for opt, port in chosen.items()))

    def _check_replica_options(self) -> None:
        if self.replicas is None:
            if self.haproxy is not None or self.balancer_dir is not None:
                raise ServeError(
                    "--haproxy / --balancer-dir: expected with --replicas N, got them without it."
                )
            return
        single = (("--repo", self.repo), ("--log-file", self.log_file), ("--verbose", self.verbose))
        extra = [name for name, value in single if value]
        if extra:
            raise ServeError(
                f"{' / '.join(extra)}: not with --replicas (each replica has its own; the "
                f"replicas' logs and haproxy.cfg go to --balancer-dir)."
            )
        find_haproxy(self.haproxy)


def serve(request: ServeRequest) -> int:
    """Serve `request` until SIGTERM/SIGINT (ServerGroup.run); the exit code. Must run in the main thread."""
    return ServerGroup(request).run()


class ServerGroup:
    """The tritonservers of one request (one, or `replicas` behind HAProxy) and their supervision."""

    def __init__(self, request: ServeRequest) -> None:
        r = self.request = request
        self.single: TritonServer | None = None
        self.replica_set: ReplicaSet | None = None
        if r.replicas is None:
            self.single = TritonServer(
                r.export_dir,
                r.options,
                r.ports,
                r.host,
                r.repo,
                r.binary,
                r.log_file,
                r.verbose,
                r.exit_timeout_s,
            )
        else:
            self.replica_set = ReplicaSet(
                r.export_dir,
                r.options,
                r.replicas,
                BalancerOptions(
                    bind=r.host, grpc_port=r.ports.grpc, http_port=r.ports.http, stats_port=r.ports.metrics
                ),
                workdir=r.balancer_dir,
                tritonserver=r.binary,
                haproxy=r.haproxy,
                exit_timeout_s=r.exit_timeout_s,
            )
        self.signals: list[int] = []
        self.serving = False  # started and announced: from now on a signal stops the group
        self._reported: set[int] = set()
        self._codes: dict[str, int | None] | None = None

    @property
    def servers(self) -> list[TritonServer]:
        return [self.single] if self.single is not None else self.replica_set.servers  # type: ignore[union-attr]

    def run(self) -> int:
        """Start, print where it listens, watch until a signal, stop. The exit code: tritonserver's (one server)
        or 0 (replicas). ServeError when it cannot start or an indispensable server exits on its own."""
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            self._start()
            self.serving = True
            print(self._banner(), flush=True)
            while not self.signals:
                time.sleep(POLL_S)
                self._watch()
            return self._stopped_code()
        finally:
            self.stop()
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.signals.append(signum)
        if not self.serving:  # still starting: unwind the start, which stops whatever it started
            raise SystemExit(128 + signum)
        if len(self.signals) == 1:
            what = (
                "finishing in-flight requests, then exiting"
                if self.single is not None
                else "stopping the balancer, then the replicas (in-flight requests finish)"
            )
            _note(f"cmath-serve: {signal.Signals(signum).name}: {what} (again to force)")
            return
        for server in self.servers:
            if server.process is not None and server.process.poll() is None:
                server.process.kill()

    def _start(self) -> None:
        if self.single is not None:
            self.single.start(self.request.ready_timeout_s)
        else:
            assert self.replica_set is not None
            self.replica_set.start(self.request.ready_timeout_s)

    def _watch(self) -> None:
        """One look at the processes: an indispensable one gone is a ServeError; a replica gone is reported once
        (what its tritonserver left, its stubs and shared memory, is cleared) and routed around."""
        if self.single is not None:
            process = self.single.process
            if process is not None and process.poll() is not None and not self.signals:
                raise ServeError(
                    f"tritonserver exited unexpectedly with code {process.returncode}{self.single.log_tail()}"
                )
            return
        assert self.replica_set is not None
        front = self.replica_set.front
        if front is not None and front.process is not None and front.process.poll() is not None:
            raise ServeError(
                f"haproxy exited unexpectedly with code {front.process.returncode}; its log: {front.log_path}"
            )
        for i, server in enumerate(self.replica_set.servers):
            if i not in self._reported and server.process is not None and server.process.poll() is not None:
                self._reported.add(i)
                server.stop()
                _note(
                    f"cmath-serve: replica {server_name(i)} exited with code {server.process.returncode}; "
                    f"the balancer routes around it"
                )

    def _stopped_code(self) -> int:
        """Stop after a signal and say so: tritonserver's exit code (one server), else 0."""
        codes = self.stop()
        if self.single is not None:
            code = codes["tritonserver"]
            _note(f"cmath-serve: tritonserver exited with code {code}")
            return code if code is not None else 1
        _note(f"cmath-serve: stopped ({', '.join(f'{k} {v}' for k, v in codes.items())})")
        return 0

    def stop(self) -> dict[str, int | None]:
        """Stop everything started (once; later calls return the same codes): the balancer, then the
        tritonservers. Their exit codes by name ("tritonserver" for one server)."""
        if self._codes is None:
            if self.single is not None:
                try:
                    self._codes = {"tritonserver": self.single.stop()}
                finally:
                    self.single.cleanup()
            else:
                assert self.replica_set is not None
                self._codes = self.replica_set.stop()
        return self._codes

    def _banner(self) -> str:
        if self.single is not None:
            return _single_banner(self.single, self.request)
        assert self.replica_set is not None
        return _replicas_banner(self.replica_set, self.request)


def _single_banner(server: TritonServer, request: ServeRequest) -> str:
    d, o = server.description, request.options
    stream = (
        "conversation state kept on the server, only the new utterance computed (causal artifact)"
        if d["stream_path"] == "step"
        else "each step recomputes the conversation"
    )
    return (
        f"cmath-serve: ready, serving {request.export_dir} on Triton (Python backend, cmath_runtime "
        f"backend={o.backend})\n"
        f"  HTTP     {server.http_url}   (readiness: {server.http_url}/v2/health/ready)\n"
        f"  gRPC     {server.grpc_url}\n"
        f"  metrics  {server.metrics_url}\n"
        f"  models   cmath (max batch {o.max_batch}, queue delay {o.queue_delay_us} us); "
        f"cmath_stream ({stream}; at most {o.max_conversations} live, idle timeout {o.idle_timeout_s:g} s)\n"
        f"  text     raw `text` BYTES input {d['text_input']}\n"
        f"  repo     {d['repository']}\n"
        f"Ctrl-C or SIGTERM stops it (in-flight requests finish first)."
    )


def _replicas_banner(rs: ReplicaSet, request: ServeRequest) -> str:
    assert rs.front is not None and rs.workdir is not None
    lines = [
        f"cmath-serve: ready, {rs.replicas} replica(s) of {request.export_dir} behind HAProxy",
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
    return "\n".join(lines)


def _note(text: str) -> None:
    print(text, file=sys.stderr, flush=True)
