"""The CDaT study: CMATH, SDT and DMD without CDaT and with each confidence, on synthetic data with and without
misaligned utterances; writes the markdown page and its JSON.

    python -m studies.cdat_study --seeds 5 --workers 4 --out docs/results/cdat_study.md \
        --json docs/results/cdat_study.json

Protocol (every choice on the validation split, test read once per run for the table):
1. alpha per (model, confidence) from `--alphas`, by the validation weighted-F1 of seed 0 on the misaligned data;
2. every (condition, model, variant) trained with seeds 0..N-1; the table gives test weighted-F1 mean +- std.
Each finished run is cached as JSON under --work, so an interrupted study resumes where it stopped.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import click
import numpy as np
import torch

from cmath_runtime.files import atomic_write_bytes, atomic_write_json
from cmath_train.cdat import CDaTConfig
from cmath_train.config import TrainConfig
from cmath_train.data.synthetic import SyntheticConfig, make_synthetic
from cmath_train.registry import loss_config, model_config
from cmath_train.train import train

MODELS = ("cmath", "sdt", "dmd")
CONFIDENCES = ("const", "ce", "confidnet")
VARIANTS = ("none", *CONFIDENCES)


@dataclass
class StudyConfig:
    """The small recipe every run of the study uses: sized so the whole grid (129 runs) trains in under an hour on
    a 2-core CPU shared with other work, two runs at a time."""

    feature_dims: dict[str, int] = field(default_factory=lambda: {"t": 48, "a": 24, "v": 24})
    conversations: dict[str, int] = field(default_factory=lambda: {"train": 80, "test": 50})
    max_len: int = 16
    misaligned: tuple[float, ...] = (0.0, 0.2)
    d: int = 32
    heads: int = 4
    epochs: int = 8
    lr: float = 5e-3
    batch_size: int = 8
    alphas: tuple[float, ...] = (1.0, 10.0)


def data(study: StudyConfig, fraction: float) -> Any:
    return make_synthetic(
        SyntheticConfig(
            feature_dims=dict(study.feature_dims),
            conversations=dict(study.conversations),
            max_len=study.max_len,
            misaligned_fraction=fraction,
        )
    )


def run_one(
    study: StudyConfig, fs: Any, model: str, variant: str, alpha: float, seed: int, out: Path
) -> dict:
    """Train one run (cached in out/result.json); -> {validation, test weighted-F1, seconds}."""
    cached = out / "result.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    mcfg = model_config(
        model,
        modalities=fs.modalities,
        feature_dims=fs.feature_dims,
        num_classes=len(fs.label_names),
        num_speakers=fs.num_speakers,
        d=study.d,
        heads=study.heads,
    )
    lcfg = loss_config(model)
    tcfg = TrainConfig(
        epochs=study.epochs, lr=study.lr, batch_size=study.batch_size, patience=study.epochs, seed=seed
    )
    cdat = CDaTConfig(variant, alpha=alpha) if variant in CONFIDENCES else None
    t0 = time.process_time()
    metrics = train(fs, mcfg, lcfg, tcfg, out, model, progress=False, cdat=cdat)
    result = {
        "validation": metrics["validation"]["weighted_f1"],
        "test": metrics["test"]["weighted_f1"],
        "cpu_seconds": round(time.process_time() - t0, 2),
    }
    atomic_write_json(cached, result)
    return result


def _run_cell(args: tuple) -> dict:
    """One run in a worker process (one torch thread): (study, fraction, model, variant, alpha, seed, folder)."""
    study, fraction, model, variant, alpha, seed, out = args
    torch.set_num_threads(1)
    return run_one(study, data(study, fraction), model, variant, alpha, seed, out)


def _folder(work: Path, fraction: float, model: str, variant: str, alpha: float, seed: int) -> Path:
    """One folder per distinct run: alpha tuning's seed-0 run is the grid's seed-0 run of the alpha it picks."""
    return work / f"{fraction:g}_{model}_{variant}_{alpha:g}_{seed}"


def run_study(
    study: StudyConfig, seeds: int, work: Path, workers: int = 1, log: Any = print
) -> dict[str, Any]:
    recorded = work / "study.json"  # the cache is only valid for the recipe that filled it
    if recorded.is_file() and json.loads(recorded.read_text()) != json.loads(json.dumps(asdict(study))):
        raise click.UsageError(
            f"--work {work} holds runs of another study recipe ({recorded}); use another folder"
        )
    work.mkdir(parents=True, exist_ok=True)
    atomic_write_json(recorded, asdict(study))
    tuning = max(study.misaligned)
    pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) if workers > 1 else None

    def run_all(cells: list[tuple]) -> list[dict]:
        jobs = [(study, *c, _folder(work, *c)) for c in cells]
        return list(pool.map(_run_cell, jobs) if pool else map(_run_cell, jobs))

    try:
        # step 1: alpha per (model, confidence) on validation, seed 0, the misaligned data
        cells = [(tuning, m, c, a, 0) for m in MODELS for c in CONFIDENCES for a in study.alphas]
        tuned = dict(zip(cells, run_all(cells)))
        alpha: dict[str, dict[str, float]] = {m: {} for m in MODELS}
        chosen_on: dict[str, dict[str, dict[str, float]]] = {m: {} for m in MODELS}
        for model in MODELS:
            for conf in CONFIDENCES:
                scores = {a: tuned[(tuning, model, conf, a, 0)]["validation"] for a in study.alphas}
                alpha[model][conf] = max(scores, key=lambda a: scores[a])
                chosen_on[model][conf] = {f"{a:g}": round(v, 4) for a, v in scores.items()}
                log(f"alpha {model} {conf}: {alpha[model][conf]:g} (validation wF1 {chosen_on[model][conf]})")
        # step 2: every cell with every seed
        keys = [(f, m, v) for f in study.misaligned for m in MODELS for v in VARIANTS]
        cells = [(f, m, v, alpha[m].get(v, 1.0), s) for f, m, v in keys for s in range(seeds)]
        done = dict(zip(cells, run_all(cells)))
    finally:
        if pool:
            pool.shutdown()
    results: dict[str, Any] = {}
    for f, model, variant in keys:
        a = alpha[model].get(variant, 1.0)
        runs = [done[(f, model, variant, a, s)] for s in range(seeds)]
        test = np.array([r["test"] for r in runs])
        val = np.array([r["validation"] for r in runs])
        results[f"{f:g}/{model}/{variant}"] = {
            "misaligned": f,
            "model": model,
            "variant": variant,
            "alpha": a if variant in CONFIDENCES else None,
            "test_mean": float(test.mean()),
            "test_std": float(test.std()),
            "test": test.tolist(),
            "validation_mean": float(val.mean()),
            "cpu_seconds": sum(r["cpu_seconds"] for r in runs),
        }
        log(f"{f:g} {model} {variant}: test wF1 {100 * test.mean():.2f} +- {100 * test.std():.2f}")
    return {
        "study": {**asdict(study), "seeds": seeds},
        "alpha": alpha,
        "alpha_validation": chosen_on,
        "results": results,
    }


def claim(report: dict[str, Any], fraction: float) -> list[str]:
    """Per model under misalignment: do CE and ConfidNet beat both the base model and the constant variant?"""
    lines = []
    for model in MODELS:
        r = {v: report["results"][f"{fraction:g}/{model}/{v}"] for v in VARIANTS}
        floor = max(r["none"]["test_mean"], r["const"]["test_mean"])
        wins = [v for v in ("ce", "confidnet") if r[v]["test_mean"] > floor]
        clear = [v for v in wins if r[v]["test_mean"] - floor > r[v]["test_std"]]
        verdict = "holds" if len(wins) == 2 else "partly holds" if wins else "does not hold"
        lines.append(
            f"- {model.upper()}: {verdict} (dynamic variants above both base and constant: "
            f"{', '.join(wins) or 'none'}; by more than one std: {', '.join(clear) or 'none'})"
        )
    return lines


def markdown(report: dict[str, Any], command: str) -> str:
    study = report["study"]
    fractions = study["misaligned"]
    head = (
        "| model | variant | alpha | "
        + " | ".join(f"{100 * f:g}% misaligned: test wF1" for f in fractions)
        + " |"
    )
    rows = [head, "|" + "---|" * (3 + len(fractions))]
    variants = dict.fromkeys(
        key.split("/")[-1] for key in report["results"]
    )  # those in the data, in run order
    for model in MODELS:
        for variant in variants:
            cells = [report["results"].get(f"{f:g}/{model}/{variant}") for f in fractions]
            a = next(c for c in cells if c)["alpha"]
            rows.append(
                f"| {model.upper()} | {variant} | {'' if a is None else f'{a:g}'} | "
                + " | ".join(
                    f"{100 * c['test_mean']:.2f} +- {100 * c['test_std']:.2f}" if c else "not run"
                    for c in cells
                )
                + " |"
            )
    cpu = sum(r["cpu_seconds"] for r in report["results"].values())
    worst = max(fractions)
    return "\n".join(
        [
            "# CDaT study (written by `studies.cdat_study`)",
            "",
            f"Reproduce: `{command}`",
            "",
            f"Synthetic data (cmath_train/data/synthetic.py): {study['conversations']} conversations of up to "
            f"{study['max_len']} utterances, feature sizes {study['feature_dims']}; with misalignment, the text of that "
            "fraction of utterances shows another emotion than the label. Every model d = "
            f"{study['d']}, {study['epochs']} epochs, lr {study['lr']:g}, batch {study['batch_size']} conversations, "
            f"{study['seeds']} seeds (0..{study['seeds'] - 1}); the checkpoint of each run is its best validation epoch. "
            "Test weighted-F1 (%), mean +- std over the seeds.",
            "",
            f"alpha chosen from {study['alphas']} per model and confidence by the validation weighted-F1 of seed 0 on "
            f"the {100 * worst:g}% data (validation = 20% of the train conversations; test never used for a choice); "
            "the same alpha for both conditions: "
            + "; ".join(f"{m.upper()} {json.dumps(v)}" for m, v in report["alpha_validation"].items())
            + ".",
            "",
            *rows,
            "",
            f"The paper's claim (dynamic CE / ConfidNet beat both the base model and the constant one under "
            f"misalignment), at {100 * worst:g}% misaligned:",
            *claim(report, worst),
            "",
            f"CPU time of the grid: {cpu / 60:.1f} min.",
            "",
        ]
    )


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--seeds", type=click.IntRange(min=1), default=5, show_default=True)
@click.option(
    "--work",
    type=click.Path(file_okay=False),
    default="runs/cdat_study",
    show_default=True,
    help="Run folders and the per-run cache (resumable).",
)
@click.option(
    "--out", type=click.Path(dir_okay=False), default="docs/results/cdat_study.md", show_default=True
)
@click.option(
    "--json",
    "json_out",
    type=click.Path(dir_okay=False),
    default="docs/results/cdat_study.json",
    show_default=True,
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Runs trained at once, one process and one torch thread each (the results do not depend on it).",
)
def main(seeds: int, work: str, out: str, json_out: str, workers: int) -> None:
    """Run the CDaT grid and write the markdown table and its JSON."""
    torch.set_num_threads(1)
    report = run_study(StudyConfig(), seeds, Path(work), workers)
    command = (
        f"python -m studies.cdat_study --seeds {seeds} --workers {workers} --out {out} --json {json_out}"
    )
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(json_out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(Path(json_out), report)
    atomic_write_bytes(Path(out), markdown(report, command).encode())
    click.echo(f"wrote {out} and {json_out}")


if __name__ == "__main__":
    main()
