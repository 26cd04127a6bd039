"""`cmath-train`: train CMATH (or a registered baseline) on synthetic data, a feature pickle or a features dir."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from cmath_runtime.errors import CmathError

from .run import DataError, RecipeOverrides, RequestError, TrainRequest, run_training


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--data",
    default="synthetic",
    show_default=True,
    help="'synthetic', a .pkl feature pickle, or a features dir.",
)
@click.option(
    "--modalities", default=None, help="Subset of the data's modalities, e.g. 'tav', 'ta', 't'. Default: all."
)
@click.option(
    "--preset",
    default=None,
    help="default | iemocap | meld (paper settings). "
    "Default: a recipe chosen from the data (modalities, feature sizes, data size), printed with the reasons.",
)
@click.option("--model", "model_name", default="cmath", show_default=True, help="Registered model name.")
@click.option(
    "--ablation", default="none", show_default=True, help="none | wo_mr | wo_cmat | wo_lld | wo_hld | wo_hd."
)
@click.option(
    "--epochs", type=click.IntRange(min=1), default=None, help="Max epochs (default from TrainConfig: 30)."
)
@click.option(
    "--lr",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Adam learning rate (default from preset).",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=None,
    help="Conversations per batch (default from preset).",
)
@click.option(
    "--d", "hidden", type=click.IntRange(min=1), default=None, help="Hidden size d (default from preset)."
)
@click.option("--dropout", type=click.FloatRange(0, 1, max_open=True), default=None)
@click.option(
    "--conv-kernel",
    type=click.IntRange(min=1),
    default=None,
    help="Kernel k_m of the reconstruction convolutions (1-2).",
)
@click.option(
    "--patience", type=click.IntRange(min=1), default=None, help="Early-stopping patience in epochs."
)
@click.option(
    "--val-fraction",
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    default=None,
    help="Validation fraction of train when there is no dev split.",
)
@click.option(
    "--class-weighted/--no-class-weighted", default=None, help="Inverse-frequency class weights in CE."
)
@click.option(
    "--cdat",
    "cdat",
    type=click.Choice(["const", "ce", "confidnet"]),
    default=None,
    help="Train inside the CDaT add-on (cmath_train/cdat.py, any model): transfer encoders G_m before the "
    "model and alpha * the dynamic PKT loss between modalities, w_m from a constant (plain PKT), the "
    "cross-entropy of masking m, or ConfidNet. The checkpoint records it; the export includes G_m.",
)
@click.option(
    "--cdat-alpha",
    type=click.FloatRange(min=0),
    default=None,
    help="With --cdat: alpha, the weight of the transfer loss (default: cdat.CDaTConfig).",
)
@click.option(
    "--causal/--bidirectional",
    default=False,
    show_default=True,
    help="Online variant: each utterance sees only the past.",
)
@click.option(
    "--decision-rule/--no-decision-rule",
    default=True,
    show_default=True,
    help="Per-class logit offsets for weighted-F1, chosen on validation and folded into the shipped model when "
    "they earn it on validation halves (cmath_train/decision.py).",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--seeds",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Train this many seeds; report mean +- std.",
)
@click.option(
    "--distill",
    type=click.FloatRange(min=0),
    default=None,
    help="With --seeds N >= 2: train N students on labels + this weight * KL(the seeds' averaged "
    "probabilities || student); they are the result (0: off). Default from the recipe.",
)
@click.option("--device", default="cpu", show_default=True)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Run directory (default runs/<time>).",
)
@click.option("--resume", is_flag=True, help="Continue an interrupted run in --out.")
@click.option(
    "--tune",
    "tune_trials",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Optuna search with this many trials on the validation split (never test), then the best "
    "trial retrained with --seeds. Search space: cmath_train/tune.py.",
)
@click.option(
    "--tune-timeout",
    type=click.FloatRange(min=1),
    default=None,
    help="Time budget of the search in seconds (stops starting trials after it).",
)
@click.option("--quiet", is_flag=True, help="No progress bars.")
def main(
    data: str,
    modalities: str | None,
    preset: str | None,
    model_name: str,
    ablation: str,
    epochs: int | None,
    lr: float | None,
    batch_size: int | None,
    hidden: int | None,
    dropout: float | None,
    conv_kernel: int | None,
    patience: int | None,
    val_fraction: float | None,
    class_weighted: bool | None,
    cdat: str | None,
    cdat_alpha: float | None,
    causal: bool,
    decision_rule: bool,
    seed: int,
    seeds: int,
    distill: float | None,
    device: str,
    out_dir: str | None,
    resume: bool,
    tune_trials: int,
    tune_timeout: float | None,
    quiet: bool,
) -> None:
    """Train a model; keep the checkpoint with the best validation weighted-F1."""
    overrides = RecipeOverrides(
        epochs, lr, batch_size, hidden, dropout, conv_kernel, patience, val_fraction, class_weighted, distill
    )
    _run(
        TrainRequest(
            data=data,
            modalities=modalities,
            model=model_name,
            preset=preset,
            ablation=ablation,
            overrides=overrides,
            causal=causal,
            cdat=cdat,
            cdat_alpha=cdat_alpha,
            seed=seed,
            seeds=seeds,
            tune_trials=tune_trials,
            tune_timeout=tune_timeout,
            decision_rule=decision_rule,
            device=device,
            out_dir=Path(out_dir) if out_dir else None,
            resume=resume,
            progress=not quiet,
        )
    )


def _run(request: TrainRequest) -> None:
    """Run the request; its errors as the command line reports them."""
    try:
        run_training(request, echo=click.echo)
    except RequestError as e:
        raise click.BadParameter(str(e)) from None
    except DataError as e:
        raise click.ClickException(str(e)) from None
    except CmathError as e:
        click.echo(f"cmath-train: error: {e}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
