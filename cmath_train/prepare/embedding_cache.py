"""An on-disk cache of text embeddings, so re-running cmath-prepare does not embed the same text twice.

    CACHE_DIR/<first 16 hex of sha256(encoder identity)>/shard-<uuid>.npz
        key (n,) str   sha256 hex of (encoder identity + NUL + text)
        emb (n, d) float32

Shards are written atomically and never modified; a run adds one shard per flush. Plain .npz read with
allow_pickle=False. A shard that cannot be read is ignored (a cache never breaks a run).
"""

from __future__ import annotations

import hashlib
import io
import uuid
import warnings
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tqdm import tqdm

from cmath_runtime.files import atomic_write_bytes

if TYPE_CHECKING:
    from .text_encoder import TextEncoder as Encoder  # the one encoder protocol

DEFAULT_CACHE_DIR = Path("~/.cache/cmath/text")


class EmbeddingCache:
    def __init__(self, root: str | Path, identity: str, dim: int) -> None:
        self.identity, self.dim = identity, dim
        self.dir = Path(root).expanduser() / hashlib.sha256(identity.encode()).hexdigest()[:16]

    def key(self, text: str) -> str:
        return hashlib.sha256(f"{self.identity}\0{text}".encode()).hexdigest()

    def load(self) -> dict[str, np.ndarray]:
        found: dict[str, np.ndarray] = {}
        for shard in sorted(self.dir.glob("shard-*.npz")):
            try:
                with np.load(shard, allow_pickle=False) as z:
                    keys, emb = z["key"], z["emb"]
            except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
                warnings.warn(f"{shard}: unreadable cache shard ignored ({e})", stacklevel=2)
                continue
            if emb.ndim != 2 or emb.shape != (len(keys), self.dim):
                warnings.warn(
                    f"{shard}: cache shard of shape {emb.shape} ignored (dim {self.dim})", stacklevel=2
                )
                continue
            found.update(zip(keys.tolist(), emb.astype(np.float32), strict=True))
        return found

    def add(self, keys: list[str], emb: np.ndarray) -> None:
        if not keys:
            return
        buf = io.BytesIO()
        np.savez(buf, key=np.array(keys, dtype="U64"), emb=np.asarray(emb, np.float32))
        atomic_write_bytes(self.dir / f"shard-{uuid.uuid4().hex}.npz", buf.getvalue())


def encode_texts(
    encoder: Encoder,
    texts: Sequence[str],
    cache: EmbeddingCache | None = None,
    chunk: int = 256,
    flush_every: int = 4096,
    desc: str = "embedding",
) -> np.ndarray:
    """(len(texts), dim) float32 embeddings; each distinct text is embedded once and looked up in `cache`.

    Texts still to embed are sorted by length (little padding per batch) and embedded in chunks under a
    tqdm bar; the cache gets a shard every `flush_every` new embeddings, so an interrupted run keeps its work.
    """
    unique = list(dict.fromkeys(texts))
    known = cache.load() if cache is not None else {}
    keys = {t: cache.key(t) for t in unique} if cache is not None else {}
    vectors: dict[str, np.ndarray] = {
        t: known[keys[t]] for t in unique if cache is not None and keys[t] in known
    }
    todo = sorted((t for t in unique if t not in vectors), key=len)
    pending: list[str] = []
    with tqdm(total=len(todo), desc=desc, unit="text", disable=not todo) as bar:
        for start in range(0, len(todo), chunk):
            part = todo[start : start + chunk]
            emb = np.asarray(encoder.encode(part), np.float32)
            if emb.shape != (len(part), encoder.dim):
                raise RuntimeError(
                    f"text encoder returned shape {emb.shape} for {len(part)} texts of dim {encoder.dim}"
                )
            vectors.update(zip(part, emb, strict=True))
            pending += part
            bar.update(len(part))
            if cache is not None and len(pending) >= flush_every:
                cache.add([keys[t] for t in pending], np.stack([vectors[t] for t in pending]))
                pending = []
    if cache is not None and pending:
        cache.add([keys[t] for t in pending], np.stack([vectors[t] for t in pending]))
    if not texts:
        return np.zeros((0, encoder.dim), np.float32)
    return np.stack([vectors[t] for t in texts]).astype(np.float32)
