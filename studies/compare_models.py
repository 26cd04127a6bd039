"""Compare the registered models on one dataset: same data, splits, dev-based selection and seeds for each.

    python -m studies.compare_models [--data synthetic|FEATURES_DIR|PICKLE] [--modalities tav] [--seeds 3]
                                       [--epochs N] [--preset default] [--recipes cmath=auto,sdt=meld]
                                       [--models cmath,sdt,dmd] [--out runs/compare]

Recipes: every model gets `--preset` unless `--recipes` names its own: `MODEL=PRESET` (a model's published recipe,
e.g. SDT's `meld`, see registry.preset) or `cmath=auto` (the recipe `cmath-train` chooses from the data).
`--epochs` caps every model when given; otherwise each recipe's own epoch budget applies.

Each entry of --models is a registered model name (the CDaT add-on has its own study: cmath_train/cdat_study.py).
Every model is trained with cmath_train.seeds.train_seeds: seeds seed..seed+N-1, each seed selecting its epoch
on validation (the official dev split, else the same seeded train fraction for every model), test evaluated once
per seed. Writes OUT/compare.json and OUT/compare.md: test accuracy and weighted-F1 (mean +- std over seeds),
parameters, and latency for one conversation of 50 utterances (batch 1). Latency is measured through the
exported artifact (cmath_export.export_run, fp32 ONNX with its parity proof) with cmath_runtime on the CPU;
with --latency-backend eager it is PyTorch eager latency, and the table says so.
"""

from __future__ import annotations

import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

LATENCY_SHAPE = (1, 50)  # (batch, utterances)


def parse_models(text: str, known: list[str]) -> list[str]:
    """`cmath,sdt` -> ["cmath", "sdt"]: distinct registered model names."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    for name in names:
        if name not in known:
            raise click.BadParameter(
                f"expected registered model names {known}, got {name!r}", param_hint="--models"
            )
    if len(set(names)) != len(names):
        raise click.BadParameter(f"expected each model once, got {text!r}", param_hint="--models")
    return names


def parse_recipes(text: str | None, known: list[str]) -> dict[str, str]:
    """`cmath=auto,sdt=meld` -> {"cmath": "auto", "sdt": "meld"}."""
    out = {}
    for item in filter(None, (t.strip() for t in (text or "").split(","))):
        model, _, name = item.partition("=")
        if model not in known or not name or (name == "auto" and model != "cmath"):
            raise click.BadParameter(
                f"expected MODEL=PRESET with MODEL one of {known} (auto: cmath only), got {item!r}",
                param_hint="--recipes",
            )
        out[model] = name
    return out


def recipe_for(model: str, name: str, fs: Any) -> tuple[str, Any]:
    """(label, Preset) of the recipe `name` for `model`; "auto" is the one cmath-train chooses from the data."""
    from cmath_train.recipe import choose_recipe
    from cmath_train.registry import preset

    if name == "auto":
        r = choose_recipe(fs)
        return f"auto:{r.name}", r.preset()
    try:
        return name, preset(model, name)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--recipes/--preset") from None


def train_models(
    fs: Any,
    names: list[str],
    configs: dict[str, tuple[dict, dict, dict]],
    seeds: int,
    out: Path,
    resume: bool,
    progress: bool,
) -> dict[str, Any]:
    """configs: model name -> (model, loss, train) config fields."""
    from cmath_train.config import TrainConfig
    from cmath_train.registry import loss_config, model_config
    from cmath_train.seeds import train_seeds

    results = {}
    for name in names:
        model_kw, loss_kw, train_kw = configs[name]
        model_cfg = model_config(name, **model_kw)
        loss_cfg = loss_config(name, **loss_kw)
        train_cfg = TrainConfig(**train_kw)
        click.echo(f"=== {name}: {seeds} seed(s) -> {out / name}")
        start = time.perf_counter()
        summary = train_seeds(fs, model_cfg, loss_cfg, train_cfg, out / name, seeds, name, resume, progress)
        results[name] = {"summary": summary, "train_seconds": time.perf_counter() - start}
    return results


# --- latency ------------------------------------------------------------------------------------------------


def _latency_inputs(feature_dims: dict[str, int], num_speakers: int, seed: int = 0) -> tuple[dict, Any, Any]:
    import numpy as np

    b, n = LATENCY_SHAPE
    rng = np.random.default_rng(seed)
    feats = {m: rng.standard_normal((b, n, dim)).astype(np.float32) for m, dim in feature_dims.items()}
    speaker = rng.integers(0, min(2, num_speakers), (b, n)).astype(np.int64)
    return feats, speaker, np.ones((b, n), dtype=bool)


def eager_callable(run_dir: Path) -> Callable[[], object]:
    """The selected checkpoint in PyTorch eager mode (eval, no grad), on one conversation of 50 utterances."""
    import torch

    from cmath_train.checkpoint import load_checkpoint

    ckpt = load_checkpoint(run_dir)
    feats, speaker, mask = _latency_inputs(ckpt.model_cfg.feature_dims, ckpt.model_cfg.num_speakers)
    feats_t = {m: torch.from_numpy(x) for m, x in feats.items()}
    speaker_t, mask_t = torch.from_numpy(speaker), torch.from_numpy(mask)

    def call() -> object:
        with torch.no_grad():
            return ckpt.model(feats_t, speaker_t, mask_t).logits.softmax(-1)

    return call


def runtime_callable(run_dir: Path) -> tuple[Callable[[], object], dict[str, Any]]:
    """Export with cmath_export.export_run (fp32, parity proven) and time cmath_runtime's predict on the CPU;
    -> (the call, the export's fp32 parity numbers)."""
    import cmath_runtime
    from cmath_export import export_run

    manifest = export_run(
        run_dir
    )  # writes RUN_DIR/export (docs/artifact-format.md); load() finds it from the run
    model = cmath_runtime.load(run_dir, backend="cpu", threads=1)
    feats, speaker, _ = _latency_inputs(dict(model.feature_dims), model.num_speakers)
    conversation = {"speakers": speaker[0].tolist(), "features": {m: x[0] for m, x in feats.items()}}
    fp32 = manifest["parity"]["fp32"]
    parity = {"passed": fp32["passed"], **{f"{o['name']}_max_abs": o["max_abs"] for o in fp32["outputs"]}}
    return (lambda: model.predict([conversation])), {
        "model_name": manifest["model_name"],
        "parity_fp32": parity,
    }


def measure_latency(
    run_dirs: dict[str, Path], calls: int = 100, backend: str = "runtime", rounds: int = 5, warmup: int = 3
) -> tuple[str, dict[str, dict[str, float]]]:
    """Median and p90 milliseconds over `calls` calls per model, the models interleaved in `rounds` rounds so that
    a change in the machine's load hits all of them alike. backend: "runtime" (export each run, time
    cmath_runtime) or "eager" (PyTorch)."""
    exports: dict[str, dict[str, Any]] = {}
    if backend == "runtime":
        label = "cmath_runtime: exported fp32 ONNX on onnxruntime CPU, 1 thread"
        fns: dict[str, Callable[[], object]] = {}
        for key, run in run_dirs.items():
            fns[key], exports[key] = runtime_callable(run)
    else:
        label = "PyTorch eager CPU fp32, 1 thread (as asked; NOT the exported runtime)"
        fns = {key: eager_callable(run) for key, run in run_dirs.items()}
    times: dict[str, list[float]] = {key: [] for key in fns}
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    for _ in range(rounds):
        for key, fn in fns.items():
            for _ in range(max(1, calls // rounds)):
                start = time.perf_counter()
                fn()
                times[key].append(time.perf_counter() - start)
    stats = {}
    for key, secs in times.items():
        ms = sorted(1e3 * s for s in secs)
        stats[key] = {
            "p50_ms": statistics.median(ms),
            "p90_ms": ms[int(0.9 * (len(ms) - 1))],
            "calls": len(ms),
            **exports.get(key, {}),
        }
    return label, stats


# --- report -------------------------------------------------------------------------------------------------


def _pm(block: dict[str, float]) -> str:
    return f"{100 * block['mean']:.2f} +- {100 * block['std']:.2f}"


def build_report(
    names: list[str],
    trained: dict[str, Any],
    latency: tuple[str, dict[str, dict[str, float]]],
    context: dict[str, Any],
) -> dict[str, Any]:
    backend, lat = latency
    models = {}
    for name in names:
        summary = trained[name]["summary"][
            "over_seeds"
        ]  # mean +- std over the seeds (cmath_train/metrics.py)
        per_seed = summary["per_seed"]
        models[name] = {
            "model": name,
            "recipe": context["recipes"][name],
            "test": {k: summary["test"][k] for k in ("accuracy", "weighted_f1", "macro_f1")}
            if "test" in summary
            else None,
            "validation": {k: summary["validation"][k] for k in ("accuracy", "weighted_f1", "macro_f1")},
            "parameters": context["parameters"][name],
            "latency": lat[name],
            "selected_epochs": {s: per_seed[s]["selected_epoch"] for s in per_seed},
            "per_seed": per_seed,
            "train_seconds": trained[name]["train_seconds"],
            "run_dir": str(context["out"] / name),
        }
    return {
        "format": "cmath-compare",
        "version": 1,
        **{k: v for k, v in context.items() if k not in ("parameters", "out", "recipes")},
        "latency": {"backend": backend, "batch": LATENCY_SHAPE[0], "utterances": LATENCY_SHAPE[1]},
        "models": models,
    }


def markdown(report: dict[str, Any]) -> str:
    split = "test" if all(m["test"] for m in report["models"].values()) else "validation"
    lines = [
        f"# Model comparison on {report['data']} ({report['modalities']})",
        "",
        f"{len(report['seeds'])} seeds {report['seeds']}, "
        + (f"at most {report['epochs']} epochs" if report["epochs"] else "each recipe's own epoch budget")
        + f", recipe per model in the table; each seed keeps its best-validation epoch (validation: {report['validation']}); "
        f"{split} metrics are mean +- std over seeds (%).",
        f"Latency: one conversation of {report['latency']['utterances']} utterances, batch "
        f"{report['latency']['batch']}, median (p90) over interleaved calls, {report['latency']['backend']}.",
        "",
    ]
    exported = all("parity_fp32" in m["latency"] for m in report["models"].values())
    head = f"| model | recipe | {split} accuracy | {split} weighted-F1 | parameters | latency ms, p50 (p90) |"
    lines += [
        head + (" ONNX fp32 parity, max abs diff of probs |" if exported else ""),
        "|---|---|---|---|---|---|" + ("---|" if exported else ""),
    ]
    for key, m in report["models"].items():
        block = m[split]
        lat = m["latency"]
        row = (
            f"| {key} | `{m['recipe']}` | {_pm(block['accuracy'])} | {_pm(block['weighted_f1'])} | {m['parameters']:,} | "
            f"{lat['p50_ms']:.2f} ({lat['p90_ms']:.2f}) |"
        )
        if exported:
            par = lat["parity_fp32"]
            row += f" {par['probs_max_abs']:.1e} {'passed' if par['passed'] else 'FAILED'} |"
        lines.append(row)
    lines += ["", f"Reproduce: `{report['command']}`", ""]
    return "\n".join(lines)


# --- CLI ----------------------------------------------------------------------------------------------------


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--data", default="synthetic", show_default=True, help="'synthetic', a features dir, or a .pkl pickle."
)
@click.option("--modalities", default=None, help="Subset of the data's modalities, e.g. 't'. Default: all.")
@click.option(
    "--preset",
    default="default",
    show_default=True,
    help="Model/loss/train preset for every model --recipes does not name.",
)
@click.option(
    "--recipes",
    default=None,
    help="Each model's own recipe, e.g. cmath=auto,sdt=meld (auto: chosen from "
    "the data, as cmath-train does without --preset).",
)
@click.option(
    "--models",
    "model_list",
    default="cmath,sdt,dmd",
    show_default=True,
    help="Comma-separated registered model names.",
)
@click.option("--seeds", type=int, default=3, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="First seed.")
@click.option("--epochs", type=int, default=None, help="Cap for every model (default: each recipe's own).")
@click.option("--d", "hidden", type=int, default=None, help="Hidden size (default from preset).")
@click.option("--batch-size", type=int, default=None)
@click.option("--lr", type=float, default=None)
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="runs/compare", show_default=True)
@click.option("--latency-calls", type=int, default=100, show_default=True, help="Timed calls per model.")
@click.option(
    "--latency-backend",
    type=click.Choice(["runtime", "eager"]),
    default="runtime",
    show_default=True,
    help="runtime: export each selected run and time cmath_runtime; eager: PyTorch eager.",
)
@click.option("--resume", is_flag=True, help="Reuse finished seeds in --out and continue interrupted ones.")
@click.option("--quiet", is_flag=True)
def main(
    data: str,
    modalities: str | None,
    preset: str,
    recipes: str | None,
    model_list: str,
    seeds: int,
    seed: int,
    epochs: int | None,
    hidden: int | None,
    batch_size: int | None,
    lr: float | None,
    out_dir: str,
    latency_calls: int,
    latency_backend: str,
    resume: bool,
    quiet: bool,
) -> None:
    """Train every model with the same data, splits, selection and seeds; write compare.json and compare.md."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    from cmath_runtime.files import atomic_write_bytes, atomic_write_json
    from cmath_train.checkpoint import load_checkpoint
    from cmath_train.data import load_data
    from cmath_train.registry import model_names
    from cmath_train.run import RequestError, select_modalities

    torch.set_num_threads(1)  # tiny models; spinning intra-op threads only slow a shared CPU down
    names = parse_models(model_list, model_names())
    if seeds < 1 or (epochs is not None and epochs < 1) or not names:
        raise click.BadParameter("expected --seeds >= 1, --epochs >= 1 and at least one model")
    own = parse_recipes(recipes, model_names())
    fs = load_data(data)
    try:
        mods = select_modalities(modalities, fs.modalities)
    except RequestError as e:
        raise click.BadParameter(str(e)) from None
    fs = fs.select(mods)
    data_kw = {
        "modalities": mods,
        "feature_dims": fs.feature_dims,
        "num_classes": len(fs.label_names),
        "num_speakers": fs.num_speakers,
    }
    given_train = {
        k: v for k, v in {"batch_size": batch_size, "lr": lr, "epochs": epochs}.items() if v is not None
    }
    configs, recipe_names = {}, {}
    for name in names:
        recipe_names[name], p = recipe_for(name, own.get(name, preset), fs)
        configs[name] = (
            {**data_kw, **p.model, **({"d": hidden} if hidden is not None else {})},
            dict(p.loss),
            {**p.train, **given_train, "seed": seed},
        )
    out = Path(out_dir)
    start = time.perf_counter()
    trained = train_models(fs, names, configs, seeds, out, resume, not quiet)
    run_dirs = {name: out / name for name in names}
    params = {
        key: sum(t.numel() for t in load_checkpoint(run).model.parameters()) for key, run in run_dirs.items()
    }
    click.echo("measuring latency ...")
    latency = measure_latency(run_dirs, latency_calls, latency_backend)
    first = trained[names[0]]["summary"]["over_seeds"]
    context = {
        "data": data,
        "modalities": "".join(mods),
        "preset": preset,
        "recipes": recipe_names,
        "epochs": epochs,
        "seeds": first["seeds"],
        "validation": _validation_source(out / names[0]),
        "configs": {
            k: {"model": m | {"modalities": list(mods)}, "loss": lo, "train": t}
            for k, (m, lo, t) in configs.items()
        },
        "command": "python -m studies.compare_models "
        + shlex.join(a for a in sys.argv[1:] if a not in ("--resume", "--quiet")),  # neither changes a number
        "host": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cpu_count": os.cpu_count(),
        },
        "total_seconds": time.perf_counter() - start,
        "parameters": params,
        "out": out,
    }
    report = build_report(names, trained, latency, context)
    atomic_write_json(out / "compare.json", report)
    text = markdown(report)
    atomic_write_bytes(out / "compare.md", text.encode())
    click.echo(text)


def _validation_source(run_dir: Path) -> str:
    import json

    seed_dirs = sorted(run_dir.glob("seed_*"))
    metrics = json.loads((seed_dirs[0] / "metrics.json").read_text()) if seed_dirs else {}
    source = metrics.get("validation_source", "unknown")
    if source == "dev":
        return "the official dev split"
    fraction = source.split("(")[0].strip()  # "train fraction 0.2"
    return f"{fraction}, drawn with each seed, the same for every model"


if __name__ == "__main__":
    main()
