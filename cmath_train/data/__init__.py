"""Data sources: the embedded synthetic default, the field's feature pickles, and cmath's features directories."""

from __future__ import annotations

from pathlib import Path

from cmath_runtime.errors import InputError

from .types import SPLITS, Dialogue, FeatureSet, split_validation

__all__ = ["SPLITS", "Dialogue", "FeatureSet", "load_data", "split_validation"]


CAUSAL_SUBDIR = (
    "causal"  # cmath-prepare's past-only twin inside a features directory whose encoder reads the future
)


def load_data(spec: str, causal: bool = False) -> FeatureSet:
    """`synthetic`, a feature pickle (`.pkl`), or a features directory written by cmath-prepare. `causal`: the
    features a causal model may read: a directory whose text encoder reads future turns gives its causal twin
    (DIR/causal, past turns only) instead, and refuses when it has none."""
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
        future = int(((fs.meta.get("text_encoder") or {}).get("turns") or {}).get("future", 0))
        if causal and future > 0:
            twin = path / CAUSAL_SUBDIR
            if not (twin / "meta.json").is_file():
                raise InputError(
                    "--data",
                    "with --causal, features whose text encoder reads past turns only, or their causal twin in "
                    f"{twin} (cmath-prepare --causal-twin)",
                    f"a text encoder that reads {future} future turn(s) and no {twin}",
                )
            return load_data(str(twin))
        fs.meta.setdefault("path", str(path.resolve()))  # lets the exporter rebuild the validation split
        return fs
    raise InputError("--data", "'synthetic', a .pkl feature pickle or a features directory", repr(spec))
