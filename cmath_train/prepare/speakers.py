"""Speaker names -> speaker ids in [0, num_speakers), for any conversation including unseen speakers.

Two mappings, both stored in the features' meta so that a runtime can apply them to live conversations:

* "order" (default): inside each conversation, the first distinct speaker is 0, the next new one 1, ...;
  the (num_speakers)-th and later distinct speakers all share id num_speakers - 1. Names never leave their
  conversation, so an unseen speaker at test time is no different from a seen one, and the same ids mean
  the same thing on any dataset. This matches what CMATH's speaker embedding is for: telling the parties of
  one conversation apart ("the same person spoke again" vs "someone else answered"), which is what
  intra-/inter-speaker context needs. It cannot learn a person's habits across conversations.
* "frequent": the num_speakers - 1 most frequent train speakers (ties broken by name) get ids 0.., everyone
  else the shared id num_speakers - 1 ("other"). On MELD the six Friends characters speak most utterances,
  so this can learn speaker-specific priors (a character who is often angry). Costs: it only helps on data
  with the same recurring people, two different minor speakers in one conversation become indistinguishable,
  and a model can lean on identity rather than content.

Which is better for CMATH on MELD is measured with the model later; "order" is the safe default because it
generalises to any conversation.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from cmath_runtime.errors import InputError

from .csv_source import CsvTable

SPEAKER_MAPPINGS = ("order", "frequent")


class SpeakerMapping(Protocol):
    num_speakers: int

    def ids(self, speakers: list[str]) -> np.ndarray: ...

    def to_meta(self) -> dict[str, Any]: ...


@dataclass
class OrderSpeakers:
    """Per-conversation index in order of first appearance, capped at num_speakers - 1."""

    num_speakers: int

    def ids(self, speakers: list[str]) -> np.ndarray:
        first: dict[str, int] = {}
        for name in speakers:
            first.setdefault(name, min(len(first), self.num_speakers - 1))
        return np.array([first[name] for name in speakers], np.int64)

    def to_meta(self) -> dict[str, Any]:
        return {
            "mapping": "order",
            "num_speakers": self.num_speakers,
            "rule": "per conversation: id of a speaker = number of distinct speakers seen before its first "
            "utterance, capped at num_speakers - 1; names compared after text normalisation",
        }


@dataclass
class FrequentSpeakers:
    """The num_speakers - 1 most frequent train speakers by name; everyone else is "other"."""

    num_speakers: int
    names: list[str] = field(default_factory=list)  # id i <-> names[i]; id len(names) is "other"

    @classmethod
    def fit(cls, train: CsvTable, num_speakers: int) -> FrequentSpeakers:
        counts = Counter(name for d in train.dialogues for name in d.speakers)
        ranked = sorted(counts, key=lambda name: (-counts[name], name))
        return cls(num_speakers, ranked[: num_speakers - 1])

    @property
    def other(self) -> int:
        return self.num_speakers - 1

    def ids(self, speakers: list[str]) -> np.ndarray:
        index = {name: i for i, name in enumerate(self.names)}
        return np.array([index.get(name, self.other) for name in speakers], np.int64)

    def to_meta(self) -> dict[str, Any]:
        return {
            "mapping": "frequent",
            "num_speakers": self.num_speakers,
            "names": list(self.names),
            "other_id": self.other,
            "rule": "id of a speaker = its index in names (the most frequent train speakers, ties by name), "
            "any other speaker = other_id; names compared after text normalisation",
        }


def make_speaker_mapping(kind: str, num_speakers: int, train: CsvTable) -> SpeakerMapping:
    if num_speakers < 2:
        raise InputError("num_speakers", "an integer >= 2", num_speakers)
    if kind == "order":
        return OrderSpeakers(num_speakers)
    if kind == "frequent":
        return FrequentSpeakers.fit(train, num_speakers)
    raise InputError("speakers", f"one of {SPEAKER_MAPPINGS}", repr(kind))
