"""cmath-export: artifacts, parity at export, dynamic shapes, fp16 safety, Triton config, every modality subset,
clear errors, nothing half-written. One tav export (fp32 + fp16 + Triton) is shared by most tests; the dynamo
exporter costs ~4-15 s per graph on 2 cores, so other tests reuse it or export single-modality models."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner

from cmath_export import export as export_module
from cmath_export import export_run, parity
from cmath_export.cli import main
from cmath_export.formats import ExportOptions, OptionError, format_table, validate
from cmath_export.graph import io_specs
from cmath_runtime.errors import ArtifactError, BackendUnavailableError
from cmath_runtime.files import sha256_file
from cmath_train.checkpoint import load_checkpoint, save_checkpoint
from cmath_train.config import LossConfig, TrainConfig
from cmath_train.registry import create_model
from tests.conftest import tiny_model_config

SHAPES = [(1, 1), (1, 7), (3, 50), (2, 257)]  # (batch, utterances); the graph was traced at (2, 16)


@pytest.fixture(scope="module")
def exported(tiny_export: tuple[Path, dict]) -> tuple[Path, dict]:
    """The session's tiny tav run exported with --fp16 --triton (conftest): (export folder, manifest)."""
    return tiny_export


@pytest.fixture(scope="module")
def sessions(exported: tuple[Path, dict]) -> dict[str, ort.InferenceSession]:
    out, _ = exported
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return {
        k: ort.InferenceSession(str(out / f), options, providers=["CPUExecutionProvider"])
        for k, f in (("fp32", "model.onnx"), ("fp16", "model.fp16.onnx"))
    }


def feeds_for(cfg, b: int, n: int, seed: int = 0, empty_row: bool = False) -> dict[str, np.ndarray]:
    """Random conversations of (b, n); the last one is half padding (or, with empty_row, all padding)."""
    rng = np.random.default_rng(seed)
    feeds = {m: rng.standard_normal((b, n, cfg.feature_dims[m])).astype(np.float32) for m in cfg.modalities}
    mask = np.ones((b, n), bool)
    if b > 1:
        mask[-1, 0 if empty_row else max(1, n // 2) :] = False
    feeds["speaker"] = (rng.integers(0, cfg.num_speakers, (b, n)) * mask).astype(np.int64)
    feeds["mask"] = mask
    return feeds


def reference(model: torch.nn.Module, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return parity.torch_outputs(model, [feeds])[0]


# --- the artifacts and the manifest ---------------------------------------------------------------------------


def test_manifest_describes_every_artifact(exported: tuple[Path, dict], tiny_run: Path) -> None:
    out, manifest = exported
    assert json.loads((out / "export.json").read_text()) == manifest
    assert manifest["format"] == "cmath-export" and manifest["version"] == 1 and manifest["opset"] == 20
    assert set(manifest["artifacts"]) == {"fp32", "fp16"}
    for entry in manifest["artifacts"].values():
        path = out / entry["file"]
        assert entry["sha256"] == sha256_file(path) and entry["bytes"] == path.stat().st_size
    assert sorted(p.name for p in out.iterdir()) == [
        "MODEL_CARD.md",
        "export.json",
        "model.fp16.onnx",
        "model.onnx",
    ]  # no .onnx.data
    ckpt = load_checkpoint(tiny_run)
    inputs, outputs = io_specs(ckpt.model_cfg)
    assert manifest["inputs"] == [s.to_json() for s in inputs]
    assert manifest["outputs"] == [s.to_json() for s in outputs]
    assert manifest["inputs"][0] == {"name": "t", "dtype": "float32", "shape": ["batch", "utterances", 24]}
    assert manifest["label_names"] == ckpt.label_names and manifest["modalities"] == ["t", "a", "v"]
    assert manifest["checkpoint"]["weights_sha256"] == sha256_file(tiny_run / "model.safetensors")
    assert {"torch", "onnx", "onnxruntime"} <= set(manifest["versions"])


def test_parity_recorded_within_bounds(exported: tuple[Path, dict]) -> None:
    _, manifest = exported
    fp32, fp16 = manifest["parity"]["fp32"], manifest["parity"]["fp16"]
    assert fp32["passed"] and fp16["passed"] and fp32["padded_rows_finite"]
    assert (
        fp32["data"].startswith("validation split of synthetic") and fp32["rows"] > 50
    )  # the run's own rows
    probs32 = next(o for o in fp32["outputs"] if o["name"] == "probs")
    probs16 = next(o for o in fp16["outputs"] if o["name"] == "probs")
    assert probs32["max_abs"] <= 1e-4 and probs32["tolerance"] == 1e-4
    assert probs16["max_abs"] <= 1e-2 and fp16["argmax_agreement"] >= 0.995
    assert {"max_abs", "mean_abs", "p99_abs", "max_rel", "mean_rel", "p99_rel"} <= set(probs32)


def test_onnx_full_check_and_lean_graph(exported: tuple[Path, dict]) -> None:
    out, _ = exported
    for name in ("model.onnx", "model.fp16.onnx"):
        onnx.checker.check_model(str(out / name), full_check=True)
    model = onnx.load(str(out / "model.onnx"))
    ops = {n.op_type for n in model.graph.node}
    assert not ops & {"Dropout", "RandomNormalLike", "RandomNormal", "Sin", "Cos", "Identity"}
    assert (
        sum(n.op_type == "Conv" for n in model.graph.node) == 3
    )  # Conv1D' per modality; no decoder Conv1D''
    assert not [t.name for t in model.graph.initializer if "decode" in t.name or "mlp_sigma" in t.name]
    half = onnx.load(str(out / "model.fp16.onnx"))
    dtypes = {i.name: i.type.tensor_type.elem_type for i in [*half.graph.input, *half.graph.output]}
    assert dtypes == {i.name: i.type.tensor_type.elem_type for i in [*model.graph.input, *model.graph.output]}
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in half.graph.initializer)


# --- dynamic shapes and fp16 safety ---------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES, ids=[f"{b}x{n}" for b, n in SHAPES])
def test_dynamic_shapes_match_pytorch(shape: tuple[int, int], tiny_run: Path, sessions: dict) -> None:
    ckpt = load_checkpoint(tiny_run)
    feeds = feeds_for(ckpt.model_cfg, *shape, seed=sum(shape))
    ref, mask = reference(ckpt.model, feeds), feeds["mask"]
    probs, emb = sessions["fp32"].run(["probs", "embedding"], feeds)
    assert probs.shape == ref["probs"].shape and emb.shape == ref["embedding"].shape
    assert np.abs(probs - ref["probs"])[mask].max() <= 1e-4
    assert np.abs(emb - ref["embedding"])[mask].max() <= 1e-3
    half, _ = sessions["fp16"].run(["probs", "embedding"], feeds)
    assert np.isfinite(half).all() and np.isfinite(probs).all()
    assert np.abs(half - ref["probs"])[mask].max() <= 1e-2


def test_fully_padded_conversation_stays_finite(tiny_run: Path, sessions: dict) -> None:
    cfg = load_checkpoint(tiny_run).model_cfg
    feeds = feeds_for(cfg, 3, 9, empty_row=True)
    for session in sessions.values():
        for value in session.run(None, feeds):
            assert np.isfinite(value).all()


def test_past_max_len_fails_instead_of_guessing(
    exported: tuple[Path, dict], tiny_run: Path, sessions: dict
) -> None:
    _, manifest = exported
    feeds = feeds_for(load_checkpoint(tiny_run).model_cfg, 1, manifest["max_len"] + 1)
    with pytest.raises(Exception, match="out of data bounds|indices"):
        sessions["fp32"].run(None, feeds)


# --- Triton ---------------------------------------------------------------------------------------------------


def test_triton_config_matches_onnx_graph(exported: tuple[Path, dict]) -> None:
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    _, manifest = exported
    repo = Path(manifest["triton"]["repository"])
    config = text_format.Parse((repo / "cmath" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert config.name == "cmath" and config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == manifest["max_batch"] and config.HasField("dynamic_batching")
    served = repo / "cmath" / "1" / "model.onnx"
    assert sha256_file(served) == manifest["artifacts"]["fp16"]["sha256"] == manifest["triton"]["sha256"]
    graph = onnx.load(str(served)).graph
    to_triton = {
        onnx.TensorProto.FLOAT: model_config_pb2.TYPE_FP32,
        onnx.TensorProto.INT64: model_config_pb2.TYPE_INT64,
        onnx.TensorProto.BOOL: model_config_pb2.TYPE_BOOL,
    }
    for tensors, values in ((config.input, graph.input), (config.output, graph.output)):
        assert [t.name for t in tensors] == [v.name for v in values]
        for t, v in zip(tensors, values):
            dims = [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            assert dims[0] == "batch"  # Triton's own batch axis (max_batch_size > 0)
            assert list(t.dims) == [-1 if d == "utterances" else d for d in dims[1:]]
            assert t.data_type == to_triton[v.type.tensor_type.elem_type]


# --- every modality subset ------------------------------------------------------------------------------------


def untrained_run(path: Path, modalities: str, big_inputs: bool = False) -> Path:
    """A checkpoint without training (export does not care how good the weights are). big_inputs: features
    around 1000 with std 0.5, which fp16 cannot hold precisely; standardisation must stay fp32."""
    cfg = tiny_model_config(modalities=tuple(modalities))
    torch.manual_seed(0)
    model = create_model("cmath", cfg)
    if big_inputs:
        for m in cfg.modalities:
            model.standardize[m].mean.fill_(1000.0)
            model.standardize[m].std.fill_(0.5)
    labels = [f"c{i}" for i in range(cfg.num_classes)]
    save_checkpoint(
        path, model, "cmath", cfg, LossConfig(), TrainConfig(), labels, {"data": {"source": "none"}}
    )
    return path


# "tav" is the shared export above. Subsets of one size build the same graph up to feature sizes, so one of each
# size runs by default and the structural duplicates are marked slow (each export costs 4-8 s of CPU).
SUBSETS = [
    pytest.param(m, marks=pytest.mark.slow) if m in ("t", "v", "ta", "av") else m
    for m in ("t", "a", "v", "ta", "tv", "av")
]


@pytest.mark.parametrize("modalities", SUBSETS)
def test_every_modality_subset_exports(modalities: str, tmp_path: Path) -> None:
    single = (
        len(modalities) == 1
    )  # cheap graphs: also export fp16, with inputs fp16 cannot represent precisely
    run = untrained_run(tmp_path / "run", modalities, big_inputs=single)
    max_len = 8 if modalities == "a" else 512  # and a max_len below the trace length (16) works
    manifest = export_run(run, fp16=single, max_len=max_len, text_encoder=False)
    assert manifest["modalities"] == list(modalities) and manifest["max_len"] == max_len
    assert [i["name"] for i in manifest["inputs"]] == [*modalities, "speaker", "mask"]
    assert all(r["passed"] for r in manifest["parity"].values())
    assert "generated" in manifest["parity"]["fp32"]["data"]
    model = onnx.load(str(run / "export" / "model.onnx"))
    onnx.checker.check_model(model, full_check=True)


# --- failures: loud, clear, nothing half-written --------------------------------------------------------------


@pytest.fixture
def fast_export(exported: tuple[Path, dict], monkeypatch: pytest.MonkeyPatch) -> None:
    """Skip the slow trace in tests of what happens around it: reuse the shared export's graph."""
    proto = onnx.load(str(exported[0] / "model.onnx"))
    from cmath_export import builders

    monkeypatch.setattr(builders, "export_onnx", lambda model, opset, max_len: proto)


def test_failed_parity_fails_loudly_and_keeps_the_previous_export(
    tiny_run: Path, tmp_path: Path, fast_export: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    first = export_run(tiny_run, out_dir=out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    monkeypatch.setitem(parity.BOUNDS, "fp16", parity.Bounds(probs_max_abs=0.0, min_argmax_agreement=1.0))
    with pytest.raises(export_module.ParityError, match="fp16 artifact failed parity"):
        export_run(tiny_run, out_dir=out, fp16=True)
    assert {
        p.name: p.read_bytes() for p in out.iterdir()
    } == before  # no fp16 file, no staging folder, old manifest
    assert json.loads((out / "export.json").read_text()) == first
    result = CliRunner().invoke(main, [str(tiny_run), "--out", str(tmp_path / "cli"), "--fp16", "--quiet"])
    assert result.exit_code == 1 and "FAILED" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "cli" / "export.json").exists() and not (tmp_path / "cli" / "model.onnx").exists()


def test_nan_is_a_parity_failure(tiny_run: Path) -> None:
    ckpt = load_checkpoint(tiny_run)
    data = parity.ParityData([feeds_for(ckpt.model_cfg, 2, 5)], "test rows", 2, 7)
    ref = parity.torch_outputs(ckpt.model, data.batches)
    bad = [{k: v.copy() for k, v in r.items()} for r in ref]
    bad[0]["probs"][0, 0, 0] = np.nan
    report = parity.compare("fp32", data, ref, bad, parity.BOUNDS["fp32"], "test")
    assert not report.passed and "FAILED" in report.summary() and report.outputs[0].nonfinite == 1
    assert parity.compare("fp32", data, ref, ref, parity.BOUNDS["fp32"], "test").passed


def test_cli_success_prints_one_summary(tiny_run: Path, tmp_path: Path, fast_export: None) -> None:
    result = CliRunner().invoke(main, [str(tiny_run), "--out", str(tmp_path / "o"), "--fp16"])
    assert result.exit_code == 0, result.output
    assert "PASSED" in result.output and (tmp_path / "o" / "model.fp16.onnx").is_file()


def _cli_error(args: list[str]) -> tuple[int, str]:
    result = CliRunner().invoke(main, args)
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    return result.exit_code, result.output.strip()


def test_clear_errors_for_bad_checkpoints(tiny_run: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    code, msg = _cli_error([str(empty)])
    assert code == 2 and "no checkpoint here" in msg and len(msg.splitlines()) == 1

    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "config.json").write_bytes((tiny_run / "config.json").read_bytes())
    (corrupt / "model.safetensors").write_bytes((tiny_run / "model.safetensors").read_bytes()[:1000])
    code, msg = _cli_error([str(corrupt)])
    assert (
        code == 2 and "weights_sha256" in msg and len(msg.splitlines()) == 1
    )  # the recorded sha256 catches it first

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "config.json").write_text(json.dumps({"format": "huggingface", "architectures": ["Bert"]}))
    code, msg = _cli_error([str(foreign)])
    assert code == 2 and "foreign file" in msg and len(msg.splitlines()) == 1

    wrong = tmp_path / "wrong"
    wrong.mkdir()
    cfg = json.loads((tiny_run / "config.json").read_text())
    del cfg["label_names"]
    (wrong / "config.json").write_text(json.dumps(cfg))
    (wrong / "model.safetensors").write_bytes((tiny_run / "model.safetensors").read_bytes())
    code, msg = _cli_error([str(wrong)])
    assert code == 2 and "invalid checkpoint" in msg and len(msg.splitlines()) == 1
    for run in (empty, corrupt, foreign, wrong):
        assert not (run / "export").exists()


def test_clear_error_for_unwritable_output(tiny_run: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    code, msg = _cli_error([str(tiny_run), "--out", str(blocker / "sub")])
    assert code == 2 and "cannot write here" in msg and len(msg.splitlines()) == 1
    code, msg = _cli_error([str(tiny_run), "--out", str(blocker)])
    assert code == 2 and "is not a folder" in msg
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        code, msg = _cli_error([str(tiny_run), "--out", str(locked / "out")])
        assert code == 2 and "cannot write here" in msg


def test_invalid_options_name_the_fix(tiny_run: Path, tmp_path: Path) -> None:
    with pytest.raises(OptionError, match="use an opset from 18 to 23"):
        validate(ExportOptions(opset=12))
    with pytest.raises(OptionError, match="--max-len 512"):
        validate(ExportOptions(max_len=0))
    with pytest.raises(OptionError, match="its own folder"):
        validate(ExportOptions(triton=tmp_path / "x", out_dir=tmp_path / "x"))
    code, msg = _cli_error([str(tiny_run), "--opset", "12", "--out", str(tmp_path / "o")])
    assert code == 2 and "--opset 12" in msg and not (tmp_path / "o").exists()
    assert "model.plan" in format_table() and "--fp16" in format_table()


def test_the_table_covers_every_file_an_export_names(
    exported: tuple[Path, dict], causal_export: Path
) -> None:
    """The exporter promotes and cleans up exactly the files of the table's rows, so every file export.json names
    (artifacts, step graph and twins, text encoder and tokenizer) must be a row's, and nothing else is written."""
    from cmath_export.export import manifest_files
    from cmath_export.formats import FORMATS, get_format
    from cmath_export.quantize import STEP_INT8_FILE
    from cmath_export.step_graph import STEP_FILE
    from cmath_export.text_encoder import ONNX_FILE, TOKENIZER_FILES, TWIN_FILES
    from cmath_runtime.manifest import read_manifest

    table = {name for fmt in FORMATS for name in fmt.out_files}
    assert set(get_format("step").out_files) == {STEP_FILE, STEP_INT8_FILE}
    assert set(get_format("text_encoder").out_files) == {ONNX_FILE, *TWIN_FILES.values(), *TOKENIZER_FILES}
    for folder, companions in ((exported[0], {"triton"}), (causal_export, {"step"})):
        manifest = read_manifest(folder)
        names = manifest_files(manifest)
        assert set(names) <= table
        assert set(names) | {"export.json", "MODEL_CARD.md"} == {p.name for p in folder.iterdir()}
        assert {k for k in ("step", "text_encoder", "triton") if manifest.to_json().get(k)} == companions
    for row in ("step", "text_encoder", "triton"):
        assert get_format(row).name in format_table()


# --- TensorRT -------------------------------------------------------------------------------------------------


def _tensorrt_ready() -> bool:
    from cmath_export import tensorrt as trt_build

    try:
        trt_build.preflight()
    except BackendUnavailableError:
        return False
    return True


@pytest.mark.skipif(
    _tensorrt_ready(), reason="TensorRT and a GPU are present: the GPU test covers this machine"
)
def test_tensorrt_missing_is_one_clear_sentence(tiny_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "trt"
    with pytest.raises(BackendUnavailableError, match="--tensorrt needs"):
        export_run(tiny_run, out_dir=out, tensorrt=True)
    code, msg = _cli_error([str(tiny_run), "--tensorrt", "--out", str(out)])
    assert code == 3 and len(msg.splitlines()) == 1 and ("pip install tensorrt" in msg or "NVIDIA GPU" in msg)
    assert not out.exists()  # nothing written, not even the folder


@pytest.mark.gpu
@pytest.mark.skipif(not _tensorrt_ready(), reason="needs an NVIDIA GPU and the tensorrt package")
@pytest.mark.parametrize("fp16", [False, True], ids=["fp32", "fp16"])
def test_tensorrt_engine_parity(tiny_run: Path, tmp_path: Path, fp16: bool) -> None:
    manifest = export_run(
        tiny_run,
        out_dir=tmp_path / "trt",
        fp16=fp16,
        tensorrt=True,
        max_len=300,
        max_batch=8,
        triton=tmp_path / "triton",
    )
    assert manifest["parity"]["tensorrt"]["passed"]
    assert manifest["artifacts"]["tensorrt"]["profile"] == {"min": [1, 1], "opt": [1, 50], "max": [8, 300]}
    assert (tmp_path / "triton" / "cmath" / "1" / "model.plan").is_file()


def test_artifact_error_is_the_exception_type(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="no checkpoint here"):
        export_run(tmp_path)


def test_a_registered_model_format_is_built_before_the_companions(monkeypatch: pytest.MonkeyPatch) -> None:
    from cmath_export import formats

    monkeypatch.setattr(formats, "FORMATS", formats.FORMATS)  # restored after the test
    formats.register_format(
        formats.ExportFormat("x", "X", "--x", "model.x.onnx", "onnx", "x", "cpu", (), "m:f")
    )
    keys = [f.key for f in formats.FORMATS]
    assert keys[keys.index("x") + 1 :] == ["step", "text_encoder", "triton"]
