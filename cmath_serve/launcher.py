"""Find and start a real `tritonserver` on the generated repository; wait for readiness; stop it cleanly.

The binary comes from `nvidia-pytriton` (pip install 'cmath[serve]'): Triton 2.51 with the Python backend only.
Two traps of that wheel are handled here, not in the user's shell:

* the Python-backend stub links `libpython3.X.so`; on a machine whose interpreter is another build of 3.X than
  the system's, loading a model fails (`'_thread.RLock' object has no attribute '_recursion_count'`) unless
  LD_LIBRARY_PATH starts with the running interpreter's own LIBDIR;
* the stub embeds Python and ignores PYTHONPATH: it finds its prefix (and site-packages) by looking `python3`
  up on PATH, so PATH starts with this interpreter's folder, and cmath's source folder travels in the model
  config (repository.py).

With `--tritonserver PATH` (e.g. /opt/tritonserver/bin/tritonserver in NVIDIA's container) that build and its own
backends are used as they are.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ServeError
from .repository import ServeOptions, write_repository

INSTALL_HINT = (
    "pip install 'cmath[serve]' (the nvidia-pytriton wheel ships the tritonserver binary), "
    "or pass --tritonserver PATH to a Triton build, e.g. /opt/tritonserver/bin/tritonserver in "
    "NVIDIA's container"
)
PY_BACKEND_FILES = ("libtriton_python.so", "triton_python_backend_utils.py")


@dataclass(frozen=True)
class TritonInstall:
    binary: Path
    python_backend: Path | None = None  # folder with libtriton_python.so (nvidia-pytriton's layout)
    stub: Path | None = None  # the Python-backend stub for this interpreter's Python version
    libs: Path | None = None  # nvidia-pytriton's bundled shared libraries

    @property
    def bundled(self) -> bool:
        return self.python_backend is not None


def find_triton(binary: str | Path | None = None) -> TritonInstall:
    """The tritonserver to run: `binary` as given, else the one nvidia-pytriton installed; ServeError if none."""
    if binary is not None:
        path = Path(binary)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise ServeError(
                f"--tritonserver: expected an executable tritonserver binary, got {binary!r} "
                f"(not an executable file); {INSTALL_HINT}."
            )
        return TritonInstall(path)
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise ServeError(f"tritonserver is not installed: {INSTALL_HINT}.")
    root = Path(list(spec.submodule_search_locations)[0])
    dist = root / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    install = TritonInstall(
        dist / "bin" / "tritonserver",
        dist / "backends" / "python",
        dist / "python_backend_stubs" / version / "triton_python_backend_stub",
        root.parent / "nvidia_pytriton.libs",
    )
    for path in (install.binary, install.python_backend / PY_BACKEND_FILES[0]):  # type: ignore[operator]
        if not path.is_file():
            raise ServeError(
                f"tritonserver is not installed completely ({path} is missing): reinstall with "
                f"pip install --force-reinstall nvidia-pytriton, or {INSTALL_HINT}."
            )
    if not install.stub.is_file():  # type: ignore[union-attr]
        raise ServeError(
            f"nvidia-pytriton has no Python-backend stub for Python {version} ({install.stub}); run "
            f"cmath-serve with a Python version it ships a stub for (3.8-3.13)."
        )
    return install


def backend_directory(install: TritonInstall, workdir: Path) -> Path | None:
    """A Triton backend folder with the Python backend and the stub for this Python (links, nothing copied)."""
    if not install.bundled:
        return None
    python = workdir / "backends" / "python"
    python.mkdir(parents=True, exist_ok=True)
    for name in PY_BACKEND_FILES:
        (python / name).symlink_to(install.python_backend / name)  # type: ignore[operator]
    (python / "triton_python_backend_stub").symlink_to(install.stub)  # type: ignore[arg-type]
    return python.parent


def server_env(install: TritonInstall, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment tritonserver (and its stub) needs: this interpreter's libpython and folder first."""
    env = dict(os.environ if base is None else base)
    libdirs = [sysconfig.get_config_var("LIBDIR") or ""]
    if install.libs is not None:
        libdirs.append(str(install.libs))
    old = env.get("LD_LIBRARY_PATH", "")
    env["LD_LIBRARY_PATH"] = ":".join([d for d in libdirs if d and Path(d).is_dir()] + ([old] if old else []))
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.setdefault("OMP_NUM_THREADS", "1")  # numpy/BLAS in the stub: onnxruntime has its own threads
    return env


def check_port(host: str, port: int, option: str) -> int:
    """`port` if it can be bound on `host` (0: a free one, chosen now); ServeError naming the option otherwise."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, port))
            return s.getsockname()[1]
    except OSError as e:
        raise ServeError(
            f"{option}: expected a free port on {host}, got {port} ({e.strerror}); pick another "
            f"with {option} PORT (0 = any free port)."
        ) from None


@dataclass
class Ports:
    http: int
    grpc: int
    metrics: int


@dataclass
class TritonServer:
    """One tritonserver process on a repository written for `export_dir`."""

    export_dir: Path
    options: ServeOptions
    ports: Ports
    host: str = "127.0.0.1"
    repo: Path | None = None
    binary: str | Path | None = None
    log_file: Path | None = None
    verbose: bool = False
    exit_timeout_s: int = 30
    process: subprocess.Popen | None = field(default=None, init=False)
    workdir: Path | None = field(default=None, init=False)
    description: dict = field(default_factory=dict, init=False)
    _group_cleared: bool = field(default=False, init=False)

    @property
    def http_url(self) -> str:
        return f"http://{_url_host(self.host)}:{self.ports.http}"

    @property
    def grpc_url(self) -> str:
        return f"{_url_host(self.host)}:{self.ports.grpc}"

    @property
    def metrics_url(self) -> str:
        return f"http://{_url_host(self.host)}:{self.ports.metrics}/metrics"

    def start(self, ready_timeout_s: float = 120.0) -> None:
        """launch(), then wait_ready(); stopped and cleaned up if it fails."""
        self.launch()
        try:
            self.wait_ready(ready_timeout_s)
        except BaseException:
            self.stop()
            self.cleanup()
            raise

    def launch(self) -> None:
        """Write the repository and start tritonserver, without waiting for it. Call it from the thread that will
        outlive the server (the main thread): the child's parent-death signal follows the thread that forked it."""
        install = find_triton(self.binary)
        self.workdir = Path(tempfile.mkdtemp(prefix="cmath-serve-"))
        try:
            repo = self.repo or self.workdir / "repository"
            self.description = write_repository(self.export_dir, repo, self.options)
            backends = backend_directory(install, self.workdir)
            cmd = [
                str(install.binary),
                f"--model-repository={repo}",
                f"--http-port={self.ports.http}",
                f"--grpc-port={self.ports.grpc}",
                f"--metrics-port={self.ports.metrics}",
                f"--http-address={self.host}",
                f"--grpc-address={self.host}",
                f"--metrics-address={self.host}",
                "--allow-gpu-metrics=false",
                "--strict-readiness=true",
                "--exit-on-error=true",
                f"--exit-timeout-secs={self.exit_timeout_s}",
                f"--log-verbose={1 if self.verbose else 0}",
                # Python-backend shared-memory regions: unique per server, so servers side by side never collide
                f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
            ]
            if backends is not None:
                cmd.append(f"--backend-directory={backends}")
            log_path = self.log_file or self.workdir / "tritonserver.log"
            log = None if self.verbose else open(log_path, "ab")  # noqa: SIM115 (the child keeps it open)
            self.log_path = log_path
            self.process = subprocess.Popen(
                cmd,
                env=server_env(install),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT if log else None,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
            if log is not None:
                log.close()
        except BaseException:
            self.stop()
            self.cleanup()
            raise

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        url = f"{self.http_url}/v2/health/ready"
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise ServeError(
                    f"tritonserver exited with code {self.process.returncode} before it was ready"
                    f"{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(url, timeout=1) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        raise ServeError(
            f"tritonserver was not ready after {timeout_s:g} s (--ready-timeout-s){self.log_tail()}"
        )

    def log_tail(self, lines: int = 25) -> str:
        path = getattr(self, "log_path", None)
        if self.verbose or path is None or not Path(path).is_file():
            return ""
        text = Path(path).read_text(errors="replace").splitlines()
        keep = [t for t in text if t[:1] in "EW" or "error" in t.lower() or "Error" in t][-lines:] or text[
            -lines:
        ]
        return f"; from its log {path}:\n" + "\n".join(keep)

    def terminate(self) -> None:
        """Ask tritonserver to stop: it refuses new requests, finishes in-flight ones, unloads and exits."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def wait(self, timeout: float | None = None) -> int:
        assert self.process is not None
        return self.process.wait(timeout)

    @property
    def shm_prefix(self) -> str:
        """The Python backend's shared-memory regions (/dev/shm): unique per server, so servers never collide."""
        return f"cmath_serve_{os.getpid()}_{self.ports.grpc}_"

    def stop(self, timeout_s: float | None = None) -> int | None:
        """terminate(), wait up to exit_timeout_s + 15 s, then kill; the exit code (None if it never started).

        Whatever tritonserver left behind goes too: a tritonserver that was killed (SIGKILL, OOM) leaves its
        Python-backend stubs running and their shared-memory regions in /dev/shm; the stubs are in its process
        group (killed here) and the regions carry this server's prefix (removed here)."""
        if self.process is None:
            return None
        self.terminate()
        try:
            code = self.process.wait(timeout_s if timeout_s is not None else self.exit_timeout_s + 15)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            code = self.process.wait()
        if not self._group_cleared:  # once, right after reaping: later the id may belong to another group
            self._group_cleared = True
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, signal.SIGKILL)
        for region in Path("/dev/shm").glob(f"{self.shm_prefix}*"):
            region.unlink(missing_ok=True)
        return code

    def cleanup(self) -> None:
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM if cmath-serve dies without stopping it (Linux prctl)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass
