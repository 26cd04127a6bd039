"""The weighted-F1 decision rule: per-class logit offsets chosen on validation, folded into the shipped model,
applied by every engine (the export's parity checks hold with it)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import cmath_runtime
from cmath_train.decision import DecisionRule, _wf1, apply_offsets, choose_rule, fit_offsets
from tests.conftest import tiny_model_config


def _biased(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Log-probabilities of a model that under-predicts class 2 (its logit 1.2 too low); labels; conversations."""
    rng = np.random.default_rng(seed)
    y = rng.choice(3, size=n, p=[0.5, 0.3, 0.2])
    logits = rng.normal(0, 1, (n, 3)) + 2.0 * np.eye(3)[y]
    logits[:, 2] -= 1.2
    log_probs = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    return log_probs, y, np.arange(n) // 8


def test_offsets_undo_a_prior_shift_and_earn_their_place() -> None:
    log_probs, y, groups = _biased(2000, 0)
    offsets = fit_offsets(log_probs, y)
    assert offsets[2] - offsets[:2].mean() > 0.5  # class 2 raised
    assert _wf1(log_probs, offsets, y) > _wf1(log_probs, np.zeros(3), y) + 0.01
    rule = choose_rule(log_probs, y, groups)
    assert rule.applied and rule.cross_fitted["after"] > rule.cross_fitted["before"]
    fresh, y2, _ = _biased(2000, 1)  # the same bias on unseen data: the rule still helps
    assert _wf1(fresh, np.asarray(rule.offsets), y2) > _wf1(fresh, np.zeros(3), y2)


def test_no_offsets_when_validation_halves_show_no_gain() -> None:
    y = np.arange(300) % 3
    log_probs = np.log(np.full((300, 3), 0.05))
    log_probs[np.arange(300), y] = np.log(0.9)  # already perfect
    rule = choose_rule(log_probs, y, np.arange(300) // 6)
    assert not rule.applied and rule.offsets == [0.0, 0.0, 0.0] and "no gain" in rule.reason


def test_weighted_f1_matches_sklearn() -> None:
    from sklearn.metrics import f1_score

    log_probs, y, _ = _biased(500, 2)
    offsets = np.array([0.3, -0.2, 0.9])
    want = f1_score(y, (log_probs + offsets).argmax(-1), average="weighted", zero_division=0)
    assert _wf1(log_probs, offsets, y) == pytest.approx(want, abs=1e-12)


def test_offsets_go_into_the_final_layer_exactly() -> None:
    from cmath_train.registry import create_model

    cfg = tiny_model_config()
    model = create_model("cmath", cfg).eval()
    feats = {m: torch.randn(1, 4, d) for m, d in cfg.feature_dims.items()}
    speaker, mask = torch.tensor([[0, 1, 0, 1]]), torch.ones(1, 4, dtype=torch.bool)
    with torch.no_grad():
        before = model(feats, speaker, mask).logits
        offsets = [0.5, -1.0] + [0.0] * (cfg.num_classes - 2)
        apply_offsets(model, offsets)
        after = model(feats, speaker, mask).logits
    torch.testing.assert_close(after - before, torch.tensor(offsets).expand_as(before), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="classify_x"):
        apply_offsets(torch.nn.Linear(2, 2), [0.0, 0.0])


def test_the_rule_ships_in_the_export_and_every_engine_applies_it(
    context_run: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run with offsets folded in: the export passes its parity checks and the runtime's probabilities are the
    original model's shifted by the offsets (softmax(log p + b)), fp32 and int8 alike."""
    from cmath_export import export_run
    from cmath_train.data import load_data
    from cmath_train.decision import apply_decision_rule

    feats, export = context_run
    run = tmp_path / "run"
    shutil.copytree(export.parent, run, ignore=shutil.ignore_patterns("export"))
    offsets = [0.7, -0.4, 1.1]
    monkeypatch.setattr(
        "cmath_train.decision.choose_rule",
        lambda *a, **k: DecisionRule(offsets, True, "forced by the test", 0.0, 0.0, {}),
    )
    fs = load_data(str(feats))
    rule = apply_decision_rule(run, fs, 0.1, 0)
    assert rule.test_weighted_f1_after is not None
    assert json.loads((run / "config.json").read_text())["decision_rule"]["offsets"] == offsets
    export_run(run, int8=True)
    d = fs.splits["test"][0]
    conv = {"speakers": d.speakers, "texts": d.texts}
    for precision in ("fp32", "int8"):
        [ref] = cmath_runtime.load(export, backend="cpu", threads=1, precision=precision).predict([conv])
        [got] = cmath_runtime.load(run / "export", backend="cpu", threads=1, precision=precision).predict(
            [conv]
        )
        shifted = np.log(ref.probs) + np.asarray(offsets, np.float32)
        want = np.exp(shifted) / np.exp(shifted).sum(-1, keepdims=True)
        np.testing.assert_allclose(got.probs, want, atol=1e-5)
