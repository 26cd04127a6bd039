"""The CDaT add-on (cmath_train/cdat.py): PKT on a batch computed by hand, w_m from masking on a model that ignores a
modality, ConfidNet's target C* and its loss, and cmath-train + cmath-export + runtime for each confidence."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import Tensor, nn

from cmath_train.cdat import (
    CDaT,
    CDaTConfig,
    dynamic_pkt,
    masking_cross_entropy,
    pkt_kl,
    true_class_probability,
)
from cmath_train.checkpoint import load_checkpoint
from cmath_train.config import LossConfig, ModelConfig
from cmath_train.data.synthetic import SyntheticConfig, make_synthetic
from cmath_train.losses import cross_entropy
from tests.conftest import TINY_DIMS

# --- PKT (7-10) on a hand-computed batch ---------------------------------------------------------------------
# Three samples. Teacher t: (1,0), (0,1), (1,1); student a: (1,0), (1,0), (0,1).
# K = (cos + 1) / 2. t: K12 = 1/2, K13 = K23 = c = (1 + 1/sqrt 2) / 2 -> P_{.|1} = P_{.|2} ~ (1/2, c) / (1/2 + c),
# P_{.|3} = (1/2, 1/2). a: K12 = 1, K13 = K23 = 1/2 -> Q_{.|1} = Q_{.|2} ~ (2/3, 1/3), Q_{.|3} = (1/2, 1/2).
C = (1 + 1 / math.sqrt(2)) / 2
P = (0.5 / (0.5 + C), C / (0.5 + C))  # anchor 1 over (2, 3); anchor 2 over (1, 3) is the same
Q = (2 / 3, 1 / 3)
KL_T_TO_A = P[0] * math.log(P[0] / Q[0]) + P[1] * math.log(P[1] / Q[1])  # anchors 1 and 2; anchor 3: 0
KL_A_TO_T = Q[0] * math.log(Q[0] / P[0]) + Q[1] * math.log(Q[1] / P[1])


def _batch() -> tuple[Tensor, Tensor]:
    t = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    return t, a


def test_pkt_matches_the_hand_computed_batch():
    t, a = _batch()
    assert pkt_kl(t, a).tolist() == pytest.approx([KL_T_TO_A, KL_T_TO_A, 0.0], abs=1e-6)
    assert pkt_kl(a, t).tolist() == pytest.approx([KL_A_TO_T, KL_A_TO_T, 0.0], abs=1e-6)
    assert pkt_kl(t, t).abs().max().item() < 1e-6


def test_dynamic_pkt_weights_each_direction_by_the_source_confidence_and_the_comparison():
    t, a = _batch()
    t, a = t[None].requires_grad_(), a[None].requires_grad_()  # (B=1, N=3, d)
    mask = torch.ones(1, 3, dtype=torch.bool)
    # constant w_m = 1: plain PKT (8), both directions at every anchor
    plain = dynamic_pkt({"t": t, "a": a}, {"t": torch.ones(1, 3), "a": torch.ones(1, 3)}, mask)
    assert plain.item() == pytest.approx((2 * KL_T_TO_A + 2 * KL_A_TO_T) / 3, rel=1e-5)
    # w_t = 1 everywhere, w_a = (2, 0, 0): a teaches t at anchor 1 with weight 2; t teaches a at anchors 2 and 3
    w = {"t": torch.ones(1, 3), "a": torch.tensor([[2.0, 0.0, 0.0]])}
    loss = dynamic_pkt({"t": t, "a": a}, w, mask)
    assert loss.item() == pytest.approx((2 * KL_A_TO_T + KL_T_TO_A) / 3, rel=1e-5)
    # the source is detached: with a never more confident, only a (the student) receives gradient
    dynamic_pkt({"t": t, "a": a}, {"t": torch.ones(1, 3), "a": torch.zeros(1, 3)}, mask).backward()
    assert (t.grad is None or not t.grad.any()) and a.grad.abs().sum() > 0
    # padded rows are not samples: with two real ones each anchor has one neighbour (P = Q = 1), so 0, where the
    # third row would have made it positive; one modality or one utterance: nothing to transfer
    padded = torch.tensor([[True, True, False]])
    assert dynamic_pkt({"t": t, "a": a}, {"t": torch.ones(1, 3), "a": torch.ones(1, 3)}, padded).item() == 0.0
    assert dynamic_pkt({"t": t}, {"t": torch.ones(1, 3)}, mask).item() == 0.0
    assert dynamic_pkt({"t": t, "a": a}, w, torch.tensor([[True, False, False]])).item() == 0.0


# --- stage 1: w_m from masking (3-6) on a model that ignores the visual modality -----------------------------


@dataclass
class _Out:
    logits: Tensor
    embedding: Tensor


class IgnoresVisual(nn.Module):
    """A fusion model whose prediction reads text and audio only (v has no path to the logits)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.t = nn.Linear(cfg.feature_dims["t"], cfg.num_classes)
        self.a = nn.Linear(cfg.feature_dims["a"], cfg.num_classes)

    def forward(
        self, features: dict[str, Tensor], speaker: Tensor, mask: Tensor, reconstruct: bool | None = None
    ):
        logits = self.t(features["t"]) + self.a(features["a"])
        return _Out(logits, logits)

    def loss(
        self, out: _Out, labels: Tensor, mask: Tensor, cfg: LossConfig, class_weight=None
    ) -> dict[str, Tensor]:
        ce = cross_entropy(out.logits, labels, mask & (labels >= 0), class_weight)
        return {"total": ce, "ce_x": ce}


def _ignoring(confidence: str) -> tuple[CDaT, dict, Tensor, Tensor, Tensor]:
    torch.manual_seed(0)
    cfg = ModelConfig(feature_dims=dict(TINY_DIMS), num_classes=4)
    net = CDaT(IgnoresVisual(cfg), CDaTConfig(confidence, hidden=8))
    feats = {m: torch.randn(2, 5, d) for m, d in TINY_DIMS.items()}
    mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    labels = torch.randint(0, 4, (2, 5)).masked_fill(~mask, -1)
    return net, feats, torch.zeros(2, 5, dtype=torch.long), mask, labels


def test_cross_entropy_weight_of_an_ignored_modality_is_the_prediction_entropy():
    net, feats, speaker, mask, labels = _ignoring("ce")
    refined = net.inputs(feats, mask)
    net.train()
    w, conf_loss = net.confidence_weights(refined, speaker, mask, labels)
    assert conf_loss is None and net.model.training  # the eval-mode masking pass restores the mode
    z = net.model(refined, speaker, mask).logits
    entropy = -(z.softmax(-1) * z.log_softmax(-1)).sum(-1)
    # masking v changes nothing: CE(z, z_v) = H(softmax z), the least any CE(z, .) can be (3)
    assert torch.allclose(w["v"], entropy, atol=1e-5)
    for m in ("t", "a"):
        z_m = net.model({**refined, m: torch.zeros_like(refined[m])}, speaker, mask).logits
        assert torch.allclose(w[m], masking_cross_entropy(z, z_m), atol=1e-5)
        assert (w[m] > w["v"])[mask].all()  # the modalities the model reads cost more to mask (real rows)
    # so v never teaches (s = 1[w_v >= w_n] = 0), while t and a do
    loss_terms = net.loss(net(feats, speaker, mask), labels, mask, LossConfig())
    assert loss_terms["pkt"].item() > 0 and set(loss_terms) == {"total", "ce_x", "pkt"}


def test_constant_weights_are_one_and_skip_the_masking_pass(monkeypatch):
    net, feats, speaker, mask, labels = _ignoring("const")
    monkeypatch.setattr(CDaT, "masked_logits", lambda *a: pytest.fail("const needs no masking pass"))
    w, conf_loss = net.confidence_weights(net.inputs(feats, mask), speaker, mask, labels)
    assert conf_loss is None and all(torch.equal(v, torch.ones(2, 5)) for v in w.values())


def test_confidnet_target_is_the_true_class_probability_and_its_l2_loss():
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])
    labels = torch.tensor([[0, 2]])
    e2, e1 = math.exp(2), math.e
    assert true_class_probability(logits, labels)[0].tolist() == pytest.approx(
        [e2 / (e2 + 2), 1 / (e1 + 2)], rel=1e-6
    )
    net, feats, speaker, mask, labels = _ignoring("confidnet")
    refined = net.inputs(feats, mask)
    w, conf_loss = net.confidence_weights(refined, speaker, mask, labels)
    z, z_m = net.masked_logits(refined, speaker, mask)
    passes = torch.stack([z, *z_m.values()])
    c_hat = net.confidnet(passes)
    rows = mask & (labels >= 0)
    expected = ((c_hat - true_class_probability(passes, labels)) ** 2)[:, rows].mean()  # (5), padded rows out
    assert conf_loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert all(torch.allclose(w[m], 1 - net.confidnet(z_m[m])) for m in w)  # (6)
    assert torch.allclose(w["v"], 1 - net.confidnet(z))  # masking the ignored modality: the full confidence
    # ConfidNet learns C* only from (5): the fusion model gets no gradient from it
    conf_loss.backward()
    assert all(p.grad is None for p in net.model.parameters())
    assert all(p.grad is not None for p in net.confidnet.parameters())


# --- cmath-train --cdat X, then cmath-export, then the runtime: each confidence, one model each ------------------


@pytest.fixture(scope="module")
def small_data():
    return make_synthetic(
        SyntheticConfig(
            feature_dims=dict(TINY_DIMS),
            conversations={"train": 16, "test": 4},
            max_len=10,
            seed=3,
            misaligned_fraction=0.2,
        )
    )


def test_cdat_alpha_needs_cdat(tmp_path):
    from cmath_train.cli import main as train_cli

    bad = CliRunner().invoke(
        train_cli, ["--cdat-alpha", "2", "--epochs", "1", "--out", str(tmp_path), "--quiet"]
    )
    assert bad.exit_code != 0 and "give it with --cdat" in bad.output


@pytest.mark.parametrize(
    ("confidence", "model", "causal"),
    [("const", "sdt", False), ("ce", "dmd", False), ("confidnet", "cmath", True)],
)
def test_cli_trains_exports_and_serves_within_the_parity_bounds(
    confidence, model, causal, small_data, tmp_path, monkeypatch
):
    import cmath_runtime
    import cmath_train.data as data_mod
    from cmath_export import parity
    from cmath_export.cli import main as export_cli
    from cmath_train.cli import main as train_cli

    run = tmp_path / "run"
    monkeypatch.setattr(data_mod, "load_data", lambda spec, causal=False: small_data)
    res = CliRunner().invoke(
        train_cli,
        [
            "--model",
            model,
            "--cdat",
            confidence,
            "--cdat-alpha",
            "2",
            "--epochs",
            "2",
            "--d",
            "16",
            "--batch-size",
            "8",
            "--lr",
            "3e-3",
            "--out",
            str(run),
            "--quiet",
            "--causal" if causal else "--bidirectional",
        ],
    )
    assert res.exit_code == 0, res.output
    history = json.loads((run / "metrics.json").read_text())["history"]
    assert "train_pkt" in history[0] and ("train_confidnet" in history[0]) == (confidence == "confidnet")
    saved = json.loads((run / "config.json").read_text())
    assert saved["model_name"] == model and saved["cdat"] == {
        **CDaTConfig().__dict__,
        "confidence": confidence,
        "alpha": 2.0,
    }
    ckpt = load_checkpoint(run)
    assert (
        isinstance(ckpt.model, CDaT) and ckpt.cdat == CDaTConfig(**saved["cdat"]) and not ckpt.model.training
    )
    assert ckpt.model.cfg.causal == causal
    assert ckpt.model.standardize["t"].std.ne(1).any()  # the train statistics live in the wrapper ...
    inner = ckpt.model.model.state_dict()
    assert inner[next(k for k in inner if k.endswith("t.std"))].eq(1).all()  # ... F reads h~ as it is

    res = CliRunner().invoke(export_cli, [str(run), "--fp16", "--max-len", "64", "--quiet"])
    assert res.exit_code == 0, res.output
    manifest = json.loads((run / "export" / "export.json").read_text())
    for kind in ("fp32", "fp16"):  # the bounds every export meets, on the run's own validation rows
        report = manifest["parity"][kind]
        probs = next(o for o in report["outputs"] if o["name"] == "probs")
        assert report["passed"] and probs["max_abs"] <= parity.BOUNDS[kind].probs_max_abs
        assert "validation" in report["data"]
    if causal:  # G_m is per utterance: the step graph composes with it
        step = manifest["step"]["parity"]
        assert step["passed"] and step["probs_max_abs"] <= parity.BOUNDS["fp32"].probs_max_abs
    served = cmath_runtime.load(run, backend="cpu", threads=1)
    d = small_data.splits["test"][0]
    [pred] = served.predict([{"speakers": d.speakers.tolist(), "features": dict(d.features)}])
    with torch.no_grad():
        ref = ckpt.model(
            {m: torch.from_numpy(x[None]).float() for m, x in d.features.items()},
            torch.from_numpy(d.speakers[None]),
            torch.ones(1, len(d.speakers), dtype=torch.bool),
        )
    assert np.abs(pred.probs - ref.logits.softmax(-1)[0].numpy()).max() <= parity.BOUNDS["fp32"].probs_max_abs


def test_synthetic_misalignment_changes_only_the_chosen_modality():
    base = SyntheticConfig(feature_dims=dict(TINY_DIMS), conversations={"train": 20}, max_len=10)
    clean = make_synthetic(base)
    off = make_synthetic(
        SyntheticConfig(**{**base.__dict__, "misaligned_fraction": 0.5, "misaligned_modality": "a"})
    )
    changed = []
    for d0, d1 in zip(clean.splits["train"], off.splits["train"]):
        assert np.array_equal(d0.labels, d1.labels) and np.array_equal(d0.features["t"], d1.features["t"])
        assert np.array_equal(d0.features["v"], d1.features["v"])
        changed += (np.abs(d0.features["a"] - d1.features["a"]).max(1) > 0).tolist()
    # audio shows arousal only: a different emotion changes it in 3/5 of the misaligned utterances (0.3 in all)
    assert 0.15 < np.mean(changed) < 0.45
    with pytest.raises(ValueError, match="misaligned_fraction"):
        SyntheticConfig(misaligned_fraction=1.5)


def test_study_page_is_written_from_the_results_with_the_verdict(tmp_path):
    from studies.cdat_study import MODELS, VARIANTS, StudyConfig, markdown, run_study

    study = {**StudyConfig().__dict__, "seeds": 2}
    scores = {"none": 0.60, "const": 0.62, "ce": 0.70, "confidnet": 0.61}
    results = {
        f"{f:g}/{m}/{v}": {
            "test_mean": scores[v] + f,
            "test_std": 0.01,
            "alpha": 1.0 if v in ("const", "ce", "confidnet") else None,
            "cpu_seconds": 3.0,
        }
        for f in study["misaligned"]
        for m in MODELS
        for v in VARIANTS
    }
    page = markdown({"study": study, "alpha_validation": {m: {} for m in MODELS}, "results": results}, "CMD")
    assert "Reproduce: `CMD`" in page and "| CMATH | ce | 1 | 70.00 +- 1.00 | 90.00 +- 1.00 |" in page
    assert (
        page.count(
            "partly holds (dynamic variants above both base and constant: ce; by more than one std: ce)"
        )
        == 3
    )
    # the committed results (which also hold a variant no longer run) still render: only variants in the data
    docs = Path(__file__).resolve().parents[1] / "docs" / "results"
    committed = json.loads((docs / "cdat_study.json").read_text())
    table = [line for line in (docs / "cdat_study.md").read_text().splitlines() if line.startswith("| ")]
    rendered = markdown(committed, "CMD").splitlines()
    assert len(table) == 1 + 3 * 5 and all(line in rendered for line in table)
    # the run cache belongs to one recipe: another recipe in the same folder is refused before any training
    (tmp_path / "study.json").write_text(json.dumps({**StudyConfig().__dict__, "epochs": 1}))
    with pytest.raises(Exception, match="another study recipe"):
        run_study(StudyConfig(), 1, tmp_path)
