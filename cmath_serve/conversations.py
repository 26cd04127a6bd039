"""The live conversations of `cmath_stream` and the one function that steps many of them at once.

Triton's Python backend calls one model instance's `execute` from one thread, so the store needs no lock. Idle
conversations are dropped when the next request arrives (nothing runs in the background); the live limit
refuses a *new* conversation and never evicts a live one.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from cmath_runtime import Conversation, EmotionModel
from cmath_runtime.errors import CmathError

from .errors import ConversationLimitError, SequenceError

GONE_MEMORY = 100_000  # how many ended/expired ids are remembered, to say why a late step fails


@dataclass
class _Entry:
    conversation: Conversation
    last_used: float


class ConversationStore:
    """sequence id -> Conversation, at most `max_conversations` live, dropped after `idle_timeout_s` idle."""

    def __init__(
        self,
        factory: Callable[[], Conversation],
        max_conversations: int,
        idle_timeout_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._factory = factory
        self.max_conversations = max_conversations
        self.idle_timeout_s = idle_timeout_s
        self._clock = clock
        self._live: OrderedDict[int, _Entry] = OrderedDict()  # least recently used first
        self._gone: OrderedDict[int, str] = OrderedDict()
        self.expired_total = 0
        self.refused_total = 0

    def __len__(self) -> int:
        return len(self._live)

    def __contains__(self, seq_id: int) -> bool:
        return seq_id in self._live

    def expire(self) -> list[int]:
        """Drop every conversation idle for longer than the timeout; returns their ids."""
        now = self._clock()
        gone = []
        while self._live:
            seq_id, entry = next(iter(self._live.items()))
            if now - entry.last_used <= self.idle_timeout_s:
                break
            del self._live[seq_id]
            self._forget(seq_id, f"expired after {self.idle_timeout_s:g} s without a request")
            gone.append(seq_id)
        self.expired_total += len(gone)
        return gone

    def start(self, seq_id: int) -> Conversation:
        """A new, empty conversation for `seq_id` (sequence_start). Restarting a live id replaces its conversation.
        ConversationLimitError when `max_conversations` others are live (nothing is evicted)."""
        self.expire()
        if seq_id not in self._live and len(self._live) >= self.max_conversations:
            self.refused_total += 1
            raise ConversationLimitError(
                f"sequence_start (sequence_id {seq_id}): expected at most {self.max_conversations} live conversations "
                f"(cmath-serve --max-conversations), got a new one while {len(self._live)} are live. Nothing was "
                f"evicted: end conversations with sequence_end, wait for idle ones to expire "
                f"({self.idle_timeout_s:g} s), or raise --max-conversations."
            )
        self._live.pop(seq_id, None)
        self._gone.pop(seq_id, None)
        entry = _Entry(self._factory(), self._clock())
        self._live[seq_id] = entry
        return entry.conversation

    def get(self, seq_id: int) -> Conversation:
        """The live conversation of `seq_id` (marked used now); SequenceError if there is none."""
        self.expire()
        entry = self._live.get(seq_id)
        if entry is None:
            why = self._gone.get(seq_id)
            state = (
                f"sequence {seq_id}, which {why}" if why else f"sequence {seq_id}, which was never started"
            )
            raise SequenceError(
                f"sequence_id: expected a live conversation (its first request sets sequence_start=True), "
                f"got {state}. Start it again with sequence_start=True."
            )
        entry.last_used = self._clock()
        self._live.move_to_end(seq_id)
        return entry.conversation

    def end(self, seq_id: int, reason: str = "was ended (sequence_end)") -> None:
        if self._live.pop(seq_id, None) is not None:
            self._forget(seq_id, reason)

    def _forget(self, seq_id: int, reason: str) -> None:
        self._gone[seq_id] = reason
        while len(self._gone) > GONE_MEMORY:
            self._gone.popitem(last=False)

    def stats(self) -> dict[str, int]:
        return {
            "live": len(self._live),
            "expired_total": self.expired_total,
            "refused_total": self.refused_total,
        }


Outcome = np.ndarray | CmathError  # (C,) probabilities, or the error that this utterance raised


def step_conversations(
    model: EmotionModel,
    conversations: Sequence[Conversation],
    utterances: Sequence[dict[str, Any]],
    mode: str = "batched",
    batch_size: int = 64,
) -> list[Outcome]:
    """Append one utterance to each conversation and return its probabilities, in order.

    mode "batched": all conversations in one step call (Conversation.step_batch);
    "serial": one step call per conversation; "recompute": model.predict on the whole conversations (batched by
    length), which is what a bidirectional artifact needs. A bad utterance gives its own error and leaves its
    conversation as it was; the others go on.
    """
    if not conversations:
        return []
    if mode == "recompute":
        return _recompute(model, conversations, utterances, batch_size)
    if mode == "batched" and len(conversations) > 1:
        try:
            emotions = Conversation.step_batch(list(conversations), [dict(u) for u in utterances])
            return [e.probs for e in emotions]
        except CmathError:
            pass  # one utterance is bad: redo them one by one, so each gets its own answer
    out: list[Outcome] = []
    for conv, utt in zip(conversations, utterances):
        try:
            out.append(_add(conv, utt).latest.probs)
        except CmathError as e:
            out.append(e)
    return out


def _add(conv: Conversation, utt: dict[str, Any]) -> Conversation:
    fields = dict(utt)
    return conv.add(fields.pop("speaker"), **fields)


def _recompute(
    model: EmotionModel,
    conversations: Sequence[Conversation],
    utterances: Sequence[dict[str, Any]],
    batch_size: int,
) -> list[Outcome]:
    out: dict[int, Outcome] = {}
    ok = []
    for i, (conv, utt) in enumerate(zip(conversations, utterances)):
        try:
            _add(conv, utt)
            ok.append(i)
        except CmathError as e:
            out[i] = e
    if ok:
        predictions = model.predict([conversations[i] for i in ok], batch_size=batch_size)
        for i, p in zip(ok, predictions):
            out[i] = p.probs[-1]
    return [out[i] for i in range(len(conversations))]
