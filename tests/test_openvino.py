"""OpenVINO backend: f32 by default and bf16 only when asked, both read back at load; the same
answers as onnxruntime at every shape; the step graph; a missing openvino is one clear error."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

import cmath_runtime
from cmath_runtime.errors import BackendUnavailableError
from tests.test_int8 import SHAPES, _conversations


@pytest.fixture(scope="module")
def ov_model(int8_causal_export: Path) -> cmath_runtime.EmotionModel:
    pytest.importorskip("openvino")
    return cmath_runtime.load(int8_causal_export, backend="openvino", threads=1)


@pytest.fixture(scope="module")
def ort_model(int8_causal_export: Path) -> cmath_runtime.EmotionModel:
    return cmath_runtime.load(int8_causal_export, backend="cpu", threads=1)


def test_default_is_f32_read_back(ov_model) -> None:
    session = ov_model._info.session
    assert ov_model.backend == "openvino" and ov_model.precision == "fp32"
    assert session.inference_precision == "f32" and all(d.startswith("CPU") for d in session.devices)
    assert "f32" in ov_model.providers[0] and "f32" in ov_model.note


@pytest.mark.parametrize("shape", SHAPES)
def test_openvino_matches_onnxruntime(ov_model, ort_model, shape: tuple[int, int]) -> None:
    batch, n = shape
    convs = _conversations(batch, n, 1)
    convs = [
        {"speakers": c["speakers"][: n - i], "features": {m: x[: n - i] for m, x in c["features"].items()}}
        for i, c in enumerate(convs)
    ]
    got = ov_model.predict(convs, batch_size=batch)
    alone = [ov_model.predict([c])[0] for c in convs]
    ref = ort_model.predict(convs, batch_size=batch)
    for g, a, r in zip(got, alone, ref):
        assert np.isfinite(g.probs).all()
        assert np.abs(g.probs - r.probs).max() < 1e-5  # f32 really is f32
        assert np.abs(g.probs - a.probs).max() < 1e-5  # padding-invariant


def test_bf16_only_when_asked(int8_causal_export: Path, ort_model) -> None:
    pytest.importorskip("openvino")
    try:
        model = cmath_runtime.load(int8_causal_export, backend="openvino", precision="bf16", threads=1)
    except (
        BackendUnavailableError
    ) as e:  # a CPU without bf16: OpenVINO would run f32, which we refuse to call bf16
        assert "bf16" in str(e)
        return
    assert model._info.session.inference_precision == "bf16" and model.precision == "bf16"
    convs = _conversations(2, 20, 2)
    for g, r in zip(model.predict(convs), ort_model.predict(convs)):
        assert np.isfinite(g.probs).all() and np.abs(g.probs - r.probs).max() < 0.1


def test_shapes_are_specialised_from_their_second_call(int8_causal_export: Path, ort_model) -> None:
    """static_shapes=1: a shape's first call runs the dynamic model, its second compiles one for that shape and later
    calls run it (same answers); another shape takes the slot only once called more than twice as often in the
    recent calls; static_shapes is refused
    on other backends and when negative."""
    pytest.importorskip("openvino")
    model = cmath_runtime.load(int8_causal_export, backend="openvino", threads=1, static_shapes=1)
    session = model._info.session
    a, b = _conversations(1, 9, 5), _conversations(2, 4, 6)
    ref_a, ref_b = ort_model.predict(a), ort_model.predict(b)
    answers = []
    for call in range(3):
        answers.append(model.predict(a))
        assert len(session.specialised_shapes()) == (0 if call == 0 else 1)
    [shape_a] = session.specialised_shapes()
    assert shape_a["mask"] == (1, 9)
    [entry] = session._static.values()
    assert (
        getattr(entry._local, "request", None) is not None
    )  # the later calls really ran the specialised model
    for got in answers:
        assert np.abs(got[0].probs - ref_a[0].probs).max() < 1e-5
    for call in range(7):  # a had 3 of the recent calls: b takes its slot on its 7th (more than twice a's)
        got_b = model.predict(b, batch_size=2)
        assert [s["mask"] for s in session.specialised_shapes()] == ([(1, 9)] if call < 6 else [(2, 4)])
    assert session.compiles == 2
    assert all(np.abs(g.probs - r.probs).max() < 1e-5 for g, r in zip(got_b, ref_b))
    assert "compiled for itself" in model.note
    default = cmath_runtime.load(int8_causal_export, backend="openvino", threads=1)
    assert default._info.session.static_shapes == cmath_runtime.model.OPENVINO_STATIC_SHAPES
    for bad, backend in ((2, "cpu"), (-1, "openvino")):
        with pytest.raises(ValueError, match="static_shapes"):
            cmath_runtime.load(int8_causal_export, backend=backend, threads=1, static_shapes=bad)


def test_more_recurring_shapes_than_slots_do_not_recompile(int8_causal_export: Path) -> None:
    """Three shapes in turn with two slots (predict over a data set, twice): two compiles, not one per call."""
    pytest.importorskip("openvino")
    model = cmath_runtime.load(int8_causal_export, backend="openvino", threads=1, static_shapes=2)
    inputs = [_conversations(1, n, 9) for n in (3, 5, 7)]
    for _ in range(5):
        for conv in inputs:
            model.predict(conv)
    assert model._info.session.compiles == 2 and len(model._info.session.specialised_shapes()) == 2


def test_shape_specialisation_is_thread_safe(int8_causal_export: Path, ort_model) -> None:
    """Threads calling one model with two shapes at once, while those shapes get compiled: every answer is right."""
    from concurrent.futures import ThreadPoolExecutor

    pytest.importorskip("openvino")
    model = cmath_runtime.load(int8_causal_export, backend="openvino", threads=1, static_shapes=2)
    inputs = [_conversations(1, 6, 7), _conversations(1, 11, 8)]
    refs = [ort_model.predict(c)[0].probs for c in inputs]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda i: (i % 2, model.predict(inputs[i % 2])[0].probs), range(24)))
    assert all(np.abs(probs - refs[k]).max() < 1e-5 for k, probs in got)
    assert sorted(s["mask"] for s in model._info.session.specialised_shapes()) == [(1, 6), (1, 11)]


def test_openvino_step_path(ov_model, ort_model) -> None:
    from cmath_runtime import Conversation

    [conv] = _conversations(1, 30, 4)
    stream = Conversation(ov_model)
    assert stream.path == "step"
    assert stream._stream.graph.session.static_shapes == 0  # its history grows every call: no shape repeats
    for i in range(30):
        stream.add(int(conv["speakers"][i]), **{m: x[i] for m, x in conv["features"].items()})
    [full] = ort_model.predict([conv])
    assert np.abs(stream.probs() - full.probs).max() < 1e-4


def test_missing_openvino_is_one_clear_error(
    int8_causal_export: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` now raises ImportError
    with pytest.raises(BackendUnavailableError) as e:
        cmath_runtime.load(int8_causal_export, backend="openvino")
    message = str(e.value)
    assert "openvino" in message and "pip install 'cmath[openvino]'" in message and "\n" not in message
