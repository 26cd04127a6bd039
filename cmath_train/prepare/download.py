"""Fetch a data set's files (sources.py) into a folder: resumed, checked, never half-written.

Each file is downloaded to `NAME.part` in the folder; a connection that breaks is resumed from the bytes already
there (HTTP Range), a bounded number of times per run, and a `.part` left by an earlier run is resumed too. Only a
file whose size and SHA-256 are the published ones is renamed to NAME; one that differs (changed upstream,
truncated, corrupted on the way) is deleted and refused with both hashes named. No network: one sentence.
"""

from __future__ import annotations

import http.client
import os
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

from tqdm import tqdm

from cmath_runtime.errors import CmathError
from cmath_runtime.files import sha256_file

from .sources import MELD, RemoteFile, Source

MELD_URL_ENV = "CMATH_MELD_URL"  # a base URL serving MELD's files (a mirror); the hashes stay MELD's
ATTEMPTS = 5  # connections per file and run before giving up (the .part is kept for the next run)
TIMEOUT_S = 60.0  # per connect / read
RETRY_WAIT_S = 0.5  # before the n-th reconnection: n times this, at most 4 times
CHUNK = 1 << 16


class DownloadError(CmathError):
    """A data file could not be fetched, or what came is not the published file."""


def meld_source() -> Source:
    """MELD as published, or at the mirror named by $CMATH_MELD_URL."""
    mirror = os.environ.get(MELD_URL_ENV, "").strip()
    return MELD.at(mirror) if mirror else MELD


def download(source: Source, folder: str | Path, progress: bool = True) -> dict[str, Path]:
    """Every file of `source` into `folder` (created), checked; {file name: path}. Files already there with the
    published hash are kept as they are."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DownloadError(f"{folder}: cannot create the download folder ({e.strerror or e})") from None
    return {f.name: fetch_file(source, f, folder, progress) for f in source.files}


def fetch_file(source: Source, file: RemoteFile, folder: Path, progress: bool = True) -> Path:
    final, part = folder / file.name, folder / f"{file.name}.part"
    if final.is_file():
        got = sha256_file(final)
        if got == file.sha256:
            return final
        raise DownloadError(
            f"{final}: exists but is not {source.name}'s published file (sha256 {got}, expected {file.sha256}); "
            "move it away to download it again"
        )
    url = source.url(file)
    bar = _Progress(file, part, progress)
    try:
        for attempt in range(1, ATTEMPTS + 1):
            try:
                if _transfer(url, part, file.bytes, bar):
                    break
            except urllib.error.HTTPError as e:
                raise DownloadError(f"{url}: HTTP {e.code} {e.reason}") from None
            except urllib.error.URLError as e:  # no connection at all: offline, DNS, refused
                kept = f"; {part.name} keeps {_size(part)} bytes to resume" if _size(part) else ""
                raise DownloadError(
                    f"cannot reach {urlsplit(url).netloc} ({_reason(e.reason)}): offline? {source.name}'s files "
                    f"are listed at {source.home}; or pass --csv-dir DIR with them{kept}"
                ) from None
            except (OSError, http.client.HTTPException):  # the connection broke mid-file: resume below
                pass
            if attempt < ATTEMPTS:
                time.sleep(RETRY_WAIT_S * min(attempt, 4))
        else:
            raise DownloadError(
                f"{url}: the connection broke {ATTEMPTS} times; {part} keeps {_size(part)} of {file.bytes} "
                "bytes: run the same command again to resume"
            )
    finally:
        bar.close()
    size, got = _size(part), sha256_file(part)
    if size != file.bytes or got != file.sha256:
        part.unlink()
        raise DownloadError(
            f"{file.name} from {url}: expected {file.bytes} bytes with sha256 {file.sha256}, got {size} bytes with "
            f"sha256 {got}: changed or truncated, refused and deleted"
        )
    os.replace(part, final)
    return final


class _Progress:
    """A tqdm bar of the file's bytes, shown from the first response on (an unreachable server prints none)."""

    def __init__(self, file: RemoteFile, part: Path, enabled: bool) -> None:
        self.file, self.part, self.enabled = file, part, enabled
        self.bar: tqdm | None = None

    def start(self) -> None:
        """(Re)start at the bytes `part` holds."""
        if self.bar is None:
            self.bar = tqdm(
                total=self.file.bytes,
                unit="B",
                unit_scale=True,
                desc=self.file.name,
                disable=not self.enabled,
            )
        self.bar.n = _size(self.part)
        self.bar.refresh()

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _transfer(url: str, part: Path, expected: int, bar: _Progress) -> bool:
    """One GET of `url` appended to `part` from its current size (HTTP Range); True when the response was read to
    its end (the file is then complete as the server has it) or past the `expected` size (it fails the check),
    False when it broke off."""
    have = _size(part)
    headers = {"User-Agent": "cmath-prepare"}
    if have:
        headers["Range"] = f"bytes={have}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # nothing past what we have: the server's file ends here
            return True
        raise
    with response:
        resumed = have and response.status == 206
        declared = response.headers.get("Content-Length")
        received = 0
        with part.open("ab" if resumed else "wb") as out:  # not resumed: the server sent the whole file
            bar.start()
            while chunk := response.read(CHUNK):
                out.write(chunk)
                received += len(chunk)
                bar.update(len(chunk))
                if received + (have if resumed else 0) > expected:  # past the expected size: fails the check
                    return True
    return declared is None or received == int(declared)


def _size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else 0


def _reason(reason: object) -> str:
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror
    return str(reason).strip().splitlines()[0] if str(reason).strip() else type(reason).__name__
