"""Conversation state files: what `Conversation.save()` writes and `Conversation.load()` reads back.

A state is a flat dict of numpy arrays, written with np.savez (never pickle) in one atomic rename:

* `meta.format` / `meta.version`: "cmath-conversation-state", 2;
* `meta.model_sha256`: the sha256 of the artifact's graph (model.onnx): a state resumes only on its own model;
* `speakers` (n,) int64, `features.{m}` (n, d_m) float32, `texts` (n,) str and `texts.known` (n,) bool (False:
  the utterance was added as feature vectors);
* for a causal model with a step graph, its cached state `state.*` (streaming.Stream.state_dict).

Every key is checked (`check_state`) before anything is built from it, so a foreign, truncated or tampered
file is an ArtifactError naming the file and the key, never half a conversation.
"""

from __future__ import annotations

import zipfile
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import ArtifactError
from .files import atomic_open

if TYPE_CHECKING:
    from .model import EmotionModel
    from .streaming import StepGraph

STATE_FORMAT = "cmath-conversation-state"
STATE_VERSION = 2  # the utterances' texts are part of the state (the text encoder reads past turns)


def state_meta(model: EmotionModel) -> dict[str, np.ndarray]:
    """What a state belongs to: its format and version, and the sha256 of its graph (model.onnx)."""
    return {
        "meta.format": np.asarray(STATE_FORMAT),
        "meta.version": np.asarray(STATE_VERSION, np.int64),
        "meta.model_sha256": np.asarray(model.manifest.artifacts["fp32"].sha256),
    }


def save_state(state: dict[str, np.ndarray], path: str | Path) -> None:
    """Write a state with np.savez (no pickle) in one rename: a crash never leaves half a file at `path`."""
    with atomic_open(path, "wb") as f:
        np.savez(f, **state)


def load_state(path: str | Path) -> dict[str, np.ndarray]:
    """Read an .npz state (allow_pickle=False). Not an npz, object arrays, a truncated or corrupt file ->
    ArtifactError naming the file (and the key, when one key is unreadable)."""
    path = Path(path)
    try:
        data = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise ArtifactError(path, "no such state file") from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        why = "numpy would need pickle to read it, which cmath never uses" if "pickle" in str(e) else str(e)
        raise ArtifactError(
            path, f"not a conversation state (.npz written by Conversation.save): {why}"
        ) from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise ArtifactError(
            path, f"not a conversation state: a single {type(data).__name__}, not an .npz archive"
        )
    out = {}
    with data:
        for key in data.files:
            try:
                out[key] = data[key]
            except ValueError as e:  # object arrays need pickle, which is never allowed
                raise ArtifactError(path, f"state[{key!r}]: cannot be read without pickle ({e})") from None
            except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
                raise ArtifactError(
                    path, f"state[{key!r}]: truncated or corrupt ({type(e).__name__}: {e})"
                ) from None
    return out


def check_state(model: EmotionModel, state: Any, source: str | Path = "state") -> None:
    """Everything Conversation.from_state relies on; ArtifactError(source, "state['key']: ...") otherwise."""
    if not isinstance(state, Mapping):
        raise ArtifactError(source, f"a state is a dict of numpy arrays, got {type(state).__name__}")
    keys = _StateKeys(state, source)
    _check_meta(keys, model)
    n = _check_utterances(keys, model)
    graph = model.step_graph
    if graph is not None and "state.position" in state:
        _check_step_state(keys, model, graph, n)


@dataclass(frozen=True)
class _StateKeys:
    """A state's arrays, read one checked key at a time; errors name the source and the key."""

    state: Mapping[str, Any]
    source: str | Path

    def fail(self, key: str, problem: str) -> ArtifactError:
        return ArtifactError(self.source, f"state[{key!r}]: {problem}")

    def get(
        self, key: str, kinds: str, shape: tuple[int | None, ...] | None = None, finite: bool = False
    ) -> np.ndarray:
        """state[key] as an array of a dtype kind in `kinds`, of `shape` (None: any size on that axis)."""
        if key not in self.state:
            raise self.fail(key, "missing")
        arr = self.state[key]
        if not isinstance(arr, np.ndarray):
            arr = np.asarray(arr) if isinstance(arr, (int, float, str, list, tuple, np.generic)) else None
            if arr is None:
                raise self.fail(key, f"expected a numpy array, got {type(self.state[key]).__name__}")
        if arr.dtype.kind not in kinds:
            raise self.fail(key, f"expected dtype kind {kinds!r}, got {arr.dtype}")
        if shape is not None and (
            arr.ndim != len(shape) or any(w is not None and w != g for w, g in zip(shape, arr.shape))
        ):
            want = tuple("any" if w is None else w for w in shape)
            raise self.fail(key, f"expected shape {want}, got {arr.shape}")
        if finite and not np.isfinite(arr).all():
            raise self.fail(key, "holds NaN or inf")
        return arr


def _check_meta(keys: _StateKeys, model: EmotionModel) -> None:
    """The state's format and version are this cmath's, and it belongs to this model's graph."""
    if str(keys.get("meta.format", "U", ())) != STATE_FORMAT:
        raise keys.fail("meta.format", f"expected {STATE_FORMAT!r}, got {str(keys.state['meta.format'])!r}")
    version = int(keys.get("meta.version", "iu", ()))
    if version != STATE_VERSION:
        raise keys.fail("meta.version", f"unsupported version {version} (this cmath reads {STATE_VERSION})")
    want = model.manifest.artifacts["fp32"].sha256
    got = str(keys.get("meta.model_sha256", "U", ()))
    if got != want:
        raise keys.fail(
            "meta.model_sha256",
            f"the state belongs to another model (graph sha256 {got[:16]}..., this model has {want[:16]}...)",
        )


def _check_utterances(keys: _StateKeys, model: EmotionModel) -> int:
    """The utterances' speakers, features and texts agree with the model and with each other; their number."""
    speakers = keys.get("speakers", "iu", (None,))
    n = len(speakers)
    if n > model.manifest.max_len:
        raise keys.fail("speakers", f"at most {model.manifest.max_len} utterances (max_len), got {n}")
    if n and (speakers.min() < 0 or speakers.max() >= model.num_speakers):
        raise keys.fail(
            "speakers", f"speaker ids in [0, {model.num_speakers}), got {speakers.min()}..{speakers.max()}"
        )
    for m in model.modalities:
        keys.get(f"features.{m}", "f", (n, model.feature_dims[m]), finite=True)
    keys.get("texts", "U", (n,))
    keys.get("texts.known", "b", (n,))
    return n


def _check_step_state(keys: _StateKeys, model: EmotionModel, graph: StepGraph, n: int) -> None:
    """The step graph's cached state: its graph, a position within the utterances, every buffer's shape and the
    outputs computed so far."""
    if str(keys.get("state.sha256", "U", ())) != graph.sha256:
        raise keys.fail("state.sha256", "the cached state belongs to another step graph")
    position = int(keys.get("state.position", "iu", ()))
    if not 0 <= position <= min(n, graph.max_len):
        raise keys.fail("state.position", f"expected 0..{min(n, graph.max_len)}, got {position}")
    for spec in graph.state_spec:
        key, shape = spec["input"], tuple(spec["shape"])
        want = (position, *shape[1:]) if spec["update"] == "append" else shape
        keys.get(f"state.{key}", "f", want, finite=True)
    if position:
        probs = keys.get("state.probs", "f", (position, model.manifest.num_classes), finite=True)
        keys.get("state.embedding", "f", (position, model.manifest.d), finite=True)
        if not np.allclose(probs.sum(-1), 1.0, atol=1e-3):
            raise keys.fail("state.probs", "rows do not sum to 1")
