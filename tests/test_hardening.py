"""A hostile artifact, extreme numbers or a broken state file never get past the runtime.

One tiny causal run, exported with fp16 and its step graph, serves every test: the full graph (predict), the
step path (Conversation) and the fp16 artifact.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cmath_runtime
from cmath_runtime import ArtifactError, Conversation, InputError
from tests.conftest import TINY_DIMS


@pytest.fixture(scope="module")
def hard_export(causal_export: Path) -> Path:
    """The session's tiny causal run exported with fp16 and a step graph (conftest); the export folder."""
    return causal_export


@pytest.fixture(scope="module")
def hard_model(hard_export: Path) -> cmath_runtime.EmotionModel:
    return cmath_runtime.load(hard_export, backend="cpu", threads=1)


def _feats(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {m: rng.standard_normal((n, d)).astype(np.float32) for m, d in TINY_DIMS.items()}


def _copy(export: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(export, tmp_path / "export"))


def _edit(folder: Path, change) -> None:  # noqa: ANN001
    m = json.loads((folder / "export.json").read_text())
    change(m)
    (folder / "export.json").write_text(json.dumps(m))


# --- a manifest never points outside its folder ----------------------------------------------------------------


def _set(path: tuple, value: object):  # noqa: ANN202
    def change(m: dict) -> None:
        node = m
        for k in path[:-1]:
            node = node[k]
        node[path[-1]] = value

    return change


@pytest.mark.parametrize(
    "entry,path,value",
    [
        ("artifacts['fp32'].file", ("artifacts", "fp32", "file"), "../outside/evil.onnx"),
        ("artifacts['fp32'].file", ("artifacts", "fp32", "file"), "/etc/passwd"),
        ("artifacts['fp16'].file", ("artifacts", "fp16", "file"), "sub/../../evil.onnx"),
        ("step.file", ("step", "file"), "../model.step.onnx"),
        (
            "text_encoder.files['onnx'].file",
            ("text_encoder",),
            {"files": {"onnx": {"file": "../../enc.onnx", "sha256": "0"}}},
        ),
        (
            "triton.file",
            ("triton",),
            {"repository": "/tmp/repo", "config": "cmath/config.pbtxt", "file": "../../x.onnx"},
        ),
        ("step.int8.file", ("step", "int8"), {"file": "../x.onnx", "sha256": "0"}),
        ("future.graphs[0].file", ("future",), {"graphs": [{"file": "/x.onnx"}]}),
    ],
    ids=[
        "dotdot",
        "absolute",
        "nested-dotdot",
        "step",
        "text-encoder",
        "triton",
        "step-nested",
        "unknown-section",
    ],
)
def test_manifest_files_stay_inside_the_folder(
    hard_export: Path, tmp_path: Path, entry: str, path: tuple, value: object
) -> None:
    folder = _copy(hard_export, tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(
        folder / "model.onnx", outside / "evil.onnx"
    )  # a loadable graph, so only confinement can refuse it
    _edit(folder, _set(path, value))
    with pytest.raises(ArtifactError) as e:
        cmath_runtime.load(folder, backend="cpu")
    msg = str(e.value)
    assert entry in msg and ("outside" in msg or "absolute" in msg), msg


def test_symlink_out_of_the_folder_is_refused(hard_export: Path, tmp_path: Path) -> None:
    folder = _copy(hard_export, tmp_path)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    target = outside / "model.onnx"
    os.replace(folder / "model.onnx", target)
    os.symlink(target, folder / "model.onnx")  # same bytes, same sha256: only the path gives it away
    with pytest.raises(ArtifactError, match=r"artifacts\['fp32'\]\.file .* outside the artifact folder"):
        cmath_runtime.load(folder, backend="cpu")
    os.unlink(folder / "model.onnx")
    os.symlink(
        folder / "model.fp16.onnx", folder / "model.onnx"
    )  # a symlink inside the folder is fine (sha fails)
    with pytest.raises(ArtifactError, match="sha256 mismatch"):
        cmath_runtime.load(folder, backend="cpu")


# --- extreme numbers never come back as NaN ----------------------------------------------------------------------


def test_whole_float_speaker_ids_are_ids_and_huge_ones_out_of_range(
    hard_model: cmath_runtime.EmotionModel,
) -> None:
    """1.0 is speaker 1; 1e300 is a speaker id out of range (checked before any cast, so never wrapped garbage)."""
    feats = _feats(2)
    as_float = hard_model.predict([{"speakers": [0.0, 1.0], "features": feats}])[0]
    as_int = hard_model.predict([{"speakers": [0, 1], "features": feats}])[0]
    np.testing.assert_array_equal(as_float.probs, as_int.probs)
    with pytest.raises(InputError) as e:
        hard_model.predict([{"speakers": [0.0, 1e300], "features": feats}])
    assert e.value.field == "conversations[0].speakers[1]" and e.value.actual == int(1e300)
    with pytest.raises(InputError, match="integer speaker ids"):
        hard_model.predict([{"speakers": [0.0, 0.5], "features": feats}])


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("value", [1e30, 3e38])
def test_extreme_features_are_refused_not_returned(hard_export: Path, precision: str, value: float) -> None:
    model = cmath_runtime.load(hard_export, backend="cpu", threads=1, precision=precision)
    feats = _feats(4)
    feats["a"][1:4] = value  # three utterances
    with pytest.raises(InputError) as e:
        model.predict(
            [
                {"speakers": [0, 1, 0, 1], "features": _feats(4, 1)},
                {"speakers": [0, 1, 0, 1], "features": feats},
            ]
        )
    assert e.value.field == "conversations[1].features" and "utterance 1" in str(e.value.actual)
    assert "non-finite" in str(e.value.actual) and precision in str(e.value.expected)
    # the step path: the offending utterances are named and taken back; the conversation goes on
    conv = Conversation(model)
    for i in range(4):
        conv.add(i % 2, **{m: x[i] for m, x in _feats(4).items()})
    conv.latest  # noqa: B018
    for i in range(1, 4):
        conv.add(i % 2, **{m: x[i] for m, x in feats.items()})
    with pytest.raises(InputError) as e:
        conv.latest  # noqa: B018
    assert e.value.field == "utterances[4:]" and len(conv) == 4
    assert np.isfinite(conv.probs()).all()
    conv.add(0, **{m: x[0] for m, x in _feats(1, 3).items()})
    assert (
        len(conv) == 5 and np.isfinite(conv.probs()).all() and np.allclose(conv.probs().sum(-1), 1, atol=1e-5)
    )


# --- state files -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_state(hard_model: cmath_runtime.EmotionModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    conv = Conversation(hard_model)
    feats = _feats(6)
    for i in range(6):
        conv.add(i % 3, **{m: x[i] for m, x in feats.items()})
    conv.latest  # noqa: B018
    path = tmp_path_factory.mktemp("state") / "conv.npz"
    conv.save(path)
    return path


def _state(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


def _poison(key: str, how: str):  # noqa: ANN202
    def change(s: dict) -> None:
        k = next(k for k in s if k.startswith(key))
        if how == "nan":
            s[k] = s[k].astype(np.float32).copy()
            s[k].reshape(-1)[0] = np.nan
        elif how == "dtype":
            s[k] = s[k].astype(np.float64) if s[k].dtype.kind != "f" else s[k].astype(np.int64)
        elif how == "shape":
            s[k] = s[k][:1]
        elif how == "missing":
            del s[k]
        else:
            s[k] = np.asarray(how)

    return change


@pytest.mark.parametrize(
    "key,how",
    [
        ("state.past_key", "nan"),
        ("state.tail", "nan"),
        ("features.t", "nan"),
        ("state.probs", "nan"),
        ("speakers", "dtype"),
        ("state.past_value", "dtype"),
        ("state.past_key", "shape"),
        ("features.a", "shape"),
        ("state.tail", "missing"),
        ("meta.model_sha256", "0" * 64),
        ("meta.version", "99"),
        ("meta.format", "other"),
        ("state.sha256", "f" * 64),
    ],
)
def test_bad_state_is_an_artifact_error_naming_the_key(
    hard_model: cmath_runtime.EmotionModel, saved_state: Path, tmp_path: Path, key: str, how: str
) -> None:
    state = _state(saved_state)
    _poison(key, how)(state)
    bad = tmp_path / "bad.npz"
    np.savez(bad, **state)
    with pytest.raises(ArtifactError) as e:
        Conversation.load(hard_model, bad)
    assert f"state[{key!r}" in str(e.value) or f"state['{key}" in str(e.value), str(e.value)


def test_not_a_state_file(hard_model: cmath_runtime.EmotionModel, saved_state: Path, tmp_path: Path) -> None:
    cases = {
        "text.npz": lambda p: p.write_text("not a state"),
        "array.npy": lambda p: np.save(p, np.arange(3)),
        "object.npz": lambda p: np.savez(p, speakers=np.array([{"a": 1}], dtype=object)),
        "truncated.npz": lambda p: p.write_bytes(saved_state.read_bytes()[: saved_state.stat().st_size // 2]),
        "empty.npz": lambda p: p.write_bytes(b""),
    }
    for name, make in cases.items():
        path = tmp_path / name
        make(path)
        with pytest.raises(ArtifactError) as e:
            Conversation.load(hard_model, path)
        assert str(path) in str(e.value), name
    with pytest.raises(ArtifactError, match="speakers"):  # an object array names its key
        Conversation.load(hard_model, tmp_path / "object.npz")


def test_another_models_state(hard_export: Path, saved_state: Path, tiny_run: Path, tmp_path: Path) -> None:
    """A state saved with one model is refused by another (here: the same architecture, other weights)."""
    import cmath_export

    run = tmp_path / "run"
    run.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_run / name, run / name)
    cmath_export.export_run(run, text_encoder=False, max_len=32)
    other = cmath_runtime.load(run / "export", backend="cpu", threads=1)
    with pytest.raises(ArtifactError, match=r"meta.model_sha256.*another model"):
        Conversation.load(other, saved_state)


def test_state_round_trip_still_exact(hard_model: cmath_runtime.EmotionModel, saved_state: Path) -> None:
    conv = Conversation.load(hard_model, saved_state)
    assert conv.path == "step" and len(conv) == 6
    feats = _feats(6)
    whole = hard_model.predict([{"speakers": [i % 3 for i in range(6)], "features": feats}])[0]
    np.testing.assert_allclose(conv.probs(), whole.probs, atol=1e-5)


# --- cmath-train options -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args,option",
    [
        (["--epochs", "0"], "--epochs"),
        (["--lr", "0"], "--lr"),
        (["--batch-size", "0"], "--batch-size"),
        (["--dropout", "1.5"], "--dropout"),
        (["--val-fraction", "1"], "--val-fraction"),
        (["--seeds", "0"], "--seeds"),
    ],
)
def test_train_rejects_out_of_range_options(tmp_path: Path, args: list[str], option: str) -> None:
    from click.testing import CliRunner

    from cmath_train.cli import main

    result = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "run"), "--quiet"])
    assert result.exit_code == 2 and option in result.output, result.output
    assert not (tmp_path / "run").exists()  # rejected up front: nothing trained, nothing written


# --- property: the whole input surface -> a finite Prediction or a CmathError -------------------------------------

EXAMPLES = {
    "predict": 0,
    "conversation": 0,
    "text": 0,
}  # examples run, reported by test_property_examples_counted
PROPERTY = settings(
    max_examples=150,
    deadline=10_000,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
SPECIAL = [np.nan, np.inf, -np.inf, 1e30, -3e38, 3.4e38, 1e-45, -0.0, 0.0, 1.0, 65504.0, 7e4, 1e5, -1e19]
DTYPES = ["float32", "float64", "float16", "int64", "int8", "uint8", "bool", "complex64", "object", "U3"]


@st.composite
def arrays(draw: st.DrawFn, shape: tuple[int, ...]) -> object:
    dtype = draw(st.sampled_from(DTYPES))
    size = int(np.prod(shape))
    values = draw(
        st.lists(st.one_of(st.sampled_from(SPECIAL), st.floats(-10, 10)), min_size=size, max_size=size)
    )
    base = np.asarray(values, np.float64).reshape(shape)
    if dtype == "object":
        return base.astype(object)
    if dtype == "U3":
        return base.astype("U3")
    with np.errstate(all="ignore"):
        arr = (
            base.astype(dtype)
            if np.dtype(dtype).kind in "fc"
            else np.nan_to_num(base, posinf=1, neginf=-1).astype(dtype)
        )
    return draw(st.sampled_from([arr, arr.tolist()])) if size < 40 else arr


@st.composite
def features(draw: st.DrawFn, n: int, one: bool = False) -> object:
    mods = draw(st.sampled_from([tuple(TINY_DIMS), tuple(TINY_DIMS), ("t", "a"), ("t", "a", "v", "x")]))
    out = {}
    for m in mods:
        d = TINY_DIMS.get(m, 3) + draw(st.sampled_from([0, 0, 0, 1, -1]))
        rows = n + draw(st.sampled_from([0, 0, 0, 1, -1]))
        shape = (d,) if one and draw(st.booleans()) else (max(rows, 0), max(d, 0))
        out[m] = draw(st.one_of(arrays(shape), st.sampled_from([None, "text", 3.0, [1, [2, 3]]])))
    return out


@st.composite
def speakers(draw: st.DrawFn, n: int) -> object:
    ids = draw(
        st.lists(
            st.one_of(st.integers(-2, 11), st.sampled_from([2**63 - 1, -(2**63)])), min_size=n, max_size=n
        )
    )
    kind = draw(st.sampled_from(["list", "int64", "int32", "float", "bool", "str", "2d", "scalar"]))
    if kind == "list":
        return ids
    if kind in ("int64", "int32"):
        return np.asarray(np.clip(ids, np.iinfo(kind).min, np.iinfo(kind).max), kind)
    if kind == "float":
        return np.asarray(ids, np.float64) + draw(st.sampled_from([0.0, 0.5, np.nan]))
    if kind == "bool":
        return np.asarray(ids) > 0
    if kind == "str":
        return [str(i) for i in ids]
    return np.asarray(ids).reshape(1, -1) if kind == "2d" else (ids[0] if ids else 0)


@st.composite
def conversation_inputs(draw: st.DrawFn) -> object:
    n = draw(st.integers(0, 6))
    kind = draw(st.sampled_from(["good", "good", "good", "junk", "texts"]))
    if kind == "junk":
        return draw(st.sampled_from([None, "conv", 3, [], {"speakers": [0]}, np.zeros(3)]))
    conv: dict = {"speakers": draw(speakers(n))}
    if kind == "texts":
        conv["texts"] = draw(st.lists(st.text(max_size=20), min_size=n, max_size=n))
    conv["features"] = draw(features(n))
    return conv


def _assert_prediction(pred: object, n: int | None = None) -> None:
    assert isinstance(pred, cmath_runtime.Prediction)
    assert np.isfinite(pred.probs).all() and np.allclose(pred.probs.sum(-1), 1.0, atol=1e-4)
    assert n is None or len(pred) == n


@pytest.fixture(scope="module")
def models(hard_export: Path) -> dict[str, cmath_runtime.EmotionModel]:
    return {
        p: cmath_runtime.load(hard_export, backend="cpu", threads=1, precision=p) for p in ("fp32", "fp16")
    }


@PROPERTY
@given(data=st.data())
def test_property_predict(models: dict, data: st.DataObject) -> None:
    EXAMPLES["predict"] += 1
    model = models[data.draw(st.sampled_from(["fp32", "fp16"]))]
    convs = data.draw(st.one_of(st.lists(conversation_inputs(), max_size=3), conversation_inputs()))
    batch = data.draw(st.sampled_from([16, 1, 2, 0, -1, 2.5, None]))
    try:
        preds = model.predict(convs, batch_size=batch)
    except cmath_runtime.CmathError:
        return
    assert isinstance(convs, list) and len(preds) == len(convs)
    for conv, pred in zip(convs, preds):
        _assert_prediction(pred, len(conv["speakers"]))


@PROPERTY
@given(data=st.data())
def test_property_conversation_add(models: dict, data: st.DataObject) -> None:
    EXAMPLES["conversation"] += 1
    model = models[data.draw(st.sampled_from(["fp32", "fp16"]))]
    conv = Conversation(model)
    for _ in range(data.draw(st.integers(1, 5))):
        speaker = data.draw(
            st.one_of(st.integers(-1, 10), st.sampled_from([1.0, True, "0", None, np.int64(2)]))
        )
        feats = data.draw(features(1, one=True))
        if data.draw(st.integers(0, 9)) == 0:
            feats["text"] = data.draw(st.text(max_size=10))
        with contextlib.suppress(cmath_runtime.CmathError):
            conv.add(speaker, **feats)
        with contextlib.suppress(cmath_runtime.CmathError):
            _assert_prediction(conv.prediction(), len(conv))
    assert conv.path == "step"


@settings(PROPERTY, max_examples=40)
@given(
    texts=st.one_of(
        st.lists(st.one_of(st.text(max_size=30), st.none(), st.integers()), max_size=4), st.text()
    )
)
def test_property_text_path(models: dict, texts: object) -> None:
    """An artifact without a text encoder: raw text is always a clear InputError, whatever the text is."""
    EXAMPLES["text"] += 1
    model = models["fp32"]
    n = len(texts) if isinstance(texts, list) else 1
    with pytest.raises(cmath_runtime.CmathError):
        model.predict([{"speakers": list(range(n)), "texts": texts, "features": {}}])
    with pytest.raises(cmath_runtime.CmathError):
        Conversation(model).add(0, text=texts if isinstance(texts, str) else "x")


def test_property_examples_counted(request: pytest.FixtureRequest) -> None:
    """Runs after the property tests (file order): each property test collected in this session ran its examples
    (a property test that was collected but skipped or cut short fails here)."""
    minimum = {
        "predict": ("test_property_predict", 100),
        "conversation": ("test_property_conversation_add", 100),
        "text": ("test_property_text_path", 30),
    }
    collected = {item.originalname for item in request.session.items if item.path == request.node.path}
    print(f"\nproperty examples run: {EXAMPLES}")
    checked = [key for key, (test, _) in minimum.items() if test in collected]
    if not checked:
        pytest.skip("only counts the property tests collected beside it, and none was")
    for key in checked:
        assert EXAMPLES[key] >= minimum[key][1], (key, EXAMPLES)
