"""Training runs, honest selection, metrics/plots, checkpoints (round trip, atomic, clear errors), resume, CLI."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from click.testing import CliRunner

from cmath_runtime.errors import ArtifactError, InputError
from cmath_train.checkpoint import load_checkpoint
from cmath_train.cli import main as train_cli
from cmath_train.config import LossConfig, TrainConfig
from cmath_train.data.batching import collate
from cmath_train.train import train
from tests.conftest import tiny_model_config


def test_run_directory_contents(tiny_run):
    names = {p.name for p in tiny_run.iterdir()}
    assert {
        "model.safetensors",
        "config.json",
        "metrics.json",
        "training_curves.png",
        "confusion_matrix.png",
    } <= names
    assert not [n for n in names if n.endswith(".tmp")]  # atomic writes leave no temp files
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    for split in ("validation", "test"):
        m = metrics[split]
        assert {"accuracy", "weighted_f1", "macro_f1", "per_class_f1", "confusion_matrix"} <= set(m)
        assert len(m["confusion_matrix"]) == 6 and sum(map(sum, m["confusion_matrix"])) == m["utterances"]
    # selection is on validation: the selected epoch is the best validation epoch of the history
    best = max(metrics["history"], key=lambda h: h["val_weighted_f1"])
    assert metrics["selected_epoch"] == best["epoch"]
    assert metrics["validation"]["weighted_f1"] == pytest.approx(best["val_weighted_f1"])
    assert metrics["validation_source"].startswith("train fraction 0.2")
    cfg = json.loads((tiny_run / "config.json").read_text())
    assert cfg["label_names"] == ["sad", "angry", "neutral", "surprise", "content", "joy"]
    assert cfg["versions"]["torch"] == torch.__version__


def test_checkpoint_round_trip_is_bit_exact(tiny_run, tiny_data):
    a, b = load_checkpoint(tiny_run), load_checkpoint(tiny_run)
    batch = collate(tiny_data.splits["test"][:4], ("t", "a", "v"))
    with torch.no_grad():
        out_a = a.model(batch.features, batch.speaker, batch.mask)
        out_b = b.model(batch.features, batch.speaker, batch.mask)
    assert torch.equal(out_a.logits, out_b.logits) and torch.equal(out_a.embedding, out_b.embedding)
    assert a.model_cfg == tiny_model_config()


@pytest.fixture()
def run_copy(tiny_run, tmp_path):
    return shutil.copytree(tiny_run, tmp_path / "run")


def test_corrupt_truncated_foreign_and_mismatched_checkpoints(run_copy):
    weights = run_copy / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(
        ArtifactError, match=r"model.safetensors: does not match config.json's weights_sha256"
    ):
        load_checkpoint(run_copy)
    cfg_path = run_copy / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(
        json.dumps({k: v for k, v in cfg.items() if k != "weights_sha256"})
    )  # an older checkpoint
    with pytest.raises(ArtifactError, match=r"model.safetensors: corrupt or truncated safetensors"):
        load_checkpoint(run_copy)
    weights.write_bytes(data)
    cfg_path.write_text(json.dumps({**cfg, "model": {**cfg["model"], "d": 64}}))
    with pytest.raises(ArtifactError, match="weights do not match config.json"):
        load_checkpoint(run_copy)
    cfg_path.write_text(json.dumps({"format": "ultralytics"}))
    with pytest.raises(ArtifactError, match="foreign file: expected format 'cmath-checkpoint'"):
        load_checkpoint(run_copy)
    cfg_path.write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        load_checkpoint(run_copy)
    cfg_path.unlink()
    with pytest.raises(ArtifactError, match="config.json is missing"):
        load_checkpoint(run_copy)
    with pytest.raises(ArtifactError, match="does not exist"):
        load_checkpoint(run_copy / "nope")


def test_training_is_reproducible_and_resumable(tiny_data, tmp_path):
    cfg, loss = tiny_model_config(), LossConfig()
    full = train(
        tiny_data, cfg, loss, TrainConfig(epochs=3, batch_size=8, lr=3e-3), tmp_path / "full", progress=False
    )
    again = train(
        tiny_data, cfg, loss, TrainConfig(epochs=3, batch_size=8, lr=3e-3), tmp_path / "again", progress=False
    )
    assert [h["train_loss"] for h in full["history"]] == [h["train_loss"] for h in again["history"]]
    # interrupted after 2 epochs, then resumed to 3: the same history as the uninterrupted run
    train(
        tiny_data, cfg, loss, TrainConfig(epochs=2, batch_size=8, lr=3e-3), tmp_path / "part", progress=False
    )
    resumed = train(
        tiny_data,
        cfg,
        loss,
        TrainConfig(epochs=3, batch_size=8, lr=3e-3),
        tmp_path / "part",
        resume=True,
        progress=False,
    )
    assert [h["epoch"] for h in resumed["history"]] == [1, 2, 3]
    assert resumed["history"][2]["train_loss"] == pytest.approx(full["history"][2]["train_loss"], rel=1e-6)
    # resuming with another recipe would mix two runs: refused, naming the option (epochs may change)
    with pytest.raises(InputError, match=r"train\.distill: expected 0\.0 .*got 1\.0"):
        train(
            tiny_data,
            cfg,
            loss,
            TrainConfig(epochs=4, batch_size=8, lr=3e-3, distill=1.0),
            tmp_path / "part",
            resume=True,
            progress=False,
        )
    with pytest.raises(InputError, match=r"train\.lr"):
        train(
            tiny_data,
            cfg,
            loss,
            TrainConfig(epochs=4, batch_size=8, lr=1e-3),
            tmp_path / "part",
            resume=True,
            progress=False,
        )
    # another architecture is named too, before its weights could fail to load into the new model
    with pytest.raises(InputError, match=r"model\.d: expected 32 .*got 16"):
        train(
            tiny_data,
            tiny_model_config(d=16),
            loss,
            TrainConfig(epochs=4, batch_size=8, lr=3e-3),
            tmp_path / "part",
            resume=True,
            progress=False,
        )


def test_early_stopping_with_patience(tiny_data, tmp_path):
    m = train(
        tiny_data,
        tiny_model_config(),
        LossConfig(),
        TrainConfig(epochs=30, batch_size=8, lr=0.0, patience=2),
        tmp_path,
        progress=False,
    )
    assert len(m["history"]) == 3  # lr 0 never improves after epoch 1: stops after patience=2 more epochs


def test_cli_trains_with_options_and_seeds(tmp_path, monkeypatch):
    import cmath_train.data as data_mod
    from cmath_train.data.synthetic import SyntheticConfig, make_synthetic

    small = make_synthetic(
        SyntheticConfig(
            feature_dims={"t": 8, "a": 6, "v": 4}, conversations={"train": 20, "test": 6}, max_len=10
        )
    )
    monkeypatch.setattr(data_mod, "load_data", lambda spec, causal=False: small)
    out = tmp_path / "cli"
    res = CliRunner().invoke(
        train_cli,
        [
            "--modalities",
            "ta",
            "--epochs",
            "1",
            "--d",
            "16",
            "--seeds",
            "2",
            "--batch-size",
            "4",
            "--out",
            str(out),
            "--quiet",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "validation accuracy" in res.output and "+-" in res.output
    metrics = json.loads((out / "metrics.json").read_text())
    spread = metrics["over_seeds"]
    assert spread["seeds"] == [0, 1] and set(spread["test"]["weighted_f1"]) == {"mean", "std"}
    # the top level is the selected seed's model, the one in the run folder
    assert (
        metrics["test"]
        == json.loads((out / f"seed_{spread['selected']}" / "metrics.json").read_text())["test"]
    )
    assert load_checkpoint(out).model_cfg.modalities == ("t", "a")
    bad = CliRunner().invoke(train_cli, ["--modalities", "tx", "--out", str(tmp_path / "x")])
    assert bad.exit_code != 0 and "expected letters from 'tav'" in bad.output
    bad = CliRunner().invoke(train_cli, ["--model", "resnet", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "expected one of ['cmath', 'dmd', 'sdt'], got 'resnet'" in bad.output
    bad = CliRunner().invoke(train_cli, ["--preset", "nope", "--out", str(tmp_path / "x")])
    assert bad.exit_code != 0 and "expected one of ['default', 'iemocap', 'meld']" in bad.output


def test_run_training_needs_no_command_line(tmp_path, monkeypatch):
    import cmath_train.data as data_mod
    from cmath_train.data.synthetic import SyntheticConfig, make_synthetic
    from cmath_train.run import DataError, RecipeOverrides, RequestError, TrainRequest, run_training

    lines: list[str] = []
    with pytest.raises(RequestError, match="got 'resnet'"):
        run_training(TrainRequest(model="resnet", out_dir=tmp_path / "x"), echo=lines.append)
    with pytest.raises(DataError, match="--data: expected 'synthetic'"):
        run_training(TrainRequest(data=str(tmp_path / "nowhere"), out_dir=tmp_path / "x"), echo=lines.append)
    assert not (tmp_path / "x").exists()  # nothing is written for a request that cannot run
    small = make_synthetic(
        SyntheticConfig(
            feature_dims={"t": 8, "a": 6, "v": 4}, conversations={"train": 20, "test": 6}, max_len=10
        )
    )
    monkeypatch.setattr(data_mod, "load_data", lambda spec, causal=False: small)
    with pytest.raises(RequestError, match="expected letters from 'tav'"):
        run_training(TrainRequest(modalities="x", out_dir=tmp_path / "x"), echo=lines.append)
    out = tmp_path / "run"
    request = TrainRequest(
        modalities="t",
        overrides=RecipeOverrides(epochs=1, d=16, batch_size=4),
        out_dir=out,
        progress=False,
    )
    metrics = run_training(request, echo=lines.append)
    assert metrics["recipe"].startswith("auto:") and metrics["shipped"] == "cmath"
    assert json.loads((out / "metrics.json").read_text())["test"] == metrics["test"]
    assert json.loads((out / "recipe.json").read_text())["chosen_from_data"] is True
    ckpt = load_checkpoint(out)
    assert ckpt.model_cfg.modalities == ("t",) and ckpt.model_cfg.d == 16 and ckpt.train_cfg.epochs == 1
    assert any(line.startswith(f"run: {out.resolve()}") for line in lines), lines


def test_ema_weights_are_validated_kept_and_resumed(tiny_data, tmp_path):
    from cmath_train.train import make_ema

    cfg, loss = tiny_model_config(), LossConfig()
    tc = TrainConfig(epochs=3, batch_size=8, lr=3e-3, ema_decay=0.9)
    full = train(tiny_data, cfg, loss, tc, tmp_path / "full", progress=False)
    # interrupted after 2 epochs, then resumed: the averaged weights come back too, so validation is identical
    train(
        tiny_data,
        cfg,
        loss,
        TrainConfig(epochs=2, batch_size=8, lr=3e-3, ema_decay=0.9),
        tmp_path / "part",
        progress=False,
    )
    resumed = train(tiny_data, cfg, loss, tc, tmp_path / "part", resume=True, progress=False)
    assert [h["val_weighted_f1"] for h in resumed["history"]] == pytest.approx(
        [h["val_weighted_f1"] for h in full["history"]]
    )
    assert json.loads((tmp_path / "full" / "config.json").read_text())["train"]["ema_decay"] == 0.9
    # the warm-up: the first call copies; the next keeps (1 + 1) / (10 + 1) of the average, whatever the decay
    model = torch.nn.Linear(2, 1)
    ema = make_ema(model, 0.999)
    with torch.no_grad():
        old = model.weight.clone()
        ema.update_parameters(model)  # the first call copies
        model.weight.add_(1.0)
        ema.update_parameters(model)
    assert torch.allclose(ema.module.weight, 2 / 11 * old + 9 / 11 * model.weight)
    assert make_ema(model, 0.0) is None
    # a smaller warm-up constant averages over a longer tail: the n-th update keeps (1 + n) / (warmup + n)
    ema, want = make_ema(model, 0.9999, warmup=4.0), None
    with torch.no_grad():
        for n in range(7):
            model.weight.add_(torch.randn_like(model.weight))
            d = (1 + n) / (4 + n)  # n updates done before this one; the first (n = 0) copies
            want = model.weight.clone() if n == 0 else d * want + (1 - d) * model.weight
            ema.update_parameters(model)
    assert torch.allclose(ema.module.weight, want, atol=1e-6)
    with pytest.raises(ValueError, match="ema_warmup: expected a number > 1, got 1.0"):
        make_ema(model, 0.9, warmup=1.0)
    with pytest.raises(ValueError, match=r"ema_decay: expected a number in \[0, 1\), got 1.0"):
        make_ema(model, 1.0)


def test_metrics_json_has_one_schema(tiny_run, tmp_path):
    """metrics.json is written by one function that checks its schema: scalar scores for the run's model."""
    from cmath_train.metrics import write_metrics

    metrics = json.loads((tiny_run / "metrics.json").read_text())
    write_metrics(tmp_path, metrics)
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics
    with pytest.raises(ValueError, match=r"validation\.accuracy: expected a number"):
        write_metrics(
            tmp_path,
            {**metrics, "validation": {**metrics["validation"], "accuracy": {"mean": 0.5, "std": 0}}},
        )
    with pytest.raises(ValueError, match="missing \\['history'\\]"):
        write_metrics(tmp_path, {k: v for k, v in metrics.items() if k != "history"})
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics  # a rejected write leaves the file
