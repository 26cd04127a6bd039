"""SDT-style feature pickles: both layouts load, bad or hostile files are refused with a clear error."""

from __future__ import annotations

import io
import os
import pickle
import pickletools
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cmath_runtime.errors import ArtifactError, InputError
from cmath_train.data import pickles
from cmath_train.data.pickles import (
    IEMOCAP_LABELS,
    MELD_LABELS,
    load_pickle_features,
    safe_pickle_load,
)
from cmath_train.data.types import split_validation

D_T, D_A, D_V = 6, 5, 4
IEMOCAP_CONVS = {"Ses01F_impro01": 3, "Ses01M_script02": 4, "Ses05F_impro03": 2, "Ses05M_script01": 5}
MELD_CONVS = {0: 3, 1: 2, 2: 4, 1039: 2, 1040: 3}
MELD_SPEAKERS = 9


def _fields(convs: dict[Any, int], speakers: Any, num_labels: int, seed: int) -> dict[str, dict]:
    """Per-utterance fields in the SDT shape: dicts of per-utterance lists (features as lists of arrays)."""
    rng = np.random.default_rng(seed)

    def rows(n: int, d: int) -> list[np.ndarray]:
        return list(rng.standard_normal((n, d)))

    out: dict[str, dict] = {name: {} for name in ("ids", "spk", "lab", "r1", "r2", "r3", "r4", "a", "v", "s")}
    for i, (vid, n) in enumerate(convs.items()):
        out["ids"][vid] = [f"{vid}_u{j}" for j in range(n)]
        out["spk"][vid] = speakers(rng, n)
        out["lab"][vid] = [int((i + j) % num_labels) for j in range(n)]
        for k in ("r1", "r2", "r3", "r4"):
            out[k][vid] = rows(n, D_T)
        out["a"][vid] = rows(n, D_A)
        out["v"][vid] = rows(n, D_V)
        out["s"][vid] = [f"utterance {j}" for j in range(n)]
    return out


def _as_tuple(f: dict[str, dict], train: Any, test: Any, *extra: Any) -> tuple:
    keys = ("ids", "spk", "lab", "r1", "r2", "r3", "r4", "a", "v", "s")
    return (*(f[k] for k in keys), train, test, *extra)


def iemocap_data() -> tuple:
    f = _fields(IEMOCAP_CONVS, lambda rng, n: [str(s) for s in rng.choice(["M", "F"], n)], 6, seed=0)
    return _as_tuple(f, {"Ses01F_impro01", "Ses01M_script02", "Ses05F_impro03"}, {"Ses05M_script01"})


def meld_data(extra: Any = None) -> tuple:
    def onehot(rng: np.random.Generator, n: int) -> list[list[int]]:
        return [[int(k == s) for k in range(MELD_SPEAKERS)] for s in rng.integers(0, MELD_SPEAKERS, n)]

    f = _fields(MELD_CONVS, onehot, 7, seed=1)
    if extra is None:  # a per-conversation dict, like sentiment labels
        extra = {vid: [1] * n for vid, n in MELD_CONVS.items()}
    return _as_tuple(f, [0, 1, 2], [1039, 1040], extra)


def write(path: Path, obj: Any, protocol: int = pickle.DEFAULT_PROTOCOL) -> Path:
    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    return path


# ---------------------------------------------------------------- layouts


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_iemocap_layout_loads(tmp_path: Path, protocol: int) -> None:
    data = iemocap_data()
    fs = load_pickle_features(write(tmp_path / "iemocap.pkl", data, protocol))
    assert fs.label_names == IEMOCAP_LABELS
    assert fs.num_speakers == 2
    assert fs.feature_dims == {"t": D_T, "a": D_A, "v": D_V}
    assert list(fs.splits) == ["train", "test"]
    assert [d.id for d in fs.splits["train"]] == ["Ses01F_impro01", "Ses01M_script02", "Ses05F_impro03"]
    assert [d.id for d in fs.splits["test"]] == ["Ses05M_script01"]
    assert fs.meta["source"] == "pickle" and fs.meta["layout"] == "iemocap"
    assert fs.meta["path"] == str(tmp_path / "iemocap.pkl")
    for d in fs.splits["train"] + fs.splits["test"]:
        n = IEMOCAP_CONVS[d.id]
        assert {m: x.shape for m, x in d.features.items()} == {"t": (n, D_T), "a": (n, D_A), "v": (n, D_V)}
        assert all(x.dtype == np.float32 for x in d.features.values())
        assert d.speakers.dtype == np.int64 and d.labels.dtype == np.int64
        assert d.speakers.tolist() == [{"M": 0, "F": 1}[s] for s in data[1][d.id]]
        assert d.labels.tolist() == data[2][d.id]
        np.testing.assert_allclose(d.features["t"], np.stack(data[3][d.id]), rtol=1e-6)
        np.testing.assert_allclose(d.features["a"], np.stack(data[7][d.id]), rtol=1e-6)
        np.testing.assert_allclose(d.features["v"], np.stack(data[8][d.id]), rtol=1e-6)


def test_iemocap_without_dev_split_uses_a_validation_fraction(tmp_path: Path) -> None:
    fs = load_pickle_features(write(tmp_path / "iemocap.pkl", iemocap_data()))
    assert "dev" not in fs.splits
    train, val = split_validation(fs.splits["train"], 0.3, seed=0)
    assert len(train) == 2 and len(val) == 1


def test_mean_text_feature_averages_the_four_roberta_sets(tmp_path: Path) -> None:
    data = iemocap_data()
    fs = load_pickle_features(write(tmp_path / "iemocap.pkl", data), text_feature="mean")
    d = fs.splits["test"][0]
    expected = np.mean([np.stack(data[k][d.id]) for k in (3, 4, 5, 6)], axis=0)
    np.testing.assert_allclose(d.features["t"], expected, rtol=1e-5)
    assert d.features["t"].dtype == np.float32 and fs.meta["text_feature"] == "mean"


def test_unknown_text_feature_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="text_feature: expected one of"):
        load_pickle_features(write(tmp_path / "iemocap.pkl", iemocap_data()), text_feature="cls")


@pytest.mark.parametrize("protocol", [2, 4])
def test_meld_layout_loads_with_one_hot_speakers(tmp_path: Path, protocol: int) -> None:
    data = meld_data()
    fs = load_pickle_features(write(tmp_path / "meld.pkl", data, protocol))
    assert fs.label_names == MELD_LABELS
    assert fs.num_speakers == MELD_SPEAKERS
    assert fs.meta["layout"] == "meld"
    assert list(fs.splits) == ["train", "test"]  # a per-conversation 13th item is not a dev split
    assert "ignored" in fs.meta["extra_item"]
    assert [d.id for d in fs.splits["train"]] == ["0", "1", "2"]
    assert [d.id for d in fs.splits["test"]] == ["1039", "1040"]
    for d in fs.splits["train"] + fs.splits["test"]:
        vid = int(d.id)
        assert d.speakers.tolist() == [row.index(1) for row in data[1][vid]]
        assert d.labels.tolist() == data[2][vid]
        assert d.features["t"].shape == (MELD_CONVS[vid], D_T)
        assert d.speakers.dtype == np.int64 and d.labels.dtype == np.int64


def test_meld_thirteenth_item_of_new_ids_becomes_dev(tmp_path: Path) -> None:
    data = meld_data(extra=[2])
    data = (*data[:10], [0, 1], *data[11:])  # conversation 2 moves from train to dev
    fs = load_pickle_features(write(tmp_path / "meld.pkl", data))
    assert list(fs.splits) == ["train", "dev", "test"]
    assert [d.id for d in fs.splits["dev"]] == ["2"]
    assert fs.meta["extra_item"].startswith("dev split")


def test_meld_thirteenth_item_overlapping_test_is_ignored(tmp_path: Path) -> None:
    fs = load_pickle_features(write(tmp_path / "meld.pkl", meld_data(extra=[1039, 1040])))
    assert "dev" not in fs.splits and "ignored" in fs.meta["extra_item"]


# ---------------------------------------------------------------- consistency checks


def _broken(tmp_path: Path, index: int, edit: Any) -> Path:
    data = list(iemocap_data())
    data[index] = edit(data[index])
    return write(tmp_path / "broken.pkl", tuple(data))


def _without(d: dict, key: Any) -> dict:
    return {k: v for k, v in d.items() if k != key}


@pytest.mark.parametrize(
    ("index", "edit", "message"),
    [
        (
            7,
            lambda d: _without(d, "Ses01M_script02"),
            "videoAudio: conversation 'Ses01M_script02' is missing",
        ),
        (5, lambda d: _without(d, "Ses05M_script01"), "roberta3: conversation 'Ses05M_script01' is missing"),
        (
            2,
            lambda d: {**d, "Ses01F_impro01": [0, 1]},
            "videoLabels: conversation 'Ses01F_impro01' has 2 utter",
        ),
        (
            9,
            lambda d: {**d, "Ses05F_impro03": ["x"]},
            "videoSentence: conversation 'Ses05F_impro03' has 1 utter",
        ),
        (
            8,
            lambda d: {**d, "Ses05M_script01": list(np.zeros((5, D_V + 1)))},
            "videoVisual: .* feature size 5",
        ),
        (
            3,
            lambda d: {**d, "Ses01F_impro01": [np.zeros(D_T), np.zeros(2), np.zeros(D_T)]},
            "roberta1: .*ragged or non-numeric",
        ),
        (1, lambda d: {**d, "Ses01F_impro01": ["M", "X", "F"]}, "videoSpeakers: .* 'M' or 'F'.* 'X'"),
        (2, lambda d: {**d, "Ses01F_impro01": [0, 6, 1]}, r"videoLabels: .* outside 0\.\.5"),
        (7, lambda d: {**d, "Ses01F_impro01": list(np.full((3, D_A), np.nan))}, "videoAudio: .* NaN"),
        (10, lambda s: {"Ses01F_impro01", "Ses05M_script01"}, "share 1 conversations"),
        (11, lambda s: {"no_such_conversation"}, "videoIDs: conversation 'no_such_conversation' is missing"),
        (11, lambda s: "Ses05M_script01", "testVid: expected a collection of conversation ids"),
        (3, lambda d: list(d.values()), "roberta1: expected a dict keyed by conversation id"),
    ],
)
def test_inconsistent_fields_name_field_and_conversation(
    tmp_path: Path, index: int, edit: Any, message: str
) -> None:
    path = _broken(tmp_path, index, edit)
    with pytest.raises(ArtifactError, match=message) as err:
        load_pickle_features(path)
    assert err.value.path == path


def test_mean_text_feature_needs_equal_roberta_sizes(tmp_path: Path) -> None:
    path = _broken(tmp_path, 6, lambda d: {vid: list(np.zeros((len(v), D_T + 2))) for vid, v in d.items()})
    assert load_pickle_features(path).feature_dims["t"] == D_T  # roberta4 is unused by default
    with pytest.raises(ArtifactError, match="roberta4: .* has shape"):
        load_pickle_features(path, text_feature="mean")


def test_meld_speaker_vectors_must_be_one_hot(tmp_path: Path) -> None:
    data = list(meld_data())
    data[1] = {**data[1], 0: [[0] * MELD_SPEAKERS] * 3}
    with pytest.raises(ArtifactError, match="videoSpeakers: conversation 0 .* not one-hot"):
        load_pickle_features(write(tmp_path / "meld.pkl", tuple(data)))
    data[1] = {**data[1], 0: [[1, 0, 0]] * 3}
    with pytest.raises(ArtifactError, match="one-hot length 3, other conversations have 9|one-hot length 9"):
        load_pickle_features(write(tmp_path / "meld.pkl", tuple(data)))


@pytest.mark.parametrize("obj", [tuple(range(5)), iemocap_data()[:11], (*meld_data(), None), {"a": 1}])
def test_wrong_tuple_length_is_refused(tmp_path: Path, obj: Any) -> None:
    with pytest.raises(ArtifactError, match="expected a 12-item .IEMOCAP. or 13-item .MELD. tuple"):
        load_pickle_features(write(tmp_path / "other.pkl", obj))


# ---------------------------------------------------------------- safety


class _Exploit:
    def __init__(self, func: Any, arg: str) -> None:
        self.func, self.arg = func, arg

    def __reduce__(self) -> tuple:
        return (self.func, (self.arg,))


def test_pickle_calling_os_system_is_refused_and_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    data = list(iemocap_data())
    data[9] = _Exploit(os.system, f"echo pwned > {marker}")  # hidden inside a valid-looking tuple
    path = write(tmp_path / "evil.pkl", tuple(data))
    refused = f"{os.system.__module__}.system"  # posix.system on Linux
    with pytest.raises(ArtifactError, match=f"refuses to load global '{refused}': not allowed") as err:
        load_pickle_features(path)
    assert str(path) in str(err.value)
    assert not marker.exists()


@pytest.mark.parametrize(
    "payload",
    [
        pickle.dumps(_Exploit(eval, "open('PWNED', 'w')"), protocol=2),
        b"\x80\x02csubprocess\nPopen\n]U\x04trueaK\x01\x86R.",
        b"\x80\x02cbuiltins\ngetattr\n.",
        b"\x80\x02cno_such_module_anywhere\nf\n)R.",  # refused before any import is tried
        b"\x80\x02c__builtin__\neval\nU\x0bprint('hi')\x85R.",
    ],
)
def test_other_globals_are_refused(tmp_path: Path, payload: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pkl"
    path.write_bytes(payload)
    with pytest.raises(ArtifactError, match="refuses to load global '.*': not allowed in a feature pickle"):
        safe_pickle_load(path)
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("cut", [0, 1, 0.5, -1])
def test_truncated_file_is_an_artifact_error(tmp_path: Path, cut: float) -> None:
    whole = pickle.dumps(iemocap_data())
    path = tmp_path / "cut.pkl"
    path.write_bytes(whole[: int(len(whole) * cut) if isinstance(cut, float) else cut])
    with pytest.raises(ArtifactError, match="corrupt or truncated pickle") as err:
        load_pickle_features(path)
    assert err.value.path == path


def test_garbage_and_missing_files_are_artifact_errors(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pkl"
    garbage.write_bytes(b"this is not a pickle at all")
    with pytest.raises(ArtifactError, match="corrupt or truncated pickle"):
        safe_pickle_load(garbage)
    with pytest.raises(ArtifactError, match="file is missing"):
        load_pickle_features(tmp_path / "absent.pkl")


def test_module_never_calls_plain_pickle_load() -> None:
    source = Path(pickles.__file__).read_text()
    assert "pickle.load(" not in source and "pickle.loads(" not in source


# ---------------------------------------------------------------- Python 2 pickles


class _Py2StylePickler(pickle._Pickler):
    """Writes what Python 2's pickler did: str/bytes as 8-bit strings, `__builtin__`, `numpy.core`."""

    dispatch = pickle._Pickler.dispatch.copy()
    modules = {"builtins": "__builtin__", "numpy._core.multiarray": "numpy.core.multiarray"}

    def save_py2_str(self, obj: str | bytes) -> None:
        raw = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(raw) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(raw)) + raw)
        self.memoize(obj)

    dispatch[str] = save_py2_str
    dispatch[bytes] = save_py2_str

    def save_global(self, obj: Any, name: str | None = None) -> None:
        name = name or obj.__qualname__
        module = pickle.whichmodule(obj, name)
        self.write(pickle.GLOBAL + f"{self.modules.get(module, module)}\n{name}\n".encode())
        self.memoize(obj)


def py2_pickle(obj: Any) -> bytes:
    buf = io.BytesIO()
    _Py2StylePickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


def test_python2_latin1_pickle_of_numpy_arrays_loads(tmp_path: Path) -> None:
    data = iemocap_data()
    data = (*data[:3], *({vid: np.stack(v) for vid, v in field.items()} for field in data[3:9]), *data[9:])
    blob = py2_pickle(data)
    ops = [(op.name, arg) for op, arg, _ in pickletools.genops(blob)]
    assert ("GLOBAL", "numpy.core.multiarray _reconstruct") in ops
    assert ("GLOBAL", "__builtin__ set") in ops
    assert any(name in ("SHORT_BINSTRING", "BINSTRING") for name, _ in ops)
    assert not any(name in ("BINUNICODE", "SHORT_BINUNICODE") for name, _ in ops)  # all strings are 8-bit
    assert not any(name == "GLOBAL" and "_codecs" in arg for name, arg in ops)
    path = tmp_path / "py2.pkl"
    path.write_bytes(blob)
    fs = load_pickle_features(path)
    assert fs.meta["layout"] == "iemocap" and fs.feature_dims == {"t": D_T, "a": D_A, "v": D_V}
    d = fs.splits["test"][0]
    assert d.id == "Ses05M_script01"
    np.testing.assert_allclose(d.features["a"], data[7][d.id], rtol=1e-6)
    assert d.speakers.tolist() == [{"M": 0, "F": 1}[s] for s in data[1][d.id]]


def test_python2_numpy_scalars_and_containers_load(tmp_path: Path) -> None:
    from collections import OrderedDict, defaultdict

    obj = {
        "scalar": np.float64(2.5),
        "int": np.int64(7),
        "ordered": OrderedDict(a=[1, 2]),
        "default": defaultdict(list, {"k": [3]}),
        "frozen": frozenset({1, 2}),
        "array": np.arange(6, dtype=np.int16).reshape(2, 3),
    }
    path = tmp_path / "py2.pkl"
    path.write_bytes(py2_pickle(obj))
    out = safe_pickle_load(path)
    assert out["scalar"] == 2.5 and out["int"] == 7 and out["ordered"] == OrderedDict(a=[1, 2])
    assert out["default"]["missing"] == [] and out["frozen"] == frozenset({1, 2})
    np.testing.assert_array_equal(out["array"], obj["array"])
