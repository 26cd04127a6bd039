"""studies/finetune_search.py: fine-tune settings scored on dev, in worker processes, as cmath-prepare trains."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from studies.finetune_search import main
from tests.conftest import context_rows
from tests.test_prepare import MELD_HEADER, meld_rows, write_csv


def test_search_scores_every_setting_on_dev_and_ranks_them(tiny_encoder: Path, tmp_path: Path) -> None:
    for k, (name, n) in enumerate((("train_sent_emo.csv", 48), ("dev_sent_emo.csv", 24))):
        write_csv(tmp_path / name, MELD_HEADER, meld_rows(context_rows(n, k)))
    common = [
        "--csv-dir",
        str(tmp_path),
        "--encoder",
        str(tiny_encoder),
        "--turns",
        "0:32,2:48",
        "--lrs",
        "1e-3",
    ]
    out = tmp_path / "search"
    result = CliRunner().invoke(main, [*common, "--seeds", "0,1", "--parallel", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()]
    assert sorted((r["window"], r["seed"]) for r in rows) == [(0, 0), (0, 1), (2, 0), (2, 1)]
    assert all(0 <= r["dev_weighted_f1"] <= 1 and len(r["dev_weighted_f1_by_epoch"]) == 2 for r in rows)
    table = out.with_suffix(".md").read_text()
    assert table.count("| 0.001 | 2 | 2 |") == 2  # two settings (lr, epochs, seeds), two seeds each
    assert "best on dev:" in result.output

    # one worker reproduces the parallel run of the same setting and seed: the same training, whichever process
    serial = tmp_path / "serial"
    one = CliRunner().invoke(main, [*common[:-4], "--turns", "2:48", "--lrs", "1e-3", "--out", str(serial)])
    assert one.exit_code == 0, one.output
    [again] = [json.loads(line) for line in serial.with_suffix(".jsonl").read_text().splitlines()]
    [first] = [r for r in rows if r["window"] == 2 and r["seed"] == 0]
    assert again["dev_weighted_f1_by_epoch"] == first["dev_weighted_f1_by_epoch"]


def test_search_refuses_bad_settings(tmp_path: Path) -> None:
    bad = CliRunner().invoke(main, ["--csv-dir", str(tmp_path), "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "missing" in bad.output
    (tmp_path / "train_sent_emo.csv").write_text("x")
    (tmp_path / "dev_sent_emo.csv").write_text("x")
    bad = CliRunner().invoke(
        main, ["--csv-dir", str(tmp_path), "--out", str(tmp_path / "x"), "--turns", "4-96"]
    )
    assert bad.exit_code == 2 and "expected WINDOW:TOKENS pairs like 4:96, got '4-96'" in bad.output
    for flag, value, says in (
        ("--turns", "4:2", "expected at least 4 tokens, got '4:2'"),
        ("--lrs", "0,1e-4", "expected learning rates > 0, got '0,1e-4'"),
        ("--epochs", "0", "expected epoch counts >= 1, got '0'"),
    ):
        bad = CliRunner().invoke(
            main, ["--csv-dir", str(tmp_path), "--out", str(tmp_path / "x"), flag, value]
        )
        assert bad.exit_code == 2 and says in bad.output, bad.output
