"""CMATH blocks and the assembled model: shapes, masking, determinism, subsets, ablations, input errors."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from cmath_runtime.errors import InputError
from cmath_train.config import PRESETS, ModelConfig, get_ablation
from cmath_train.layers import (
    Attention,
    GatedFusion,
    ModalityReconstruction,
    UtteranceConv,
    attention_mask,
    sinusoidal_positions,
)
from cmath_train.models.cmath import CMATH, CMATHConfig
from tests.conftest import TINY_DIMS, tiny_model_config

SUBSETS = ["".join(s) for r in (1, 2, 3) for s in itertools.combinations("tav", r)]


def make_inputs(cfg: ModelConfig, lengths: list[int], n: int | None = None, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    n = n or max(lengths)
    b = len(lengths)
    feats = {m: torch.randn(b, n, cfg.feature_dims[m], generator=g) for m in cfg.modalities}
    speaker = torch.randint(0, 3, (b, n), generator=g)
    mask = torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]
    return feats, speaker, mask


def model(**overrides) -> CMATH:
    torch.manual_seed(0)
    return CMATH(tiny_model_config(**overrides)).eval()


# --- blocks -------------------------------------------------------------------------------------------------


def test_sinusoidal_positions_follow_eq_6_7():
    p = sinusoidal_positions(torch.arange(5), 8)
    assert p.shape == (5, 8)
    i, k = 3, 1
    assert p[i, 2 * k].item() == pytest.approx(math.sin(i / 10000 ** (2 * k / 8)), abs=1e-6)
    assert p[i, 2 * k + 1].item() == pytest.approx(math.cos(i / 10000 ** (2 * k / 8)), abs=1e-6)
    assert torch.equal(p[0, 1::2], torch.ones(4))


def test_attention_ignores_masked_keys_and_padded_queries_stay_finite():
    torch.manual_seed(0)
    attn = Attention(16, 4, 0.0, -1e4).eval()
    x = torch.randn(2, 6, 16)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    allowed = attention_mask(mask, causal=False)
    out = attn(x, x, allowed)
    assert out.shape == (2, 6, 16)
    y = x.clone()
    y[0, 4:] = 1e3 * torch.randn(2, 16)  # garbage in padded keys
    assert torch.allclose(attn(x, y, allowed)[0, :4], out[0, :4], atol=1e-6)
    assert torch.isfinite(out).all()  # the fully padded conversation gives finite rows, no NaN


def test_causal_attention_never_looks_ahead():
    torch.manual_seed(0)
    attn = Attention(16, 4, 0.0, -1e4).eval()
    x = torch.randn(1, 6, 16)
    allowed = attention_mask(torch.ones(1, 6, dtype=torch.bool), causal=True)
    y = x.clone()
    y[0, 4:] += 5.0  # change the future
    assert torch.allclose(attn(x, x, allowed)[0, :4], attn(y, y, allowed)[0, :4], atol=1e-6)


@pytest.mark.parametrize("causal", [False, True])
def test_utterance_conv_padding(causal):
    torch.manual_seed(0)
    conv = UtteranceConv(4, 5, 3, causal)
    x = torch.randn(1, 7, 4)
    out = conv(x)
    assert out.shape == (1, 7, 5)
    y = x.clone()
    y[0, 5:] += 1.0
    same_prefix = torch.allclose(conv(y)[0, :4], out[0, :4], atol=1e-6)
    assert same_prefix  # rows far enough before a change never see it
    assert torch.allclose(conv(y)[0, 4], out[0, 4], atol=1e-6) == causal  # 'same' sees one row ahead


def test_gate_is_a_convex_combination():
    torch.manual_seed(0)
    gate = GatedFusion(8, 3)
    branches = [torch.full((1, 2, 8), float(v)) for v in (1.0, 2.0, 3.0)]
    out = gate(branches)
    assert out.shape == (1, 2, 8)
    assert (out >= 1.0).all() and (out <= 3.0).all()


def test_modality_reconstruction_shapes_and_padding():
    torch.manual_seed(0)
    rec = ModalityReconstruction(10, 6, 3, causal=False)
    u = torch.randn(2, 5, 10)
    rows = torch.ones(2, 5, 1)
    rows[1, 3:] = 0
    u_prime, u_rec = rec(u, rows, True)
    assert u_prime.shape == (2, 5, 6) and u_rec.shape == (2, 5, 10)
    assert torch.equal(u_prime[1, 3:], torch.zeros(2, 6))


# --- the model ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mods", SUBSETS)
def test_every_modality_subset(mods):
    cfg = tiny_model_config(modalities=tuple(mods), feature_dims={m: TINY_DIMS[m] for m in mods})
    net = CMATH(cfg).train()
    feats, speaker, mask = make_inputs(cfg, [5, 3])
    out = net(feats, speaker, mask)
    assert out.logits.shape == (2, 5, 6) and out.embedding.shape == (2, 5, 32)
    assert set(out.modality_logits) == set(mods) and set(out.reconstructions) == set(mods)
    assert (net.cma[mods[0]].gate is None) == (len(mods) == 1)


def test_feature_sizes_are_free():
    cfg = tiny_model_config(feature_dims={"t": 7, "a": 1, "v": 300})
    out = CMATH(cfg).eval()(*make_inputs(cfg, [4]))
    assert out.logits.shape == (1, 4, 6)


def test_eval_is_the_deterministic_mean_path():
    net = model()
    inputs = make_inputs(net.cfg, [6, 4])
    a, b = net(*inputs), net(*inputs)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.embedding, a.mu)  # H'_x = mu_x
    net.train()
    torch.manual_seed(1)
    c = net(*inputs)
    torch.manual_seed(2)
    d = net(*inputs)
    assert not torch.equal(c.embedding, d.embedding)  # training samples H'_x = mu_x + e * sigma_x (17)


@pytest.mark.parametrize("causal", [False, True])
def test_padding_inside_a_larger_batch_changes_no_real_row(causal):
    net = model(causal=causal)
    feats, speaker, mask = make_inputs(net.cfg, [7])
    alone = net(feats, speaker, mask)
    # the same conversation as member 1 of 3, padded to 19 rows, with garbage in the padding
    big_f, big_s, big_m = make_inputs(net.cfg, [19, 7, 12], seed=5)
    for m in feats:
        big_f[m][1, :7] = feats[m][0]
        big_f[m][1, 7:] = 100.0 * torch.randn(12, net.cfg.feature_dims[m])
    big_s[1, :7] = speaker[0]
    big = net(big_f, big_s, big_m)
    assert (big.logits[1, :7] - alone.logits[0]).abs().max() <= 1e-5
    assert (big.embedding[1, :7] - alone.embedding[0]).abs().max() <= 1e-5


def test_fully_padded_batch_member_has_no_nan():
    net = model()
    feats, speaker, mask = make_inputs(net.cfg, [5, 0, 2])
    out = net(feats, speaker, mask)
    for t in (out.logits, out.embedding, out.mu, out.sigma, *out.modality_logits.values()):
        assert torch.isfinite(t).all()


def test_causal_model_output_does_not_depend_on_the_future():
    net = model(causal=True)
    feats, speaker, mask = make_inputs(net.cfg, [8])
    full = net(feats, speaker, mask)
    prefix = net({m: x[:, :5] for m, x in feats.items()}, speaker[:, :5], mask[:, :5])
    assert (full.logits[0, :5] - prefix.logits[0]).abs().max() <= 1e-5


@pytest.mark.parametrize("name", ["wo_mr", "wo_cmat", "wo_hd"])
def test_ablations_build_and_run(name):
    model_over, _ = get_ablation(name)
    net = CMATH(tiny_model_config(**model_over)).train()
    out = net(*make_inputs(net.cfg, [4, 2]))
    assert out.logits.shape == (2, 4, 6)
    if name == "wo_mr":
        assert out.reconstructions == {}
    if name == "wo_cmat":
        assert all(cma.gate is None and len(cma.cross_attn) == 0 for cma in net.cma.values())


def test_presets_use_the_paper_settings():
    assert PRESETS["meld"].model["d"] == 400 and PRESETS["meld"].train["lr"] == 2e-4
    assert PRESETS["iemocap"].model["d"] == 500 and PRESETS["iemocap"].loss["gamma_kl"] == 1.8
    for p in PRESETS.values():
        CMATHConfig(**p.model)  # heads divide d
    with pytest.raises(ValueError, match="heads"):
        ModelConfig(d=500, heads=8)


# --- clear errors -------------------------------------------------------------------------------------------


def _bad(net, feats, speaker, mask, match):
    with pytest.raises(InputError, match=match):
        net(feats, speaker, mask)


def test_clear_input_errors():
    net = model()
    feats, speaker, mask = make_inputs(net.cfg, [4, 3])
    wrong_size = dict(feats, a=torch.randn(2, 4, 13))
    _bad(net, wrong_size, speaker, mask, r"features\['a'\]: expected shape \(2, 4, 12\), got \(2, 4, 13\)")
    nan = {m: x.clone() for m, x in feats.items()}
    nan["t"][0, 1, 2] = float("nan")
    _bad(net, nan, speaker, mask, r"features\['t'\]: expected finite values")
    inf = {m: x.clone() for m, x in feats.items()}
    inf["v"][1, 0, 0] = float("inf")
    _bad(net, inf, speaker, mask, "finite")
    _bad(net, {m: x[:, :0] for m, x in feats.items()}, speaker[:, :0], mask[:, :0], "at least one utterance")
    _bad(net, feats, torch.full_like(speaker, 9), mask, r"speaker: expected ids in \[0, 8\], got 9")
    _bad(net, feats, torch.full_like(speaker, -1), mask, "got -1")
    _bad(net, {"t": feats["t"]}, speaker, mask, r"features: expected modalities \['t', 'a', 'v'\]")
    _bad(net, dict(feats, t=feats["t"].long()), speaker, mask, "floating-point")
    _bad(net, feats, speaker.float(), mask, "integer dtype")
    _bad(net, feats, speaker, mask.long(), "torch.bool")


def test_near_constant_features_are_not_blown_up():
    """A feature constant (or nearly) in train divides by 1, not by a clamped 1e-6 std (which multiplies test-time
    differences by ~1e6); informative features keep their std."""
    net = CMATH(tiny_model_config())
    d = TINY_DIMS["t"]
    mean = {m: torch.full((n,), 3.0) for m, n in TINY_DIMS.items()}
    std = {m: torch.ones(n) for m, n in TINY_DIMS.items()}
    std["t"][0], std["t"][1], std["t"][2], std["t"][3] = 0.0, 1e-9, 1e-7, 0.5
    net.set_input_stats(mean, std)
    got = net.standardize["t"].std
    assert got[:3].tolist() == [1.0, 1.0, 1.0] and got[3].item() == 0.5 and got.shape == (d,)
    x = torch.full((1, 1, d), 3.0)
    x[..., :3] += 0.01  # a small test-time change of a train-constant feature stays small
    assert net.standardize["t"](x)[..., :3].abs().max() < 0.02


def test_near_dead_features_get_the_std_floor():
    """A feature that barely moves in train (std 1e-5 against a median of 0.04, as a fine-tuned encoder's dead
    dimensions do) is divided by STD_FLOOR x the median std, so encoder rounding at inference stays small; the
    others keep their std."""
    from cmath_train.models.common import STD_FLOOR

    net = CMATH(tiny_model_config())
    d = TINY_DIMS["t"]
    mean = {m: torch.zeros(n) for m, n in TINY_DIMS.items()}
    std = {m: torch.full((n,), 0.04) for m, n in TINY_DIMS.items()}
    std["t"][0], std["t"][1] = 1e-5, 0.03
    net.set_input_stats(mean, std)
    got = net.standardize["t"].std
    assert got[0].item() == pytest.approx(STD_FLOOR * 0.04) and got[1].item() == pytest.approx(0.03)
    assert torch.equal(got[2:], torch.full((d - 2,), 0.04))
    x = torch.zeros(1, 1, d)
    x[..., 0] = 1e-3  # an int8 encoder's rounding on the dead dimension: 0.25 std, not 100
    assert net.standardize["t"](x)[..., 0].abs().item() == pytest.approx(1e-3 / (STD_FLOOR * 0.04))


def test_padded_speaker_ids_are_ignored():
    """Padded rows may hold any speaker id (-1, 99): CMATH reads them as 0 under the mask, as the baselines do."""
    torch.manual_seed(0)
    net = CMATH(tiny_model_config()).eval()
    feats, speaker, mask = make_inputs(net.cfg, [5, 3])
    clean = net(feats, speaker, mask)
    for junk in (-1, 99):
        dirty = net(feats, torch.where(mask, speaker, junk), mask)
        assert torch.equal(dirty.logits[mask], clean.logits[mask])
