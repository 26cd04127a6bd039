"""Reading one conversation CSV: which columns hold what, grouping rows into conversations, ordering them.

Every row is one utterance. The `dialogue` columns together name its conversation (conversations keep the
order in which they first appear in the file); the numeric `order` column sorts utterances inside one.
Cells are normalised with `clean_text`. Every problem is an `InputError` that names the file and, for a
row, both its 1-based data row (header excluded) and its CSV line (header = line 1).
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cmath_runtime.errors import InputError
from cmath_runtime.files import sha256_file
from cmath_runtime.text_clean import clean_text, decode_bytes


@dataclass(frozen=True)
class CsvColumns:
    """Names of the columns cmath-prepare reads; the defaults are MELD's."""

    text: str = "Utterance"
    speaker: str = "Speaker"
    label: str = "Emotion"
    dialogue: tuple[str, ...] = ("Dialogue_ID",)
    order: str = "Utterance_ID"

    def required(self) -> list[str]:
        return [self.text, self.speaker, self.label, *self.dialogue, self.order]


@dataclass
class RawDialogue:
    """One conversation as text, in utterance order, with where each utterance came from."""

    id: str
    texts: list[str] = field(default_factory=list)
    speakers: list[str] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)  # 1-based data row (header excluded)
    lines: list[int] = field(default_factory=list)  # 1-based CSV line where the row starts

    def __len__(self) -> int:
        return len(self.texts)


@dataclass
class CsvTable:
    path: Path
    encoding: str
    sha256: str
    num_rows: int
    dialogues: list[RawDialogue]
    carved: bool = False  # a dev split carved out of this train file (cmath-prepare without --dev)

    def where(self, dialogue: RawDialogue, i: int) -> str:
        return f"{self.path}: data row {dialogue.rows[i]} (line {dialogue.lines[i]})"

    def describe(self) -> dict[str, object]:
        return {
            "path": str(self.path),
            "sha256": self.sha256,
            "encoding": self.encoding,
            "rows": self.num_rows,
            "dialogues": len(self.dialogues),
            **({"carved_from_train": True} if self.carved else {}),
        }


Row = tuple[float, int, int, list[str]]  # (order value, data row number, line number, fields)


def read_conversations(path: str | Path, columns: CsvColumns = CsvColumns()) -> CsvTable:
    """Read a conversation CSV into dialogues sorted by the order column."""
    path = Path(path)
    if not path.is_file():
        raise InputError(str(path), "an existing CSV file", "no such file")
    text, encoding = decode_bytes(path.read_bytes())
    reader = csv.reader(io.StringIO(text, newline=""))
    header = _read_header(reader, path)
    missing = [c for c in columns.required() if c not in header]
    if missing:
        raise InputError(
            f"{path}: column {missing[0]!r}" if len(missing) == 1 else f"{path}: columns {missing}",
            f"a column of the CSV (columns found: {header})",
            "missing",
            hint="Choose the columns with --text-col, --speaker-col, --label-col, --dialogue-cols, --order-col.",
        )
    index = {name: header.index(name) for name in columns.required()}
    groups, num_rows = _grouped_rows(reader, header, index, columns, path)
    dialogues = [_dialogue(dialogue_id, rows, index, columns, path) for dialogue_id, rows in groups.items()]
    return CsvTable(path, encoding, sha256_file(path), num_rows, dialogues)


def _grouped_rows(
    reader: Any,  # a csv.reader (its line_num is read)
    header: list[str],
    index: dict[str, int],
    columns: CsvColumns,
    path: Path,
) -> tuple[dict[str, list[Row]], int]:
    """The data rows grouped by conversation, in file order, and how many there are."""
    groups: dict[str, list[Row]] = {}
    num_rows, prev_line = 0, 1
    for record in reader:
        line, prev_line = prev_line + 1, reader.line_num
        if not record or all(not cell.strip() for cell in record):
            continue  # blank line
        num_rows += 1
        where = f"{path}: data row {num_rows} (line {line})"
        if len(record) != len(header):
            raise InputError(
                where,
                f"{len(header)} fields like the header",
                f"{len(record)} fields",
                hint="Is a text cell with a comma missing its quotes?",
            )
        order = _parse_order(record[index[columns.order]], f"{where}, column {columns.order!r}")
        dialogue_id = "/".join(record[index[c]].strip() for c in columns.dialogue)
        groups.setdefault(dialogue_id, []).append((order, num_rows, line, record))
    if num_rows == 0:
        raise InputError(
            str(path), "at least one data row after the header", f"only a header (columns: {header})"
        )
    return groups, num_rows


def _dialogue(
    dialogue_id: str, rows: list[Row], index: dict[str, int], columns: CsvColumns, path: Path
) -> RawDialogue:
    """One conversation's rows sorted by the order column (distinct values), each with a label."""
    rows.sort(key=lambda r: r[0])  # stable: equal orders would keep file order, but they are refused below
    for a, b in zip(rows, rows[1:], strict=False):
        if a[0] == b[0]:
            raise InputError(
                f"{path}: data rows {a[1]} and {b[1]} (lines {a[2]} and {b[2]}), column {columns.order!r}",
                f"distinct values within conversation {dialogue_id!r}",
                f"{_number(a[0])} twice",
            )
    dialogue = RawDialogue(dialogue_id)
    for _, row, line, record in rows:
        label = clean_text(record[index[columns.label]])
        if not label:
            raise InputError(
                f"{path}: data row {row} (line {line}), column {columns.label!r}",
                "a label",
                "an empty cell",
            )
        dialogue.texts.append(clean_text(record[index[columns.text]]))
        dialogue.speakers.append(clean_text(record[index[columns.speaker]]))
        dialogue.labels.append(label)
        dialogue.rows.append(row)
        dialogue.lines.append(line)
    return dialogue


def _read_header(reader: Iterator[list[str]], path: Path) -> list[str]:
    for record in reader:
        if record and any(cell.strip() for cell in record):
            return [cell.strip() for cell in record]
    raise InputError(str(path), "a CSV header line and at least one data row", "an empty file")


def _parse_order(cell: str, where: str) -> float:
    try:
        value = float(cell.strip())
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise InputError(where, "a number (the utterance's position in its conversation)", repr(cell))
    return value


def _number(x: float) -> str:
    return str(int(x)) if x.is_integer() else str(x)
