"""Data sources: the embedded synthetic default, the field's feature pickles, and cmath's features directories."""

from __future__ import annotations

from pathlib import Path

from cmath_runtime.errors import InputError

from .types import SPLITS, Dialogue, FeatureSet, split_validation

__all__ = ["SPLITS", "Dialogue", "FeatureSet", "load_data", "split_validation"]


def load_data(spec: str) -> FeatureSet:
    """`synthetic`, a feature pickle (`.pkl`), or a features directory written by cmath-prepare."""
    if spec == "synthetic":
        from .synthetic import make_synthetic

        return make_synthetic()
    path = Path(spec)
    if path.suffix in (".pkl", ".pickle"):
        from .pickles import load_pickle_features

        return load_pickle_features(path)
    if path.is_dir():
        from .features_dir import load_features

        fs = load_features(path)
        fs.meta.setdefault("path", str(path.resolve()))  # lets the exporter rebuild the validation split
        return fs
    raise InputError("--data", "'synthetic', a .pkl feature pickle or a features directory", repr(spec))
