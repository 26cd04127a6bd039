"""The recipe chosen from the data, `--tune`, and the context-free baseline (with its warning) in metrics.json."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from click.testing import CliRunner

from cmath_train.cli import main as train_cli
from cmath_train.recipe import SMALL_DATA_UTTERANCES, choose_recipe
from cmath_train.summary import baseline_warnings


@pytest.fixture(scope="module")
def small_data():
    from cmath_train.data.synthetic import SyntheticConfig, make_synthetic

    return make_synthetic(
        SyntheticConfig(
            feature_dims={"t": 8, "a": 6, "v": 4}, conversations={"train": 20, "test": 6}, max_len=10
        )
    )


def test_recipe_depends_on_modalities_and_size(small_data, tiny_data):
    one = choose_recipe(small_data.select(("t",)))
    assert one.name == "single" and one.model["modality_reconstruction"] is False
    assert (
        one.loss == {"use_reconstruction": False, "gamma_mse": 0.0, "gamma_kl": 0.0}
        and one.train["ema_decay"] > 0
    )
    assert (
        one.train["distill"] == 1.0 and "distill" not in choose_recipe(small_data).train
    )  # validated on text only
    assert any("one modality ('t', 8-d)" in r for r in one.reasons)
    assert one.data["train_utterances"] < SMALL_DATA_UTTERANCES and "(small)" in one.reasons[-1]
    multi = choose_recipe(small_data)
    assert multi.name == "multimodal" and "modality_reconstruction" not in multi.model and multi.loss == {}
    big = small_data.select(("t",))
    big.splits["train"] = big.splits["train"] * (
        SMALL_DATA_UTTERANCES // 100
    )  # many more training utterances
    assert "(medium or large)" in choose_recipe(big).reasons[-1]
    assert "chosen from the data" in one.describe()


@pytest.fixture()
def fake_data(small_data, monkeypatch):
    import cmath_train.data as data_mod

    monkeypatch.setattr(data_mod, "load_data", lambda spec, causal=False: small_data)
    return small_data


def test_cli_without_preset_uses_the_auto_recipe_and_reports_the_baseline(fake_data, tmp_path):
    out = tmp_path / "auto"
    res = CliRunner().invoke(train_cli, ["--modalities", "t", "--epochs", "1", "--out", str(out), "--quiet"])
    assert res.exit_code == 0, res.output
    assert "recipe 'single' (chosen from the data)" in res.output
    recipe = json.loads((out / "recipe.json").read_text())
    assert recipe["chosen_from_data"] and recipe["name"] == "single" and recipe["reasons"]
    cfg = json.loads((out / "config.json").read_text())
    assert (
        cfg["model"]["modality_reconstruction"] is False
        and cfg["train"]["ema_decay"] == recipe["train"]["ema_decay"]
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["recipe"] == "auto:single"
    base = metrics["baseline_context_free"]["t"]
    assert 0 <= base["validation_weighted_f1"] <= 1 and 0 <= base["test_weighted_f1"] <= 1
    assert "context-free logistic regression ('t')" not in res.output  # printed without quotes
    assert "context-free logistic regression (t): validation weighted-F1" in res.output
    # an explicit --preset overrides the auto recipe
    res = CliRunner().invoke(
        train_cli,
        ["--preset", "default", "--epochs", "1", "--d", "16", "--out", str(tmp_path / "p"), "--quiet"],
    )
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "p" / "recipe.json").read_text()) == {
        "chosen_from_data": False,
        "name": "default",
        "reasons": ["--preset default given"],
    }


def test_warning_when_below_the_baseline_on_validation():
    metrics = {
        "validation": {"weighted_f1": 0.30},
        "baseline_context_free": {"t": {"validation_weighted_f1": 0.32, "test_weighted_f1": 0.31}},
    }
    (warning,) = baseline_warnings(metrics)
    assert "WARNING" in warning and "30.00" in warning and "32.00" in warning
    metrics["validation"]["weighted_f1"] = 0.33
    assert baseline_warnings(metrics) == []
    assert baseline_warnings({"validation": {"weighted_f1": 0.2}, "baseline_context_free": {}}) == []


def test_tune_searches_on_validation_records_every_trial_and_retrains(fake_data, tmp_path):
    pytest.importorskip("optuna")
    out = tmp_path / "tuned"
    res = CliRunner().invoke(
        train_cli,
        [
            "--modalities",
            "ta",
            "--epochs",
            "1",
            "--tune",
            "3",
            "--tune-timeout",
            "120",
            "--seeds",
            "2",
            "--out",
            str(out),
            "--quiet",
        ],
    )
    assert res.exit_code == 0, res.output
    lines = [json.loads(x) for x in (out / "tune" / "trials.jsonl").read_text().splitlines()]
    assert [r["trial"] for r in lines] == [0, 1, 2]
    recipe = json.loads((out / "recipe.json").read_text())  # trial 0 is the recipe the search started from
    assert (
        lines[0]["dropout"] == recipe["model"].get("dropout", 0.1) and lines[0]["lr"] == recipe["train"]["lr"]
    )
    assert lines[0]["ema_decay"] == recipe["train"]["ema_decay"] and lines[0]["d"] == recipe["model"]["d"]
    with open(out / "tune" / "trials.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 and {"lr", "d", "dropout", "validation_weighted_f1"} <= set(rows[0])
    best = json.loads((out / "tune" / "best.json").read_text())
    assert best["validation_weighted_f1"] == max(r["validation_weighted_f1"] for r in lines)
    for r in range(3):  # the trials never saw the test split
        assert "test" not in json.loads((out / "tune" / f"trial_{r:03d}" / "metrics.json").read_text())
    cfg = json.loads((out / "config.json").read_text())
    assert (
        cfg["model"]["d"] == best["params"]["model"]["d"]
        and cfg["train"]["lr"] == best["params"]["train"]["lr"]
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert (
        metrics["over_seeds"]["seeds"] == [0, 1]
        and "test" in metrics
        and "t" in metrics["baseline_context_free"]
    )
    assert metrics["recipe"].startswith("auto:multimodal + tune (") and "best.json" in metrics["recipe"]
    ens = metrics["over_seeds"]["ensemble"]  # no dev split in this data: the ensemble is scored on test only
    assert ens["seeds"] == [0, 1] and 0 <= ens["test"]["weighted_f1"] <= 1 and "validation" not in ens
    assert "ensemble of the 2 seeds" in res.output


def test_search_space_kinds_are_checked():
    from cmath_train.tune import suggest

    class Trial:
        def suggest_categorical(self, name, choices):
            return choices[0]

    with pytest.raises(ValueError, match=r"SEARCH_SPACE\['x'\]: expected kind"):
        suggest(Trial(), {"x": ("model", "int", (1, 2))})


def test_tune_apply_skips_fields_a_config_does_not_have():
    import dataclasses

    from cmath_train.config import TrainConfig
    from cmath_train.tune import apply
    from tests.conftest import tiny_model_config

    @dataclasses.dataclass
    class PlainLoss:  # a model whose loss has no distillation weights
        class_weighted: bool = False

    m, loss, t = apply(
        tiny_model_config(heads=4),
        PlainLoss(),
        TrainConfig(),
        {"model": {"d": 64, "dropout": 0.2}, "loss": {"gamma_mse": 0.5}, "train": {"lr": 1e-3}},
    )
    assert (m.d, m.dropout, m.heads, t.lr) == (64, 0.2, 4, 1e-3) and loss == PlainLoss()


def test_batches_carry_each_dialogues_soft_targets(small_data):
    """Soft targets travel with their dialogue through the shuffle, and are zero on padding."""
    from cmath_train.data.batching import batches

    train = small_data.splits["train"]
    soft = [np.full((len(d), 3), i, np.float32) for i, d in enumerate(train)]
    index = {id(d): i for i, d in enumerate(train)}
    seen = 0
    for batch in batches(train, ("t",), 4, shuffle=True, seed=3, soft=soft):
        assert batch.soft is not None and batch.soft.shape == (*batch.mask.shape, 3)
        assert (batch.soft[~batch.mask] == 0).all()
        seen += int(batch.mask.sum())
    assert seen == sum(len(d) for d in train)
    first = next(batches(train, ("t",), 4, shuffle=True, seed=3, soft=soft))
    order = np.random.default_rng(3).permutation(len(train))[:4]
    for row, i in enumerate(order):
        assert (first.soft[row, : len(train[i])] == index[id(train[i])]).all()


def test_ensemble_distillation_is_the_kl_to_fixed_targets():
    import torch

    from cmath_train.losses import ensemble_distillation

    logits = torch.randn(2, 3, 4, requires_grad=True)
    rows = torch.tensor([[True, True, False], [True, False, False]])
    same = torch.softmax(logits.detach(), -1)
    assert ensemble_distillation(logits, same, rows).abs() < 1e-6
    target = torch.zeros(2, 3, 4)
    target[..., 2] = 1.0  # one-hot: KL = -log q(2)
    loss = ensemble_distillation(logits, target, rows)
    want = -torch.log_softmax(logits, -1)[..., 2][rows].mean()
    assert torch.allclose(loss, want)
    loss.backward()
    assert (logits.grad[rows][:, 2] < 0).all() and (logits.grad[~rows] == 0).all()  # pulls towards the target


def test_seeds_with_distillation_train_students_from_the_seeds_ensemble(fake_data, tmp_path):
    out = tmp_path / "distilled"
    res = CliRunner().invoke(
        train_cli,
        [
            "--modalities",
            "t",
            "--epochs",
            "2",
            "--seeds",
            "2",
            "--distill",
            "1",
            "--out",
            str(out),
            "--quiet",
        ],
    )
    assert res.exit_code == 0, res.output
    metrics = json.loads((out / "metrics.json").read_text())
    spread = metrics["over_seeds"]
    assert spread["distilled"]["weight"] == 1.0 and spread["teachers"]["test"]["weighted_f1"]["mean"] >= 0
    assert "distilled from the seeds' ensemble" in res.output
    for seed in (0, 1):
        student = json.loads((out / f"student_{seed}" / "metrics.json").read_text())
        teacher = json.loads((out / f"seed_{seed}" / "metrics.json").read_text())
        assert all(h["train_distill"] > 0 for h in student["history"])  # the KL term was really trained on
        assert all("train_distill" not in h for h in teacher["history"])
        assert json.loads((out / f"student_{seed}" / "config.json").read_text())["train"]["distill"] == 1.0
    best = spread["selected"]
    assert (out / "model.safetensors").read_bytes() == (
        out / f"student_{best}" / "model.safetensors"
    ).read_bytes()
    assert (
        spread["per_seed"][str(best)]["test"]
        == student_test(out, best)
        == {k: metrics["test"][k] for k in ("accuracy", "weighted_f1")}
    )


def student_test(out, seed):
    m = json.loads((out / f"student_{seed}" / "metrics.json").read_text())
    return {k: m["test"][k] for k in ("accuracy", "weighted_f1")}


def test_distillation_refuses_duplicate_dialogue_ids_before_training(small_data, tmp_path):
    import dataclasses

    from cmath_runtime.errors import InputError
    from cmath_train.config import TrainConfig
    from cmath_train.seeds import train_seeds

    fs = dataclasses.replace(
        small_data, splits={**small_data.splits, "train": [small_data.splits["train"][0]] * 2}
    )
    with pytest.raises(InputError, match=r"dialogue id: expected unique ids .* got .* more than once"):
        train_seeds(fs, None, None, TrainConfig(distill=1.0), tmp_path, seeds=2)
    assert not any(tmp_path.iterdir())  # refused before any seed was trained
