"""The text-path benchmark on the tiny context export (context_run): one new utterance into a live 20-turn
conversation per contender, floors from the read bandwidth of the same rounds, ratios from the same run; and the
raw-text replay parity against the PyTorch pipeline."""

from __future__ import annotations

from pathlib import Path

import pytest

from cmath_bench.roofline import CallWork, Machine, weight_bytes
from cmath_bench.text_path import (
    FP32,
    FROZEN,
    INT8,
    TORCH,
    Dialogue,
    dev_dialogues,
    live_conversations,
    replay_parity,
    report_text_path,
)
from cmath_bench.timing import Budget

TEST_BUDGET = Budget(warmup=1, iterations=4, seconds=0.3, min_iterations=2, rounds=2)


@pytest.fixture(scope="module")
def dev(context_run: tuple[Path, Path]) -> list[Dialogue]:
    _, export = context_run
    return dev_dialogues(export.parents[1] / "dev.csv", num_speakers=9)


def test_live_conversations_are_20_turns_of_real_texts(dev: list[Dialogue]) -> None:
    convs = live_conversations(dev, 3, num_speakers=9)
    texts = {t for d in dev for t in d.texts}
    assert [len(c.texts) for c in convs] == [21] * 3 and all(set(c.texts) <= texts for c in convs)
    assert all(c.speakers[0] == 0 and max(c.speakers) < 9 for c in convs)
    assert convs[0].texts[:6] == dev[0].texts  # consecutive utterances of the dialogues


def test_text_path_report(
    context_run: tuple[Path, Path], tiny_encoder: Path, dev: list[Dialogue], tmp_path: Path
) -> None:
    _, export = context_run
    machine = Machine(
        bandwidth_gb_s=5.0, fp32_gflop_s=50.0, threads=1
    )  # cmath-bench's, before: reported only
    report = report_text_path(
        export.parent,
        export,
        1,
        quick=True,
        out_dir=tmp_path,
        machine=machine,
        frozen_dir=tiny_encoder,
        log=lambda _m: None,
        budget=TEST_BUDGET,
        dialogues=dev,
    )
    assert report is not None
    recs = {r["contender"]: r for r in report["records"]}
    assert set(recs) == {FP32, INT8, TORCH, FROZEN}, report["skipped"]
    m = report["machine"]  # measured in the same rounds as the contenders
    assert m["read_gb_s"] == max(m["read_sum_gb_s"], m["read_gemv_gb_s"]) > 0 and m["copy_gb_s"] > 0
    assert (
        m["fp32_gflop_s"] > 0
        and m["int8_gop_s"] > 0
        and report["machine_start_of_run"]["bandwidth_gb_s"] == 5.0
    )
    for r in recs.values():
        assert r["p50_ms"] > 0 and r["p90_ms"] >= r["p50_ms"] and r["iterations"] >= 2 and r["history"] == 20
        # the floor: weights read / the READ bandwidth (not the copy rate), FLOPs / the peak of its arithmetic
        assert r["bytes_floor_ms"] == pytest.approx(r["weight_bytes"] / m["read_gb_s"] / 1e6)
        peak = max(m["int8_gop_s"], m["fp32_gflop_s"]) if r["precision"] == "int8" else m["fp32_gflop_s"]
        assert r["flops_floor_ms"] == pytest.approx(r["flops"] / peak / 1e6) and r["peak_gflop_s"] == peak
        assert r["floor_ms"] == max(r["bytes_floor_ms"], r["flops_floor_ms"])
        assert r["latency_x_floor"] == pytest.approx(r["p50_ms"] / r["floor_ms"])
        assert r["best_floor_ms"] <= r["floor_ms"] and r["latency_x_best_floor"] >= r["latency_x_floor"]
        assert r["weight_bytes"] == r["encoder_weight_bytes"] + r["model_weight_bytes"] and r["flops"] > 0
    assert report["floor_reliable"] == all(r["latency_x_floor"] >= 1 for r in recs.values())
    # the word-embedding table is read only at the call's tokens
    assert recs[FP32]["encoder_weight_bytes"] < weight_bytes(export / "text_encoder.onnx")
    assert recs[INT8]["weight_bytes"] < recs[FP32]["weight_bytes"] == recs[TORCH]["weight_bytes"]
    assert recs[FROZEN]["tokens"] < recs[FP32]["tokens"]  # the utterance alone vs with its past turns
    ratios = report["ratios"]
    assert ratios["int8_vs_fp32"]["ratio"] == pytest.approx(recs[FP32]["p50_ms"] / recs[INT8]["p50_ms"])
    assert ratios["runtime_vs_pytorch"]["ratio"] == pytest.approx(
        recs[TORCH]["p50_ms"] / recs[FP32]["p50_ms"]
    )
    assert ratios["context_vs_frozen"]["ratio"] == pytest.approx(
        recs[FP32]["p50_ms"] / recs[FROZEN]["p50_ms"]
    )
    md = (tmp_path / "bench_text.md").read_text()
    assert "| contender | encoder | tokens | p50 ms |" in md and "int8_vs_fp32" in md and "x floor" in md
    assert (tmp_path / "bench_text.json").is_file()
    assert (tmp_path / "bench_text.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_replay_parity_with_the_pytorch_pipeline(context_run: tuple[Path, Path], dev: list[Dialogue]) -> None:
    _, export = context_run
    parity = replay_parity(export.parent, export, dev, log=lambda _m: None)
    fp32 = parity["fp32"]
    assert fp32["rows"] == sum(len(d.texts) for d in dev) and fp32["conversations"] == len(dev)
    assert fp32["outputs"][0]["max_abs"] < 1e-4 and fp32["passed"]
    assert 0 <= parity["int8"]["argmax_agreement"] <= 1 and parity["int8"]["min_argmax_agreement"] == 0.99


def test_weight_reads_count_gathered_rows(tmp_path: Path) -> None:
    """An embedding table read by a Gather of run-time indices counts only its distinct rows; other weights whole."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    table = numpy_helper.from_array(np.ones((100, 8), np.float32), "table")
    w = numpy_helper.from_array(np.ones((8, 4), np.float32), "w")
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["e"]),
        helper.make_node("MatMul", ["e", "w"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [table, w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, str(tmp_path / "g.onnx"))
    assert (
        CallWork(tmp_path / "g.onnx").weight_bytes({"ids": np.array([3, 3, 7, -1])}) == 3 * 8 * 4 + 8 * 4 * 4
    )  # rows 3, 7, 99
    assert weight_bytes(tmp_path / "g.onnx") == 100 * 8 * 4 + 8 * 4 * 4


def test_cmath_bench_runs_the_text_path_on_real_dialogues(
    context_run: tuple[Path, Path], tiny_encoder: Path, tmp_path: Path
) -> None:
    """`cmath-bench RUN --texts DIR --text-parity N` on a text run: the full model's pages and the text path's, its
    live conversations from the folder's dev CSV, the replay parity in its report; --text-parity alone is refused."""
    import json
    import shutil

    from click.testing import CliRunner

    from cmath_bench.cli import main

    _, export = context_run
    texts = tmp_path / "texts"
    texts.mkdir()
    shutil.copy(export.parents[1] / "dev.csv", texts / "dev_sent_emo.csv")
    out = tmp_path / "bench"
    args = [
        str(export.parent),
        "--quick",
        "--threads",
        "1",
        "--backends",
        "onnxruntime:fp32",
        "--lengths",
        "1",
    ]
    refused = CliRunner().invoke(main, [*args, "--text-parity", "2"])
    assert refused.exit_code == 2 and "--text-parity" in refused.output and "needs --texts" in refused.output
    result = CliRunner().invoke(
        main,
        [
            *args,
            "--out",
            str(out),
            "--texts",
            str(texts),
            "--text-parity",
            "2",
            "--frozen-encoder",
            str(tiny_encoder),
        ],
    )
    assert result.exit_code == 0, result.output
    assert {p.name for p in out.iterdir()} >= {"bench.json", "bench.md", "bench_text.json", "bench_text.md"}
    report = json.loads((out / "bench_text.json").read_text())
    assert report["texts"] == "MELD dev (dev_sent_emo.csv)" and report["host"]["isa"]
    assert report["parity"]["fp32"]["conversations"] == 2 and report["parity"]["fp32"]["passed"]
    assert {r["contender"] for r in report["records"]} >= {FP32, TORCH, FROZEN}
    records = json.loads((out / "bench.json").read_text())
    assert all(r["isa"] and r["cpu"] for r in records)
