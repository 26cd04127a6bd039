"""One utterance as the runtime carries it: who spoke, what was said (when given as text), its feature vectors.

`Conversation` keeps a list of them, the text encoder reads them with the turns around them, and a state file
(state.py) stores their fields as arrays. Frozen: an utterance, once checked, is never changed in place.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True, eq=False)
class Utterance:
    speaker: int  # the speaker's id, in [0, num_speakers)
    text: str | None = (
        None  # None: added as feature vectors only (a text encoder cannot read it as a past turn)
    )
    features: Mapping[str, np.ndarray] = field(
        default_factory=dict
    )  # {modality: (d_m,) float32}, once checked
