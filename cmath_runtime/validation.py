"""Every check on user input, before anything reaches onnxruntime.

Each failure is an InputError naming the field (e.g. `conversations[3].features['a']`), what was expected and
what came. Convertible inputs are converted: float64/float16/integer arrays and nested lists become float32
features, integer lists become int64 speaker ids; anything non-numeric is refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import InputError
from .manifest import Manifest


@dataclass(frozen=True)
class CheckedConversation:
    """A conversation that passed validation: float32 features and int64 speakers of one length n."""

    features: dict[str, np.ndarray]  # modality -> (n, d_m) float32, finite
    speakers: np.ndarray  # (n,) int64 in [0, num_speakers)

    def __len__(self) -> int:
        return len(self.speakers)


def check_conversations(conversations: Any, spec: Manifest) -> list[CheckedConversation]:
    """Validate a list of conversations; each is a mapping with 'speakers' and 'features' (or has those attributes)."""
    if isinstance(conversations, (Mapping, str, bytes, np.ndarray)) or not hasattr(conversations, "__len__"):
        got = (
            "a single conversation (wrap it in a list)" if _parts(conversations) else _describe(conversations)
        )
        raise InputError("conversations", "a list of conversations", got)
    out = []
    for i, conv in enumerate(conversations):
        parts = _parts(conv)
        if parts is None:
            raise InputError(
                f"conversations[{i}]",
                "a mapping with 'speakers' and 'features' (or an object with those attributes)",
                _describe(conv),
            )
        out.append(check_conversation(*parts, spec, f"conversations[{i}]"))
    return out


def check_conversation(
    speakers: Any, features: Any, spec: Manifest, field: str = "conversation"
) -> CheckedConversation:
    spk = check_speakers(speakers, spec, f"{field}.speakers")
    feats = check_features(features, len(spk), spec, f"{field}.features")
    return CheckedConversation(feats, spk)


def check_speakers(speakers: Any, spec: Manifest, field: str) -> np.ndarray:
    arr = _as_array(speakers, field)
    if arr.ndim != 1:
        raise InputError(field, "a 1-D sequence of speaker ids, one per utterance", f"shape {arr.shape}")
    if len(arr) == 0:
        raise InputError(field, "at least one utterance", "an empty conversation")
    check_max_len(
        len(arr), spec.max_len, field, hint="Split the conversation or re-export with a larger max_len."
    )
    whole_floats = arr.dtype.kind == "f" and np.all(np.isfinite(arr)) and np.all(arr == np.round(arr))
    if arr.dtype.kind not in "iu" and not whole_floats:  # 1.0, 2.0, ... are ids too
        raise InputError(field, "integer speaker ids", f"dtype {arr.dtype}")
    # the range is checked before any cast: 1e300 is an id out of range, not a wrapped integer
    bad = np.flatnonzero((arr < 0) | (arr >= spec.num_speakers))
    if len(bad):
        j = int(bad[0])
        raise InputError(f"{field}[{j}]", f"a speaker id in [0, {spec.num_speakers})", int(arr[j]))
    return arr.astype(np.int64, copy=False)


def check_max_len(
    n: int,
    max_len: int,
    field: str,
    capacity: str = "the artifact's max_len",
    hint: str = "Start a new Conversation with the most recent utterances.",
) -> None:
    """A conversation of `n` utterances fits the artifact: at most `max_len` (its position table and its step
    graph's K/V cache end there). Every length check of the runtime is this one."""
    if n > max_len:
        raise InputError(field, f"at most {max_len} utterances ({capacity})", f"{n} utterances", hint)


def check_speaker(speaker: Any, spec: Manifest, field: str) -> int:
    """One speaker id (Conversation.add): a Python or numpy integer in [0, num_speakers); bools are not ids."""
    is_int = isinstance(speaker, (int, np.integer)) and not isinstance(speaker, (bool, np.bool_))
    if not is_int or not 0 <= speaker < spec.num_speakers:
        raise InputError(
            field, f"an integer id in [0, {spec.num_speakers})", int(speaker) if is_int else repr(speaker)
        )
    return int(speaker)


def check_utterance(features: Any, spec: Manifest, field: str) -> dict[str, np.ndarray]:
    """One utterance's features (Conversation.add): {modality: (d_m,) or (1, d_m)} -> {modality: (1, d_m) float32}."""
    if isinstance(features, Mapping):
        features = {m: _one_row(v) for m, v in features.items()}
    return check_features(features, 1, spec, field)


def _one_row(value: Any) -> Any:
    if isinstance(value, (str, bytes)) or value is None:
        return value
    try:
        arr = np.asarray(value)
    except (ValueError, TypeError):
        return value  # check_modality explains
    return arr[None, :] if arr.ndim == 1 else arr


def check_features(features: Any, n: int, spec: Manifest, field: str) -> dict[str, np.ndarray]:
    if not isinstance(features, Mapping):
        raise InputError(field, "a dict {modality: (utterances, feature_size) array}", _describe(features))
    missing = [m for m in spec.modalities if m not in features]
    extra = sorted(str(m) for m in features if m not in spec.modalities)
    if missing or extra:
        what = "; ".join(
            s for s in (f"missing {missing}" if missing else "", f"extra {extra}" if extra else "") if s
        )
        raise InputError(
            field, f"exactly the modalities {list(spec.modalities)}", f"{sorted(map(str, features))} ({what})"
        )
    return {
        m: check_modality(features[m], n, spec.feature_dims[m], f"{field}[{m!r}]") for m in spec.modalities
    }


def check_modality(value: Any, n: int, dim: int, field: str) -> np.ndarray:
    arr = _as_array(value, field)
    if arr.dtype.kind not in "fiu":
        raise InputError(field, "a numeric (float) array", f"dtype {arr.dtype}")
    if arr.shape != (n, dim):
        raise InputError(field, f"shape ({n}, {dim}) (utterances, feature size)", f"shape {arr.shape}")
    with np.errstate(over="ignore"):
        arr = np.ascontiguousarray(arr, dtype=np.float32)
    finite = np.isfinite(arr)
    if not finite.all():
        j = int(np.flatnonzero(~finite.all(axis=1))[0])
        kind = "NaN" if np.isnan(arr[j]).any() else "inf (or a value beyond float32's range)"
        raise InputError(field, "finite values", f"{kind} in utterance {j}")
    return arr


def nonfinite_rows(*outputs: np.ndarray) -> np.ndarray:
    """Indices of the rows (leading axis) where any output holds NaN/inf."""
    bad = np.zeros(len(outputs[0]), bool)
    for out in outputs:
        bad |= ~np.isfinite(out.reshape(len(out), -1)).all(axis=1)
    return np.flatnonzero(bad)


def nonfinite_output_error(
    field: str, rows: Any, features: dict[str, np.ndarray], precision: str, hint: str = ""
) -> InputError:
    """The InputError for inputs the model cannot compute finitely: names the rows and the most extreme value.

    Finite but extreme features (e.g. 1e30) overflow once standardised and pushed through attention and norms
    (fp32: squares beyond 3.4e38; fp16 artifacts: standardised values beyond 65504); the runtime never hands such
    outputs back."""
    worst_m, worst_j, worst = "", 0, -1.0
    for m, x in features.items():
        if x.size:
            mags = np.abs(x.astype(np.float64)).max(axis=1)
            j = int(mags.argmax())
            if mags[j] > worst:
                worst_m, worst_j, worst = m, j, float(mags[j])
    rows = [int(r) for r in rows]
    shown = rows if len(rows) <= 10 else [*rows[:10], "..."]
    return InputError(
        field,
        f"features this {precision} model computes finitely (standardised values well within "
        f"the {precision} range)",
        f"non-finite probabilities for utterances {shown}; the largest |feature| is {worst:.3g} "
        f"(utterance {worst_j}, modality {worst_m!r})",
        hint or "Check the features' scale.",
    )


def _as_array(value: Any, field: str) -> np.ndarray:
    if isinstance(value, (str, bytes)) or value is None:
        raise InputError(field, "a numeric array", _describe(value))
    try:
        return np.asarray(value)
    except (ValueError, TypeError) as e:  # ragged nested lists and the like
        raise InputError(
            field, "a rectangular numeric array", f"{type(value).__name__} that numpy cannot convert ({e})"
        ) from None


def _parts(conv: Any) -> tuple[Any, Any] | None:
    """(speakers, features) of a mapping or an object with those attributes; None if it has neither."""
    if isinstance(conv, Mapping):
        return (conv["speakers"], conv["features"]) if {"speakers", "features"} <= set(conv) else None
    if hasattr(conv, "speakers") and hasattr(conv, "features"):
        return conv.speakers, conv.features
    return None


def _describe(value: Any) -> str:
    if isinstance(value, np.ndarray):
        return f"ndarray of shape {value.shape}, dtype {value.dtype}"
    if isinstance(value, Mapping):
        return f"{type(value).__name__} with keys {sorted(map(str, value))}"
    return type(value).__name__
