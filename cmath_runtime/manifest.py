"""`export.json`, the manifest beside the exported artifacts (docs/artifact-format.md), read and checked.

Missing, corrupt or foreign manifests are ArtifactErrors that name the file and what is wrong with it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ArtifactError
from .files import read_tagged_json

FORMAT, VERSION = "cmath-export", 1
MANIFEST = "export.json"
EXPORT_DIR = "export"  # cmath-export's default output folder inside a run directory
MODALITY_ORDER = ("t", "a", "v")


@dataclass(frozen=True)
class Artifact:
    """One exported file: where it is and the sha256 it must have."""

    key: str  # "fp32", "fp16", "tensorrt"
    path: Path
    sha256: str
    bytes: int
    format: str  # "onnx" or "tensorrt"
    precision: str  # "fp32" or "fp16"
    profile: dict[str, Any] | None = None  # TensorRT optimisation profile, when present


@dataclass(frozen=True)
class Manifest:
    """What the runtime needs from export.json; `raw` keeps every field as written."""

    path: Path
    modalities: tuple[str, ...]
    feature_dims: dict[str, int]
    num_speakers: int
    num_classes: int
    label_names: tuple[str, ...]
    d: int
    causal: bool
    max_batch: int
    max_len: int
    artifacts: dict[str, Artifact]
    raw: dict[str, Any] = field(repr=False, compare=False)

    @property
    def directory(self) -> Path:
        return self.path.parent

    @property
    def input_names(self) -> tuple[str, ...]:
        return (*self.modalities, "speaker", "mask")


def find_manifest(path: str | Path) -> Path:
    """export.json itself, an export folder holding it, or a run directory with export/export.json."""
    path = Path(path)
    if path.is_file():
        return path
    for candidate in (path / MANIFEST, path / EXPORT_DIR / MANIFEST):
        if candidate.is_file():
            return candidate
    if not path.exists():
        raise ArtifactError(path, "does not exist")
    hint = " (this looks like a run directory: export it first with `cmath-export RUN_DIR`)" if (
        path / "config.json").is_file() else ""
    raise ArtifactError(path, f"no {MANIFEST} here or in {EXPORT_DIR}/{hint}")


def read_manifest(path: str | Path) -> Manifest:
    """Read and check export.json; see find_manifest for the accepted paths."""
    file = find_manifest(path)
    raw = read_tagged_json(file, FORMAT, VERSION, "manifest")
    return _parse(file, raw)


def _parse(file: Path, raw: dict[str, Any]) -> Manifest:
    def need(key: str, kind: type | tuple[type, ...]) -> Any:
        if key not in raw:
            raise ArtifactError(file, f"invalid manifest: field {key!r} is missing")
        value = raw[key]
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
            raise ArtifactError(file, f"invalid manifest: field {key!r} should be {_kind_name(kind)}, got {value!r}")
        return value

    modalities = tuple(need("modalities", list))
    if not modalities or len(set(modalities)) != len(modalities) or any(m not in MODALITY_ORDER for m in modalities):
        raise ArtifactError(file, f"invalid manifest: modalities should be distinct names from {MODALITY_ORDER}, "
                                  f"got {list(modalities)}")
    dims = need("feature_dims", dict)
    if set(dims) != set(modalities) or not all(isinstance(v, int) and v > 0 for v in dims.values()):
        raise ArtifactError(file, f"invalid manifest: feature_dims should give a positive size for each of "
                                  f"{list(modalities)}, got {dims}")
    label_names = tuple(need("label_names", list))
    num_classes = need("num_classes", int)
    if len(label_names) != num_classes:
        raise ArtifactError(file, f"invalid manifest: {num_classes} classes but {len(label_names)} label_names")
    positive = {k: need(k, int) for k in ("num_speakers", "d", "max_batch", "max_len")}
    bad = {k: v for k, v in positive.items() if v < 1}
    if bad:
        raise ArtifactError(file, f"invalid manifest: expected positive integers, got {bad}")
    artifacts = {}
    for key, entry in need("artifacts", dict).items():
        if not isinstance(entry, dict) or not {"file", "sha256"} <= set(entry):
            raise ArtifactError(file, f"invalid manifest: artifacts[{key!r}] needs 'file' and 'sha256', got {entry!r}")
        artifacts[key] = Artifact(key, file.parent / entry["file"], str(entry["sha256"]), int(entry.get("bytes", -1)),
                                  str(entry.get("format", "onnx")), str(entry.get("precision", key)),
                                  entry.get("profile"))
    if "fp32" not in artifacts:
        raise ArtifactError(file, "invalid manifest: no fp32 artifact (model.onnx) listed")
    return Manifest(file, modalities, {m: dims[m] for m in modalities}, positive["num_speakers"], num_classes,
                    tuple(str(n) for n in label_names), positive["d"], bool(raw.get("causal", False)),
                    positive["max_batch"], positive["max_len"], artifacts, raw)


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = {int: "an integer", list: "a list", dict: "an object", str: "a string", bool: "true/false"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)
