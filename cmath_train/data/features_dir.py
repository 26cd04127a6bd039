"""cmath's own on-disk feature format, written by front-ends (cmath-prepare) and read by cmath-train.

    FEATURES_DIR/meta.json     {"format": "cmath-features", "version": 1, label_names, feature_dims,
                                num_speakers, splits, meta}
    FEATURES_DIR/<split>.npz   feat_<m> (U, d_m) float32 for each modality m, speaker (U,) int64,
                               label (U,) int64, length (C,) int64, id (C,) str — U utterances, C conversations;
                               text (U,) str when the features were made from text (cmath-prepare)

No pickle anywhere: arrays are read with allow_pickle=False.
"""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cmath_runtime.errors import ArtifactError
from cmath_runtime.files import atomic_write_bytes, atomic_write_json, confined_path, read_tagged_json

from .types import Dialogue, FeatureSet

FORMAT, VERSION = "cmath-features", 1


def save_features(fs: FeatureSet, out_dir: str | Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for split, dialogues in fs.splits.items():
        arrays: dict[str, np.ndarray] = {
            f"feat_{m}": _concat([d.features[m] for d in dialogues], (0, fs.feature_dims[m]), np.float32)
            for m in fs.modalities
        }
        arrays["speaker"] = _concat([d.speakers for d in dialogues], (0,), np.int64)
        arrays["label"] = _concat([d.labels for d in dialogues], (0,), np.int64)
        arrays["length"] = np.array([len(d) for d in dialogues], np.int64)
        arrays["id"] = np.array([d.id for d in dialogues], dtype=str)
        texts = [d.texts for d in dialogues if d.texts is not None]
        if dialogues and len(texts) == len(dialogues):
            arrays["text"] = np.array([t for ts in texts for t in ts], dtype=str).reshape(-1)
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        atomic_write_bytes(out / f"{split}.npz", buf.getvalue())
    atomic_write_json(
        out / "meta.json",
        {
            "format": FORMAT,
            "version": VERSION,
            "label_names": list(fs.label_names),
            "feature_dims": dict(fs.feature_dims),
            "num_speakers": int(fs.num_speakers),
            "splits": list(fs.splits),
            "meta": fs.meta,
        },
    )
    return out


def load_features(path: str | Path) -> FeatureSet:
    path = Path(path)
    meta_path = path / "meta.json"
    if not meta_path.is_file():
        raise ArtifactError(path, "not a features directory: meta.json is missing")
    meta = read_tagged_json(meta_path, FORMAT, VERSION, "features meta")
    dims = {m: int(v) for m, v in meta["feature_dims"].items()}
    splits = {name: _read_split(path / f"{name}.npz", dims) for name in meta["splits"]}
    return FeatureSet(
        list(meta["label_names"]), dims, int(meta["num_speakers"]), splits, meta.get("meta", {})
    )


@dataclass
class EncoderClassifier:
    """The fine-tuned encoder's own classifier, written by cmath-prepare beside the features."""

    probs: dict[str, np.ndarray]  # split -> (U, classes) probabilities (dev, test)
    weight: np.ndarray | None  # (classes, d) the head; None when the file holds the probabilities only
    bias: np.ndarray | None  # (classes,)
    input_scale: float  # the head reads input_scale * embedding


def load_encoder_classifier(fs: FeatureSet) -> EncoderClassifier | None:
    """The fine-tuned encoder's own classifier beside the features (meta "encoder_classifier"); None when there is
    none (a frozen encoder)."""
    name, folder = fs.meta.get("encoder_classifier"), fs.meta.get("path")
    if not name or not folder:
        return None
    file = confined_path(folder, name, "meta.encoder_classifier", Path(folder) / "meta.json")
    try:
        with np.load(file, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (FileNotFoundError, zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        raise ArtifactError(file, f"unreadable encoder classifier outputs ({e})") from None
    classes = len(fs.label_names)
    probs = {k.removesuffix("_probs"): v for k, v in arrays.items() if k.endswith("_probs")}
    for split, p in probs.items():
        rows = sum(len(d) for d in fs.splits.get(split, []))
        if p.shape != (rows, classes):
            raise ArtifactError(file, f"{split}_probs: expected shape ({rows}, {classes}), got {p.shape}")
    weight, bias = arrays.get("head_weight"), arrays.get("head_bias")
    if weight is not None:
        if weight.ndim != 2 or weight.shape[0] != classes or weight.shape[1] not in fs.feature_dims.values():
            raise ArtifactError(file, f"head_weight: expected shape ({classes}, d), got {weight.shape}")
        if bias is None or bias.shape != (classes,):
            raise ArtifactError(
                file, f"head_bias: expected shape ({classes},), got {None if bias is None else bias.shape}"
            )
    scale = float(arrays["head_input_scale"]) if "head_input_scale" in arrays else 1.0
    return EncoderClassifier(probs, weight, bias, scale)


def _read_split(file: Path, dims: dict[str, int]) -> list[Dialogue]:
    try:
        with np.load(file, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except FileNotFoundError:
        raise ArtifactError(file, "split file is missing") from None
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        raise ArtifactError(file, f"corrupt or truncated .npz ({e})") from None
    for m, d in dims.items():
        key = f"feat_{m}"
        if key not in arrays:
            raise ArtifactError(file, f"array {key!r} is missing")
        if arrays[key].ndim != 2 or arrays[key].shape[1] != d:
            raise ArtifactError(file, f"{key}: expected shape (utterances, {d}), got {arrays[key].shape}")
    lengths = arrays["length"]
    total = int(lengths.sum())
    for key in ["speaker", "label", *(f"feat_{m}" for m in dims), *(["text"] if "text" in arrays else [])]:
        if len(arrays[key]) != total:
            raise ArtifactError(file, f"{key}: expected {total} rows (sum of length), got {len(arrays[key])}")
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    return [
        Dialogue(
            id=str(arrays["id"][i]),
            features={m: arrays[f"feat_{m}"][s:e] for m in dims},
            speakers=arrays["speaker"][s:e].astype(np.int64),
            labels=arrays["label"][s:e].astype(np.int64),
            texts=[str(t) for t in arrays["text"][s:e]] if "text" in arrays else None,
        )
        for i, (s, e) in enumerate(zip(bounds[:-1], bounds[1:]))
    ]


def _concat(parts: list[np.ndarray], empty_shape: tuple[int, ...], dtype: type) -> np.ndarray:
    return np.concatenate(parts).astype(dtype) if parts else np.zeros(empty_shape, dtype)
