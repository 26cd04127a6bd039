"""Shared fixtures: tiny synthetic data, tiny configs, and per test session ONE tiny trained run (bidirectional)
with ONE export of it, and ONE tiny causal run with ONE export (step graph, fp16). Tests that only read an
export share these; tests that change files copy them first (shutil.copytree into tmp_path)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tiny models gain nothing from intra-op threads, and spinning OpenMP threads crawl on a busy 2-core box.
os.environ.setdefault("OMP_NUM_THREADS", "1")
try:
    import torch

    torch.set_num_threads(1)
except ImportError:  # the runtime's tests run without torch
    pass

SHARED = Path(__file__).resolve().parents[2] / "shared"
MELD_DIR = SHARED / "data" / "meld"
TINY_DIMS = {"t": 24, "a": 12, "v": 16}
CAUSAL_MAX_LEN = 200  # the shared causal export's max_len (cache capacity of its step graph)


@pytest.fixture(scope="session")
def tiny_data():
    from cmath_train.data.synthetic import SyntheticConfig, make_synthetic

    return make_synthetic(SyntheticConfig(feature_dims=dict(TINY_DIMS), conversations={"train": 30, "test": 10},
                                          max_len=20, seed=1))


def tiny_model_config(model: str = "cmath", **overrides):
    from cmath_train.registry import model_config

    base = {"feature_dims": dict(TINY_DIMS), "num_classes": 6, "num_speakers": 9, "d": 32, "heads": 4}
    return model_config(model, **{**base, **overrides})


@pytest.fixture(scope="session")
def tiny_run(tiny_data, tmp_path_factory) -> Path:
    """A trained run directory (2 epochs, d=32, all three modalities)."""
    from cmath_train.config import LossConfig, TrainConfig
    from cmath_train.train import train

    out = tmp_path_factory.mktemp("tiny_run")
    train(tiny_data, tiny_model_config(), LossConfig(), TrainConfig(epochs=2, batch_size=8, lr=3e-3), out, progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_export(tiny_run: Path) -> tuple[Path, dict]:
    """tiny_run exported once, into tiny_run/export: fp32 + fp16 + a Triton repository; (export folder, manifest).
    Read-only for tests: copy it before changing anything."""
    from cmath_export import export_run

    manifest = export_run(tiny_run, fp16=True, triton=tiny_run / "triton")
    return tiny_run / "export", manifest


@pytest.fixture(scope="session")
def causal_run(tiny_data, tmp_path_factory) -> Path:
    """A tiny causal run (1 epoch, d=32, all three modalities)."""
    from cmath_train.config import LossConfig, TrainConfig
    from cmath_train.train import train

    run = tmp_path_factory.mktemp("causal_run")
    train(tiny_data, tiny_model_config(causal=True), LossConfig(), TrainConfig(epochs=1, batch_size=8, lr=3e-3), run,
          progress=False)
    return run


@pytest.fixture(scope="session")
def causal_export(causal_run: Path) -> Path:
    """causal_run exported once with its step graph and fp16 (max_len CAUSAL_MAX_LEN); the export folder."""
    from cmath_export import export_run

    export_run(causal_run, fp16=True, max_len=CAUSAL_MAX_LEN, text_encoder=False)
    return causal_run / "export"


@pytest.fixture(scope="session")
def int8_causal_export(causal_run: Path, tmp_path_factory) -> Path:
    """causal_run exported with --int8 (model.int8.onnx + model.step.int8.onnx), max_len 300, into its own folder:
    the export folder. Shared by the int8 and OpenVINO tests.

    The int8 agreement bound is lowered to 95% here: a 1-2 epoch d=32 model is nearly undecided (measured on the
    model before the issue-12 refactor: 6% of its validation rows had a top-2 probability margin below 1e-3 and
    98.4% agreement at max |dp| 9e-4), so its argmax flips under any rounding. That the bound is enforced is
    test_failed_bound_writes_nothing's job; the meld model meets 99.5% (notes/B.md); max |dp| <= 0.03 is kept."""
    from cmath_export import export_run, parity

    out = tmp_path_factory.mktemp("int8_export")
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(parity.BOUNDS, "int8", parity.Bounds(probs_max_abs=3e-2, min_argmax_agreement=0.95))
        export_run(causal_run, out, max_len=300, int8=True, text_encoder=False)
    return out
