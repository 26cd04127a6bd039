"""An agent that turns a transcript into emotions as it arrives, with cmath_runtime only (no torch).

    python examples/agent_from_text.py EXPORT_DIR [TRANSCRIPT]      # TRANSCRIPT: file, or stdin when absent

Each line is `speaker: text`; for every line the emotion of that utterance is printed as soon as it is read:
`<line number>\t<speaker>\t<label>\t<confidence>\t<text>`. Speakers get ids in order of first appearance
(capped at the model's number of speakers), as cmath-prepare numbered them in training. Lines without a colon
are spoken by the previous speaker; blank lines are skipped.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TextIO

import cmath_runtime


def run(export_dir: str | Path, lines: TextIO, out: TextIO = sys.stdout) -> None:
    model = cmath_runtime.load(export_dir, backend="cpu")
    conv = cmath_runtime.Conversation(model)
    ids: dict[str, int] = {}
    speaker = "?"
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        name, sep, text = line.partition(":")
        if sep:
            speaker, text = name.strip(), text.strip()
        else:
            text = line.strip()
        sid = ids.setdefault(speaker, min(len(ids), model.num_speakers - 1))
        emotion = conv.add(sid, text=text).latest
        print(f"{number}\t{speaker}\t{emotion.label}\t{emotion.confidence:.3f}\t{text}", file=out, flush=True)


def main(argv: list[str]) -> int:
    if len(argv) not in (1, 2):
        print(__doc__, file=sys.stderr)
        return 2
    if len(argv) == 2:
        with open(argv[1], encoding="utf-8") as f:
            run(argv[0], f)
    else:
        run(argv[0], sys.stdin)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
