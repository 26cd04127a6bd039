"""The fine-tuned, context-reading text encoder end to end on tiny data: cmath-prepare -> train ->
export (fp32 + fp16 + int8 encoder) -> the runtime reads each utterance with its past exactly as training did."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

import cmath_runtime
from cmath_runtime.errors import InputError
from tests.conftest import CONTEXT_TURNS

TURNS = CONTEXT_TURNS


def test_export_carries_the_turns_encoder_and_its_twins(context_run: tuple[Path, Path]) -> None:
    _, export = context_run
    entry = json.loads((export / "export.json").read_text())["text_encoder"]
    assert entry["turns"] == TURNS.to_json() and entry["inputs"] == [
        "input_ids",
        "attention_mask",
        "token_type_ids",
    ]
    assert (
        entry["parity"]["passed"]
        and entry["parity"]["min_cosine"] >= 0.9999
        and entry["parity"]["texts"] == 24
    )
    for precision in ("fp16", "int8"):
        record = entry["variants"][precision]
        assert record["data"] == "4 validation conversations" and record["utterances"] == 24
        assert record["agreement"] is not None and record["passed"] == (f"onnx_{precision}" in entry["files"])
        assert record["passed"] and (export / record["file"]).is_file()


def test_int8_encoder_falls_back_to_the_blockwise_scheme(
    context_run: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the fast int8 scheme misses the twin's bounds the next one is tried, and the record says which scheme
    the written twin is and what was tried before it; when none passes nothing is written."""
    import shutil

    from cmath_export import text_encoder as te
    from cmath_export.parity_data import validation_texts
    from cmath_train.checkpoint import load_checkpoint

    _, export = context_run
    staging = tmp_path / "staging"
    shutil.copytree(export, staging)
    entry = json.loads((staging / "export.json").read_text())["text_encoder"]
    conversations = validation_texts(load_checkpoint(export.parent))
    fast = entry["variants"]["int8"]
    assert fast["scheme"]["method"] == "dynamic" and fast["tried"] == []
    real = te.twin_agreement
    calls: list[int] = []

    def first_misses(
        *a: object,
    ) -> dict:  # the tiny encoder's dynamic twin is within 1e-7 of fp32: make it miss
        record = real(*a)
        calls.append(1)
        return {**record, "passed": False} if len(calls) == 1 else record

    monkeypatch.setattr(te, "twin_agreement", first_misses)
    said: list[str] = []
    items = te.twin_items(conversations)
    ref = te._runtime_encoder(entry, staging).encode_turns(items)
    args = (entry, staging, "int8", items, ref, conversations, staging / "model.onnx", said.append)
    record = te.write_twin(*args)
    assert record["passed"] and record["scheme"]["method"] == "blockwise" and record["scheme"]["block"] == 32
    assert (
        len(record["tried"]) == 1
        and "scheme dynamic" in record["tried"][0]
        and "missed its bounds" in said[0]
    )
    twin = onnx.load_model(str(staging / "text_encoder.int8.onnx"))
    assert sum(n.op_type == "MatMulNBits" for n in twin.graph.node) >= 4 and record["min_cosine"] > 0.999
    monkeypatch.setitem(te.TWIN_BOUNDS, "int8", {"min_cosine": 1.5, "agreement": 0.99})
    calls.clear()
    record = te.write_twin(*args)
    assert (
        not record["passed"]
        and len(record["tried"]) == 2
        and not (staging / "text_encoder.int8.onnx").exists()
    )


def test_replayed_conversations_match_the_training_features(context_run: tuple[Path, Path]) -> None:
    """Utterance by utterance through Conversation.add(text=): the features cmath-prepare wrote for dev (final
    encoder, torch) within 1e-5, and the same emotions as predict() on those features."""
    from cmath_train.data.features_dir import load_features

    feats, export = context_run
    model = cmath_runtime.load(export, backend="cpu", threads=1)
    dev = load_features(feats).splits["dev"]
    for d in dev:
        conv = cmath_runtime.Conversation(model)
        for s, text in zip(d.speakers, d.texts, strict=True):
            conv.add(int(s), text=text)
        np.testing.assert_allclose(conv.features["t"], d.features["t"], atol=1e-5)
        [ref] = model.predict([{"speakers": d.speakers, "features": {"t": d.features["t"]}}])
        np.testing.assert_allclose(conv.probs(), ref.probs, atol=1e-5)
        [batch] = model.predict([{"speakers": d.speakers, "texts": d.texts}])
        np.testing.assert_allclose(batch.probs, ref.probs, atol=1e-5)


def test_step_batch_and_state_files_keep_the_history(context_run: tuple[Path, Path], tmp_path: Path) -> None:
    _, export = context_run
    model = cmath_runtime.load(export, backend="cpu", threads=1)
    lines = [
        (0, "great lovely fun 1"),
        (1, "stupid awful hate 2"),
        (2, "the table is here 3"),
        (0, "great 4"),
    ]
    a, b = cmath_runtime.Conversation(model), cmath_runtime.Conversation(model)
    ref = cmath_runtime.Conversation(model)
    for s, t in lines[:2]:
        a.add(s, text=t)
        ref.add(s, text=t)
    a.save(tmp_path / "a.npz")
    a = cmath_runtime.Conversation.load(model, tmp_path / "a.npz")
    assert a.texts == [t for _, t in lines[:2]]
    for s, t in lines[2:]:
        cmath_runtime.Conversation.step_batch([a, b], [{"speaker": s, "text": t}, {"speaker": s, "text": t}])
        ref.add(s, text=t)
    np.testing.assert_allclose(a.features["t"], ref.features["t"], atol=1e-6)
    np.testing.assert_allclose(a.probs(), ref.probs(), atol=1e-6)
    assert b.texts == [t for _, t in lines[2:]]
    assert not np.allclose(
        b.features["t"][0], ref.features["t"][2]
    )  # the same text without its past reads differently


def test_int8_encoder_is_used_and_mixed_history_is_refused(context_run: tuple[Path, Path]) -> None:
    _, export = context_run
    int8 = cmath_runtime.load(export, backend="cpu", precision="int8", threads=1)
    assert (
        int8.text_encoder.spec.precision == "int8"
        and int8.text_encoder.spec.onnx_file.name == "text_encoder.int8.onnx"
    )
    fp32 = cmath_runtime.load(export, backend="cpu", threads=1)
    assert fp32.text_encoder.spec.precision == "fp32"
    conv = cmath_runtime.Conversation(fp32).add(0, t=np.zeros(32, np.float32))
    with pytest.raises(InputError, match=r"utterances\[1\]\.text: expected text for the last 2 utterances"):
        conv.add(1, text="hello")
    assert len(conv) == 1


def test_future_turns_whole_conversations_and_the_causal_twin_streams(
    tiny_encoder: Path, tmp_path: Path
) -> None:
    """cmath-prepare with future turns -> the whole-conversation model's export reads texts as training did and
    refuses to stream; the causal twin (--causal reads it) streams utterance by utterance, as training did."""
    from cmath_export import export_run
    from cmath_runtime.turns import TurnFormat
    from cmath_train.config import LossConfig, TrainConfig
    from cmath_train.data import load_data
    from cmath_train.prepare.build import PrepareOptions, prepare_features
    from cmath_train.prepare.finetune import FinetuneOptions
    from cmath_train.train import train
    from tests.conftest import context_rows, tiny_model_config
    from tests.test_prepare import MELD_HEADER, meld_rows, write_csv

    files = {
        s: write_csv(tmp_path / f"{s}.csv", MELD_HEADER, meld_rows(context_rows(n, k)))
        for k, (s, n) in enumerate((("train", 36), ("dev", 18), ("test", 12)))
    }
    feats = tmp_path / "feat"
    prepare_features(
        files,
        feats,
        PrepareOptions(
            cache_dir=None,
            encoder_dir=tiny_encoder,
            turns=TurnFormat(window=2, max_tokens=56, future=1),
            causal_turns=TurnFormat(window=2, max_tokens=48),
            finetune=FinetuneOptions(epochs=1, batch_size=8, lr=1e-3),
        ),
        log=lambda _: None,
    )
    exports = {}
    for causal in (False, True):
        fs = load_data(str(feats), causal=causal)
        run = tmp_path / f"run-{causal}"
        cfg = tiny_model_config(modalities=("t",), feature_dims={"t": 32}, num_classes=3, causal=causal)
        train(fs, cfg, LossConfig(), TrainConfig(epochs=1, batch_size=4), run, progress=False)
        export_run(run)
        exports[causal] = (fs, run / "export")
    fs, export = exports[False]
    manifest = json.loads((export / "export.json").read_text())
    assert manifest["text_encoder"]["turns"]["future"] == 1
    model = cmath_runtime.load(export, backend="cpu", threads=1)
    for d in fs.splits["dev"]:
        [got] = model.predict([{"speakers": d.speakers, "texts": d.texts}])
        [ref] = model.predict([{"speakers": d.speakers, "features": {"t": d.features["t"]}}])
        np.testing.assert_allclose(got.probs, ref.probs, atol=1e-5)  # texts read with past and future turns
    with pytest.raises(InputError, match="future turn") as err:
        cmath_runtime.Conversation(model).add(0, text="hello there")
    assert "utterances[0].text" in str(err.value)
    fs, export = exports[True]
    model = cmath_runtime.load(export, backend="cpu", threads=1)
    d = fs.splits["dev"][0]
    conv = cmath_runtime.Conversation(model)
    for s, text in zip(d.speakers, d.texts, strict=True):
        conv.add(int(s), text=text)
    np.testing.assert_allclose(conv.features["t"], d.features["t"], atol=1e-5)
    # the levers page reads the same records: both encoders, what each reads, the twin distilled
    from click.testing import CliRunner

    from studies.levers import main as levers

    out = tmp_path / "levers"
    args = [
        "--features",
        str(feats),
        "--run",
        f"causal={tmp_path / 'run-True'}",
        "--title",
        "tiny",
        "--out",
        str(out),
    ]
    result = CliRunner().invoke(levers, args)
    assert result.exit_code == 0, result.output
    page = json.loads(out.with_suffix(".json").read_text())
    assert [(e["encoder"], e["distilled"]) for e in page["encoders"]] == [
        ("whole conversation", False),
        ("causal twin", True),
    ]
    assert page["encoders"][0]["reads"].startswith("2 past + 1 future") and page["runs"][0]["seeds"] == 1
