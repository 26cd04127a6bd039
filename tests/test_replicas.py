"""Replicas behind a real HAProxy (`cmath-serve EXPORT --replicas 3`) and the conversation client that survives
a replica's death by replaying its history.

The cluster (3 real tritonservers on the session's tiny causal export + HAProxy, all on free 127.0.0.1 ports)
starts once for the module, through the CLI as a user starts it, and is always stopped; the failover test runs
last (it SIGKILLs a replica) and then checks that SIGTERM leaves no tritonserver, stub or haproxy behind.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from cmath_runtime.errors import InputError
from cmath_serve.balancer import (
    BalancerOptions,
    ReplicaAddress,
    find_haproxy,
    haproxy_config,
    parse_stats_csv,
)
from cmath_serve.errors import ServeError, UnreachableError
from cmath_serve.launcher import check_port

pytest.importorskip("tritonclient.grpc")
from cmath_serve.conversation_client import ClientOptions, ServeClient, error_kind  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONVERSATIONS, UTTERANCES = 32, 30


def _haproxy_or_skip() -> Path:
    try:
        return find_haproxy()
    except ServeError as e:
        pytest.skip(str(e))


def _triton_or_skip() -> None:
    from cmath_serve.launcher import find_triton

    try:
        find_triton()
    except ServeError as e:
        pytest.skip(str(e))


def test_balancer_config_is_valid_haproxy_and_hashes_the_conversation_header(tmp_path: Path) -> None:
    haproxy = _haproxy_or_skip()
    replicas = [ReplicaAddress.parse("10.0.0.5:8000:8001"), ReplicaAddress.parse("10.0.0.6:9000:9001")]
    text = haproxy_config(
        replicas, BalancerOptions(bind="127.0.0.1", grpc_port=18001, http_port=18000, stats_port=18002)
    )
    (tmp_path / "haproxy.cfg").write_text(text)
    check = subprocess.run(
        [str(haproxy), "-c", "-f", str(tmp_path / "haproxy.cfg")], capture_output=True, text=True
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert text.count("balance hdr(x-cmath-conversation)") == 2 and text.count("hash-type consistent") == 2
    assert "server r1 10.0.0.6:9001 proto h2 check-proto h1 port 9000" in text  # gRPC, checked on HTTP
    assert "server r1 10.0.0.6:9000" in text
    assert "observe layer4 error-limit 1 on-error mark-down" in text
    for bad in ("10.0.0.5:8000", "host:x:8001", ":1:2", "h:0:70000"):
        with pytest.raises(ValueError, match="HOST:HTTP_PORT:GRPC_PORT"):
            ReplicaAddress.parse(bad)
    csv = (
        "# pxname,svname,qcur,status,stot,econ,eresp\ngrpc_replicas,FRONTEND,,OPEN,5,,\n"
        "grpc_replicas,r0,0,UP,3,0,0\ngrpc_replicas,r1,0,DOWN,2,1,1\n"
    )
    rows = parse_stats_csv(csv)
    assert [(r.name, r.up, r.requests, r.connection_errors) for r in rows] == [
        ("r0", True, 3, 0),
        ("r1", False, 2, 1),
    ]


def test_unreachable_server_is_a_clear_error_after_bounded_retries() -> None:
    port = check_port("127.0.0.1", 0, "port")  # free: nothing listens there
    client = ServeClient(f"127.0.0.1:{port}", ClientOptions(attempts=3, backoff_s=0.05, timeout_s=5))
    t0 = time.monotonic()
    with pytest.raises(UnreachableError, match=r"no answer for .* after 3 attempts"):
        client.conversation().add(0, t=np.zeros(4))
    assert time.monotonic() - t0 < 30
    assert client.stats.retries == 2


class Cluster:
    """`cmath-serve EXPORT --replicas N` (the CLI), its printed endpoints and pids."""

    def __init__(self, export_dir: Path, out: Path, replicas: int) -> None:
        self.out = out
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        cmd = [
            sys.executable,
            "-m",
            "cmath_serve.cli",
            str(export_dir),
            "--replicas",
            str(replicas),
            "--http-port",
            "0",
            "--grpc-port",
            "0",
            "--metrics-port",
            "0",
            "--threads",
            "1",
            "--queue-delay-us",
            "2000",
            "--exit-timeout-s",
            "5",
            "--balancer-dir",
            str(out.parent / "balancer"),
        ]
        self.proc = subprocess.Popen(
            cmd,
            stdout=open(out, "w"),  # noqa: SIM115
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )

    def wait_ready(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.out.read_text()
            if "cmath-serve: ready" in text and "Ctrl-C" in text:
                self.grpc = re.search(r"gRPC +(127\.0\.0\.1:\d+)", text).group(1)
                self.stats_url = re.search(r"stats +(http://\S+)", text).group(1)
                self.replicas = {
                    m.group(1): (int(m.group(2)), int(m.group(3)))
                    for m in re.finditer(r"replica +(r\d+) pid (\d+) +gRPC 127\.0\.0\.1:(\d+)", text)
                }
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"cmath-serve exited with {self.proc.returncode}:\n{text}")
            time.sleep(0.3)
        raise RuntimeError(f"cmath-serve --replicas not ready after {timeout} s:\n{self.out.read_text()}")

    def stats(self) -> dict[str, object]:
        import urllib.request

        with urllib.request.urlopen(f"{self.stats_url};csv", timeout=10) as r:
            return {s.name: s for s in parse_stats_csv(r.read().decode()) if s.backend == "grpc_replicas"}

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture(scope="module")
def cluster(causal_export: Path, tmp_path_factory: pytest.TempPathFactory):
    _triton_or_skip()
    _haproxy_or_skip()
    tmp = tmp_path_factory.mktemp("replicas")
    c = Cluster(causal_export, tmp / "cluster.out", 3)
    try:
        c.wait_ready()
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def model(causal_export: Path):
    import cmath_runtime

    return cmath_runtime.load(causal_export, backend="cpu", threads=1)


def _conversation(model, n: int, seed: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    rng = np.random.default_rng(seed)
    return (
        {m: rng.standard_normal((n, d)).astype(np.float32) for m, d in model.feature_dims.items()},
        rng.integers(0, model.num_speakers, n).astype(np.int64),
    )


def _serial_probs(model, feats: dict[str, np.ndarray], speakers: np.ndarray) -> np.ndarray:
    import cmath_runtime

    conv = cmath_runtime.Conversation(model)
    rows = []
    for i in range(len(speakers)):
        conv.add(int(speakers[i]), **{m: feats[m][i] for m in model.modalities})
        rows.append(conv.probs()[-1])
    return np.stack(rows)


@pytest.mark.slow
def test_batches_and_bad_input_through_the_balancer(cluster: Cluster, model) -> None:
    import cmath_runtime

    client = ServeClient(cluster.grpc)
    convs = []
    for j, n in enumerate((7, 3, 12)):
        feats, speakers = _conversation(model, n, seed=50 + j)
        convs.append({"speakers": speakers, "features": feats})
    got = client.predict(convs, embeddings=True)
    for pred, expected in zip(got, model.predict(convs, embeddings=True)):
        assert pred.labels == expected.labels
        assert np.abs(pred.probs - expected.probs).max() <= 1e-5
        assert np.abs(pred.embedding - expected.embedding).max() <= 1e-5

    # bad utterances: refused before sending, with the message a local Conversation gives
    feats, speakers = _conversation(model, 2, seed=60)
    local, remote = cmath_runtime.Conversation(model), client.conversation()
    nan = feats["a"][0].copy()
    nan[3] = np.nan
    for kwargs in (
        {"speaker": 99, "t": feats["t"][0], "a": feats["a"][0], "v": feats["v"][0]},
        {"speaker": 0, "t": feats["t"][0], "a": nan, "v": feats["v"][0]},
        {"speaker": 0, "t": feats["t"][0], "a": feats["a"][0]},
        {"speaker": 0, "t": feats["t"][0][:-1], "a": feats["a"][0], "v": feats["v"][0]},
    ):
        speaker = kwargs.pop("speaker")
        with pytest.raises(InputError) as want:
            local.add(speaker, **kwargs)
        with pytest.raises(InputError) as got_error:
            remote.add(speaker, **kwargs)
        assert str(got_error.value) == str(want.value)
    with pytest.raises(InputError, match="text_input"):  # this export has no text encoder
        remote.add(0, text="hello", a=feats["a"][0], v=feats["v"][0])
    assert len(remote) == 0 and client.stats.retries == 0

    # end=True frees the server's conversation; adding again replays it there first, answers unchanged
    feats, speakers = _conversation(model, 4, seed=61)
    conv = client.conversation()
    for i in range(4):
        emotion = conv.add(int(speakers[i]), end=i == 1, **{m: feats[m][i] for m in model.modalities})
    assert conv.replays == 1 and client.stats.replayed_utterances == 2
    expected = _serial_probs(model, feats, speakers)
    assert np.abs(conv.probs() - expected).max() <= 1e-5
    assert emotion.label == model.label_names[int(expected[-1].argmax())] == conv.latest.label
    assert np.array_equal(conv.latest.probs, emotion.probs)
    assert conv.speakers.tolist() == speakers.tolist() and conv.texts == [None] * 4
    assert np.abs(client.predict([conv])[0].probs - expected).max() <= 1e-5  # causal: whole == streamed


@pytest.mark.slow
def test_a_replica_killed_half_way_loses_no_conversation(cluster: Cluster, model) -> None:
    """32 conversations x 30 utterances streamed concurrently through HAProxy to 3 replicas; one replica is
    SIGKILLed half-way. Every conversation completes and equals its own serial in-process Conversation within
    1e-5 (the ones the dead replica held were replayed onto others), and the balancer marks the dead replica
    down and sends it nothing more."""
    data = [_conversation(model, UTTERANCES, seed=2000 + j) for j in range(CONVERSATIONS)]
    client = ServeClient(cluster.grpc, ClientOptions(attempts=8, backoff_s=0.2, timeout_s=120))
    got: dict[int, np.ndarray] = {}
    errors: list[BaseException] = []
    answered = [0]
    lock = threading.Lock()
    half = threading.Event()

    def run(j: int) -> None:
        try:
            feats, speakers = data[j]
            conv = client.conversation()
            for i in range(UTTERANCES):
                conv.add(
                    int(speakers[i]), end=i == UTTERANCES - 1, **{m: feats[m][i] for m in model.modalities}
                )
                with lock:
                    answered[0] += 1
                    if answered[0] >= CONVERSATIONS * UTTERANCES // 2:
                        half.set()
                if i == UTTERANCES // 2:
                    half.wait(300)  # nobody finishes before the kill: the kill lands mid-conversation for all
            got[j] = conv.probs()
        except BaseException as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=run, args=(j,), daemon=True) for j in range(CONVERSATIONS)]
    for t in threads:
        t.start()
    assert half.wait(400), f"half-way not reached: {answered[0]} answered, errors {errors[:1]}"
    before = cluster.stats()
    victim = max(
        before, key=lambda name: before[name].requests
    )  # the busiest replica: it holds conversations
    os.kill(cluster.replicas[victim][0], signal.SIGKILL)
    deadline = time.monotonic() + 60
    while cluster.stats()[victim].up and time.monotonic() < deadline:
        time.sleep(0.1)
    at_down = cluster.stats()
    assert not at_down[victim].up, f"the balancer still has {victim} up after 60 s: {at_down[victim]}"
    for t in threads:
        t.join(600)
    assert not errors, errors[0]
    assert len(got) == CONVERSATIONS  # 0 lost
    for j, (feats, speakers) in enumerate(data):
        assert got[j].shape == (UTTERANCES, model.manifest.num_classes)
        assert np.abs(got[j] - _serial_probs(model, feats, speakers)).max() <= 1e-5, j
    assert client.stats.replays >= 1, "no conversation was replayed: the kill did not hit a live conversation"
    end = cluster.stats()
    assert not end[victim].up
    assert end[victim].requests == at_down[victim].requests, "the balancer sent requests to the dead replica"
    alive = [name for name in end if name != victim]
    assert sum(end[n].requests - at_down[n].requests for n in alive) > 0  # the rest was served by the others
    assert re.search(rf"replica {victim} exited with code -9", cluster.out.read_text())

    # clean shutdown: SIGTERM stops the balancer and the surviving replicas; nothing of ours is left running
    assert cluster.stop() == 0, cluster.out.read_text()
    marks = [f"_{grpc}_" for _, grpc in cluster.replicas.values()]  # tritonserver's and its stubs' shm prefix
    marks += [f"--grpc-port={grpc}" for _, grpc in cluster.replicas.values()] + [
        str(cluster.out.parent / "balancer")
    ]
    assert not _processes_with(marks)
    assert not [p for p in Path("/dev/shm").iterdir() if any(m in p.name for m in marks)]


def _processes_with(marks: list[str]) -> list[str]:
    """Command lines (from /proc, never truncated) of the processes that name any of `marks`."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if any(m in cmd for m in marks):
                out.append(f"{entry.name}: {cmd}")
    return out


def test_error_kinds() -> None:
    from tritonclient.utils import InferenceServerException

    def err(status: str, msg: str) -> InferenceServerException:
        return InferenceServerException(msg, status)

    assert (
        error_kind(
            err(
                "StatusCode.INVALID_ARGUMENT",
                "inference request for sequence 5 to model 'cmath_stream' "
                "must specify the START flag on the first request",
            )
        )
        == "unknown_sequence"
    )
    assert (
        error_kind(err("StatusCode.INVALID_ARGUMENT", "sequence_id: expected a live conversation ..."))
        == "unknown_sequence"
    )
    assert (
        error_kind(err("StatusCode.UNAVAILABLE", "sequence_start ...: (cmath-serve --max-conversations)"))
        == "limit"
    )
    assert error_kind(err("StatusCode.INVALID_ARGUMENT", "speaker: expected ...")) == "request"
    assert error_kind(err("StatusCode.UNAVAILABLE", "Received http2 header with status: 502")) == "transport"


def test_cli_refuses_bad_replica_options_before_starting_anything(
    causal_export: Path, tmp_path: Path
) -> None:
    from click.testing import CliRunner

    from cmath_serve.cli import main

    def run(*args: str) -> str:
        result = CliRunner().invoke(
            main, [str(causal_export), "--http-port", "0", "--grpc-port", "0", "--metrics-port", "0", *args]
        )
        assert result.exit_code == 2, result.output
        return " ".join(result.output.split())

    assert "--haproxy / --balancer-dir: expected with --replicas N" in run("--balancer-dir", str(tmp_path))
    assert "--repo: not with --replicas" in run("--replicas", "2", "--repo", str(tmp_path / "repo"))
    assert "--haproxy: expected an executable haproxy binary" in run(
        "--replicas", "2", "--haproxy", str(tmp_path / "nope")
    )
    assert "0 is not in the range 1<=x<=64" in run("--replicas", "0")
    assert not (tmp_path / "repo").exists()


@pytest.mark.slow
@pytest.mark.parametrize("module", ["serve_load", "replicas"])
def test_server_benchmarks_run_for_real(module: str, causal_export: Path, tmp_path: Path) -> None:
    """`python -m cmath_bench.serve_load` / `cmath_bench.replicas` --quick against real servers (one stream mode;
    1 and 2 replicas behind HAProxy): every request answered without error, the pages written, the machine named
    with its ISA class, no path of this machine in them."""
    import json
    import sys

    _triton_or_skip()
    if module == "replicas":
        _haproxy_or_skip()
    extra = (
        ["--modes", "batched"]
        if module == "serve_load"
        else ["--replicas", "1,2", "--failover-conversations", "2"]
    )
    cmd = [
        sys.executable,
        "-m",
        f"cmath_bench.{module}",
        str(causal_export),
        "--quick",
        "--out",
        str(tmp_path),
    ]
    proc = subprocess.run([*cmd, *extra], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    page = json.loads((tmp_path / f"{module}.json").read_text())
    env = page["environment"]
    assert env["isa"] and env["command"].startswith(f"python -m cmath_bench.{module} EXPORT_DIR --quick")
    text = (tmp_path / f"{module}.md").read_text()
    assert str(causal_export) not in text and str(causal_export) not in json.dumps(page)
    assert (tmp_path / f"{module}.png").stat().st_size > 1000
    records = page["records"]
    if module == "serve_load":
        served = [r for r in records if r["benchmark"] in ("serve_cmath", "serve_stream")]
        assert {r["benchmark"] for r in served} == {"serve_cmath", "serve_stream"}
        assert all(r["errors"] == 0 for r in served)
        assert all(r["answered"] == r["sent"] for r in served if r["benchmark"] == "serve_cmath")
        streamed = [r for r in served if r["benchmark"] == "serve_stream"]
        assert all(r["answered"] == r["sent_planned"] == 8 * 5 for r in streamed)
        assert all(r["rss_peak_mib"] >= r["rss_idle_mib"] > 0 for r in streamed)  # the stub's memory, read
    else:
        assert [r["replicas"] for r in records] == [1, 2] and all(r["errors"] == 0 for r in records)
        assert all(
            r["answered"] == r["planned"] and r["cpu_ms_per_utterance"]["replicas"] > 0 for r in records
        )
        assert page["failover"]["killed"] in ("r0", "r1") and page["failover"]["conversations"] == 2


@pytest.mark.parametrize("module", ["serve_load", "replicas"])
def test_server_benchmark_pages_are_what_their_commands_write(module: str, tmp_path: Path) -> None:
    """docs/bench/serve_load.md and replicas.md are the markdown their command writes of the .json beside them
    (the layout docs/scaling.md and docs/benchmarks.md read), and the plot draws from that .json."""
    import importlib
    import json

    from cmath_bench.loadgen import plot

    scenario = importlib.import_module(f"cmath_bench.{module}")
    page = json.loads((ROOT / "docs" / "bench" / f"{module}.json").read_text())
    env = page.pop("environment")
    assert scenario.markdown(page, env) == (ROOT / "docs" / "bench" / f"{module}.md").read_text()
    plot(scenario.draw, page, tmp_path / f"{module}.png")
    assert (tmp_path / f"{module}.png").stat().st_size > 1000


def test_server_benchmarks_name_a_bad_export(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A folder without an export: each benchmark says so in one line (no traceback) and writes nothing."""
    from cmath_bench import replicas, serve_load

    for scenario in (serve_load, replicas):
        with pytest.raises(SystemExit) as exit_:
            scenario.main([str(tmp_path / "nope"), "--quick", "--out", str(tmp_path)])
        err = capsys.readouterr().err
        assert exit_.value.code == 1 and "does not exist" in err and "Traceback" not in err
    assert not list(tmp_path.iterdir())
