"""`export.json`, the manifest beside the exported artifacts (docs/artifact-format.md): the one `Manifest` type.

The exporter builds a `Manifest` and writes `to_json()`; the runtime, the benchmarks and the exporter's own
checks read it back with `read_manifest()` / `Manifest.from_json()`. FORMAT/VERSION live here only.

Missing, corrupt or foreign manifests are ArtifactErrors that name the file and what is wrong with it; so is
any file the manifest names (graphs, step graph, text encoder, tokenizer files, Triton files) that does not
resolve inside its folder, symlinks included.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .base import MODALITY_ORDER
from .errors import ArtifactError
from .files import atomic_write_json, confined_path, read_tagged_json

FORMAT, VERSION = "cmath-export", 1
MANIFEST = "export.json"
EXPORT_DIR = "export"  # cmath-export's default output folder inside a run directory
__all__ = [
    "FORMAT",
    "VERSION",
    "MANIFEST",
    "EXPORT_DIR",
    "MODALITY_ORDER",
    "Artifact",
    "Manifest",
    "find_manifest",
    "read_manifest",
    "check_agreement",
]


@dataclass(frozen=True)
class Artifact:
    """One exported model file: its name inside the export folder and the sha256 it must have."""

    key: str  # "fp32", "fp16", "tensorrt", ...
    file: str  # file name inside the export folder
    sha256: str
    bytes: int
    format: str  # "onnx" or "tensorrt"
    precision: str  # "fp32", "fp16", ...
    profile: dict[str, Any] | None = None  # TensorRT optimisation profile, when present
    directory: Path | None = field(default=None, compare=False)  # the export folder (None: not placed yet)

    @property
    def path(self) -> Path:
        return (self.directory or Path(".")) / self.file

    def to_json(self) -> dict[str, Any]:
        out = {
            "file": self.file,
            "sha256": self.sha256,
            "bytes": self.bytes,
            "format": self.format,
            "precision": self.precision,
        }
        return {**out, "profile": self.profile} if self.profile is not None else out

    @classmethod
    def from_json(cls, key: str, entry: Any, directory: Path, where: Path) -> Artifact:
        if not isinstance(entry, dict) or not {"file", "sha256"} <= set(entry):
            raise ArtifactError(
                where, f"invalid manifest: artifacts[{key!r}] needs 'file' and 'sha256', got {entry!r}"
            )
        confined_path(directory, entry["file"], f"artifacts[{key!r}].file", where)
        try:
            size = int(entry.get("bytes", -1))
        except (TypeError, ValueError):
            raise ArtifactError(
                where, f"invalid manifest: artifacts[{key!r}].bytes should be an integer"
            ) from None
        return cls(
            key,
            entry["file"],
            str(entry["sha256"]),
            size,
            str(entry.get("format", "onnx")),
            str(entry.get("precision", key)),
            entry.get("profile"),
            directory,
        )


@dataclass(frozen=True)
class Manifest:
    """Everything export.json says. Typed fields for what the runtime uses; the sections the runtime reads through
    their own specs (text_encoder, step) or only reports (parity, checkpoint, versions, triton) stay JSON objects."""

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
    model_name: str = "cmath"
    opset: int | None = None
    inputs: list[dict[str, Any]] = field(default_factory=list)  # graph input specs (name, dtype, shape)
    outputs: list[dict[str, Any]] = field(default_factory=list)
    parity: dict[str, Any] = field(default_factory=dict)  # artifact key -> its parity report
    checkpoint: dict[str, Any] | None = None
    versions: dict[str, str] = field(default_factory=dict)
    triton: dict[str, Any] | None = None
    text_encoder: dict[str, Any] | None = None
    step: dict[str, Any] | None = None
    path: Path | None = field(default=None, compare=False)  # the export.json this was read from / written to
    extra: dict[str, Any] = field(
        default_factory=dict, repr=False, compare=False
    )  # keys this cmath does not know

    @property
    def directory(self) -> Path:
        return self.path.parent if self.path is not None else Path(".")

    @property
    def input_names(self) -> tuple[str, ...]:
        return (*self.modalities, "speaker", "mask")

    def replace(self, **changes: Any) -> Manifest:
        return dataclasses.replace(self, **changes)

    def file(self, name: Any, entry: str) -> Path:
        """A file named by this manifest, confined to its folder (ArtifactError naming `entry` otherwise)."""
        return confined_path(self.directory, name, entry, self.path)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "model_name": self.model_name,
            "modalities": list(self.modalities),
            "feature_dims": dict(self.feature_dims),
            "num_speakers": self.num_speakers,
            "num_classes": self.num_classes,
            "label_names": list(self.label_names),
            "d": self.d,
            "causal": self.causal,
            "opset": self.opset,
            "max_batch": self.max_batch,
            "max_len": self.max_len,
            "inputs": list(self.inputs),
            "outputs": list(self.outputs),
            "artifacts": {k: a.to_json() for k, a in self.artifacts.items()},
            "parity": dict(self.parity),
            "checkpoint": self.checkpoint,
            "versions": dict(self.versions),
            "triton": self.triton,
            "text_encoder": self.text_encoder,
            "step": self.step,
            **self.extra,
        }

    def write(self, directory: str | Path) -> Manifest:
        """Write DIRECTORY/export.json atomically; the manifest placed there."""
        path = Path(directory) / MANIFEST
        atomic_write_json(path, self.to_json())
        return self.placed(path)

    def placed(self, path: Path) -> Manifest:
        """This manifest as if read from `path` (artifacts resolved against its folder)."""
        arts = {k: dataclasses.replace(a, directory=path.parent) for k, a in self.artifacts.items()}
        return dataclasses.replace(self, path=path, artifacts=arts)

    @classmethod
    def from_json(cls, doc: dict[str, Any], path: str | Path) -> Manifest:
        """Check a parsed export.json (format, version, fields, files confined to its folder) -> Manifest."""
        path = Path(path)
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            got = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
            raise ArtifactError(path, f"foreign file: expected format {FORMAT!r}, got {got!r}")
        if doc.get("version") != VERSION:
            raise ArtifactError(
                path, f"unsupported manifest version {doc.get('version')!r} (this cmath reads {VERSION})"
            )
        return _parse(path, doc)


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
    hint = (
        " (this looks like a run directory: export it first with `cmath-export RUN_DIR`)"
        if (path / "config.json").is_file()
        else ""
    )
    raise ArtifactError(path, f"no {MANIFEST} here or in {EXPORT_DIR}/{hint}")


def read_manifest(path: str | Path) -> Manifest:
    """Read and check export.json; see find_manifest for the accepted paths."""
    file = find_manifest(path)
    return Manifest.from_json(read_tagged_json(file, FORMAT, VERSION, "manifest"), file)


def check_agreement(record: Any, where: Path | None, what: str, flag: str) -> None:
    """Refuse a reduced-precision graph (int8 model, int8 step graph, fp16/int8 text encoder) whose agreement
    record in export.json failed or is missing: such a graph is only ever loaded after the exporter measured
    it within its bounds. `flag` is the cmath-export option that re-exports it."""
    if isinstance(record, dict) and record.get("passed") is True:
        return
    if not isinstance(record, dict):
        why = "has no agreement record"
    else:
        keys = ("argmax_agreement", "min_argmax_agreement", "agreement", "min_cosine")
        measured = {k: record[k] for k in keys if k in record}
        why = f"failed its agreement bound ({measured})"
    raise ArtifactError(
        where if where is not None else MANIFEST,
        f"the {what} {why} in export.json; refusing to load it: re-export with `cmath-export RUN_DIR {flag}`",
    )


_KNOWN = {f.name for f in dataclasses.fields(Manifest)} | {"format", "version"}


@dataclasses.dataclass(frozen=True)
class _Fields:
    """export.json's object, read one checked field at a time; errors name the file and the field."""

    file: Path
    raw: dict[str, Any]

    def fail(self, problem: str) -> ArtifactError:
        return ArtifactError(self.file, f"invalid manifest: {problem}")

    def need(self, key: str, kind: type | tuple[type, ...]) -> Any:
        if key not in self.raw:
            raise self.fail(f"field {key!r} is missing")
        value = self.raw[key]
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
            raise self.fail(f"field {key!r} should be {_kind_name(kind)}, got {value!r}")
        return value

    def section(self, key: str) -> Any:
        value = self.raw.get(key)
        if value is not None and not isinstance(value, dict):
            raise self.fail(f"field {key!r} should be an object or null, got {value!r}")
        return value


def _parse(file: Path, raw: dict[str, Any]) -> Manifest:
    fields = _Fields(file, raw)
    modalities, dims = _modalities(fields)
    label_names, num_classes = _labels(fields)
    positive = {k: fields.need(k, int) for k in ("num_speakers", "d", "max_batch", "max_len")}
    bad = {k: v for k, v in positive.items() if v < 1}
    if bad:
        raise fields.fail(f"expected positive integers, got {bad}")
    directory = file.parent
    artifacts = {
        str(key): Artifact.from_json(str(key), entry, directory, file)
        for key, entry in fields.need("artifacts", dict).items()
    }
    if "fp32" not in artifacts:
        raise fields.fail("no fp32 artifact (model.onnx) listed")
    step, text, triton = fields.section("step"), fields.section("text_encoder"), fields.section("triton")
    _confine_files(fields, step, text, triton)
    return Manifest(
        modalities,
        {m: dims[m] for m in modalities},
        positive["num_speakers"],
        num_classes,
        tuple(str(n) for n in label_names),
        positive["d"],
        bool(raw.get("causal", False)),
        positive["max_batch"],
        positive["max_len"],
        artifacts,
        model_name=str(raw.get("model_name", "cmath")),
        opset=raw.get("opset"),
        inputs=list(raw.get("inputs") or []),
        outputs=list(raw.get("outputs") or []),
        parity=dict(raw.get("parity") or {}),
        checkpoint=fields.section("checkpoint"),
        versions=dict(raw.get("versions") or {}),
        triton=triton,
        text_encoder=text,
        step=step,
        path=file,
        extra={k: v for k, v in raw.items() if k not in _KNOWN},
    )


def _modalities(fields: _Fields) -> tuple[tuple[str, ...], dict[str, int]]:
    """The modalities (distinct, known names) and the feature size of each."""
    modalities = tuple(fields.need("modalities", list))
    if (
        not modalities
        or len(set(modalities)) != len(modalities)
        or any(m not in MODALITY_ORDER for m in modalities)
    ):
        raise fields.fail(
            f"modalities should be distinct names from {MODALITY_ORDER}, got {list(modalities)}"
        )
    dims = fields.need("feature_dims", dict)
    if set(dims) != set(modalities) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in dims.values()
    ):
        raise fields.fail(
            f"feature_dims should give a positive size for each of {list(modalities)}, got {dims}"
        )
    return modalities, dims


def _labels(fields: _Fields) -> tuple[tuple[Any, ...], int]:
    """The label names and their number (they must agree)."""
    label_names = tuple(fields.need("label_names", list))
    num_classes = fields.need("num_classes", int)
    if len(label_names) != num_classes:
        raise fields.fail(f"{num_classes} classes but {len(label_names)} label_names")
    return label_names, num_classes


def _confine_files(fields: _Fields, step: Any, text: Any, triton: Any) -> None:
    """Every file the manifest names stays inside the export folder (the Triton repository's inside its own)."""
    directory, file = fields.file.parent, fields.file
    if step is not None:
        confined_path(directory, step.get("file"), "step.file", file)
        _confine_nested(directory, step, "step", file)
    for key, value in fields.raw.items():  # sections this cmath does not know (a newer exporter's)
        if key not in _KNOWN:
            _confine_nested(directory, value, key, file)
    if text is not None:
        files = text.get("files")
        if not isinstance(files, dict):
            raise fields.fail(f"text_encoder.files should be an object, got {files!r}")
        for name, entry in files.items():
            confined_path(
                directory,
                entry.get("file") if isinstance(entry, dict) else entry,
                f"text_encoder.files[{name!r}].file",
                file,
            )
    if triton is not None:
        _confine_triton(fields, triton)


def _confine_triton(fields: _Fields, triton: dict[str, Any]) -> None:
    """The Triton repository is its own folder; its files must stay inside it."""
    repo = triton.get("repository")
    if not isinstance(repo, str) or not repo:
        raise fields.fail(f"triton.repository should be a folder, got {repo!r}")
    for key in ("config", "file"):
        if key in triton:
            confined_path(repo, triton[key], f"triton.{key}", fields.file)


def _confine_nested(directory: Path, node: Any, entry: str, where: Path) -> None:
    """Every "file" value anywhere under `node` must stay inside `directory` (named by its path in the JSON)."""
    if isinstance(node, dict):
        for key, value in node.items():
            name = f"{entry}.{key}"
            if key == "file":
                confined_path(directory, value, name, where)
            elif isinstance(value, (dict, list)):
                _confine_nested(directory, value, name, where)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            _confine_nested(directory, value, f"{entry}[{i}]", where)


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = {int: "an integer", list: "a list", dict: "an object", str: "a string", bool: "true/false"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)
