"""What the text encoder reads for one utterance: the utterance, its speaker and the conversation's past turns.

One function builds the encoder's input in training (cmath-prepare) and at run time (`Conversation.add(text=)`,
`predict` with texts, `step_batch`, the server's `text` input), so both see exactly the same token ids:

    [CLS] s: target [SEP] s1: turn_{i-1} s2: turn_{i-2} ... [SEP]
    token type 0 .............. token type 1 ........................

`s: ` is the speaker id of the turn (when `speaker_prefix`), texts are normalised with `clean_text` first. The
target comes first and is cut on the right only when it alone exceeds `max_tokens`; the past turns fill what is
left, most recent first, the last one that does not fit cut on the right. Only past turns are read (`window` of
them), so a live conversation's encoding of an utterance never changes when later ones arrive: the same encoder
serves streaming exactly. The encoder pools over the target segment (token type 0) only.

`TurnFormat(window=0, speaker_prefix=False)` with the tokenizer's own limit is the plain sentence pipeline:
[CLS] text [SEP]. Tokenising a text is the caller's (the `tokenizers` library in both places, from the same
tokenizer.json): this module is pure Python.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from .text_clean import clean_text

TURN_FORMAT = "cmath-turns-v1"


@dataclass(frozen=True)
class TurnFormat:
    window: int = 0  # past turns the encoder reads besides the utterance
    max_tokens: int = 128  # the whole input, [CLS]/[SEP] included
    speaker_prefix: bool = True  # "3: text" instead of "text"

    def __post_init__(self) -> None:
        if self.window < 0:
            raise ValueError(f"window: expected >= 0, got {self.window}")
        if self.max_tokens < 4:
            raise ValueError(f"max_tokens: expected >= 4, got {self.max_tokens}")

    def to_json(self) -> dict[str, Any]:
        return {"format": TURN_FORMAT, **asdict(self)}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> TurnFormat:
        if raw.get("format") != TURN_FORMAT:
            raise ValueError(f"turns.format: expected {TURN_FORMAT!r}, got {raw.get('format')!r}")
        return cls(int(raw["window"]), int(raw["max_tokens"]), bool(raw["speaker_prefix"]))

    def turn(self, speaker: int, text: str) -> str:
        text = clean_text(text)
        return f"{int(speaker)}: {text}" if self.speaker_prefix else text


Tokenize = Callable[[list[str]], list[list[int]]]  # texts -> token ids without special tokens


def encode_turns(
    fmt: TurnFormat,
    tokenize: Tokenize,
    cls_id: int,
    sep_id: int,
    texts: Sequence[str],
    speakers: Sequence[int],
    start: int = 0,
) -> list[tuple[list[int], list[int]]]:
    """(input_ids, token_type_ids) of utterances start..n-1 of one conversation, each with its own past."""
    if len(texts) != len(speakers):
        raise ValueError(
            f"texts and speakers: expected the same length, got {len(texts)} and {len(speakers)}"
        )
    first = max(0, start - fmt.window)
    pieces = tokenize([fmt.turn(s, t) for s, t in zip(speakers[first:], texts[first:], strict=True)])
    out = []
    for i in range(start, len(texts)):
        target = pieces[i - first][: fmt.max_tokens - 3]
        ids, types = [cls_id, *target, sep_id], [0] * (len(target) + 2)
        budget = fmt.max_tokens - len(ids) - 1
        for j in range(i - 1, max(-1, i - 1 - fmt.window), -1):
            if budget <= 0:
                break
            past = pieces[j - first][:budget]
            ids += past
            budget -= len(past)
        if len(ids) > len(types):
            ids.append(sep_id)
            types += [1] * (len(ids) - len(types))
        out.append((ids, types))
    return out
