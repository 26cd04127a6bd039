"""Files are written atomically (temp file in the same folder + rename) and identified by sha256."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from .errors import ArtifactError


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temp file next to `path`; on success it replaces `path` in one rename, on error it vanishes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; the final file gets ordinary permissions
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_problem(path: str | os.PathLike, sha256: str) -> str | None:
    """What is wrong with the file at `path` that should have this sha256: None when it exists and matches."""
    if not Path(path).is_file():
        return "missing"
    digest = sha256_file(path)
    if digest != sha256:
        return (
            f"sha256 mismatch: export.json says {sha256[:16]}..., the file has {digest[:16]}... "
            "(corrupt, truncated or replaced; re-export it)"
        )
    return None


def verified_file(path: Path, sha256: str, what: str, verify: bool = True) -> Path:
    """`path`, a file export.json lists with its sha256, once it is known to be there and (`verify`) to match;
    ArtifactError naming the file otherwise. Every graph and tokenizer file is opened through this."""
    if not path.is_file():
        raise ArtifactError(path, f"the {what} listed in export.json is missing")
    problem = sha256_problem(path, sha256) if verify else None
    if problem is not None:
        raise ArtifactError(path, problem)
    return path


def read_tagged_json(path: str | os.PathLike, fmt: str, version: int, what: str) -> dict[str, Any]:
    """A cmath JSON document (checkpoint config, export manifest, features meta): valid JSON, our format, our version.

    Anything else is an ArtifactError naming the file: corrupt, foreign or from an unsupported version.
    """
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(path, f"corrupt {what}, not valid JSON ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != fmt:
        got = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
        raise ArtifactError(path, f"foreign file: expected format {fmt!r}, got {got!r}")
    if doc.get("version") != version:
        raise ArtifactError(
            path, f"unsupported {what} version {doc.get('version')!r} (this cmath reads {version})"
        )
    return doc


def confined_path(
    directory: str | os.PathLike, name: Any, entry: str, where: str | os.PathLike | None = None
) -> Path:
    """`directory / name` for a file a manifest names, provided it stays inside `directory` (symlinks followed).

    An absolute name, a `..` that climbs out, or a symlink pointing elsewhere is an ArtifactError naming `entry`
    (e.g. "artifacts['fp32'].file") and the manifest `where`: a manifest must never make cmath read outside
    its own folder, whatever sha256 it claims.
    """
    where = where if where is not None else directory
    if not isinstance(name, str) or not name or "\x00" in name:
        raise ArtifactError(where, f"invalid manifest: {entry} should be a file name, got {name!r}")
    rel = Path(name)
    if rel.is_absolute():
        raise ArtifactError(
            where,
            f"invalid manifest: {entry} is an absolute path ({name!r}); files must lie "
            "inside the artifact folder",
        )
    root = Path(directory).resolve()
    target = (root / rel).resolve()  # follows every symlink that exists (strict=False)
    if target == root or root not in target.parents:
        raise ArtifactError(
            where,
            f"invalid manifest: {entry} ({name!r}) resolves to {target}, outside the artifact folder {root}",
        )
    return Path(directory) / rel
