"""cmath_runtime.turns: the text encoder's input for one utterance (the utterance, its speaker, its past turns)."""

from __future__ import annotations

import pytest

from cmath_runtime.turns import TurnFormat, encode_turns

CLS, SEP = 101, 102


def words(texts: list[str]) -> list[list[int]]:
    """A fake tokenizer: one id per whitespace word, the word's length + 1000 ("3:" -> 1002)."""
    return [[1000 + len(w) for w in t.split()] for t in texts]


def test_target_first_then_past_turns_most_recent_first() -> None:
    fmt = TurnFormat(window=2, max_tokens=64)
    texts, speakers = ["a", "bb bb", "ccc ccc ccc", "dddd"], [0, 1, 0, 1]
    out = encode_turns(fmt, words, CLS, SEP, texts, speakers)
    assert len(out) == 4
    ids, types = out[3]
    # [CLS] "1:" dddd [SEP] | "0:" ccc ccc ccc "1:" bb bb [SEP]   (turn 0 is outside the window of 2)
    assert ids == [CLS, 1002, 1004, SEP, 1002, 1003, 1003, 1003, 1002, 1002, 1002, SEP]
    assert types == [0] * 4 + [1] * 8
    first_ids, first_types = out[0]
    assert first_ids == [CLS, 1002, 1001, SEP] and first_types == [0, 0, 0, 0]  # no past: one segment


def test_start_encodes_only_the_new_utterances_with_the_same_result() -> None:
    fmt = TurnFormat(window=3, max_tokens=32)
    texts, speakers = [f"w{i} " * (i + 1) for i in range(6)], [0, 1, 2, 0, 1, 2]
    whole = encode_turns(fmt, words, CLS, SEP, texts, speakers)
    assert encode_turns(fmt, words, CLS, SEP, texts, speakers, start=4) == whole[4:]


def test_truncation_keeps_the_utterance_and_cuts_the_oldest_turn() -> None:
    fmt = TurnFormat(window=5, max_tokens=10)
    texts, speakers = ["x " * 6, "y " * 6, "z z"], [0, 1, 0]
    ids, types = encode_turns(fmt, words, CLS, SEP, texts, speakers)[2]
    assert len(ids) == 10 and ids[:5] == [CLS, 1002, 1001, 1001, SEP] and ids[-1] == SEP
    assert ids[5:9] == [1002, 1001, 1001, 1001] and types == [0] * 5 + [1] * 5  # turn 1, cut on its right
    long_ids, long_types = encode_turns(fmt, words, CLS, SEP, ["q " * 50], [0])[0]
    assert len(long_ids) == 9 and long_types == [0] * 9  # the utterance alone fills the input: no past fits


def test_plain_format_is_the_sentence_pipeline() -> None:
    fmt = TurnFormat(window=0, max_tokens=256, speaker_prefix=False)
    [(ids, types)] = encode_turns(fmt, words, CLS, SEP, ["  hello\u0085 world "], [3])
    assert (
        ids == [CLS, 1006, 1005, SEP] and types == [0] * 4
    )  # cleaned ("hello\x85" -> "hello\u2026"), no prefix


def test_format_round_trips_and_refuses_bad_values() -> None:
    fmt = TurnFormat(window=3, max_tokens=96)
    assert TurnFormat.from_json(fmt.to_json()) == fmt
    with pytest.raises(ValueError, match="window"):
        TurnFormat(window=-1)
    with pytest.raises(ValueError, match="max_tokens"):
        TurnFormat(max_tokens=3)
    with pytest.raises(ValueError, match="turns.format"):
        TurnFormat.from_json({**fmt.to_json(), "format": "other"})
    with pytest.raises(ValueError, match="same length"):
        encode_turns(fmt, words, CLS, SEP, ["a"], [0, 1])


def test_future_turns_follow_the_past_in_their_own_segment_nearest_first() -> None:
    fmt = TurnFormat(window=2, max_tokens=64, future=1)
    texts, speakers = ["a", "bb", "ccc", "dddd", "eeeee"], [0, 1, 0, 1, 0]
    out = encode_turns(fmt, words, CLS, SEP, texts, speakers)
    ids, types = out[2]
    # [CLS] "0:" ccc [SEP] | "1:" bb "0:" a [SEP] "1:" dddd [SEP]
    assert ids == [CLS, 1002, 1003, SEP, 1002, 1002, 1002, 1001, SEP, 1002, 1004, SEP]
    assert types == [0] * 4 + [1] * 8
    assert out[0][0] == [CLS, 1002, 1001, SEP, SEP, 1002, 1002, SEP]  # no past: an empty past segment
    assert out[4][0] == [CLS, 1002, 1005, SEP, 1002, 1004, 1002, 1003, SEP]  # no future: past only
    assert encode_turns(fmt, words, CLS, SEP, texts, speakers, start=2, stop=3) == out[2:3]
    assert not fmt.streams and TurnFormat(window=2).streams
    assert TurnFormat.from_json(fmt.to_json()) == fmt


def test_the_budget_goes_to_the_nearest_turns_alternating_past_and_future() -> None:
    fmt = TurnFormat(window=3, max_tokens=12, future=3)
    texts, speakers = ["x x x", "y y y", "t", "z z z", "w w w"], [0] * 5
    ids, _ = encode_turns(fmt, words, CLS, SEP, texts, speakers)[2]
    # budget 12 - 2 (target) - 4 = 6: turn 1 (4 tokens), then turn 3 cut to 2; turns 0 and 4 do not fit
    assert ids == [CLS, 1002, 1001, SEP, 1002, 1001, 1001, 1001, SEP, 1002, 1001, SEP]
    with pytest.raises(ValueError, match="future"):
        TurnFormat(future=-1)
