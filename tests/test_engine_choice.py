"""backend="auto" / precision="auto" on the CPU: the engine choice is measured once, cached per (CPU, export,
threads, ...), invalidated when either changes, never crashes on a corrupt cache, keeps the default exact, and
agrees with onnxruntime fp32; the text encoder runs on OpenVINO as it does on onnxruntime."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import cmath_runtime
from cmath_runtime.cpu import cpu_info, parse_cpuinfo
from cmath_runtime.engine_choice import CACHE_FILE, EXACT
from cmath_runtime.manifest import read_manifest
from cmath_runtime.text import open_text_encoder
from tests.test_int8 import _conversations

XEON_AMX = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz
flags\t\t: fpu sse2 avx avx2 fma f16c avx512f avx512bw avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8
"""
EPYC_AVX2 = """processor\t: 0
model name\t: AMD EPYC 7B12
flags\t\t: fpu sse2 avx avx2 fma f16c
"""
TEXTS = [
    "Oh my God!",
    "I don't know... maybe?",
    "Hey Ross, what's up?",
    "Okay.",
    "You're going to get it, I just know it!",
]


def test_isa_classes() -> None:
    xeon, epyc = parse_cpuinfo(XEON_AMX), parse_cpuinfo(EPYC_AVX2)
    assert xeon.model.startswith("Intel(R) Xeon(R) Platinum 8481C") and xeon.isa == "amx"
    assert xeon.bf16 and xeon.int8_dot
    assert epyc.isa == "avx2" and not epyc.bf16 and not epyc.int8_dot
    assert parse_cpuinfo(EPYC_AVX2.replace("fma", "fma avx512f avx512_vnni")).isa == "avx512_vnni"
    assert parse_cpuinfo(EPYC_AVX2.replace("fma", "fma avx512f")).isa == "avx512"
    assert xeon.key != epyc.key and "sse2" not in xeon.key  # only the flags the engines care about
    here = cpu_info()
    assert here.model and here.isa in ("amx", "avx512_vnni", "avx512", "avx2", "other")


@pytest.fixture
def export_copy(causal_export: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(causal_export, tmp_path / "export"))


def _load(export: Path, cache: Path, **kw) -> cmath_runtime.EmotionModel:
    return cmath_runtime.load(export, threads=1, choice_cache=cache, **kw)


def test_choice_is_cached_and_reused(causal_export: Path, tmp_path: Path) -> None:
    pytest.importorskip("openvino")
    first = _load(causal_export, tmp_path)
    choice = first.engine_choice["model"]
    assert choice.source == "calibrated" and choice.isa == cpu_info().isa and choice.threads == 1
    timed = {c.name: c for c in choice.candidates if c.quiet_ms is not None}
    assert set(timed) == {"onnxruntime fp32", "openvino fp32"}  # both exact engines timed, quiet and shared
    assert all(c.shared_ms and c.shared_ms > 0 and c.score for c in timed.values())
    assert timed["openvino fp32"].agreement is not None and timed["openvino fp32"].agreement <= EXACT
    assert (first.backend, first.precision) == (choice.backend, "fp32")
    stored = json.loads((tmp_path / CACHE_FILE).read_text())["choices"]
    assert len(stored) == 1

    second = _load(causal_export, tmp_path)
    again = second.engine_choice["model"]
    assert again.source == "cached"  # no second calibration: the first one's record, medians and all
    assert again.candidates == choice.candidates and again.calibration_seconds == choice.calibration_seconds
    assert second.backend == first.backend
    assert json.loads((tmp_path / CACHE_FILE).read_text())["choices"] == stored  # nothing re-measured


def test_export_change_invalidates(export_copy: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    assert _load(export_copy, cache).engine_choice["model"].source == "calibrated"
    assert _load(export_copy, cache).engine_choice["model"].source == "cached"
    manifest = export_copy / "export.json"
    doc = json.loads(manifest.read_text())
    doc["parity"]["fp32"]["notes"] = [*doc["parity"]["fp32"].get("notes", []), "re-exported"]
    manifest.write_text(json.dumps(doc))  # another export: another sha256
    assert _load(export_copy, cache).engine_choice["model"].source == "calibrated"
    assert len(json.loads((cache / CACHE_FILE).read_text())["choices"]) == 2


def test_cpu_change_invalidates(causal_export: Path, tmp_path: Path) -> None:
    assert _load(causal_export, tmp_path).engine_choice["model"].source == "calibrated"
    other = parse_cpuinfo(XEON_AMX if cpu_info().isa != "amx" else EPYC_AVX2)
    moved = _load(causal_export, tmp_path, cpu=other).engine_choice["model"]
    assert moved.source == "calibrated" and moved.cpu == other.model and moved.isa == other.isa
    assert _load(causal_export, tmp_path, cpu=other).engine_choice["model"].source == "cached"
    assert (
        _load(causal_export, tmp_path).engine_choice["model"].source == "cached"
    )  # this machine's still there


@pytest.mark.parametrize("garbage", [b"{not json\xff", b'{"format": "cmath-engine-choices", "version": 1}'])
def test_corrupt_cache_is_ignored_with_a_warning(causal_export: Path, tmp_path: Path, garbage: bytes) -> None:
    (tmp_path / CACHE_FILE).write_bytes(garbage)
    with pytest.warns(RuntimeWarning, match="unreadable"):
        model = _load(causal_export, tmp_path)
    assert model.engine_choice["model"].source == "calibrated"
    assert json.loads((tmp_path / CACHE_FILE).read_text())["format"] == "cmath-engine-choices"  # replaced
    assert _load(causal_export, tmp_path).engine_choice["model"].source == "cached"


def test_default_precision_is_exact_and_agrees(causal_export: Path) -> None:
    model = cmath_runtime.load(causal_export, threads=1)  # the suite's cache folder (conftest)
    choice = model.engine_choice["model"]
    assert model.precision == "fp32" and {c.precision for c in choice.candidates} == {"fp32"}
    assert model.spinning is False  # onnxruntime threads sleep, whatever engine was chosen
    ref = cmath_runtime.load(causal_export, backend="cpu", threads=1)
    convs = _conversations(2, 30, 3)
    for got, want in zip(model.predict(convs), ref.predict(convs)):
        assert np.abs(got.probs - want.probs).max() <= EXACT


def test_precision_auto_considers_passed_reduced_precisions(causal_export: Path, tmp_path: Path) -> None:
    """The shared causal export has an int8 model whose agreement record passed: precision="auto" weighs it (and
    OpenVINO bf16 only on a CPU with bf16); whatever wins stays within its recorded bound of onnxruntime fp32."""
    model = _load(causal_export, tmp_path, precision="auto")
    choice = model.engine_choice["model"]
    names = {c.name: c for c in choice.candidates}
    assert "onnxruntime int8" in names and names["onnxruntime int8"].refused == ""
    assert names["onnxruntime int8"].agreement is not None and "probs max" in names["onnxruntime int8"].bound
    if "openvino bf16" in names and not cpu_info().bf16:
        assert "no bf16" in names["openvino bf16"].refused
    picked = names[f"{'onnxruntime' if model.backend == 'cpu' else model.backend} {model.precision}"]
    assert picked.refused == "" and (picked.agreement or 0.0) <= 3e-2
    ref = cmath_runtime.load(causal_export, backend="cpu", threads=1)
    convs = _conversations(2, 30, 4)
    bound = EXACT if model.precision == "fp32" else 3e-2
    for got, want in zip(model.predict(convs), ref.predict(convs)):
        assert np.abs(got.probs - want.probs).max() <= bound


def test_failed_record_is_refused(export_copy: Path, tmp_path: Path) -> None:
    manifest = export_copy / "export.json"
    doc = json.loads(manifest.read_text())
    doc["parity"]["int8"]["passed"] = False
    manifest.write_text(json.dumps(doc))
    model = _load(export_copy, tmp_path, precision="auto")
    names = {c.name: c for c in model.engine_choice["model"].candidates}
    assert "passed agreement record" in names["onnxruntime int8"].refused and model.precision != "int8"


def test_precision_auto_needs_a_cpu_engine(causal_export: Path) -> None:
    with pytest.raises(ValueError, match="precision 'auto' chooses among the CPU engines"):
        cmath_runtime.load(causal_export, backend="cuda", precision="auto")


@pytest.fixture(scope="module")
def context_export(context_run: tuple[Path, Path]) -> Path:
    return context_run[1]


def test_openvino_text_encoder_matches_onnxruntime(context_export: Path) -> None:
    pytest.importorskip("openvino")
    manifest = read_manifest(context_export)
    items = [(TEXTS, [k % 2 for k in range(len(TEXTS))], i) for i in range(len(TEXTS))]
    ref = open_text_encoder(manifest, "cpu", "fp32", threads=1).encode_turns(items)
    ov = open_text_encoder(manifest, "openvino", "fp32", threads=1)
    assert ov.backend == "openvino" and ov.label == "fp32"
    assert np.abs(ov.encode_turns(items) - ref).max() <= EXACT
    if not cpu_info().bf16:
        pytest.skip(f"bf16: this CPU ({cpu_info().describe()}) has no bf16 arithmetic, OpenVINO refuses it")
    bf16 = open_text_encoder(manifest, "openvino", "bf16", threads=1).encode_turns(items)
    bound = manifest.text_encoder["variants"]["fp16"]["bounds"]["min_cosine"]  # bf16 is held to fp16's bound
    cos = np.sum(ref * bf16, 1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(bf16, axis=1))
    assert cos.min() >= bound


def test_text_encoder_follows_an_explicit_engine(context_export: Path) -> None:
    pytest.importorskip("openvino")
    model = cmath_runtime.load(context_export, backend="openvino", threads=1)
    assert model.text_encoder.backend == "openvino"
    assert model.engine_choice["text_encoder"].source == "requested"
    ref = cmath_runtime.load(context_export, backend="cpu", threads=1)
    conv = {"speakers": [0, 1, 0, 1, 0], "texts": TEXTS}
    [got], [want] = model.predict([conv]), ref.predict([conv])
    assert np.abs(got.probs - want.probs).max() <= EXACT


def test_text_encoder_chosen_on_its_own(context_export: Path, tmp_path: Path) -> None:
    """precision="auto": the encoder's candidates are calibrated apart from the model's on first use (int8 graph
    on both engines, its record passed in this export), cached as well, and the texts' emotions stay within the
    int8 twin's recorded bound."""
    pytest.importorskip("openvino")
    model = _load(context_export, tmp_path, precision="auto")
    assert "text_encoder" not in model.engine_choice  # not loaded yet
    conv = {"speakers": [0, 1, 0, 1, 0], "texts": TEXTS}
    [got] = model.predict([conv])
    choice = model.engine_choice["text_encoder"]
    names = {c.name: c for c in choice.candidates}
    assert choice.source == "calibrated" and {"onnxruntime fp32", "openvino fp32", "onnxruntime int8"} <= set(
        names
    )
    assert model.text_encoder.backend == choice.backend and model.text_encoder.label == choice.precision
    [want] = cmath_runtime.load(context_export, backend="cpu", threads=1).predict([conv])
    assert np.abs(got.probs - want.probs).max() <= (EXACT if choice.precision == "fp32" else 0.1)
    again = _load(context_export, tmp_path, precision="auto")
    again.predict([conv])
    assert again.engine_choice["text_encoder"].source == "cached"
    assert again.engine_choice["model"].source == "cached"


def test_engine_choice_benchmark_times_auto_against_each_engine(causal_export: Path, tmp_path: Path) -> None:
    """`python -m cmath_bench.engine_choice EXPORT --quick --out FILE`: auto and auto+auto (calibrated in the run)
    timed beside onnxruntime fp32 and the other engines, quiet and beside a busy core, each record naming the CPU and
    its ISA class; the report says what auto chose."""
    import json

    from cmath_bench.engine_choice import main

    out = tmp_path / "choice.json"
    main([str(causal_export), "--threads", "1", "--quick", "--out", str(out)])
    report = json.loads(out.read_text())
    rows = {(r["contender"], r["phase"]) for r in report["records"]}
    for phase in ("quiet", "beside a busy core"):
        assert {("auto", phase), ("auto+auto", phase), ("onnxruntime fp32", phase)} <= rows
    assert all(r["isa"] == report["cpu"]["isa"] and r["p50_ms"] > 0 for r in report["records"])
    assert report["choices"]["auto"]["model"] and report["choices"]["auto+auto"]["model"]
