"""N replicas of `cmath-serve` behind a real L7 load balancer (HAProxy, from the distribution's packages).

    cmath-serve EXPORT --replicas 3            # 3 tritonservers on free 127.0.0.1 ports + HAProxy in front
    python -m cmath_serve.balancer --replica HOST:HTTP:GRPC ... > haproxy.cfg   # the same file for other machines

What the balancer does (the config is written from TEMPLATE below, one file for one machine or many):

* one gRPC frontend (HTTP/2 cleartext, Triton's gRPC API) and one HTTP/1.1 frontend (Triton's REST API);
* `balance hdr(x-cmath-conversation)` + `hash-type consistent`: a request carrying the conversation header
  (every `cmath_stream` step the client sends) goes to the replica that holds that conversation, and when a
  replica leaves only its own conversations move; a request without it (`cmath`, whole conversations) is spread
  round robin (HAProxy's documented fallback when the hashed header is absent);
* passive health checks (`observe layer4`, `error-limit 1`, `on-error mark-down`): the first failed connection
  to a replica marks it down, so a dead replica stops receiving traffic at once; an active check of
  `/v2/health/ready` every `check_interval_ms` brings a restarted replica back;
* a connection that fails before the request was sent is retried on another replica (`retries`, `option
  redispatch 1`); an answer lost in flight is not retried by the balancer (a stream step is not idempotent):
  the client replays the conversation (conversation_client.py);
* a stats listener: `/stats` (HTML, `;csv` for machines) and `/metrics` (HAProxy's Prometheus exporter).

`ReplicaSet` starts the replicas (launcher.TritonServer, in parallel), then HAProxy on the written config,
waits (bounded) until every replica is up in the balancer, and stops everything on `stop()`: HAProxy first
(no new requests), then each replica with SIGTERM (in-flight requests finish), SIGKILL after a bound.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from string import Template

from .errors import ServeError
from .launcher import Ports, TritonServer, _die_with_parent, check_port
from .repository import ServeOptions

HEADER = "x-cmath-conversation"  # the routing header: the conversation's sequence id, sent with every step
INSTALL_HINT = (
    "install HAProxy from the distribution's packages (Debian/Ubuntu: `apt-get install -y haproxy`; "
    "scripts/install.sh does it where apt-get exists), or pass --haproxy PATH"
)

TEMPLATE = Template("""\
# Written by cmath-serve (cmath_serve/balancer.py): ${count} replica(s) of one cmath export behind HAProxy.
# The same file serves replicas on other machines: only the `server` lines name them.
global
    maxconn ${maxconn}
    log stdout format raw daemon info

defaults
    mode http
    log global
    option httplog
    timeout connect ${connect_timeout_ms}ms
    timeout client ${request_timeout_s}s
    timeout server ${request_timeout_s}s
    timeout http-request ${request_timeout_s}s
    retries ${retries}
    option redispatch 1
    # passive: the first failed connection marks a replica down; active: its readiness brings it back
    default-server check inter ${check_interval_ms}ms fall 2 rise 2 observe layer4 error-limit 1 on-error mark-down

frontend grpc
    bind ${bind}:${grpc_port} proto h2
    default_backend grpc_replicas

backend grpc_replicas
    balance hdr(${header})
    hash-type consistent
    option httpchk GET /v2/health/ready
${grpc_servers}

frontend http
    bind ${bind}:${http_port}
    default_backend http_replicas

backend http_replicas
    balance hdr(${header})
    hash-type consistent
    option httpchk GET /v2/health/ready
${http_servers}

frontend stats
    bind ${bind}:${stats_port}
    http-request use-service prometheus-exporter if { path /metrics }
    stats enable
    stats uri /stats
""")


@dataclass(frozen=True)
class ReplicaAddress:
    """Where one replica listens: its host, Triton's HTTP port (also the health check's) and gRPC port."""

    host: str
    http: int
    grpc: int

    @classmethod
    def parse(cls, text: str) -> ReplicaAddress:
        """HOST:HTTP:GRPC (e.g. 10.0.0.5:8000:8001); ValueError naming the expected form otherwise."""
        host, _, ports = text.rpartition(":")
        host, _, http = host.rpartition(":")
        try:
            address = cls(host, int(http), int(ports))
        except ValueError:
            raise ValueError(
                f"--replica: expected HOST:HTTP_PORT:GRPC_PORT (e.g. 10.0.0.5:8000:8001), got {text!r}"
            ) from None
        if not host or not all(0 < p < 65536 for p in (address.http, address.grpc)):
            raise ValueError(
                f"--replica: expected HOST:HTTP_PORT:GRPC_PORT with ports in 1..65535, got {text!r}"
            )
        return address


@dataclass(frozen=True)
class BalancerOptions:
    """How HAProxy balances and checks the replicas (the template's settings)."""

    bind: str = "127.0.0.1"  # address of the balancer's frontends and stats
    grpc_port: int = 8001
    http_port: int = 8000
    stats_port: int = 8002  # /stats (HTML; ;csv) and /metrics (Prometheus)
    check_interval_ms: int = 1000  # active readiness check of each replica
    connect_timeout_ms: int = 1000
    request_timeout_s: int = 300  # an answer may take this long (a long conversation on a busy replica)
    retries: int = 2  # connection attempts before an error; the last goes to another replica
    maxconn: int = 4096


def server_name(i: int) -> str:
    return f"r{i}"


def haproxy_config(replicas: list[ReplicaAddress], options: BalancerOptions) -> str:
    """The balancer's config for these replicas (TEMPLATE filled in)."""
    if not replicas:
        raise ValueError("replicas: expected at least one replica, got none")

    def host(h: str) -> str:
        return f"[{h}]" if ":" in h else h

    # gRPC is HTTP/2 to the replica; its health check asks the replica's HTTP port, in HTTP/1.1
    grpc = [
        f"    server {server_name(i)} {host(r.host)}:{r.grpc} proto h2 check-proto h1 port {r.http}"
        for i, r in enumerate(replicas)
    ]
    http = [f"    server {server_name(i)} {host(r.host)}:{r.http}" for i, r in enumerate(replicas)]
    return TEMPLATE.substitute(
        count=len(replicas),
        header=HEADER,
        bind=options.bind,
        grpc_port=options.grpc_port,
        http_port=options.http_port,
        stats_port=options.stats_port,
        check_interval_ms=options.check_interval_ms,
        connect_timeout_ms=options.connect_timeout_ms,
        request_timeout_s=options.request_timeout_s,
        retries=options.retries,
        maxconn=options.maxconn,
        grpc_servers="\n".join(grpc),
        http_servers="\n".join(http),
    )


def find_haproxy(binary: str | Path | None = None) -> Path:
    """The haproxy binary (`binary`, else the one on PATH or in /usr/sbin); ServeError with the fix if none."""
    if binary is not None:
        path = Path(binary)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise ServeError(
                f"--haproxy: expected an executable haproxy binary, got {str(binary)!r}; {INSTALL_HINT}."
            )
        return path
    found = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/usr/local/sbin")
    if found is None:
        raise ServeError(f"haproxy is not installed: {INSTALL_HINT}.")
    return Path(found)


@dataclass(frozen=True)
class ServerStats:
    """One replica as the balancer sees it (a row of HAProxy's stats CSV)."""

    backend: str
    name: str
    status: str  # UP, DOWN, "UP 1/2", MAINT, ...
    requests: int  # stot: requests (streams) sent to it in total
    connection_errors: int  # econ
    response_errors: int  # eresp

    @property
    def up(self) -> bool:
        return self.status.startswith("UP")


def parse_stats_csv(text: str) -> list[ServerStats]:
    """The server rows of HAProxy's `;csv` stats (frontend/backend summary rows left out)."""
    rows = csv.DictReader(io.StringIO(text.lstrip("# ")))
    return [
        ServerStats(
            r["pxname"],
            r["svname"],
            r["status"],
            int(r["stot"] or 0),
            int(r["econ"] or 0),
            int(r["eresp"] or 0),
        )
        for r in rows
        if r["svname"] not in ("FRONTEND", "BACKEND")
    ]


@dataclass
class Balancer:
    """One HAProxy process on a written config, in the foreground (its log: stdout -> log_path)."""

    config_path: Path
    options: BalancerOptions
    log_path: Path
    binary: str | Path | None = None
    process: subprocess.Popen[bytes] | None = field(default=None, init=False)

    @property
    def stats_url(self) -> str:
        return f"http://{_url_host(self.options.bind)}:{self.options.stats_port}/stats"

    def start(self, expected_servers: int, ready_timeout_s: float = 60.0) -> None:
        binary = find_haproxy(self.binary)
        check = subprocess.run(
            [str(binary), "-c", "-q", "-f", str(self.config_path)], capture_output=True, text=True, timeout=30
        )
        if check.returncode != 0:
            raise ServeError(
                f"haproxy refused the config {self.config_path}: {(check.stdout + check.stderr).strip()}"
            )
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [str(binary), "-db", "-f", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        self.wait_up(expected_servers, ready_timeout_s)

    def wait_up(self, expected_servers: int, timeout_s: float) -> None:
        """Until `expected_servers` replicas are UP in every backend; ServeError after timeout_s."""
        deadline = time.monotonic() + timeout_s
        last = ""
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise ServeError(
                    f"haproxy exited with code {self.process.returncode} before it was ready; its log "
                    f"{self.log_path}:\n{_tail(self.log_path)}"
                )
            try:
                rows = self.stats()
                last = ", ".join(f"{s.backend}/{s.name} {s.status}" for s in rows)
                by_backend: dict[str, int] = {}
                for s in rows:
                    by_backend[s.backend] = by_backend.get(s.backend, 0) + s.up
                if by_backend and all(n >= expected_servers for n in by_backend.values()):
                    return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        raise ServeError(
            f"the balancer did not see {expected_servers} replica(s) up after {timeout_s:g} s "
            f"(last: {last or 'no stats'}); its log {self.log_path}:\n{_tail(self.log_path)}"
        )

    def stats(self) -> list[ServerStats]:
        with urllib.request.urlopen(f"{self.stats_url};csv", timeout=5) as r:
            return parse_stats_csv(r.read().decode())

    def stop(self, timeout_s: float = 10.0) -> int | None:
        """SIGTERM (HAProxy stops at once in -db mode), SIGKILL after timeout_s; the exit code."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            return self.process.wait()


@dataclass
class ReplicaSet:
    """N tritonservers of one export on free ports of `host`, behind one HAProxy; everything they write lives in
    `workdir` (default: a temporary folder, removed by stop()): haproxy.cfg, haproxy.log, rN.tritonserver.log."""

    export_dir: Path
    options: ServeOptions
    replicas: int
    balancer: BalancerOptions = field(default_factory=BalancerOptions)
    host: str = "127.0.0.1"
    workdir: Path | None = None
    tritonserver: str | Path | None = None
    haproxy: str | Path | None = None
    exit_timeout_s: int = 30
    servers: list[TritonServer] = field(default_factory=list, init=False)
    front: Balancer | None = field(default=None, init=False)
    _own_workdir: bool = field(default=False, init=False)

    @property
    def grpc_url(self) -> str:
        return f"{_url_host(self.balancer.bind)}:{self.balancer.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://{_url_host(self.balancer.bind)}:{self.balancer.http_port}"

    def start(self, ready_timeout_s: float = 180.0) -> None:
        """Start the replicas (side by side, each waited for up to ready_timeout_s), then the balancer; on any
        failure everything started is stopped and a ServeError says what failed."""
        if self.replicas < 1:
            raise ServeError(f"--replicas: expected at least 1, got {self.replicas}")
        find_haproxy(self.haproxy)  # before minutes of startup: fail now when the balancer is missing
        if self.workdir is None:
            self.workdir, self._own_workdir = Path(tempfile.mkdtemp(prefix="cmath-replicas-")), True
        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            for i in range(self.replicas):
                ports = Ports(*(check_port(self.host, 0, f"replica {i} port") for _ in range(3)))
                self.servers.append(
                    TritonServer(
                        self.export_dir,
                        self.options,
                        ports,
                        self.host,
                        binary=self.tritonserver,
                        log_file=self.workdir / f"{server_name(i)}.tritonserver.log",
                        exit_timeout_s=self.exit_timeout_s,
                    )
                )
            for server in self.servers:  # from this thread: a child's parent-death signal follows its forker
                server.launch()
            for i, server in enumerate(self.servers):  # they boot side by side; each gets the whole bound
                try:
                    server.wait_ready(ready_timeout_s)
                except ServeError as e:
                    raise ServeError(f"replica {server_name(i)} did not start: {e}") from None
            config = self.workdir / "haproxy.cfg"
            text = haproxy_config(
                [ReplicaAddress(self.host, s.ports.http, s.ports.grpc) for s in self.servers], self.balancer
            )
            tmp = config.with_suffix(".cfg.tmp")
            tmp.write_text(text)
            os.replace(tmp, config)
            self.front = Balancer(config, self.balancer, self.workdir / "haproxy.log", self.haproxy)
            self.front.start(self.replicas, min(ready_timeout_s, 60.0))
        except BaseException:
            self.stop()
            raise

    def stats(self) -> list[ServerStats]:
        assert self.front is not None
        return self.front.stats()

    def stop(self) -> dict[str, int | None]:
        """The balancer, then every replica (SIGTERM, in parallel); their exit codes by name."""
        codes: dict[str, int | None] = {}
        if self.front is not None:
            codes["haproxy"] = self.front.stop()
        results: dict[int, int | None] = {}

        def stop(i: int, server: TritonServer) -> None:
            results[i] = server.stop()
            server.cleanup()

        threads = [
            threading.Thread(target=stop, args=(i, s), daemon=True) for i, s in enumerate(self.servers)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(self.exit_timeout_s + 60)
        codes.update({server_name(i): results.get(i) for i in range(len(self.servers))})
        if self._own_workdir and self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
        return codes


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def main(argv: list[str] | None = None) -> None:
    """Print the balancer config for replicas on any machines (the file `cmath-serve --replicas` writes)."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument(
        "--replica",
        action="append",
        required=True,
        metavar="HOST:HTTP:GRPC",
        help="one replica's address (repeat for each), e.g. 10.0.0.5:8000:8001",
    )
    defaults = BalancerOptions()
    parser.add_argument("--bind", default="0.0.0.0", help="address the balancer listens on")
    parser.add_argument("--grpc-port", type=int, default=defaults.grpc_port)
    parser.add_argument("--http-port", type=int, default=defaults.http_port)
    parser.add_argument("--stats-port", type=int, default=defaults.stats_port)
    args = parser.parse_args(argv)
    try:
        replicas = [ReplicaAddress.parse(r) for r in args.replica]
    except ValueError as e:
        parser.error(str(e))
    print(
        haproxy_config(
            replicas,
            BalancerOptions(
                bind=args.bind, grpc_port=args.grpc_port, http_port=args.http_port, stats_port=args.stats_port
            ),
        ),
        end="",
    )


if __name__ == "__main__":
    main()
