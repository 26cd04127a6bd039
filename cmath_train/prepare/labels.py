"""The label set and label indices.

The label set is every label that occurs in the train split, sorted alphabetically (MELD: anger, disgust,
fear, joy, neutral, sadness, surprise). Alphabetical rather than by frequency so that indices do not depend
on counts: a subset of the data, or a re-sampled train file, gives the same index to the same label.
A dev/test label absent from train is an error, never a silent new class.
"""

from __future__ import annotations

import numpy as np

from cmath_runtime.errors import InputError

from .csv_source import CsvTable

LABEL_ORDER = "alphabetical, from the labels present in train"


def label_names(train: CsvTable) -> list[str]:
    return sorted({label for d in train.dialogues for label in d.labels})


def label_indices(table: CsvTable, names: list[str], column: str) -> list[np.ndarray]:
    """Per dialogue of `table`, its labels as indices into `names`."""
    index = {name: i for i, name in enumerate(names)}
    out = []
    for dialogue in table.dialogues:
        for i, label in enumerate(dialogue.labels):
            if label not in index:
                raise InputError(
                    f"{table.where(dialogue, i)}, column {column!r}",
                    f"one of the train labels {names}",
                    repr(label),
                    hint="Labels come from the train file; dev/test may not add new ones.",
                )
        out.append(np.array([index[label] for label in dialogue.labels], np.int64))
    return out
