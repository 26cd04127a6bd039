"""cmath_runtime: no torch, the batch and Conversation APIs, validation errors, artifacts, backends, threads,
and outputs equal to the PyTorch model within 1e-4."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

import cmath_runtime
from cmath_runtime import ArtifactError, BackendUnavailableError, Conversation, InputError
from cmath_runtime.model import length_groups

DIMS = {"t": 24, "a": 12, "v": 16}  # the conftest's tiny synthetic data


@pytest.fixture(scope="module")
def exported(tiny_export: tuple[Path, dict]) -> Path:
    """The session's tiny run, exported once (fp32 + fp16) by conftest; the export folder (its parent: the run)."""
    return tiny_export[0]


@pytest.fixture(scope="module")
def model(exported: Path) -> cmath_runtime.EmotionModel:
    return cmath_runtime.load(exported, backend="cpu", threads=1)


def make_conversations(lengths: list[int], seed: int = 0, speakers: int = 3) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [
        {
            "speakers": rng.integers(0, speakers, n),
            "features": {m: rng.standard_normal((n, d)).astype(np.float32) for m, d in DIMS.items()},
        }
        for n in lengths
    ]


def torch_outputs(run_dir: Path, conv: dict) -> tuple[np.ndarray, np.ndarray]:
    import torch

    from cmath_train.checkpoint import load_checkpoint

    net = load_checkpoint(run_dir).model
    n = len(conv["speakers"])
    with torch.no_grad():
        out = net(
            {m: torch.from_numpy(x)[None] for m, x in conv["features"].items()},
            torch.as_tensor(conv["speakers"])[None],
            torch.ones(1, n, dtype=torch.bool),
        )
    return torch.softmax(out.logits, -1)[0].numpy(), out.embedding[0].numpy()


# --- no torch, fast import ---------------------------------------------------------------------------------------


def test_runtime_never_imports_torch(exported: Path) -> None:
    code = f"""
import sys, time
t = time.perf_counter()
import cmath_runtime
heavy = sorted(m for m in ("onnxruntime", "numpy") if m in sys.modules)
model = cmath_runtime.load({str(exported)!r}, backend="cpu")
import numpy as np
conv = {{"speakers": [0, 1], "features": {{m: np.zeros((2, d)) for m, d in {DIMS!r}.items()}}}}
model.predict([conv])
cmath_runtime.Conversation(model).add(0, **{{m: np.zeros(d) for m, d in {DIMS!r}.items()}}).latest
bad = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "cmath_train", "cmath_export"))
print("HEAVY", heavy, "BAD", bad)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "HEAVY [] BAD []" in out, out  # import loads neither numpy nor onnxruntime; nothing loads torch


# --- the batch API ------------------------------------------------------------------------------------------------


def test_predict_equals_pytorch(model: cmath_runtime.EmotionModel, exported: Path) -> None:
    convs = make_conversations([3, 1, 40, 7])  # lengths other than the export example's 16, mixed in one call
    preds = model.predict(convs, embeddings=True)
    assert [len(p) for p in preds] == [3, 1, 40, 7]  # input order
    run_dir = exported.parent
    for conv, pred in zip(convs, preds):
        probs, emb = torch_outputs(run_dir, conv)
        np.testing.assert_allclose(pred.probs, probs, atol=1e-4, rtol=0)
        np.testing.assert_allclose(pred.embedding, emb, atol=1e-4, rtol=0)
        assert pred.labels == [model.label_names[k] for k in probs.argmax(-1)]
        assert pred.probs.dtype == np.float32 and pred.probs.shape == (len(conv["speakers"]), 6)
        np.testing.assert_allclose(pred.probs.sum(-1), 1.0, atol=1e-5)


def test_batching_does_not_change_results(model: cmath_runtime.EmotionModel) -> None:
    convs = make_conversations([5, 17, 2, 9, 30, 1], seed=1)
    together = model.predict(convs, batch_size=4)
    alone = [model.predict([c], batch_size=1)[0] for c in convs]
    for a, b in zip(together, alone):
        np.testing.assert_allclose(a.probs, b.probs, atol=1e-5)
        assert a.embedding is None


def test_length_groups_batches_similar_lengths() -> None:
    groups = length_groups([5, 100, 6, 99, 4, 101], batch_size=3)
    assert groups == [[4, 0, 2], [3, 1, 5]]
    assert sorted(i for g in groups for i in g) == list(range(6))
    assert length_groups([], 4) == []


def test_model_properties(model: cmath_runtime.EmotionModel, exported: Path) -> None:
    assert model.backend == "cpu" and model.providers == ("CPUExecutionProvider",)
    assert model.label_names == ["sad", "angry", "neutral", "surprise", "content", "joy"]
    assert model.modalities == ("t", "a", "v") and model.feature_dims == DIMS
    assert model.threads == 1 and model.precision == "fp32" and model.load_seconds > 0
    assert "backend='cpu'" in repr(model)
    options = model._info.session.get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"  # idle threads sleep
    for path in (
        exported,
        exported / "export.json",
        exported.parent,
    ):  # export folder, manifest, run directory
        assert cmath_runtime.load(path, backend="cpu").label_names == model.label_names
    assert model.predict([]) == []


def test_convertible_inputs_are_converted(model: cmath_runtime.EmotionModel) -> None:
    [conv] = make_conversations([4], seed=2)
    ref = model.predict([conv])[0].probs
    as_lists = {
        "speakers": [int(s) for s in conv["speakers"]],
        "features": {
            "t": conv["features"]["t"].astype(np.float64),
            "a": conv["features"]["a"].astype(np.float16),
            "v": conv["features"]["v"].tolist(),
        },
    }
    conv16 = {"speakers": conv["speakers"], "features": {**conv["features"], "a": as_lists["features"]["a"]}}
    np.testing.assert_allclose(
        model.predict([as_lists])[0].probs, model.predict([conv16])[0].probs, atol=1e-6
    )
    np.testing.assert_allclose(
        model.predict([as_lists])[0].probs, ref, atol=1e-2
    )  # only the float16 rounding
    ints = {"speakers": conv["speakers"], "features": {m: np.ones((4, d), np.int32) for m, d in DIMS.items()}}
    assert len(model.predict([ints])[0]) == 4


def test_fp16_on_cpu(exported: Path, model: cmath_runtime.EmotionModel) -> None:
    half = cmath_runtime.load(exported, backend="cpu", precision="fp16")
    assert half.precision == "fp16" and "weight rounding" in half.note
    convs = make_conversations([6, 20], seed=3)
    for a, b in zip(half.predict(convs), model.predict(convs)):
        np.testing.assert_allclose(a.probs, b.probs, atol=2e-2)


# --- the Conversation API -----------------------------------------------------------------------------------------


def test_conversation_add_one_at_a_time(model: cmath_runtime.EmotionModel) -> None:
    [full] = make_conversations([6], seed=4)
    conv = Conversation(model)
    for i, spk in enumerate(full["speakers"]):
        latest = conv.add(int(spk), **{m: x[i] for m, x in full["features"].items()}).latest
        expected = model.predict(
            [
                {
                    "speakers": full["speakers"][: i + 1],
                    "features": {m: x[: i + 1] for m, x in full["features"].items()},
                }
            ]
        )[0]
        assert latest.label == expected.labels[-1] and len(conv) == i + 1
        np.testing.assert_allclose(latest.probs, expected.probs[-1], atol=1e-6)
        assert latest.probs.shape == (len(model.label_names),) and latest.probs.dtype == np.float32
        assert latest.confidence == latest.probs.max() == latest.probs[model.label_names.index(latest.label)]
    whole = model.predict([full])[0]
    assert conv.labels() == whole.labels
    np.testing.assert_allclose(conv.probs(), whole.probs, atol=1e-6)
    assert [e.label for e in conv.emotions()] == whole.labels
    np.testing.assert_allclose(model.predict([conv])[0].probs, whole.probs, atol=1e-6)  # predict accepts it


def test_conversation_errors(model: cmath_runtime.EmotionModel) -> None:
    conv = Conversation(model)
    with pytest.raises(InputError, match="at least one utterance"):
        conv.latest  # noqa: B018
    vec = {m: np.zeros(d) for m, d in DIMS.items()}
    with pytest.raises(InputError) as e:
        conv.add(9, **vec)
    assert e.value.field == "utterances[0].speaker" and e.value.actual == 9
    with pytest.raises(InputError, match="an integer id"):
        conv.add("alice", **vec)
    with pytest.raises(InputError, match=r"missing \['v'\]"):
        conv.add(0, t=vec["t"], a=vec["a"])
    with pytest.raises(InputError) as e:
        conv.add(0, **{**vec, "a": np.zeros(11)})
    assert e.value.field == "utterances[0].features['a']" and "(1, 12)" in str(e.value.expected)
    assert len(conv) == 0  # nothing was added by the failed calls


# --- thread safety ------------------------------------------------------------------------------------------------


def test_one_model_shared_by_threads(exported: Path) -> None:
    shared = cmath_runtime.load(exported, backend="cpu", threads=1)
    jobs = [make_conversations([1 + (k * 7) % 23, 3 + k % 5], seed=k) for k in range(24)]
    serial = [shared.predict(job) for job in jobs]
    results: dict[int, list] = {}
    errors: list[BaseException] = []

    def worker(t: int) -> None:
        try:
            for _ in range(3):
                for k in range(t, len(jobs), 8):
                    results.setdefault(k, []).append(shared.predict(jobs[k]))
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    for k, runs in results.items():
        assert len(runs) == 3
        for preds in runs:
            for a, b in zip(preds, serial[k]):
                assert a.labels == b.labels
                np.testing.assert_array_equal(a.probs, b.probs)


# --- validation: each error names the field, what was expected and what came -----------------------------------


def _mutate(case: str, convs: list[dict]) -> object:
    c = convs[1]
    f = c["features"]
    if case == "missing_modality":
        del f["v"]
    elif case == "extra_modality":
        f["x"] = np.zeros((5, 3))
    elif case == "feature_size":
        f["a"] = np.zeros((5, 11), np.float32)
    elif case == "rows":
        f["t"] = np.zeros((4, 24), np.float32)
    elif case == "nan":
        f["t"][2, 3] = np.nan
    elif case == "inf":
        f["v"][4, 0] = np.inf
    elif case == "overflow":
        f["v"] = f["v"].astype(np.float64)
        f["v"][1, 0] = 1e300
    elif case == "strings":
        f["a"] = np.full((5, 12), "x")
    elif case == "bool":
        f["a"] = np.ones((5, 12), bool)
    elif case == "ragged":
        f["t"] = [[0.0] * 24, [0.0] * 23, [0.0] * 24, [0.0] * 24, [0.0] * 24]
    elif case == "not_a_dict":
        c["features"] = np.zeros((5, 52))
    elif case == "empty":
        c["speakers"] = []
        c["features"] = {m: np.zeros((0, d)) for m, d in DIMS.items()}
    elif case == "unknown_speaker":
        c["speakers"] = np.array([0, 1, 2, 9, 1])
    elif case == "negative_speaker":
        c["speakers"] = [0, -1, 0, 1, 1]
    elif case == "float_speaker":
        c["speakers"] = [0.0, 1.5, 0.0, 1.0, 1.0]
    elif case == "too_long":
        n = 513
        convs[1] = {"speakers": np.zeros(n, int), "features": {m: np.zeros((n, d)) for m, d in DIMS.items()}}
    elif case == "no_keys":
        convs[1] = {"speaker": c["speakers"], "features": f}
    elif case == "single":
        return convs[0]
    return convs


CASES = {  # case: (field, text in expected, text in actual)
    "missing_modality": ("conversations[1].features", "['t', 'a', 'v']", "missing ['v']"),
    "extra_modality": ("conversations[1].features", "['t', 'a', 'v']", "extra ['x']"),
    "feature_size": ("conversations[1].features['a']", "(5, 12)", "(5, 11)"),
    "rows": ("conversations[1].features['t']", "(5, 24)", "(4, 24)"),
    "nan": ("conversations[1].features['t']", "finite", "NaN in utterance 2"),
    "inf": ("conversations[1].features['v']", "finite", "inf"),
    "overflow": ("conversations[1].features['v']", "finite", "float32's range"),
    "strings": ("conversations[1].features['a']", "numeric", "<U1"),
    "bool": ("conversations[1].features['a']", "numeric", "bool"),
    "ragged": ("conversations[1].features['t']", "rectangular", "list"),
    "not_a_dict": ("conversations[1].features", "a dict", "ndarray"),
    "empty": ("conversations[1].speakers", "at least one utterance", "empty conversation"),
    "unknown_speaker": ("conversations[1].speakers[3]", "[0, 9)", "9"),
    "negative_speaker": ("conversations[1].speakers[1]", "[0, 9)", "-1"),
    "float_speaker": ("conversations[1].speakers", "integer", "float64"),
    "too_long": ("conversations[1].speakers", "at most 512", "513 utterances"),
    "no_keys": ("conversations[1]", "'speakers' and 'features'", "speaker"),
    "single": ("conversations", "a list", "wrap it in a list"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_validation_errors(
    model: cmath_runtime.EmotionModel, case: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_run(*args: object, **kw: object) -> None:
        raise AssertionError("invalid input reached onnxruntime")

    monkeypatch.setattr(model, "run_padded", no_run)
    field, expected, actual = CASES[case]
    with pytest.raises(InputError) as e:
        model.predict(_mutate(case, make_conversations([3, 5, 2])))
    err = e.value
    assert err.field == field
    assert expected in str(err.expected) and actual in str(err.actual)
    assert str(err).startswith(f"{field}: expected ") and actual in str(err)


# --- artifacts and backends ---------------------------------------------------------------------------------------


@pytest.fixture()
def export_copy(exported: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(exported, tmp_path / "export"))


def _manifest(path: Path) -> dict:
    return json.loads((path / "export.json").read_text())


def test_missing_foreign_and_corrupt_manifest(export_copy: Path, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ArtifactError, match="no export.json"):
        cmath_runtime.load(tmp_path / "empty")
    with pytest.raises(ArtifactError, match="does not exist"):
        cmath_runtime.load(tmp_path / "nowhere")
    m = _manifest(export_copy)
    (export_copy / "export.json").write_text(json.dumps({**m, "format": "something-else"}))
    with pytest.raises(ArtifactError, match="foreign file"):
        cmath_runtime.load(export_copy)
    (export_copy / "export.json").write_text(json.dumps({k: v for k, v in m.items() if k != "max_len"}))
    with pytest.raises(ArtifactError, match="'max_len' is missing"):
        cmath_runtime.load(export_copy)
    (export_copy / "export.json").write_text('{"format": "cmath-export", ')
    with pytest.raises(ArtifactError, match="not valid JSON"):
        cmath_runtime.load(export_copy)


def test_bad_sha256_and_corrupt_onnx(export_copy: Path) -> None:
    onnx_file = export_copy / "model.onnx"
    data = bytearray(onnx_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    onnx_file.write_bytes(bytes(data[: len(data) // 3 * 2]))  # flipped and truncated
    with pytest.raises(ArtifactError, match="sha256 mismatch") as e:
        cmath_runtime.load(export_copy, backend="cpu")
    assert e.value.path == onnx_file
    m = _manifest(
        export_copy
    )  # a manifest that agrees with the broken file: onnxruntime's error becomes ours
    from cmath_runtime.files import sha256_file

    m["artifacts"]["fp32"]["sha256"] = sha256_file(onnx_file)
    (export_copy / "export.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="onnxruntime cannot load this model"):
        cmath_runtime.load(export_copy, backend="cpu")
    onnx_file.unlink()
    with pytest.raises(ArtifactError, match="is missing"):
        cmath_runtime.load(export_copy, backend="cpu")


def test_missing_fp16_artifact(export_copy: Path) -> None:
    m = _manifest(export_copy)
    del m["artifacts"]["fp16"]
    (export_copy / "export.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="--fp16"):
        cmath_runtime.load(export_copy, precision="fp16")


def test_bad_arguments(exported: Path) -> None:
    with pytest.raises(ValueError, match="backend"):
        cmath_runtime.load(exported, backend="gpu")
    with pytest.raises(ValueError, match="precision"):
        cmath_runtime.load(exported, precision="int4")


def _has_gpu() -> bool:
    return (
        shutil.which("nvidia-smi") is not None
        and "CUDAExecutionProvider" in __import__("onnxruntime").get_available_providers()
    )


@pytest.mark.skipif(_has_gpu(), reason="this machine has a GPU: CUDA is available")
@pytest.mark.parametrize("backend", ["cuda", "tensorrt"])
def test_unavailable_backend_is_an_error(exported: Path, backend: str) -> None:
    with pytest.raises(BackendUnavailableError, match=f"backend '{backend}' needs onnxruntime's"):
        cmath_runtime.load(exported, backend=backend)


@pytest.mark.filterwarnings(
    "ignore:Specified provider 'CUDAExecutionProvider' is not in available provider names"
)
def test_listed_but_unusable_gpu_provider(exported: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """onnxruntime-gpu on a machine without a GPU lists CUDA and silently runs on the CPU: explicit -> error,
    auto -> falls back and says so."""
    if _has_gpu():
        pytest.skip("this machine has a GPU")
    from cmath_runtime import session

    monkeypatch.setattr(
        session, "available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    with pytest.raises(BackendUnavailableError, match="came up on"):
        cmath_runtime.load(exported, backend="cuda")
    with pytest.warns(RuntimeWarning, match="could not start here; running on cpu"):
        fallback = cmath_runtime.load(exported, backend="auto")
    assert fallback.backend == "cpu" and "running on cpu" in fallback.note


def test_auto_on_cpu_machine(exported: Path) -> None:
    m = cmath_runtime.load(exported)  # without a GPU: the calibrated CPU engine (test_engine_choice.py)
    assert m.backend in ("cpu", "openvino", "cuda") and m.precision == "fp32"
    assert m.engine_choice["model"].backend == m.backend


@pytest.mark.gpu
@pytest.mark.skipif(not _has_gpu(), reason="needs an NVIDIA GPU with onnxruntime-gpu")
def test_cuda_matches_cpu(exported: Path, model: cmath_runtime.EmotionModel) -> None:
    gpu = cmath_runtime.load(exported, backend="cuda")
    assert gpu.backend == "cuda"
    convs = make_conversations([3, 30])
    for a, b in zip(gpu.predict(convs), model.predict(convs)):
        np.testing.assert_allclose(a.probs, b.probs, atol=1e-4)


# --- one loader, one manifest, one comparator --------------------------------------------------------------------


def test_manifest_round_trip(exported: Path) -> None:
    from cmath_runtime.manifest import Manifest, read_manifest

    manifest = read_manifest(exported)
    on_disk = json.loads((exported / "export.json").read_text())
    assert manifest.to_json() == on_disk  # what the exporter wrote is exactly what the type holds
    again = Manifest.from_json(manifest.to_json(), exported / "export.json")
    assert again == manifest and again.artifacts["fp32"].path == exported / "model.onnx"


def test_every_session_goes_through_open_session(exported: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cmath_runtime import session

    seen = []
    real = session.open_session

    def spy(path, backend="cpu", **kw):  # noqa: ANN001, ANN202
        seen.append((Path(path).name, backend, kw.get("what")))
        return real(path, backend, **kw)

    monkeypatch.setattr(session, "open_session", spy)
    model = cmath_runtime.load(exported, backend="cpu", threads=1)
    assert seen == [("model.onnx", "cpu", "model")]
    assert (
        model.step_graph is None and model.step_graph is model.step_graph
    )  # bidirectional: none, asked once
    with pytest.raises(ValueError, match="backend"):
        session.open_session(exported / "model.onnx", "no-such-backend")
    with pytest.raises(ArtifactError, match="does not match export.json"):
        session.open_session(exported / "model.onnx", "cpu", inputs=("x",), what="step graph")


def test_backend_table_takes_a_new_backend(exported: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cmath_runtime import session

    monkeypatch.setitem(
        session.BACKENDS, "fancy", session.Backend("fancy", "FancyExecutionProvider", "pip install fancy-ort")
    )
    assert "fancy" in session.backend_names()
    with pytest.raises(BackendUnavailableError, match="pip install fancy-ort"):
        cmath_runtime.load(exported, backend="fancy")
    assert (
        session.PRECISIONS["fp16"].artifact_key("tensorrt") == "fp32"
    )  # TensorRT builds fp16 from model.onnx


def test_comparator_checks_and_nan() -> None:
    from cmath_runtime.compare import compare, max_abs, min_cosine

    ref = [{"probs": np.array([[[0.2, 0.8], [0.6, 0.4]]]), "embedding": np.array([[[1.0, 0.0], [0.0, 1.0]]])}]
    got = [{"probs": ref[0]["probs"] + 1e-5, "embedding": ref[0]["embedding"] * 2.0}]
    masks = [np.array([[True, True]])]
    report = compare(ref, got, {"probs": max_abs(1e-4), "embedding": min_cosine(0.999)}, masks)
    assert report.passed and report.argmax_agreement == 1.0 and report.rows == 2
    assert (
        report.output("embedding").min_cosine == pytest.approx(1.0)
        and report.output("embedding").max_abs == 1.0
    )
    assert not compare(ref, got, {"embedding": max_abs(1e-3)}, masks).passed  # same data, another check
    bad = [{"probs": got[0]["probs"].copy(), "embedding": got[0]["embedding"]}]
    bad[0]["probs"][0, 1, 0] = np.nan
    report = compare(ref, bad, {"probs": max_abs(None)}, masks)  # report-only, yet NaN fails
    assert not report.passed and report.output("probs").nonfinite == 1 and "FAILED" in report.summary()
