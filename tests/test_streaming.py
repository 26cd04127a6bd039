"""Streaming: the causal step equals the full forward row by row (torch, ONNX, runtime), state
persistence, capacity, and the full path for artifacts without a step graph."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from cmath_runtime.errors import InputError
from tests.conftest import CAUSAL_MAX_LEN, TINY_DIMS, tiny_model_config

SUBSETS = ("t", "a", "v", "ta", "tv", "av", "tav")
MAX_LEN = CAUSAL_MAX_LEN


def _conversation(n: int, dims: dict[str, int], seed: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    rng = np.random.default_rng(seed)
    return (
        {m: rng.standard_normal((n, d)).astype(np.float32) for m, d in dims.items()},
        rng.integers(0, 9, n).astype(np.int64),
    )


@pytest.mark.parametrize("mods", SUBSETS)
def test_torch_step_equals_full_forward(mods: str) -> None:
    from cmath_train.models.cmath import CMATH
    from cmath_train.streaming import StepModule, StreamState, step

    torch.manual_seed(len(mods))
    net = CMATH(tiny_model_config(modalities=tuple(mods), causal=True)).eval()
    module = StepModule(net, MAX_LEN)
    for n in (1, 200) if mods == "tav" else (1, 23):
        feats, spk = _conversation(n, {m: TINY_DIMS[m] for m in net.cfg.modalities}, n)
        with torch.no_grad():
            out = net(
                {m: torch.from_numpy(x)[None] for m, x in feats.items()},
                torch.from_numpy(spk)[None],
                torch.ones(1, n, dtype=torch.bool),
            )
        full = torch.softmax(out.logits, -1)[0]
        state = StreamState.empty(module)
        for i in range(n):
            probs, emb, state = step(
                module, state, {m: torch.from_numpy(x[i]) for m, x in feats.items()}, int(spk[i])
            )
            assert (probs - full[i]).abs().max() < 1e-4, (mods, n, i)
            assert (emb - out.embedding[0, i]).abs().max() < 1e-4
        assert state.position == n


@pytest.mark.parametrize("overrides", [{"modality_reconstruction": False}, {"cross_modal": False}])
def test_torch_step_ablations(overrides: dict) -> None:
    from cmath_train.models.cmath import CMATH
    from cmath_train.streaming import StepModule, StreamState, step

    net = CMATH(tiny_model_config(causal=True, **overrides)).eval()
    module, state = StepModule(net, 16), None
    feats, spk = _conversation(9, TINY_DIMS, 3)
    with torch.no_grad():
        full = torch.softmax(
            net(
                {m: torch.from_numpy(x)[None] for m, x in feats.items()},
                torch.from_numpy(spk)[None],
                torch.ones(1, 9, dtype=torch.bool),
            ).logits,
            -1,
        )[0]
    state = StreamState.empty(module)
    for i in range(9):
        probs, _, state = step(
            module, state, {m: torch.from_numpy(x[i]) for m, x in feats.items()}, int(spk[i])
        )
        assert (probs - full[i]).abs().max() < 1e-4


@pytest.mark.parametrize("kernel", [1, 2, 3, 5])
def test_torch_step_every_conv_kernel(kernel: int) -> None:
    """k = 1 has no conv tail (the step once used a linear layer it does not have); k > 1 carries k-1 rows."""
    from cmath_train.models.cmath import CMATH
    from cmath_train.streaming import StepModule, StreamState, step

    torch.manual_seed(kernel)
    net = CMATH(tiny_model_config(causal=True, conv_kernel=kernel)).eval()
    module = StepModule(net, 16)
    assert module.tail == kernel - 1
    feats, spk = _conversation(9, TINY_DIMS, kernel)
    with torch.no_grad():
        out = net(
            {m: torch.from_numpy(x)[None] for m, x in feats.items()},
            torch.from_numpy(spk)[None],
            torch.ones(1, 9, dtype=torch.bool),
        )
    state = StreamState.empty(module)
    for i in range(9):
        probs, emb, state = step(
            module, state, {m: torch.from_numpy(x[i]) for m, x in feats.items()}, int(spk[i])
        )
        assert (probs - out.logits[0, i].softmax(-1)).abs().max() < 1e-5
        assert (emb - out.embedding[0, i]).abs().max() < 1e-5


def test_step_graph_export_with_conv_kernel_1(tmp_path: Path) -> None:
    """A causal --conv-kernel 1 model exports its step graph, and it equals the full graph."""
    import onnx

    from cmath_export.formats import DEFAULT_OPSET
    from cmath_export.graph import export_onnx
    from cmath_export.step_graph import export_step
    from cmath_train.models.cmath import CMATH

    torch.manual_seed(1)
    net = CMATH(
        tiny_model_config(causal=True, conv_kernel=1, modalities=("t",))
    ).eval()  # one modality: a quicker trace
    onnx.save(export_onnx(net, DEFAULT_OPSET, 32), str(tmp_path / "model.onnx"))
    entry = export_step(net, DEFAULT_OPSET, 32, tmp_path, say=lambda _: None)
    assert entry["tail"] == 0 and not any(s["input"].startswith("tail_") for s in entry["state"])
    assert entry["parity"]["passed"] and entry["parity"]["probs_max_abs"] < 1e-5
    assert entry["parity"]["batched_probs_max_abs"] < 1e-5


def test_step_refuses_bidirectional_model() -> None:
    from cmath_train.models.cmath import CMATH
    from cmath_train.streaming import StepModule

    with pytest.raises(InputError, match="causal"):
        StepModule(CMATH(tiny_model_config()), 16)


@pytest.fixture(scope="module")
def causal_model(causal_export: Path):
    import cmath_runtime

    return cmath_runtime.load(causal_export, backend="cpu", threads=1)


def test_export_records_step_graph(causal_export: Path) -> None:
    manifest = json.loads((causal_export / "export.json").read_text())
    step = manifest["step"]
    assert step["file"] == "model.step.onnx" and (causal_export / step["file"]).is_file()
    assert step["max_len"] == MAX_LEN and step["parity"]["passed"] and step["parity"]["probs_max_abs"] < 1e-4
    names = {s["input"] for s in step["state"]}
    assert {"position", "tail_t", "past_key_tt", "past_value_ta"} <= names
    # the exact rewrites ran (rewrites.py): no Conv left, the projections of each hidden row fused into one MatMul
    import onnx

    ops = {n.op_type for n in onnx.load(str(causal_export / step["file"])).graph.node}
    assert (
        step["rewrites"]["convs_as_matmul"] == len(TINY_DIMS) and step["tail"] > 0
    )  # one Conv1D' per modality
    assert (
        "Conv" not in ops
        and "Split" in ops
        and step["rewrites"]["matmuls_fused"] >= 2 * len(step["attention"])
    )


def test_step_graph_parity_200(causal_export: Path) -> None:
    import onnxruntime as ort

    from cmath_runtime.streaming import StepGraph

    step = json.loads((causal_export / "export.json").read_text())["step"]
    session = ort.InferenceSession(str(causal_export / "model.step.onnx"), providers=["CPUExecutionProvider"])
    graph = StepGraph(session, step)
    feats, spk = _conversation(MAX_LEN, TINY_DIMS, 7)
    full = ort.InferenceSession(str(causal_export / "model.onnx"), providers=["CPUExecutionProvider"])
    ref_probs, ref_emb = full.run(
        ["probs", "embedding"],
        {**{m: x[None] for m, x in feats.items()}, "speaker": spk[None], "mask": np.ones((1, MAX_LEN), bool)},
    )
    state = graph.empty_state()
    out = [graph.run(state, i, int(spk[i]), {m: x[i] for m, x in feats.items()}) for i in range(MAX_LEN)]
    probs, emb = np.stack([p for p, _ in out]), np.stack([e for _, e in out])
    assert np.abs(probs - ref_probs[0]).max() < 1e-4
    assert np.abs(emb - ref_emb[0]).max() < 1e-3


def _add_all(conv, feats: dict[str, np.ndarray], spk: np.ndarray, start: int = 0, stop: int | None = None):
    for i in range(start, len(spk) if stop is None else stop):
        conv.add(int(spk[i]), **{m: x[i] for m, x in feats.items()})
    return conv


def test_runtime_conversation_step_path(causal_model) -> None:
    from cmath_runtime import Conversation

    feats, spk = _conversation(60, TINY_DIMS, 11)
    conv = Conversation(causal_model)
    assert conv.path == "step"
    latest = []
    for i in range(len(spk)):
        _add_all(conv, feats, spk, i, i + 1)
        latest.append(conv.latest.probs)
    [full] = causal_model.predict([{"speakers": spk, "features": feats}])
    assert np.abs(conv.probs() - full.probs).max() < 1e-4
    got = np.stack(latest)
    assert np.abs(got - full.probs).max() < 1e-4


def test_state_copy_save_resume(causal_model, tmp_path: Path) -> None:
    from cmath_runtime import Conversation

    feats, spk = _conversation(30, TINY_DIMS, 5)
    whole = _add_all(Conversation(causal_model), feats, spk)
    half = _add_all(Conversation(causal_model), feats, spk, 0, 12)
    half.latest  # noqa: B018 (computes the first 12 on the step path)
    copied = _add_all(half.copy(), feats, spk, 12)
    half.save(tmp_path / "conv.npz")
    resumed = _add_all(Conversation.load(causal_model, tmp_path / "conv.npz"), feats, spk, 12)
    assert resumed.path == "step"
    for other in (copied, resumed):
        np.testing.assert_array_equal(other.probs(), whole.probs())
    assert len(half) == 12  # the copy did not touch the original


def test_capacity_error(causal_model) -> None:
    from cmath_runtime import Conversation

    feats, spk = _conversation(MAX_LEN, TINY_DIMS, 2)
    conv = _add_all(Conversation(causal_model), feats, spk)
    with pytest.raises(InputError) as e:
        conv.add(0, **{m: x[0] for m, x in feats.items()})
    assert e.value.field == f"utterances[{MAX_LEN}]"
    graph = causal_model.step_graph
    with pytest.raises(InputError, match="capacity"):
        graph.run(graph.empty_state(), MAX_LEN, 0, {m: x[0] for m, x in feats.items()})


def test_no_step_graph_uses_full_path(causal_export: Path, tmp_path: Path) -> None:
    import cmath_runtime
    from cmath_runtime import Conversation

    folder = tmp_path / "export"
    shutil.copytree(causal_export, folder)
    manifest = json.loads((folder / "export.json").read_text())
    manifest["step"] = None  # what a bidirectional export writes
    (folder / "export.json").write_text(json.dumps(manifest))
    model = cmath_runtime.load(folder, backend="cpu", threads=1)
    feats, spk = _conversation(5, TINY_DIMS, 1)
    conv = _add_all(Conversation(model), feats, spk)
    assert conv.path == "full" and conv.probs().shape == (5, 6)
    resumed = Conversation.from_state(model, conv.state_dict())
    np.testing.assert_array_equal(resumed.probs(), conv.probs())


def test_step_batch_equals_each_alone_and_full_graph(causal_model) -> None:
    """16 conversations of different lengths stepped together in one graph call per step (different positions,
    padded histories) equal each one stepped alone, and the full graph's rows."""
    from cmath_runtime import Conversation

    lengths = [1, 2, 3, 5, 8, 13, 21, 34, 4, 9, 17, 30, 6, 11, 25, 40]
    data = [_conversation(n, TINY_DIMS, 100 + k) for k, n in enumerate(lengths)]
    together = [Conversation(causal_model) for _ in lengths]
    for k, (feats, spk) in enumerate(
        data
    ):  # different histories before the batched steps (some left pending)
        _add_all(together[k], feats, spk, 0, lengths[k] // 2)
    for i in range(max(lengths)):
        live = [k for k, n in enumerate(lengths) if lengths[k] // 2 <= i < n]
        if not live:
            continue
        emotions = Conversation.step_batch(
            [together[k] for k in live],
            [{"speaker": int(data[k][1][i]), **{m: x[i] for m, x in data[k][0].items()}} for k in live],
        )
        for k, emotion in zip(live, emotions):
            latest = together[k].latest
            assert emotion.label == latest.label and np.array_equal(emotion.probs, latest.probs)
    for k, (feats, spk) in enumerate(data):
        alone = _add_all(Conversation(causal_model), feats, spk)
        assert len(together[k]) == lengths[k]
        np.testing.assert_allclose(together[k].probs(), alone.probs(), atol=1e-5, rtol=0)
        [full] = causal_model.predict([{"speakers": spk, "features": feats}])
        assert np.abs(together[k].probs() - full.probs).max() < 1e-4


def test_step_batch_validation_names_the_utterance(causal_model) -> None:
    from cmath_runtime import Conversation

    feats, _ = _conversation(1, TINY_DIMS, 0)
    good = {"speaker": 0, **{m: x[0] for m, x in feats.items()}}
    convs = [Conversation(causal_model), Conversation(causal_model)]
    for bad, field in (
        ({**good, "speaker": 99}, "utterances[1].speaker"),
        ({k: v for k, v in good.items() if k != "a"}, "utterances[1].features"),
        ({**good, "t": np.full(TINY_DIMS["t"], np.nan, np.float32)}, "utterances[1].features['t']"),
        ({**good, "v": np.zeros(3, np.float32)}, "utterances[1].features['v']"),
    ):
        with pytest.raises(InputError) as e:
            Conversation.step_batch(convs, [good, bad])
        assert e.value.field == field
    assert [len(c) for c in convs] == [0, 0]  # nothing changed
    with pytest.raises(InputError, match="at most once"):
        Conversation.step_batch([convs[0], convs[0]], [good, good])
    with pytest.raises(InputError) as e:
        Conversation.step_batch(convs, [good])
    assert e.value.field == "utterances"


@pytest.mark.parametrize("spinning", [False, True])
def test_step_graph_follows_the_models_thread_policy(causal_export: Path, spinning: bool) -> None:
    """load(spinning=True) must reach the step graph's session too (it is what the step bar is measured on)."""
    import cmath_runtime

    model = cmath_runtime.load(causal_export, backend="cpu", threads=1, spinning=spinning)
    options = model.step_graph.session.get_session_options()
    assert model.spinning is spinning
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == ("1" if spinning else "0")
