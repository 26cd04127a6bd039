"""The feature pickles the ERC field shares (SDT / MMGCN style), read without running code from the file.

Each file is one pickled tuple. Per-utterance fields are dicts keyed by conversation id, holding one
entry per utterance (a list or an array); ``trainVid`` / ``testVid`` are collections of conversation ids.

IEMOCAP layout (``iemocap_multimodal_features.pkl``), 12 items, in this order::

    0 videoIDs       {conv: [utterance id, ...]}
    1 videoSpeakers  {conv: ['M' | 'F', ...]}                 'M' -> 0, 'F' -> 1 (2 speakers)
    2 videoLabels    {conv: [int, ...]}                       happy sad neutral angry excited frustrated
    3 videoText      {conv: [(d_t,), ...]}   RoBERTa CLS features: "roberta1", SDT's text input
    4-6 roberta2, roberta3, roberta4         the other three RoBERTa feature sets, same size
    7 videoAudio     {conv: [(d_a,), ...]}
    8 videoVisual    {conv: [(d_v,), ...]}
    9 videoSentence  {conv: [str, ...]}      transcripts (only their count is checked)
    10 trainVid, 11 testVid                  collections (sets or lists) of conversation ids

SDT's train.py assumes d_t = 1024, d_v = 342 (DenseFace) and d_a = 1582 (IEMOCAP, IS10) or 300 (MELD);
this module reads whatever sizes the file has, as long as they agree across conversations.

MELD layout (``meld_multimodal_features.pkl``), 13 items: the same 12 in the same order, except that
videoSpeakers holds a one-hot list per utterance (9 long in SDT's setup; speaker id = argmax,
num_speakers = its length) and labels are neutral surprise fear sadness joy disgust anger; then::

    12 an item that SDT's public dataloader (github.com/butterfliesss/SDT, dataloader.py) unpacks as
       ``_`` and never uses; SDT's train.py builds no MELD dev split from it (its loaders take a
       validation fraction of train, and it passes valid=0.0).

The 13th item becomes the "dev" split only when it is a collection of conversation ids present in
videoIDs and disjoint from trainVid and testVid; anything else (e.g. a per-conversation dict) is ignored
and described in ``meta["extra_item"]``. Without a dev split, training holds out a validation fraction
(``types.split_validation``). Sets of ids are sorted; lists keep their order. ``Dialogue.id`` is
``str(conversation id)`` (MELD ids are ints).

The file is unpickled by ``safe_pickle_load``, which only resolves the few globals such files need
(containers, numpy array reconstruction, ``_codecs.encode``) and refuses every other one before it is
imported or called. ``encoding="latin1"`` lets Python 2 pickles of numpy arrays load.
"""

from __future__ import annotations

import importlib
import pickle
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from cmath_runtime.errors import ArtifactError, InputError

from .types import Dialogue, FeatureSet

IEMOCAP_LABELS = ["happy", "sad", "neutral", "angry", "excited", "frustrated"]
MELD_LABELS = ["neutral", "surprise", "fear", "sadness", "joy", "disgust", "anger"]
IEMOCAP_SPEAKERS = {"M": 0, "F": 1}
TEXT_FEATURES = ("roberta1", "mean")

FIELDS = (
    "videoIDs",
    "videoSpeakers",
    "videoLabels",
    "roberta1",
    "roberta2",
    "roberta3",
    "roberta4",
    "videoAudio",
    "videoVisual",
    "videoSentence",
    "trainVid",
    "testVid",
)
PER_UTTERANCE = tuple(f for f in FIELDS if not f.endswith("Vid"))
LAYOUTS = {12: "iemocap", 13: "meld"}
EXTRA_ITEM = "item13"


# ---------------------------------------------------------------- restricted unpickling


def _numpy_attr(submodule: str, name: str) -> Callable[[], object]:
    """A resolver for numpy's `_core.<submodule>.<name>` (numpy >= 2), falling back to `core` (numpy 1)."""

    def resolve() -> object:
        for package in ("numpy._core", "numpy.core"):
            try:
                return getattr(importlib.import_module(f"{package}.{submodule}"), name)
            except (ImportError, AttributeError):
                continue
        raise AttributeError(f"numpy has no {submodule}.{name}")

    return resolve


def _constant(obj: object) -> Callable[[], object]:
    return lambda: obj


def _allowed_globals() -> dict[tuple[str, str], Callable[[], object]]:
    """(module, name) as written in the file -> how to get the object; nothing else is ever resolved."""
    allowed: dict[tuple[str, str], Callable[[], object]] = {}
    for module in ("builtins", "__builtin__"):  # Python 3 and Python 2 spellings
        for obj in (list, dict, set, frozenset, tuple, bytearray, bytes, complex):
            allowed[(module, obj.__name__)] = _constant(obj)
    allowed[("collections", "OrderedDict")] = _constant(OrderedDict)
    allowed[("collections", "defaultdict")] = _constant(defaultdict)
    allowed[("numpy", "ndarray")] = _constant(np.ndarray)
    allowed[("numpy", "dtype")] = _constant(np.dtype)
    for package in ("numpy.core", "numpy._core"):
        allowed[(f"{package}.multiarray", "_reconstruct")] = _numpy_attr("multiarray", "_reconstruct")
        allowed[(f"{package}.multiarray", "scalar")] = _numpy_attr("multiarray", "scalar")
        # protocol 5 pickles of contiguous arrays rebuild them from a buffer
        allowed[(f"{package}.numeric", "_frombuffer")] = _numpy_attr("numeric", "_frombuffer")
    allowed[("_codecs", "encode")] = _constant(_latin1_encode)
    return allowed


def _latin1_encode(obj: str, encoding: str = "latin1") -> bytes:
    """What protocol < 3 pickles of `bytes` call (`_codecs.encode(text, "latin1")`); no other codec."""
    if not isinstance(obj, str) or encoding not in ("latin1", "latin-1", "iso-8859-1"):
        raise pickle.UnpicklingError(f"_codecs.encode is only allowed on text with latin1, got {encoding!r}")
    return obj.encode("latin1")


class _FeatureUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the globals in `_allowed_globals` and refuses the rest."""

    def __init__(self, file: BinaryIO, path: Path) -> None:
        super().__init__(file, encoding="latin1")
        self._path = path
        self._allowed = _allowed_globals()

    def find_class(self, module: str, name: str) -> Any:
        resolve = self._allowed.get((module, name))
        if resolve is None:
            raise ArtifactError(
                self._path, f"refuses to load global '{module}.{name}': not allowed in a feature pickle"
            )
        return resolve()

    def persistent_load(self, pid: Any) -> Any:
        raise ArtifactError(self._path, "refuses a persistent id: not allowed in a feature pickle")


def safe_pickle_load(path: str | Path) -> Any:
    """Unpickle a feature file, resolving only containers and numpy arrays; anything else is refused."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            return _FeatureUnpickler(f, path).load()
    except ArtifactError:
        raise
    except FileNotFoundError:
        raise ArtifactError(path, "file is missing") from None
    except OSError as e:
        raise ArtifactError(path, f"cannot be read ({e})") from None
    except Exception as e:  # a damaged stream fails in many ways; each means "not a readable pickle"
        raise ArtifactError(path, f"corrupt or truncated pickle ({type(e).__name__}: {e})") from None


# ---------------------------------------------------------------- layouts


def load_pickle_features(path: str | Path, text_feature: str = "roberta1") -> FeatureSet:
    """Read an SDT-style IEMOCAP (12-tuple) or MELD (13-tuple) feature pickle into a FeatureSet."""
    if text_feature not in TEXT_FEATURES:
        raise InputError("text_feature", f"one of {list(TEXT_FEATURES)}", repr(text_feature))
    path = Path(path)
    data = safe_pickle_load(path)
    layout = _detect_layout(path, data)
    fields = dict(zip((*FIELDS, EXTRA_ITEM), data, strict=False))  # IEMOCAP has no 13th item
    _check_per_utterance_fields(path, fields)
    meta: dict[str, Any] = {
        "source": "pickle",
        "layout": layout,
        "path": str(path),
        "text_feature": text_feature,
    }
    split_ids = _split_ids(path, fields, layout, meta)
    reader = _Reader(path, fields, layout, text_feature)
    splits = {name: [reader.dialogue(vid) for vid in ids] for name, ids in split_ids.items()}
    if layout == "iemocap":
        labels, num_speakers = IEMOCAP_LABELS, len(IEMOCAP_SPEAKERS)
        meta["speaker_mapping"] = dict(IEMOCAP_SPEAKERS)
    else:
        labels, num_speakers = MELD_LABELS, int(reader.speaker_width or 0)
        meta["speaker_mapping"] = "argmax of the one-hot videoSpeakers vector"
    dims = {"t": reader.dims["roberta1"], "a": reader.dims["videoAudio"], "v": reader.dims["videoVisual"]}
    return FeatureSet(list(labels), dims, num_speakers, splits, meta)


def _check_per_utterance_fields(path: Path, fields: dict[str, Any]) -> None:
    for name in PER_UTTERANCE:
        if not isinstance(fields[name], Mapping):
            raise ArtifactError(
                path, f"{name}: expected a dict keyed by conversation id, got {_kind(fields[name])}"
            )


def _split_ids(path: Path, fields: dict[str, Any], layout: str, meta: dict[str, Any]) -> dict[str, list[Any]]:
    """Conversation ids per split: train and test, and dev when MELD's 13th item is a list of new ids."""
    train, test = (_id_list(path, f"{name}Vid", fields[f"{name}Vid"]) for name in ("train", "test"))
    _check_disjoint(path, train, test)
    if layout != "meld":
        return {"train": train, "test": test}
    dev, meta["extra_item"] = _dev_ids(fields, train, test)
    return {"train": train, "test": test} if dev is None else {"train": train, "dev": dev, "test": test}


def _detect_layout(path: Path, data: Any) -> str:
    """'iemocap' for a 12-tuple, 'meld' for a 13-tuple; anything else is not a feature pickle we know."""
    if not isinstance(data, (tuple, list)) or len(data) not in LAYOUTS:
        got = f"a {len(data)}-item {type(data).__name__}" if isinstance(data, (tuple, list)) else _kind(data)
        raise ArtifactError(
            path, f"expected a 12-item (IEMOCAP) or 13-item (MELD) tuple of feature fields, got {got}"
        )
    return LAYOUTS[len(data)]


def _kind(obj: Any) -> str:
    return f"a {type(obj).__name__}"


def _id_list(path: Path, field: str, ids: Any) -> list[Any]:
    """A split's conversation ids as a list: lists keep their order, sets are sorted."""
    if isinstance(ids, (Mapping, str, bytes)) or not isinstance(
        ids, (list, tuple, set, frozenset, np.ndarray)
    ):
        raise ArtifactError(path, f"{field}: expected a collection of conversation ids, got {_kind(ids)}")
    out = _ordered(ids)
    if not out:
        raise ArtifactError(path, f"{field}: no conversations")
    try:
        unique = len(set(out)) == len(out)
    except TypeError:
        raise ArtifactError(path, f"{field}: holds entries that are not conversation ids") from None
    if not unique:
        raise ArtifactError(path, f"{field}: lists some conversation ids more than once")
    return out


def _ordered(ids: Any) -> list[Any]:
    items = ids.tolist() if isinstance(ids, np.ndarray) else list(ids)
    if not isinstance(ids, (set, frozenset)):
        return items
    try:
        return sorted(items)
    except TypeError:
        return sorted(items, key=repr)


def _check_disjoint(path: Path, train: list[Any], test: list[Any]) -> None:
    shared = set(train) & set(test)
    if shared:
        raise ArtifactError(
            path, f"trainVid and testVid share {len(shared)} conversations, e.g. {min(map(repr, shared))}"
        )


def _dev_ids(fields: dict[str, Any], train: list[Any], test: list[Any]) -> tuple[list[Any] | None, str]:
    """The MELD 13th item as dev conversation ids when it is one; else None and why it was ignored."""
    extra = fields[EXTRA_ITEM]
    if isinstance(extra, Mapping):
        return None, "ignored: a per-conversation dict, not a list of conversation ids"
    if isinstance(extra, (str, bytes)) or not isinstance(extra, (list, tuple, set, frozenset, np.ndarray)):
        return None, f"ignored: {_kind(extra)}, not a list of conversation ids"
    try:
        ids = _ordered(extra)
        known = all(vid in fields["videoIDs"] for vid in ids)
        unique = len(set(ids)) == len(ids)
    except TypeError:  # unhashable entries: not ids
        return None, "ignored: its entries are not conversation ids"
    taken = set(train) | set(test)
    if not ids or not known or not unique or taken.intersection(ids):
        return None, "ignored: not a set of new conversation ids (empty, unknown, repeated or in train/test)"
    return ids, f"dev split ({len(ids)} conversations)"


class _Reader:
    """Turns one conversation of the pickled fields into a Dialogue, checking it against the others."""

    def __init__(self, path: Path, fields: dict[str, Any], layout: str, text_feature: str) -> None:
        self.path, self.fields, self.layout, self.text_feature = path, fields, layout, text_feature
        self.dims: dict[str, int] = {}
        self.speaker_width: int | None = None
        self.num_labels = len(IEMOCAP_LABELS if layout == "iemocap" else MELD_LABELS)

    def fail(self, field: str, vid: Any, problem: str) -> ArtifactError:
        return ArtifactError(self.path, f"{field}: conversation {vid!r} {problem}")

    def entry(self, field: str, vid: Any) -> Any:
        try:
            value = self.fields[field][vid]
        except KeyError:
            raise self.fail(field, vid, "is missing") from None
        except TypeError:
            raise self.fail(field, vid, "cannot be looked up (unhashable id)") from None
        try:
            size = len(value)
        except TypeError:
            raise self.fail(field, vid, f"expected one entry per utterance, got {_kind(value)}") from None
        n = len(self.fields["videoIDs"][vid])
        if size != n:
            raise self.fail(field, vid, f"has {size} utterances, videoIDs has {n}")
        return value

    def dialogue(self, vid: Any) -> Dialogue:
        if len(self.entry("videoIDs", vid)) == 0:
            raise self.fail("videoIDs", vid, "has no utterances")
        for field in PER_UTTERANCE:  # present, with one entry per utterance, in every field
            self.entry(field, vid)
        text = self.matrix("roberta1", vid)
        if self.text_feature == "mean":
            parts = [text] + [self.matrix(f"roberta{k}", vid) for k in (2, 3, 4)]
            for k, part in zip((2, 3, 4), parts[1:], strict=True):
                if part.shape != text.shape:
                    raise self.fail(f"roberta{k}", vid, f"has shape {part.shape}, roberta1 has {text.shape}")
            text = np.mean(np.stack(parts), axis=0, dtype=np.float32)
        features = {"t": text, "a": self.matrix("videoAudio", vid), "v": self.matrix("videoVisual", vid)}
        return Dialogue(str(vid), features, self.speakers(vid), self.labels(vid))

    def matrix(self, field: str, vid: Any) -> np.ndarray:
        """(utterances, size) float32; the size must match the field's other conversations."""
        value = self.entry(field, vid)
        try:
            arr = np.asarray(value, dtype=np.float32)
        except (TypeError, ValueError):
            raise self.fail(
                field, vid, "is not a numeric (utterances, size) array (ragged or non-numeric)"
            ) from None
        if arr.ndim != 2:
            raise self.fail(field, vid, f"expected shape (utterances, size), got {arr.shape}")
        expected = self.dims.setdefault(field, arr.shape[1])
        if arr.shape[1] != expected:
            raise self.fail(
                field, vid, f"has feature size {arr.shape[1]}, other conversations have {expected}"
            )
        if not np.isfinite(arr).all():
            raise self.fail(field, vid, "has NaN or infinite values")
        return np.ascontiguousarray(arr)

    def speakers(self, vid: Any) -> np.ndarray:
        value = self.entry("videoSpeakers", vid)
        return (
            self._iemocap_speakers(vid, value)
            if self.layout == "iemocap"
            else self._onehot_speakers(vid, value)
        )

    def _iemocap_speakers(self, vid: Any, value: Any) -> np.ndarray:
        bad = [s for s in value if not (isinstance(s, str) and s in IEMOCAP_SPEAKERS)]
        if bad:
            raise self.fail("videoSpeakers", vid, f"expected 'M' or 'F' per utterance, got {bad[0]!r}")
        return np.array([IEMOCAP_SPEAKERS[s] for s in value], dtype=np.int64)

    def _onehot_speakers(self, vid: Any, value: Any) -> np.ndarray:
        try:
            arr = np.asarray(value, dtype=np.float64)
        except (TypeError, ValueError):
            raise self.fail("videoSpeakers", vid, "is not a one-hot vector per utterance") from None
        if arr.ndim != 2 or arr.shape[1] == 0:
            raise self.fail(
                "videoSpeakers", vid, f"expected one one-hot vector per utterance, got shape {arr.shape}"
            )
        width = self.speaker_width = self.speaker_width or arr.shape[1]
        if arr.shape[1] != width:
            raise self.fail(
                "videoSpeakers", vid, f"has one-hot length {arr.shape[1]}, other conversations have {width}"
            )
        ids = arr.argmax(axis=1)
        top = arr.max(axis=1)
        if not np.isfinite(arr).all() or (top <= 0).any() or ((arr == top[:, None]).sum(axis=1) != 1).any():
            raise self.fail(
                "videoSpeakers", vid, "has an utterance whose vector is not one-hot (no single speaker)"
            )
        return ids.astype(np.int64)

    def labels(self, vid: Any) -> np.ndarray:
        value = self.entry("videoLabels", vid)
        try:
            arr = np.asarray(value)
        except (TypeError, ValueError):
            raise self.fail("videoLabels", vid, "is not one integer label per utterance") from None
        integral = arr.dtype.kind in "iu" or (arr.dtype.kind == "f" and np.all(np.mod(arr, 1) == 0))
        if arr.ndim != 1 or not integral:
            raise self.fail(
                "videoLabels", vid, f"expected one integer label per utterance, got {arr.dtype} {arr.shape}"
            )
        out = arr.astype(np.int64)
        if ((out < 0) | (out >= self.num_labels)).any():
            raise self.fail(
                "videoLabels",
                vid,
                f"has labels outside 0..{self.num_labels - 1}: {sorted(set(out.tolist()))}",
            )
        return out
