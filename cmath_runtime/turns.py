"""What the text encoder reads for one utterance: the utterance, its speaker and the turns around it.

One function builds the encoder's input in training (cmath-prepare) and at run time (`Conversation.add(text=)`,
`predict` with texts, `step_batch`, the server's `text` input), so both see exactly the same token ids:

    [CLS] s: target [SEP] s1: turn_{i-1} s2: turn_{i-2} ... [SEP] s3: turn_{i+1} ... [SEP]
    token type 0 .............. token type 1 ..........................................

`s: ` is the speaker id of the turn (when `speaker_prefix`), texts are normalised with `clean_text` first. The
target comes first and is cut on the right only when it alone exceeds `max_tokens`. The context fills what is
left nearest first, alternating past and future turns (turn i-1, i+1, i-2, i+2, ...), each in its own segment;
the last one that does not fit is cut on the right. An encoder with `future == 0` reads past turns only (the
future segment is then absent), so a live conversation's encoding of an utterance never changes when later ones
arrive: the same encoder serves streaming exactly. One with `future > 0` reads the whole conversation around each
utterance: it classifies whole conversations, never one new utterance at a time. The encoder pools over the
target segment (token type 0) only.

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
    future: int = 0  # future turns it reads too (> 0: whole conversations only, no streaming)

    def __post_init__(self) -> None:
        if self.window < 0:
            raise ValueError(f"window: expected >= 0, got {self.window}")
        if self.future < 0:
            raise ValueError(f"future: expected >= 0, got {self.future}")
        if self.max_tokens < 4:
            raise ValueError(f"max_tokens: expected >= 4, got {self.max_tokens}")

    def to_json(self) -> dict[str, Any]:
        return {"format": TURN_FORMAT, **asdict(self)}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> TurnFormat:
        if raw.get("format") != TURN_FORMAT:
            raise ValueError(f"turns.format: expected {TURN_FORMAT!r}, got {raw.get('format')!r}")
        return cls(
            int(raw["window"]), int(raw["max_tokens"]), bool(raw["speaker_prefix"]), int(raw.get("future", 0))
        )

    def reads(self, start: int, stop: int, n: int) -> range:
        """The turns of an n-utterance conversation the encoder reads for utterances start..stop-1: the one place
        its window is applied."""
        return range(max(0, start - self.window), min(n, stop + self.future))

    @property
    def streams(self) -> bool:
        """True when an utterance's input never depends on later turns (past turns only)."""
        return self.future == 0

    def turn(self, speaker: int, text: str) -> str:
        text = clean_text(text)
        return f"{int(speaker)}: {text}" if self.speaker_prefix else text


Tokenize = Callable[[list[str]], list[list[int]]]  # texts -> token ids without special tokens
# (start, separator) tokens: BERT's, then RoBERTa's; the encoder's input is built the same way with either
SPECIAL_TOKENS = (("[CLS]", "[SEP]"), ("<s>", "</s>"))


def special_ids(token_to_id: Callable[[str], int | None]) -> tuple[int, int] | None:
    """The (start, separator) token ids of a tokenizer's vocabulary (`token_to_id`), or None when it has neither
    pair of SPECIAL_TOKENS."""
    for start, sep in SPECIAL_TOKENS:
        ids = token_to_id(start), token_to_id(sep)
        if ids[0] is not None and ids[1] is not None:
            return ids[0], ids[1]
    return None


def encode_turns(
    fmt: TurnFormat,
    tokenize: Tokenize,
    cls_id: int,
    sep_id: int,
    texts: Sequence[str],
    speakers: Sequence[int],
    start: int = 0,
    stop: int | None = None,
) -> list[tuple[list[int], list[int]]]:
    """(input_ids, token_type_ids) of utterances start..stop-1 of one conversation, each with the turns around it."""
    if len(texts) != len(speakers):
        raise ValueError(
            f"texts and speakers: expected the same length, got {len(texts)} and {len(speakers)}"
        )
    stop = len(texts) if stop is None else stop
    read = fmt.reads(start, stop, len(texts))
    first, last = read.start, read.stop
    pieces = tokenize([fmt.turn(s, t) for s, t in zip(speakers[first:last], texts[first:last], strict=True)])
    out = []
    for i in range(start, stop):
        target = pieces[i - first][: fmt.max_tokens - 3]
        # [CLS], [SEP] after the target, the context's last [SEP], and the [SEP] between past and future
        budget = fmt.max_tokens - len(target) - 3 - (fmt.future > 0)
        past: list[int] = []
        future: list[int] = []
        for k in range(1, max(fmt.window, fmt.future) + 1):
            for segment, j, reach in ((past, i - k, fmt.window), (future, i + k, fmt.future)):
                if k <= reach and first <= j < last and budget > 0:
                    piece = pieces[j - first][:budget]
                    segment += piece
                    budget -= len(piece)
        ids = [cls_id, *target, sep_id]
        context = past + ([sep_id, *future] if future else [])
        if context:
            ids += [*context, sep_id]
        out.append((ids, [0] * (len(target) + 2) + [1] * (len(ids) - len(target) - 2)))
    return out
