"""The registered baselines (SDT, DMD) beside CMATH.

Per model: every modality subset, padding invariance, no NaN, eval determinism, clear input errors, each loss
term by hand, gradients to every parameter, overfitting, training + checkpoint round trip, export, the training
CLI and the comparison harness.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from cmath_runtime.errors import InputError
from cmath_train.checkpoint import load_checkpoint
from cmath_train.config import LossConfig, TrainConfig
from cmath_train.models.dmd import DMDLossConfig, edge_prior, margin_loss
from cmath_train.models.sdt import SDTLossConfig
from cmath_train.registry import create_model, entry, model_names
from cmath_train.train import predict, train
from tests.conftest import TINY_DIMS, tiny_model_config
from tests.test_model import SUBSETS, make_inputs

ZOO = model_names()  # every registered model gets the shared contract tests
CLASSES = {name: entry(name).model for name in ZOO}


def build(name: str, seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model(name, tiny_model_config(**overrides))


def labelled(cfg, lengths, seed=0):
    feats, speaker, mask = make_inputs(cfg, lengths, seed=seed)
    labels = torch.randint(0, cfg.num_classes, mask.shape, generator=torch.Generator().manual_seed(seed))
    labels[~mask] = -1
    return feats, speaker, mask, labels


# --- registry -----------------------------------------------------------------------------------------------


def test_registry_knows_every_model_and_names_them_on_error():
    assert {"cmath", "sdt", "dmd"} <= set(model_names())
    for name in ZOO:
        assert isinstance(build(name), CLASSES[name])
    with pytest.raises(ValueError, match=r"model: expected one of \['cmath', 'dmd', 'sdt'\], got 'mult'"):
        create_model("mult", tiny_model_config())


# --- forward contract ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ZOO)
@pytest.mark.parametrize("mods", SUBSETS)
def test_every_modality_subset(name, mods):
    net = build(name, modalities=tuple(mods), feature_dims={m: TINY_DIMS[m] for m in mods}).train()
    feats, speaker, mask, labels = labelled(net.cfg, [5, 3])
    out = net(feats, speaker, mask)
    assert out.logits.shape == (2, 5, 6) and out.embedding.shape == (2, 5, 32)
    assert set(out.modality_logits) == set(mods)
    assert all(lg.shape == (2, 5, 6) for lg in out.modality_logits.values())
    terms = net.loss(out, labels, mask, LossConfig())
    assert all(torch.isfinite(v) for v in terms.values())


@pytest.mark.parametrize("name", ZOO)
def test_padding_inside_a_larger_batch_changes_no_real_row(name):
    net = build(name).eval()
    feats, speaker, mask = make_inputs(net.cfg, [7])
    alone = net(feats, speaker, mask)
    big_f, big_s, big_m = make_inputs(net.cfg, [19, 7, 12], seed=5)
    for m in feats:
        big_f[m][1, :7] = feats[m][0]
        big_f[m][1, 7:] = 100.0 * torch.randn(12, net.cfg.feature_dims[m])  # garbage in the padding
    big_s[1, :7] = speaker[0]
    big_s[1, 7:] = 1000  # even out-of-range speaker ids in padded rows
    big = net(big_f, big_s, big_m)
    assert (big.logits[1, :7] - alone.logits[0]).abs().max() <= 1e-5
    assert (big.embedding[1, :7] - alone.embedding[0]).abs().max() <= 1e-5
    for m in feats:
        assert (big.modality_logits[m][1, :7] - alone.modality_logits[m][0]).abs().max() <= 1e-5


@pytest.mark.parametrize("name", ZOO)
def test_fully_padded_batch_member_has_no_nan(name):
    net = build(name).train()
    feats, speaker, mask, labels = labelled(net.cfg, [5, 0, 2])
    out = net(feats, speaker, mask)
    tensors = [out.logits, out.embedding, *out.modality_logits.values(), *out.modality_embeddings.values()]
    assert all(torch.isfinite(t).all() for t in tensors)
    assert all(torch.isfinite(v) for v in net.loss(out, labels, mask, LossConfig()).values())
    net.eval()
    assert torch.isfinite(net(feats, speaker, mask).logits).all()


@pytest.mark.parametrize("name", ZOO)
def test_eval_is_deterministic_and_training_uses_dropout(name):
    net = build(name).eval()
    inputs = make_inputs(net.cfg, [6, 4])
    a, b = net(*inputs), net(*inputs)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.embedding, b.embedding)
    net.train()
    torch.manual_seed(1)
    c = net(*inputs)
    torch.manual_seed(2)
    assert not torch.equal(c.logits, net(*inputs).logits)


@pytest.mark.parametrize("name", ZOO)
def test_clear_input_errors_like_cmath(name):
    net = build(name).eval()
    feats, speaker, mask = make_inputs(net.cfg, [4, 3])
    with pytest.raises(InputError, match=r"features\['a'\]: expected shape \(2, 4, 12\), got \(2, 4, 13\)"):
        net(dict(feats, a=torch.randn(2, 4, 13)), speaker, mask)
    with pytest.raises(InputError, match=r"features: expected modalities \['t', 'a', 'v'\]"):
        net({"t": feats["t"]}, speaker, mask)
    with pytest.raises(InputError, match=r"speaker: expected ids in \[0, 8\], got 9"):
        net(feats, torch.full_like(speaker, 9), mask)


# --- losses by hand -----------------------------------------------------------------------------------------


def test_sdt_loss_terms_match_their_definitions():
    net = build("sdt", dropout=0.0).train()
    feats, speaker, mask, labels = labelled(net.cfg, [6, 4])
    out = net(feats, speaker, mask)
    cfg = SDTLossConfig(sdt_gamma_ce_m=0.5, sdt_gamma_kl=1.5, sdt_temperature=2.0, sdt_gamma_feat=0.3)
    t = net.loss(out, labels, mask, cfg)
    r = mask
    ce_x = F.cross_entropy(out.logits[r], labels[r])
    ce_m = sum(F.cross_entropy(out.modality_logits[m][r], labels[r]) for m in "tav")
    p_x = (out.logits[r] / 2).softmax(-1)
    kl = sum(
        (p_x * (p_x.log() - (out.modality_logits[m][r] / 2).log_softmax(-1))).sum(-1).mean() for m in "tav"
    )
    feat = sum(((out.embedding - out.modality_embeddings[m])[r] ** 2).mean() for m in "tav")
    for key, ref in [("ce_x", ce_x), ("ce_m", ce_m), ("kl", kl), ("feat", feat)]:
        assert t[key].item() == pytest.approx(ref.item(), rel=1e-5), key
        assert t[key].item() > 0, key
    assert t["total"].item() == pytest.approx((ce_x + 0.5 * ce_m + 1.5 * kl + 0.3 * feat).item(), rel=1e-5)
    assert set(t) == {"total", "ce_x", "ce_m", "kl", "feat"}


def _brute_margin(points, ids, margin):
    x = F.normalize(points, dim=-1)
    cos = x @ x.T
    per_anchor = []
    for i in range(len(ids)):
        pos = [j for j in range(len(ids)) if j != i and ids[j] == ids[i]]
        neg = [j for j in range(len(ids)) if ids[j] != ids[i]]
        if pos and neg:
            per_anchor.append(
                torch.stack([F.relu(margin - cos[i, p] + cos[i, n]) for p in pos for n in neg]).mean()
            )
    return torch.stack(per_anchor).mean()


@pytest.mark.parametrize("margin", [0.15, 0.6])
def test_dmd_margin_loss_is_the_exact_triplet_hinge(margin):
    g = torch.Generator().manual_seed(0)
    points = torch.randn(14, 5, generator=g, requires_grad=True)
    ids = torch.tensor([0, 0, 1, 1, 1, 2, 2, 0, 3, 1, 2, 0, 4, 4])  # class 3 has no positive: not an anchor
    fast, slow = margin_loss(points, ids, margin), _brute_margin(points, ids, margin)
    assert fast.item() == pytest.approx(slow.item(), rel=1e-5) and fast.item() > 0
    (g_fast,) = torch.autograd.grad(fast, points)
    (g_slow,) = torch.autograd.grad(slow, points)
    assert torch.allclose(g_fast, g_slow, atol=1e-6)
    assert margin_loss(points, torch.zeros(14, dtype=torch.long), margin).item() == 0.0  # no negatives at all


def test_dmd_loss_terms_match_their_definitions():
    net = build("dmd", dropout=0.0).train()
    feats, speaker, mask, labels = labelled(net.cfg, [6, 4])
    out = net(feats, speaker, mask)
    cfg = DMDLossConfig(
        dmd_gamma_dec=0.2, dmd_gamma_margin_ort=0.3, dmd_gamma_gd=0.07, dmd_gd_repr=4.0, dmd_gd_reg=5.0
    )
    t = net.loss(out, labels, mask, cfg)
    r, mods = mask, "tav"
    ce = {
        "ce_x": F.cross_entropy(out.logits[r], labels[r]),
        "ce_m": sum(
            F.cross_entropy(h[m][r], labels[r])
            for h in (out.modality_logits, out.hetero_logits)
            for m in mods
        ),
        "ce_c": F.cross_entropy(out.common_logits[r], labels[r]),
    }
    dec = {
        "re": sum(((out.reconstructions[m] - out.projected[m])[r] ** 2).mean() for m in mods),
        "cycle": sum(((out.specific_cycle[m] - out.specific[m])[r] ** 2).mean() for m in mods),
        "ort": sum(
            F.relu(F.cosine_similarity(out.specific[m][r], out.common[m][r], dim=-1)).mean() for m in mods
        ),
        "margin": _brute_margin(
            torch.cat([out.common_aligned[m][r] for m in mods]), labels[r].repeat(3), 0.15
        ),
    }
    # graph distillation, by hand from the units' edges; pairs (student, teacher) in DMD's order
    pairs = [(n, m) for n in mods for m in mods if n != m]
    gd = {}
    for unit, logits, reprs, key in (
        (net.homo_gd, out.modality_logits, out.modality_embeddings, "gd_homo"),
        (net.hetero_gd, out.hetero_logits, out.hetero_embeddings, "gd_hetero"),
    ):
        edges = unit.edges(logits, reprs)
        assert torch.allclose(
            edges.sum(-1), torch.ones(2, 6)
        )  # a distribution over the 6 edges of each utterance
        w = edges + unit.prior
        gd[key] = sum(
            (w[..., k] * (logits[n] - logits[m]).abs().sum(-1))[r].mean() for k, (n, m) in enumerate(pairs)
        )
        if key == "gd_hetero":
            gd["gd_hetero_repr"] = sum(
                (w[..., k] * F.relu(F.cosine_similarity(reprs[n], reprs[m], dim=-1)))[r].mean()
                for k, (n, m) in enumerate(pairs)
            )
        gd.setdefault("gd_reg", 0)
        gd["gd_reg"] = gd["gd_reg"] + 5.0 * ((edges[r].mean(0) - unit.prior) ** 2).sum()
    refs = {**ce, **dec, **gd}
    for key, ref in refs.items():
        assert t[key].item() == pytest.approx(ref.item(), rel=1e-4), key
        assert t[key].item() > 0, key
    total = (
        ce["ce_x"]
        + ce["ce_m"]
        + ce["ce_c"]
        + 0.2 * (dec["re"] + dec["cycle"] + 0.3 * (dec["margin"] + dec["ort"]))
        + 0.07 * (gd["gd_homo"] + gd["gd_hetero"] + 4.0 * gd["gd_hetero_repr"] + gd["gd_reg"])
    )
    assert t["total"].item() == pytest.approx(total.item(), rel=1e-5)


def test_dmd_edge_prior_lets_text_teach():
    homo, hetero = edge_prior(("t", "a", "v"), hetero=False), edge_prior(("t", "a", "v"), hetero=True)
    # pairs (student, teacher): (t,a) (t,v) (a,t) (a,v) (v,t) (v,a) — DMD's [0,0,1,0,1,0] and [0,0,1,0,1,1]
    assert homo[2] == homo[4] > homo[0] and torch.allclose(homo.sum(), torch.tensor(1.0))
    assert hetero[2] == hetero[4] == hetero[3] > hetero[0]
    assert torch.allclose(edge_prior(("a", "v"), hetero=False), torch.tensor([0.5, 0.5]))  # no text: uniform


# --- training -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ZOO)
def test_gradients_reach_every_parameter(name):
    net = build(name).train()
    feats, speaker, mask, labels = labelled(net.cfg, [6, 4])
    net.loss(net(feats, speaker, mask), labels, mask, LossConfig())["total"].backward()
    dead = [n for n, p in net.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert dead == []


@pytest.mark.parametrize("name", ZOO)
def test_overfits_a_tiny_batch(name):
    net = build(name, dropout=0.0).train()
    feats, speaker, mask, labels = labelled(net.cfg, [6, 4])
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(60):
        loss = net.loss(net(feats, speaker, mask), labels, mask, LossConfig())["total"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    pred = net(feats, speaker, mask).logits.argmax(-1)
    assert (pred[mask] == labels[mask]).float().mean().item() == 1.0


@pytest.fixture(scope="module")
def zoo_runs(tiny_data, tiny_run, tmp_path_factory):
    """name -> (run dir, metrics) of a 2-epoch d=32 training run through cmath_train.train.train (CMATH: the
    session's tiny_run, trained once for the whole suite)."""
    runs = {"cmath": (tiny_run, json.loads((tiny_run / "metrics.json").read_text()))}
    for name in ZOO:
        if name in runs:
            continue
        out = tmp_path_factory.mktemp(f"run_{name}")
        metrics = train(
            tiny_data,
            tiny_model_config(),
            LossConfig(),
            TrainConfig(epochs=2, batch_size=8, lr=3e-3),
            out,
            model_name=name,
            progress=False,
        )
        runs[name] = (out, metrics)
    return runs


@pytest.mark.parametrize("name", ZOO)
def test_training_and_checkpoint_round_trip(name, zoo_runs, tiny_data):
    run, metrics = zoo_runs[name]
    cfg = tiny_model_config(name)
    assert metrics["model"] == name
    saved = json.loads((run / "config.json").read_text())
    assert saved["model_name"] == name
    ckpt = load_checkpoint(run)
    assert isinstance(ckpt.model, CLASSES[name]) and ckpt.model_name == name and ckpt.model_cfg == cfg
    assert not ckpt.model.training
    y, p = predict(ckpt.model, tiny_data.splits["test"], cfg.modalities)
    assert (y == p).mean() == pytest.approx(metrics["test"]["accuracy"])  # the same model that was evaluated
    again = load_checkpoint(run).model
    feats, speaker, mask = make_inputs(cfg, [5, 3])
    assert torch.equal(ckpt.model(feats, speaker, mask).logits, again(feats, speaker, mask).logits)


@pytest.mark.parametrize("name", ZOO)
def test_exports_and_serves_through_the_runtime_with_fp32_parity(name, zoo_runs, tiny_data, request):
    import numpy as np

    import cmath_runtime
    from cmath_export import export_run

    run, _ = zoo_runs[name]
    # CMATH's run is exported once per session (conftest tiny_export); the others here
    manifest = request.getfixturevalue("tiny_export")[1] if name == "cmath" else export_run(run)
    assert (
        manifest["model_name"] == name
        and json.loads((run / "export" / "export.json").read_text())["model_name"] == name
    )
    fp32 = manifest["parity"]["fp32"]
    probs = next(o for o in fp32["outputs"] if o["name"] == "probs")
    assert fp32["passed"] and probs["max_abs"] <= 1e-4 and fp32["padded_rows_finite"]
    # the runtime serves it: same probabilities as PyTorch on a held-out conversation
    served = cmath_runtime.load(run, backend="cpu", threads=1)
    d = tiny_data.splits["test"][0]
    [pred] = served.predict([{"speakers": d.speakers.tolist(), "features": dict(d.features)}])
    ckpt = load_checkpoint(run)
    with torch.no_grad():
        ref = ckpt.model(
            {m: torch.from_numpy(x[None]).float() for m, x in d.features.items()},
            torch.from_numpy(d.speakers[None]),
            torch.ones(1, len(d.speakers), dtype=torch.bool),
        )
    assert np.abs(pred.probs - ref.logits.softmax(-1)[0].numpy()).max() <= 1e-4


def test_cli_trains_a_baseline(tmp_path, monkeypatch):
    import cmath_train.data as data_mod
    from cmath_train.cli import main as train_cli
    from cmath_train.data.synthetic import SyntheticConfig, make_synthetic

    small = make_synthetic(
        SyntheticConfig(
            feature_dims={"t": 8, "a": 6, "v": 4}, conversations={"train": 12, "test": 4}, max_len=8
        )
    )
    monkeypatch.setattr(data_mod, "load_data", lambda spec, causal=False: small)
    out = tmp_path / "run"
    res = CliRunner().invoke(
        train_cli,
        [
            "--model",
            "dmd",
            "--modalities",
            "ta",
            "--epochs",
            "1",
            "--d",
            "16",
            "--batch-size",
            "4",
            "--out",
            str(out),
            "--quiet",
        ],
    )
    assert res.exit_code == 0, res.output
    saved = json.loads((out / "config.json").read_text())
    assert saved["model_name"] == "dmd"


def test_cli_has_no_confidence_kd_option(tmp_path):
    from cmath_train.cli import main as train_cli

    res = CliRunner().invoke(train_cli, ["--model", "dmd", "--confidence-kd", "--out", str(tmp_path / "run")])
    assert res.exit_code == 2 and "No such option" in res.output and "--confidence-kd" in res.output
    assert not (tmp_path / "run").exists()


# --- comparison ---------------------------------------------------------------------------------------------


def test_compare_models_writes_the_table(tmp_path, monkeypatch):
    import cmath_train.data as data_mod
    from cmath_train.data.synthetic import SyntheticConfig, make_synthetic
    from studies.compare_models import main as compare_cli

    small = make_synthetic(
        SyntheticConfig(
            feature_dims={"t": 8, "a": 6, "v": 4}, conversations={"train": 12, "test": 4}, max_len=8
        )
    )
    monkeypatch.setattr(data_mod, "load_data", lambda spec, causal=False: small)
    out = tmp_path / "cmp"
    res = CliRunner().invoke(
        compare_cli,
        [
            "--models",
            "cmath,sdt,dmd",
            "--recipes",
            "cmath=auto,sdt=meld",
            "--seeds",
            "2",
            "--epochs",
            "1",
            "--d",
            "16",
            "--modalities",
            "ta",
            "--latency-calls",
            "5",
            "--latency-backend",
            "eager",
            "--out",
            str(out),
            "--quiet",
        ],
    )
    assert res.exit_code == 0, res.output
    report = json.loads((out / "compare.json").read_text())
    assert list(report["models"]) == ["cmath", "sdt", "dmd"] and report["seeds"] == [0, 1]
    # each model's own recipe: CMATH's chosen from the data, SDT's published MELD one, DMD the shared preset
    assert [m["recipe"] for m in report["models"].values()] == ["auto:multimodal", "meld", "default"]
    sdt_cfg = json.loads((out / "sdt" / "seed_0" / "config.json").read_text())
    assert (
        sdt_cfg["train"]["lr"] == 5e-6
        and sdt_cfg["train"]["epochs"] == 1
        and sdt_cfg["loss"]["sdt_temperature"] == 8
    )
    assert json.loads((out / "cmath" / "seed_0" / "config.json").read_text())["train"]["ema_decay"] > 0
    dmd = report["models"]["dmd"]
    assert dmd["model"] == "dmd" and set(dmd["test"]["accuracy"]) == {"mean", "std"}
    assert dmd["parameters"] > 0 and dmd["latency"]["p50_ms"] > 0
    assert json.loads((out / "dmd" / "seed_1" / "config.json").read_text())["model_name"] == "dmd"
    table = (out / "compare.md").read_text()
    assert "| dmd | `default` |" in table and "| sdt | `meld` |" in table
    assert report["latency"]["backend"] in table and "NOT the exported runtime" in table
    bad = CliRunner().invoke(compare_cli, ["--models", "mult", "--out", str(tmp_path / "x")])
    assert bad.exit_code != 0 and "expected registered model names" in bad.output and "'mult'" in bad.output
    bad = CliRunner().invoke(compare_cli, ["--models", "dmd+ckd", "--out", str(tmp_path / "z")])
    assert bad.exit_code != 0 and "got 'dmd+ckd'" in bad.output
    bad = CliRunner().invoke(compare_cli, ["--models", "sdt,sdt", "--out", str(tmp_path / "w")])
    assert bad.exit_code != 0 and "expected each model once" in bad.output
    bad = CliRunner().invoke(compare_cli, ["--recipes", "sdt=auto", "--out", str(tmp_path / "y")])
    assert bad.exit_code != 0 and "auto: cmath only" in bad.output


def test_sdt_gets_its_published_recipe():
    """SDT's own MELD/IEMOCAP recipes (its public code) replace CMATH's presets of the same name."""
    from cmath_train.config import get_preset
    from cmath_train.registry import loss_config, model_config, preset

    meld, iemocap = preset("sdt", "meld"), preset("sdt", "iemocap")
    loss = loss_config("sdt", **meld.loss)
    assert loss.sdt_temperature == 8.0 and not loss.class_weighted
    assert meld.train["lr"] == 5e-6 and meld.train["batch_size"] == 8 and meld.model["dropout"] == 0.5
    assert loss_config("sdt", **iemocap.loss).class_weighted and iemocap.train["lr"] == 1e-4
    assert model_config("sdt", feature_dims=dict(TINY_DIMS), **meld.model).d == 1024
    assert preset("cmath", "meld") is get_preset("meld") and preset("dmd", "meld") is get_preset("meld")
    # CMATH-only fields of a shared preset are dropped for a model that does not have them
    assert not hasattr(model_config("sdt", modality_reconstruction=False), "modality_reconstruction")
