"""Raw text -> "t" features inside the runtime: `tokenizers` + the exported text_encoder.onnx, no torch.

The export's `text_encoder` entry (docs/artifact-format.md) names the ONNX graph (tokens -> pooled, normalised
embedding), its fp16/int8 twins when exported, and the tokenizer files. Texts are first normalised as
cmath-prepare did (cmath-clean-text-v1). A fine-tuned encoder (`turns` in the entry) reads each utterance with
its speaker and the turns around it (past ones; future ones too when its format says so), built by
`cmath_runtime.turns` exactly as in training; the plain
sentence encoder reads [CLS] text [SEP], cut on the right to max_seq_length tokens. Inputs are padded to the
longest of the batch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ArtifactError, InputError
from .files import verified_file
from .manifest import Manifest, check_agreement
from .session import open_session
from .text_clean import TEXT_NORMALISATION, clean_text
from .turns import SPECIAL_TOKENS, TurnFormat, encode_turns, special_ids
from .utterance import Utterance

TEXT_MODALITY = "t"
DEFAULT_BATCH = 32
# One utterance in its conversation: (texts, speakers, index), the turns the caller has (at least the encoder's
# window around `index`) and which of them to embed.
TurnItem = tuple[Sequence[str], Sequence[int], int]


@dataclass(frozen=True)
class TextEncoderSpec:
    """export.json's `text_encoder` entry, checked."""

    onnx_file: Path
    tokenizer_file: Path
    files: dict[str, tuple[Path, str]]  # name -> (path, sha256)
    inputs: tuple[str, ...]
    max_seq_length: int
    pooling: str
    normalize: bool
    dim: int
    text_normalisation: str | None
    turns: TurnFormat | None = None  # None: one utterance at a time, no speaker, no context
    precision: str = "fp32"

    @classmethod
    def from_manifest(cls, manifest: Manifest, precision: str = "fp32") -> TextEncoderSpec | None:
        """The entry for `precision` ("fp32", "fp16", "int8"): its own graph when the export made one whose
        agreement record passed, else the fp32 graph."""
        raw = manifest.text_encoder
        if raw is None:
            return None
        try:
            graph = f"onnx_{precision}" if f"onnx_{precision}" in raw["files"] else "onnx"
            if graph != "onnx":
                what = f"{precision} text encoder (text_encoder.variants[{precision!r}])"
                record = (raw.get("variants") or {}).get(precision)
                check_agreement(record, manifest.path, what, f"--{precision}")
            files = {
                k: (manifest.file(v["file"], f"text_encoder.files[{k!r}].file"), str(v["sha256"]))
                for k, v in raw["files"].items()
                if k == graph or not k.startswith("onnx")
            }
            turns = TurnFormat.from_json(raw["turns"]) if raw.get("turns") else None
            return cls(
                files[graph][0],
                files["tokenizer"][0],
                files,
                tuple(raw["inputs"]),
                int(raw["max_seq_length"]),
                str(raw["pooling"]),
                bool(raw["normalize"]),
                int(raw["dim"]),
                raw.get("text_normalisation"),
                turns,
                precision if graph != "onnx" else "fp32",
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ArtifactError(
                manifest.path, f"invalid manifest: text_encoder entry ({type(e).__name__}: {e})"
            ) from None


class TextEncoder:
    """Tokenizer + the encoder graph on an engine: `encode(texts)` -> (n, dim) float32, like the training features.

    The engine is any CPU backend of `cmath_runtime.session` ("cpu": onnxruntime, "openvino"), opened by the one
    session loader; `precision` is the engine's ("bf16": OpenVINO compiles the graph in bf16), the graph's own
    precision is the spec's."""

    def __init__(
        self,
        spec: TextEncoderSpec,
        threads: int | None = None,
        verify: bool = True,
        spinning: bool = False,
        backend: str = "cpu",
        precision: str = "fp32",
    ) -> None:
        from tokenizers import Tokenizer

        for name, (path, digest) in spec.files.items():
            verified_file(path, digest, f"text encoder's {name} file", verify)
        self.spec = spec
        self.tokenizer = Tokenizer.from_file(str(spec.tokenizer_file))
        self.tokenizer.no_padding()  # padded by hand, per batch, to the longest input
        if spec.turns is None:
            self.tokenizer.enable_truncation(
                max_length=spec.max_seq_length, strategy="longest_first", direction="right"
            )
        else:  # cmath_runtime.turns adds the special tokens and cuts
            self.tokenizer.no_truncation()
            ids = special_ids(self.tokenizer.token_to_id)
            if ids is None:
                raise ArtifactError(
                    spec.tokenizer_file, f"the tokenizer has none of the token pairs {SPECIAL_TOKENS}"
                )
            self._cls, self._sep = ids
        self.backend, self.precision = backend, precision
        self.session = open_session(
            spec.onnx_file,
            backend,
            precision=precision,
            threads=threads,
            inputs=spec.inputs,
            spinning=spinning,
            what="text encoder",
        ).session

    @property
    def dim(self) -> int:
        return self.spec.dim

    @property
    def label(self) -> str:
        """The precision it runs in: its graph's (fp32, fp16, int8), or bf16 when OpenVINO computes in bf16."""
        return "bf16" if self.precision == "bf16" else self.spec.precision

    def normalise(self, text: str) -> str:
        return clean_text(text) if self.spec.text_normalisation == TEXT_NORMALISATION else text.strip()

    def tokenize(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """The encoder's feeds for single texts (input_ids / attention_mask / token_type_ids, right-padded)."""
        return self.feeds(self.inputs([([t], [0], 0) for t in texts]))

    def encode(self, texts: Sequence[str], batch_size: int = DEFAULT_BATCH) -> np.ndarray:
        """(n, dim) float32 embeddings of single texts (an encoder with turns reads each as a conversation's first
        turn of speaker 0); texts of similar length are batched together."""
        texts = [_check_text(t, f"texts[{i}]") for i, t in enumerate(texts)]
        return self._run(self.inputs([([t], [0], 0) for t in texts]), batch_size)

    def encode_turns(self, items: Sequence[TurnItem], batch_size: int = DEFAULT_BATCH) -> np.ndarray:
        """(n, dim) embeddings of utterances, each given as (texts, speakers, index) of its conversation: read with
        the encoder's `turns` window, exactly as cmath-prepare read the training data."""
        return self._run(self.inputs(items), batch_size)

    def inputs(self, items: Sequence[TurnItem]) -> list[tuple[list[int], list[int]]]:
        """(input_ids, token_type_ids) the encoder reads for each item of `encode_turns` (a plain encoder: the text
        alone; one with turns: the turns its format reads around the utterance, `TurnFormat.reads`)."""
        fmt = self.spec.turns
        if fmt is None:
            return [
                self._single(e)
                for e in self.tokenizer.encode_batch([self.normalise(texts[i]) for texts, _, i in items])
            ]
        return [
            encode_turns(fmt, self._pieces, self._cls, self._sep, texts, speakers, i, i + 1)[0]
            for texts, speakers, i in items
        ]

    def encode_utterances(
        self, conversations: Sequence[tuple[Sequence[Utterance], range]], fields: Sequence[str]
    ) -> np.ndarray:
        """(n, dim) embeddings of utterances[k] for k in `which`, for each (utterances, which) of `conversations`
        in order, each read with the turns its encoder reads around it. Every turn read must have its text: an
        InputError names fields[c] (the conversation's) otherwise."""
        items: list[TurnItem] = []
        for (utterances, which), field in zip(conversations, fields, strict=True):
            self._check_known(utterances, which, field)
            texts = [u.text or "" for u in utterances]
            speakers = [u.speaker for u in utterances]
            items += [(texts, speakers, k) for k in which]
        return self.encode_turns(items)

    def _check_known(self, utterances: Sequence[Utterance], which: range, field: str) -> None:
        fmt = self.spec.turns
        read = which if fmt is None else fmt.reads(which.start, which.stop, len(utterances))
        missing = [k for k in read if utterances[k].text is None]
        if missing:
            window = fmt.window if fmt is not None else 0
            raise InputError(
                field,
                f"text for the last {window} utterances (the text encoder reads them with the new one)",
                f"utterance {missing[0]} added as features",
                "Add every utterance of a conversation with text= when its model embeds text.",
            )

    def encode_conversation(self, texts: Sequence[str], speakers: Sequence[int]) -> np.ndarray:
        """(n, dim) embeddings of every utterance of one conversation, each read with the turns around it."""
        return self.encode_turns([(texts, speakers, i) for i in range(len(texts))])

    def _pieces(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]

    @staticmethod
    def _single(e: Any) -> tuple[list[int], list[int]]:
        return list(e.ids), list(e.type_ids)

    def _run(self, inputs: list[tuple[list[int], list[int]]], batch_size: int) -> np.ndarray:
        out = np.zeros((len(inputs), self.dim), np.float32)
        order = sorted(range(len(inputs)), key=lambda i: len(inputs[i][0]))
        for k in range(0, len(order), batch_size):
            idx = order[k : k + batch_size]
            (emb,) = self.session.run(None, self.feeds([inputs[i] for i in idx]))
            out[idx] = emb
        return out

    def feeds(self, inputs: list[tuple[list[int], list[int]]]) -> dict[str, np.ndarray]:
        """The graph's feeds for `inputs` (input_ids, token_type_ids pairs), right-padded to the longest."""
        width = max(len(ids) for ids, _ in inputs)
        out = {
            k: np.zeros((len(inputs), width), np.int64)
            for k in ("input_ids", "attention_mask", "token_type_ids")
        }
        for i, (ids, types) in enumerate(inputs):
            out["input_ids"][i, : len(ids)] = ids
            out["attention_mask"][i, : len(ids)] = 1
            out["token_type_ids"][i, : len(types)] = types
        return {k: v for k, v in out.items() if k in self.spec.inputs}


def open_text_encoder(
    manifest: Manifest,
    backend: str = "cpu",
    precision: str = "fp32",
    threads: int | None = None,
    verify: bool = True,
    spinning: bool = False,
) -> TextEncoder:
    """The artifact's text encoder on `backend` ("cpu": onnxruntime, "openvino") in `precision`: "fp16" / "int8"
    read the twin graph the export made for it (refused without a passed agreement record; the fp32 graph when
    there is none), "bf16" (OpenVINO) compiles the fp32 graph in bf16."""
    spec = TextEncoderSpec.from_manifest(manifest, precision if precision in ("fp16", "int8") else "fp32")
    if spec is None:
        raise ArtifactError(manifest.path, "this export has no text encoder")
    engine = ("bf16" if precision == "bf16" else "fp32") if backend == "openvino" else spec.precision
    return TextEncoder(spec, threads, verify, spinning, backend, engine)


def check_text_features(text: Any, features: dict[str, Any], field: str) -> str:
    """An utterance given as text: a str, and no "t" features beside it."""
    if TEXT_MODALITY in features:
        raise InputError(field, "either text= or t=, not both", "both")
    return _check_text(text, field)


def resolve_texts(conversations: Any, encoder: Callable[[], TextEncoder]) -> Any:
    """The batch API: conversations given with "texts" (one string per utterance) get features["t"] from them,
    each utterance read with the turns around it that the encoder reads (`encoder()`: the model's text encoder,
    loaded only when some conversation has texts). Returns new conversation mappings; the given ones are left as
    they are."""
    if isinstance(conversations, (Mapping, str, bytes, np.ndarray)) or not hasattr(conversations, "__len__"):
        return conversations  # validation explains what is wrong
    todo = [i for i, c in enumerate(conversations) if isinstance(c, Mapping) and "texts" in c]
    if not todo:
        return conversations
    given = [_text_utterances(conversations[i], f"conversations[{i}]") for i in todo]
    fields = [f"conversations[{i}].texts" for i in todo]
    if any(given):
        emb = encoder().encode_utterances([(u, range(len(u))) for u in given], fields)
    else:  # only empty texts lists
        emb = np.zeros((0, 0), np.float32)
    out, start = list(conversations), 0
    for i, utterances in zip(todo, given):
        conv, n = out[i], len(utterances)
        feats = {**(conv.get("features") or {}), TEXT_MODALITY: emb[start : start + n]}
        out[i] = {**{k: v for k, v in conv.items() if k != "texts"}, "features": feats}
        start += n
    return out


def _text_utterances(conv: Mapping[str, Any], field: str) -> list[Utterance]:
    """A batch conversation's texts as utterances (speakers as far as they can be read: validation checks them)."""
    if isinstance(conv["texts"], (str, bytes)) or not hasattr(conv["texts"], "__len__"):
        raise InputError(
            f"{field}.texts", "a list of strings, one per utterance", type(conv["texts"]).__name__
        )
    if TEXT_MODALITY in (conv.get("features") or {}):
        raise InputError(field, "either texts or features['t'], not both", "both")
    texts = [_check_text(t, f"{field}.texts[{j}]") for j, t in enumerate(conv["texts"])]
    speakers = _speakers_for(conv.get("speakers"), len(texts), f"{field}.speakers")
    return [Utterance(s, t) for s, t in zip(speakers, texts, strict=True)]


def _speakers_for(raw: Any, n: int, field: str) -> list[int]:
    """Speaker ids to read texts with; what is wrong with them is for validation to say (0s stand in here)."""
    try:
        ids = np.asarray(raw).reshape(-1)
        if (
            len(ids) == n
            and ids.dtype.kind in "iuf"
            and np.isfinite(ids).all()
            and (ids == np.round(ids)).all()
        ):
            return [int(x) for x in ids]
    except (TypeError, ValueError, OverflowError):
        pass
    return [0] * n


def _check_text(text: Any, field: str) -> str:
    if not isinstance(text, str):
        raise InputError(field, "a str", type(text).__name__)
    return text
