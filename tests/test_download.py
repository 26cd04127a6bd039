"""`cmath-prepare meld --download DIR` (cmath_train/prepare/download.py) against a real HTTP server on 127.0.0.1
serving small MELD-like CSVs made here, with their hashes in place of MELD's: the real path from the download on
(prepare, train, export, the model card, the runtime), resumed downloads, refused files, the offline message."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from click.testing import CliRunner

from cmath_train.prepare import download as download_module
from cmath_train.prepare.cli import main as prepare_cli
from cmath_train.prepare.download import MELD_URL_ENV, DownloadError, download
from cmath_train.prepare.sources import MELD, RemoteFile, Source
from tests.conftest import context_rows
from tests.test_prepare import MELD_HEADER, meld_rows, write_csv


class FileServer:
    """Serves `files` at /NAME with HTTP Range; `cut_after` bytes into a response (None: never) it drops the
    connection, for the first `cuts` responses of each file (None: every response). Records (name, Range)."""

    def __init__(
        self, files: dict[str, bytes], cut_after: int | None = None, cuts: int | None = None
    ) -> None:
        self.files, self.cut_after, self.cuts = files, cut_after, cuts
        self.requests: list[tuple[str, str | None]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                name = self.path.rsplit("/", 1)[-1]
                rng = self.headers.get("Range")
                server.requests.append((name, rng))
                if name not in server.files:
                    self.send_error(404)
                    return
                data, start = server.files[name], 0
                if rng:
                    start = int(rng.removeprefix("bytes=").split("-")[0])
                    if start >= len(data):
                        self.send_error(416)
                        return
                self.send_response(206 if rng else 200)
                if rng:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                body = data[start:]
                seen = sum(1 for n, _ in server.requests if n == name)
                if server.cut_after is not None and (server.cuts is None or seen <= server.cuts):
                    self.wfile.write(body[: server.cut_after])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/data/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> FileServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)


def meld_like_files(tmp_path: Path) -> dict[str, bytes]:
    """Small CSVs with MELD's names and columns; their words tell their labels (conftest.context_rows)."""
    out = {}
    for k, (f, n) in enumerate(zip(MELD.files, (48, 24, 12), strict=True)):
        path = write_csv(tmp_path / f"made_{f.name}", MELD_HEADER, meld_rows(context_rows(n, k)))
        out[f.name] = path.read_bytes()
    return out


def source_for(files: dict[str, bytes], base_url: str = "http://127.0.0.1:9/unused/") -> Source:
    """MELD's Source with these files' hashes and sizes (what a test injects in place of the published ones)."""
    remote = tuple(RemoteFile(n, hashlib.sha256(b).hexdigest(), len(b)) for n, b in files.items())
    return dataclasses.replace(MELD, base_url=base_url, files=remote)


@pytest.fixture
def files(tmp_path: Path) -> dict[str, bytes]:
    return meld_like_files(tmp_path)


@pytest.fixture(autouse=True)
def no_retry_wait(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(download_module, "RETRY_WAIT_S", 0.0)
    yield


def free_closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_download_then_prepare_train_export_and_the_card(
    files: dict[str, bytes], tmp_path: Path, tiny_encoder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The newcomer's path: `cmath-prepare meld --download` from a server that cuts every file's first response
    midway (resumed with Range), then cmath-train, cmath-export, the card and the runtime on raw text."""
    import cmath_runtime
    from cmath_export.cli import main as export_cli
    from cmath_train.cli import main as train_cli
    from tests.test_model_card import assert_card_matches_metrics, read_card

    monkeypatch.setattr(download_module, "MELD", source_for(files))
    with FileServer(files, cut_after=300, cuts=1) as server:
        monkeypatch.setenv(MELD_URL_ENV, server.url)
        data, feats = tmp_path / "meld", tmp_path / "feat"
        args = ["meld", "--download", str(data), "--out", str(feats), "--encoder", str(tiny_encoder)]
        args += ["--no-cache", "--finetune-epochs", "1", "--finetune-batch-size", "8"]
        args += ["--context-window", "2", "--context-max-tokens", "48"]
        result = CliRunner().invoke(prepare_cli, args)
    assert result.exit_code == 0, result.output
    assert {p.name: p.read_bytes() for p in data.iterdir()} == files  # no .part left
    for name in files:  # each first response was cut: the second asked for the rest
        assert [r for n, r in server.requests if n == name] == [None, "bytes=300-"]
    meta = json.loads((feats / "meta.json").read_text())
    assert meta["meta"]["source"]["kind"] == "meld"

    run = tmp_path / "run"
    result = CliRunner().invoke(
        train_cli, ["--data", str(feats), "--seeds", "2", "--epochs", "1", "--d", "16", "--out", str(run)]
    )
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(export_cli, [str(run), "--quiet"])
    assert result.exit_code == 0, result.output

    metrics = assert_card_matches_metrics(run / "export", run)
    assert metrics["over_seeds"]["seeds"] == [0, 1] and "baseline_context_free" in metrics
    front, body = read_card(run / "export")
    assert front["datasets"] == ["MELD"] and front["training_data_license"] == "GPL-3.0"
    assert front["language"] == ["en"] and "English multi-party TV dialogue" in body
    assert "differ from MELD's as published" in body  # the test's files, not MELD's
    model = cmath_runtime.load(run / "export", backend="cpu", threads=1)
    texts = ["great lovely fun", "stupid awful hate"]  # the default encoder reads whole conversations
    [pred] = model.predict([{"speakers": [0, 1], "texts": texts}])
    assert pred.labels == [model.label_names[i] for i in pred.probs.argmax(-1)] and len(pred) == 2


def test_a_part_left_by_a_broken_run_is_resumed_by_the_next(files: dict[str, bytes], tmp_path: Path) -> None:
    """A server that drops every response after 200 bytes: the run stops after its bounded reconnections with the
    bytes it has in NAME.part (and no NAME); the next run, from a good server, asks only for the rest."""
    source = source_for(files)
    name = source.files[0].name
    broke = pytest.raises(DownloadError, match="broke 5 times.*run the same command again to resume")
    with FileServer(files, cut_after=200) as bad, broke:
        download(source.at(bad.url), tmp_path / "d", progress=False)
    part = tmp_path / "d" / f"{name}.part"
    assert part.stat().st_size == 1000 and not (tmp_path / "d" / name).exists()
    assert [r for _, r in bad.requests] == [None, "bytes=200-", "bytes=400-", "bytes=600-", "bytes=800-"]
    with FileServer(files) as good:
        got = download(source.at(good.url), tmp_path / "d", progress=False)
    assert {n: p.read_bytes() for n, p in got.items()} == files
    assert good.requests[0] == (name, "bytes=1000-")
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == sorted(files)
    with FileServer(files) as again:  # a second download finds the checked files and fetches nothing
        download(source.at(again.url), tmp_path / "d", progress=False)
    assert again.requests == []


@pytest.mark.parametrize("damage", ["changed", "truncated"])
def test_a_changed_or_truncated_file_is_refused_and_nothing_is_left(
    damage: str, files: dict[str, bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = source_for(files)
    name = source.files[1].name
    served = dict(files)
    served[name] = files[name].replace(b"lovely", b"LOVELY", 1) if damage == "changed" else files[name][:-40]
    monkeypatch.setattr(download_module, "MELD", source)
    out = tmp_path / "d"
    with FileServer(served) as server:
        monkeypatch.setenv(MELD_URL_ENV, server.url)
        result = CliRunner().invoke(
            prepare_cli, ["meld", "--download", str(out), "--out", str(tmp_path / "f")]
        )
    assert result.exit_code == 1 and "Traceback" not in result.output
    expected = source.files[1]
    got = hashlib.sha256(served[name]).hexdigest()
    assert (
        f"{name} from {server.url}{name}: expected {expected.bytes} bytes with sha256 {expected.sha256}, got "
        in (result.output)
    )
    assert (
        f"{len(served[name])} bytes with sha256 {got}: changed or truncated, refused and deleted"
        in result.output
    )
    assert sorted(p.name for p in out.iterdir()) == [
        source.files[0].name
    ]  # the good file; nothing of the bad one
    assert not (tmp_path / "f").exists()


def test_a_different_file_already_there_is_named_not_overwritten(
    files: dict[str, bytes], tmp_path: Path
) -> None:
    source = source_for(files)
    (tmp_path / source.files[0].name).write_bytes(b"mine")
    with pytest.raises(DownloadError, match="exists but is not MELD's published file .*move it away"):
        download(source.at("http://127.0.0.1:9/"), tmp_path, progress=False)
    assert (tmp_path / source.files[0].name).read_bytes() == b"mine"


def test_offline_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    port = free_closed_port()
    monkeypatch.setenv(MELD_URL_ENV, f"http://127.0.0.1:{port}/meld")
    result = CliRunner().invoke(
        prepare_cli, ["meld", "--download", str(tmp_path / "d"), "--out", str(tmp_path / "f")]
    )
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        f"Error: cannot reach 127.0.0.1:{port} (Connection refused): offline? MELD's files are listed at "
        f"{MELD.home}; or pass --csv-dir DIR with them"
    ]
    assert list((tmp_path / "d").iterdir()) == []


def test_meld_takes_one_of_csv_dir_or_download(tmp_path: Path) -> None:
    for args in ([], ["--csv-dir", str(tmp_path), "--download", str(tmp_path)]):
        result = CliRunner().invoke(prepare_cli, ["meld", *args, "--out", str(tmp_path / "f")])
        assert result.exit_code == 2 and "give one of --csv-dir DIR" in result.output


def test_the_meld_source_is_the_published_files_and_a_mirror_keeps_the_hashes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert MELD.url(MELD.files[0]) == (
        "https://raw.githubusercontent.com/declare-lab/MELD/master/data/MELD/train_sent_emo.csv"
    )
    assert [f.name for f in MELD.files] == ["train_sent_emo.csv", "dev_sent_emo.csv", "test_sent_emo.csv"]
    monkeypatch.setenv(MELD_URL_ENV, "http://mirror.example/meld")
    mirror = download_module.meld_source()
    assert mirror.url(mirror.files[1]) == "http://mirror.example/meld/dev_sent_emo.csv"
    assert mirror.files == MELD.files
