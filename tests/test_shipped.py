"""Which model a run ships (cmath_train/shipped.py): the trained context model, or the fine-tuned encoder's own
classifier when that is better on validation, exported and served like any model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import cmath_runtime
from cmath_runtime.errors import ArtifactError
from cmath_train.shipped import CONTEXT_MODEL_DIR, ship_encoder_classifier, shipped_model


def test_the_encoder_classifier_ships_only_when_better_on_validation() -> None:
    enc = {"encoder_classifier": {"validation_weighted_f1": 0.60}}
    assert shipped_model({**enc, "validation": {"weighted_f1": 0.61}}) == "cmath"
    assert shipped_model({**enc, "validation": {"weighted_f1": 0.60}}) == "encoder_classifier"
    assert shipped_model({"validation": {"weighted_f1": 0.1}}) == "cmath"  # a frozen encoder: nothing to beat


def test_shipped_encoder_classifier_is_the_encoders_head_end_to_end(
    context_run: tuple[Path, Path], tmp_path: Path
) -> None:
    """The run ships the head: its export, fed raw text utterance by utterance, gives the probabilities cmath-prepare
    recorded for the fine-tuned encoder's classifier (torch, at fine-tuning time) on dev; the trained model is kept."""
    from cmath_export import export_run
    from cmath_train.checkpoint import load_checkpoint
    from cmath_train.data import load_data

    feats, export = context_run
    run = tmp_path / "run"
    shutil.copytree(export.parent, run, ignore=shutil.ignore_patterns("export"))
    trained = json.loads((run / "config.json").read_text())
    fs = load_data(str(feats))
    ship_encoder_classifier(fs, run, 0.5)

    assert json.loads((run / CONTEXT_MODEL_DIR / "config.json").read_text()) == trained
    ckpt = load_checkpoint(run)
    assert ckpt.model_name == "encoder_head" and ckpt.extra["selected"]["value"] == 0.5
    manifest = export_run(run, int8=True)
    assert manifest["model_name"] == "encoder_head"
    model = cmath_runtime.load(run / "export", backend="cpu", threads=1)
    with np.load(feats / "encoder_classifier.npz") as z:
        want = z["dev_probs"]
    got = []
    for d in fs.splits["dev"]:
        conv = cmath_runtime.Conversation(model)
        for s, text in zip(d.speakers, d.texts, strict=True):
            conv.add(int(s), text=text)
        got.append(conv.probs())
    np.testing.assert_allclose(np.concatenate(got), want, atol=1e-5)


def test_shipping_needs_the_stored_head(context_run: tuple[Path, Path], tmp_path: Path) -> None:
    from cmath_train.data import load_data

    feats, export = context_run
    copy = tmp_path / "feat"
    shutil.copytree(feats, copy, ignore=shutil.ignore_patterns("encoder"))
    with np.load(copy / "encoder_classifier.npz") as z:
        probs_only = {k: z[k] for k in z.files if k.endswith("_probs")}
    np.savez(copy / "encoder_classifier.npz", **probs_only)
    run = tmp_path / "run"
    shutil.copytree(export.parent, run, ignore=shutil.ignore_patterns("export"))
    with pytest.raises(ArtifactError, match="head_weight, head_bias"):
        ship_encoder_classifier(load_data(str(copy)), run)
    assert not (run / CONTEXT_MODEL_DIR).exists()


def test_cmath_train_ships_the_encoder_classifier_when_context_does_not_help(
    context_run: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the decision (tested above) says the encoder's classifier: the run holds it, metrics and the summary say
    so, and the trained model is kept in context_model/. (The tiny encoder is too weak to win for real.)"""
    from click.testing import CliRunner

    from cmath_train.cli import main as train_cli

    feats, _ = context_run
    run = tmp_path / "run"
    monkeypatch.setattr("cmath_train.shipped.shipped_model", lambda metrics: "encoder_classifier")
    args = ["--data", str(feats), "--epochs", "1", "--d", "16", "--out", str(run)]
    result = CliRunner().invoke(train_cli, args)
    assert result.exit_code == 0, result.output
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["shipped"] == "encoder_classifier"
    assert "shipped: the encoder's own classifier" in result.output
    assert json.loads((run / "config.json").read_text())["model_name"] == "encoder_head"
    assert json.loads((run / CONTEXT_MODEL_DIR / "config.json").read_text())["model_name"] == "cmath"
