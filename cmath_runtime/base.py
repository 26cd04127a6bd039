"""The torch-free base layer of cmath: the few modules training, export, benchmarks and the runtime all import.

The base layer is these modules of `cmath_runtime` (numpy and the standard library only; they import nothing
else from cmath, except each other):

* `cmath_runtime.base`: this map and the constants every package shares (`MODALITY_ORDER`),
* `cmath_runtime.errors`: `CmathError` and its subclasses (`InputError`, `ArtifactError`, ...),
* `cmath_runtime.files`: atomic writes, sha256, tagged JSON documents, paths confined to a folder,
* `cmath_runtime.batching`: padding conversations into one batch,
* `cmath_runtime.text_clean`: the text normalisation applied in training and at run time,
* `cmath_runtime.turns`: what the text encoder reads for one utterance (the utterance and its past turns).

Import rules (tests/test_architecture.py checks them on every run):

* `cmath_train` may import the base layer of `cmath_runtime` and nothing else of it;
* `cmath_runtime` imports nothing from `cmath_train`, `cmath_export` or `cmath_bench` (and never torch);
* `cmath_export` and `cmath_bench` may import all of `cmath_runtime` (the exporter reads back what it wrote
  with the runtime's own `Manifest`, session loader and comparator);
* `cmath_train` imports nothing from `cmath_export`, `cmath_serve` or `cmath_bench`;
* no module reaches itself through imports, counting those inside functions.

See docs/architecture.md for the whole map.
"""

from __future__ import annotations

MODALITY_ORDER = ("t", "a", "v")  # text, audio, visual: the canonical order of modalities everywhere

BASE_MODULES = (
    "base",
    "errors",
    "files",
    "batching",
    "text_clean",
    "turns",
)  # modules of cmath_runtime in the base layer
