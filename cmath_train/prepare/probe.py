"""A context-free sanity number for a features directory: logistic regression on single utterances.

Features are standardised with train mean/std; scikit-learn LogisticRegression (lbfgs, multinomial,
class_weight none); C is chosen by weighted-F1 on dev (or, without dev, on a seeded 20% of the train
conversations (`val_fraction`, `seed`), then refit on all of train). Test is scored once, with the chosen C.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score
from sklearn.preprocessing import StandardScaler

from cmath_train.data.types import Dialogue, FeatureSet, split_validation

DEFAULT_CS = (0.0001, 0.0003, 0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0)


@dataclass
class ProbeResult:
    modality: str
    best_c: float
    selection: str
    dev_weighted_f1: float  # on the selection split
    test_weighted_f1: float | None
    test_accuracy: float | None
    by_c: dict[float, float] = field(default_factory=dict)  # C -> selection weighted-F1


def linear_probe(
    fs: FeatureSet,
    modality: str = "t",
    cs: tuple[float, ...] = DEFAULT_CS,
    seed: int = 0,
    val_fraction: float = 0.2,
) -> ProbeResult:
    train = fs.splits["train"]
    if "dev" in fs.splits:
        fit_on, select_on, selection = train, fs.splits["dev"], "dev"
    else:
        fit_on, select_on = split_validation(train, val_fraction, seed)
        selection = f"{100 * val_fraction:g}% of train conversations (seed {seed})"
    x, y = _flat(fit_on, modality)
    xs, ys = _flat(select_on, modality)
    scaler = StandardScaler().fit(x)
    by_c = {c: _f1(_fit(scaler.transform(x), y, c), scaler.transform(xs), ys) for c in cs}
    best_c = max(by_c, key=lambda c: (by_c[c], -c))
    result = ProbeResult(modality, best_c, selection, by_c[best_c], None, None, by_c)
    if "test" in fs.splits:
        if selection != "dev":  # refit on all of train
            x, y = _flat(train, modality)
            scaler = StandardScaler().fit(x)
        model = _fit(scaler.transform(x), y, best_c)
        xt, yt = _flat(fs.splits["test"], modality)
        pred = model.predict(scaler.transform(xt))
        result.test_weighted_f1 = float(f1_score(yt, pred, average="weighted"))
        result.test_accuracy = float(accuracy_score(yt, pred))
    return result


def _flat(dialogues: list[Dialogue], modality: str) -> tuple[np.ndarray, np.ndarray]:
    return np.concatenate([d.features[modality] for d in dialogues]), np.concatenate(
        [d.labels for d in dialogues]
    )


def _fit(x: np.ndarray, y: np.ndarray, c: float) -> LogisticRegression:
    return LogisticRegression(C=c, max_iter=3000).fit(x, y)


def _f1(model: LogisticRegression, x: np.ndarray, y: np.ndarray) -> float:
    return float(f1_score(y, model.predict(x), average="weighted"))
