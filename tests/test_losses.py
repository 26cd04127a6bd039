"""Every loss term of (3-4, 18, 20-24), masking of the losses, gradients, and overfitting a tiny batch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cmath_train.losses import cmath_loss
from cmath_train.models.cmath import CMATH
from cmath_train.models.cmath import CMATHLossConfig as LossConfig
from tests.conftest import tiny_model_config
from tests.test_model import make_inputs


@pytest.fixture()
def setup():
    torch.manual_seed(0)
    net = CMATH(tiny_model_config(dropout=0.0)).train()
    feats, speaker, mask = make_inputs(net.cfg, [6, 4])
    labels = torch.randint(0, 6, mask.shape)
    labels[~mask] = -1
    return net, feats, speaker, mask, labels


def test_each_term_matches_its_equation(setup):
    net, feats, speaker, mask, labels = setup
    torch.manual_seed(3)
    out = net(feats, speaker, mask)
    t = cmath_loss(out, labels, mask, LossConfig(gamma_mse=0.7, gamma_kl=1.3))
    rows = mask
    ce_x = F.cross_entropy(out.logits[rows], labels[rows])
    ce_m = sum(F.cross_entropy(out.modality_logits[m][rows], labels[rows]) for m in "tav")
    re = sum(((out.inputs[m] - out.reconstructions[m])[rows] ** 2).mean() for m in "tav")
    mse = sum(((out.embedding - out.modality_embeddings[m])[rows] ** 2).mean() for m in "tav")
    p_x = out.logits.softmax(-1)[rows]
    kl = sum((p_x * (p_x.log() - out.modality_logits[m].log_softmax(-1)[rows])).sum(-1).mean() for m in "tav")
    for name, ref in [("ce_x", ce_x), ("ce_m", ce_m), ("re", re), ("mse", mse), ("kl", kl)]:
        assert t[name].item() == pytest.approx(ref.item(), rel=1e-5), name
        assert t[name].item() > 0, name
    assert t["total"].item() == pytest.approx(
        (ce_x + ce_m + re + 0.7 * mse + 1.3 * kl).item(), rel=1e-5
    )  # (24)


def test_kl_is_zero_when_students_agree_with_the_teacher(setup):
    net, feats, speaker, mask, labels = setup
    out = net(feats, speaker, mask)
    out.modality_logits = {m: out.logits.clone() for m in out.modality_logits}
    out.modality_embeddings = {m: out.embedding.clone() for m in out.modality_embeddings}
    t = cmath_loss(out, labels, mask, LossConfig())
    assert t["kl"].abs().item() < 1e-6 and t["mse"].item() == 0.0


def test_padding_never_enters_a_loss(setup):
    net, feats, speaker, mask, labels = setup
    torch.manual_seed(3)
    a = cmath_loss(net(feats, speaker, mask), labels, mask, LossConfig())
    feats2 = {m: x.clone() for m, x in feats.items()}
    feats2["t"][1, 4:] = 50.0
    torch.manual_seed(3)
    b = cmath_loss(net(feats2, speaker, mask), labels, mask, LossConfig())
    for k in a:
        assert a[k].item() == pytest.approx(b[k].item(), rel=1e-5, abs=1e-6), k


def test_teacher_detached_or_not(setup):
    net, feats, speaker, mask, labels = setup
    out = net(feats, speaker, mask)
    kl = cmath_loss(out, labels, mask, LossConfig(detach_teacher=True))["kl"]
    grad = torch.autograd.grad(kl, net.classify_x.weight, allow_unused=True)[0]
    assert grad is None or grad.abs().sum() == 0  # the fused classifier only learns from its own CE
    out = net(feats, speaker, mask)
    kl = cmath_loss(out, labels, mask, LossConfig(detach_teacher=False))["kl"]
    assert torch.autograd.grad(kl, net.classify_x.weight)[0].abs().sum() > 0


def test_gradients_reach_every_parameter(setup):
    net, feats, speaker, mask, labels = setup
    cmath_loss(net(feats, speaker, mask), labels, mask, LossConfig())["total"].backward()
    dead = [n for n, p in net.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert dead == []


def test_overfits_a_tiny_batch(setup):
    net, feats, speaker, mask, labels = setup
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(150):
        loss = cmath_loss(net(feats, speaker, mask), labels, mask, LossConfig())["total"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    pred = net(feats, speaker, mask).logits.argmax(-1)
    assert (pred[mask] == labels[mask]).float().mean().item() == 1.0


@pytest.mark.parametrize("detach", [True, False])
def test_mse_teacher_gradient_is_a_config_choice(setup, detach):
    """L_mse's teacher H'_x receives gradient by default (eq. 24 as written), or none with detach_mse_teacher=True.
    MLP_mu (15) sits only on the teacher's path, so it gets L_mse gradient exactly when the teacher does."""
    from cmath_train.losses import low_level_distillation

    net, feats, speaker, mask, labels = setup
    assert LossConfig().detach_mse_teacher is False
    out = net(feats, speaker, mask)
    low_level_distillation(out, mask, detach).backward()
    grads = [p.grad for p in net.mlp_mu.parameters()]
    assert (
        all(g is None or not g.any() for g in grads)
        if detach
        else any(g is not None and g.any() for g in grads)
    )
    total = cmath_loss(net(feats, speaker, mask), labels, mask, LossConfig(detach_mse_teacher=detach))[
        "total"
    ]
    assert torch.isfinite(total)
