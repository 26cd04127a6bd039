"""The streaming path of `Conversation`: model.step.onnx computes only the newest utterance (causal models).

The step graph (docs/artifact-format.md, export.json["step"]) takes a batch of B conversations, one new
utterance each, at different positions, with their cached state, and returns each new utterance's
probs/embedding plus the new state rows. The state of one conversation is plain numpy:

* `position`: utterances seen so far,
* `tail_{m}`: (k-1, d_m) standardised input rows the convolution still needs,
* `past_key_{cs}` / `past_value_{cs}`: (max_len, d) preallocated K/V buffers, rows [:position] valid.

`StepGraph.run_batch` is the one cache-update loop: it stacks the states (past K/V padded to the longest history;
batch 1 passes a view, no copy), runs the graph once and writes each conversation's new rows back. `Conversation`
(one at a time) and `step_batch` (many at once, for servers) both use it, and so does cmath-export's step parity.
A step costs O(n d + d^2) instead of recomputing the whole conversation. Nothing here imports torch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import ArtifactError, InputError
from .files import sha256_file
from .validation import nonfinite_output_error, nonfinite_rows

if TYPE_CHECKING:
    from .conversation import Conversation, Emotion
    from .model import EmotionModel



class StepGraph:
    """model.step.onnx on its own onnxruntime session (same provider family and threads as the model)."""

    def __init__(self, model: EmotionModel, entry: dict[str, Any]) -> None:
        from .session import open_session

        file = entry
        if model.precision == "int8":  # the int8 step graph, with its own agreement record (cmath-export --int8)
            file = entry.get("int8") or {}
            if not file or not (file.get("parity") or {}).get("passed"):
                raise ArtifactError(model.manifest.path, "no int8 step graph with a passed agreement record "
                                                         "(re-export with `cmath-export RUN_DIR --int8`)")
        path = model.manifest.file(file["file"], "step.file")
        if not path.is_file():
            raise ArtifactError(path, "the step graph listed in export.json is missing")
        if model.verify and sha256_file(path) != file["sha256"]:
            raise ArtifactError(path, "sha256 mismatch with export.json (corrupt or replaced; re-export it)")
        # Same engine as the model: CPU stays CPU, OpenVINO stays OpenVINO (same precision); a GPU model steps on
        # CUDA (the step graph's growing cache axis has no TensorRT profile). open_session checks what came up.
        backend = model.backend if model.backend in ("cpu", "openvino") else "cuda"
        precision = model.precision if backend == "openvino" else "fp32"
        names = [i["name"] for i in entry.get("inputs", [])] or None
        self.session = open_session(path, backend, precision=precision, threads=model.threads, inputs=names,
                                    spinning=model.spinning, what="step graph").session
        self.file = path
        self._setup({**entry, "sha256": file["sha256"]})

    @classmethod
    def from_session(cls, session: Any, entry: dict[str, Any]) -> StepGraph:
        """A StepGraph on a session made elsewhere (cmath-export checks its fresh graph with this same code)."""
        graph = cls.__new__(cls)
        graph.session = session
        graph._setup(entry)
        return graph

    def _setup(self, entry: dict[str, Any]) -> None:
        self.sha256: str = entry["sha256"]
        self.max_len: int = int(entry["max_len"])
        self.state_spec: list[dict[str, Any]] = [s for s in entry["state"] if s["update"] != "increment"]
        self.output_names: list[str] = [o["name"] for o in entry["outputs"]]
        speaker = next(i for i in entry["inputs"] if i["name"] == "speaker")
        # Graphs exported before the batched contract take (1,) inputs without a batch axis: run them one by one.
        self.batched: bool = speaker["shape"] != [1]

    def empty_state(self) -> dict[str, np.ndarray]:
        return {s["input"]: np.zeros(s["shape"], np.float32) for s in self.state_spec}

    def run(self, buffers: dict[str, np.ndarray], position: int, speaker: int,
            features: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """One utterance at `position`; updates `buffers` in place; returns probs (C,), embedding (d,)."""
        probs, emb = self.run_batch([buffers], [position], [speaker], [features])
        return probs[0], emb[0]

    def run_batch(self, buffers: Sequence[dict[str, np.ndarray]], positions: Sequence[int], speakers: Sequence[int],
                  features: Sequence[Mapping[str, Any]], fields: Sequence[str] | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
        """B conversations, one new utterance each, in one graph call: conversation b's state `buffers[b]` at
        `positions[b]`. Updates every buffers[b] in place; returns probs (B, C), embedding (B, d)."""
        for b, position in enumerate(positions):
            if position >= self.max_len:
                field = fields[b] if fields else f"utterances[{position}]"
                raise InputError(field, f"at most {self.max_len} utterances (the step graph's cache capacity, "
                                        "max_len)", f"utterance {position + 1}",
                                 "Start a new Conversation with the most recent utterances.")
        if not self.batched:
            outs = [self._call([buf], [pos], [spk], [feat], batch_axis=False)
                    for buf, pos, spk, feat in zip(buffers, positions, speakers, features)]
            out = {k: np.stack([o[k] for o in outs]) for k in outs[0]}
        else:
            out = self._call(buffers, positions, speakers, features, batch_axis=True)
        for b, position in enumerate(positions):
            for s in self.state_spec:
                if s["update"] == "append":
                    buffers[b][s["input"]][position] = out[s["output"]][b].reshape(-1)
                else:
                    buffers[b][s["input"]] = out[s["output"]][b]
        return out["probs"], out["embedding"]

    def _call(self, buffers: Sequence[dict[str, np.ndarray]], positions: Sequence[int], speakers: Sequence[int],
              features: Sequence[Mapping[str, Any]], batch_axis: bool) -> dict[str, np.ndarray]:
        """One session.run; outputs with a leading batch axis either way."""
        n, history = len(positions), max(positions)
        feeds: dict[str, np.ndarray] = {m: np.stack([np.asarray(f[m], np.float32).reshape(-1) for f in features])
                                        for m in features[0]}
        feeds["speaker"] = np.asarray(speakers, np.int64)
        feeds["position"] = np.asarray(positions, np.int64)
        for s in self.state_spec:
            name = s["input"]
            if s["update"] == "append" and n == 1:
                feeds[name] = buffers[0][name][None, :history]  # a view of the preallocated buffer, no copy
            elif s["update"] == "append":
                past = np.zeros((n, history, s["shape"][-1]), np.float32)  # padded to the longest history
                for b, position in enumerate(positions):
                    past[b, :position] = buffers[b][name][:position]
                feeds[name] = past
            else:
                feeds[name] = np.stack([buf[name] for buf in buffers])
        if not batch_axis:  # legacy graph: state inputs (k-1, d_m) tails, (P, d) past without the batch axis
            feeds.update({s["input"]: feeds[s["input"]][0] for s in self.state_spec})
        out = dict(zip(self.output_names, self.session.run(self.output_names, feeds)))
        if not batch_axis:  # ... and its new tails (k-1, d_m); probs, embedding, K/V rows are (1, ...) already
            out.update({s["output"]: out[s["output"]][None] for s in self.state_spec if s["update"] == "replace"})
        return out


def load_step_graph(model: EmotionModel) -> StepGraph | None:
    """The artifact's step graph, None when it has none (bidirectional); EmotionModel.step_graph loads it once."""
    entry = model.manifest.step
    return StepGraph(model, entry) if entry else None


def step_graph(model: EmotionModel) -> StepGraph | None:
    """model.step_graph (kept for callers of the function)."""
    return model.step_graph


class Stream:
    """The step state of one conversation plus the outputs computed so far."""

    def __init__(self, graph: StepGraph) -> None:
        self.graph = graph
        self.position = 0
        self.buffers = graph.empty_state()
        self.probs: list[np.ndarray] = []
        self.embedding: list[np.ndarray] = []

    def catch_up(self, speakers: list[int], features: dict[str, list[np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
        """Step through the utterances not seen yet; (probs (n, C), embedding (n, d)) of all so far."""
        while self.position < len(speakers):
            i = self.position
            p, e = self.graph.run(self.buffers, i, speakers[i], {m: rows[i] for m, rows in features.items()})
            self.probs.append(p)
            self.embedding.append(e)
            self.position += 1
        return np.stack(self.probs), np.stack(self.embedding)

    def state_dict(self) -> dict[str, np.ndarray]:
        n = self.position
        out = {f"state.{k}": (v[:n] if k.startswith("past_") else v).copy() for k, v in self.buffers.items()}
        out["state.position"] = np.asarray(n, np.int64)
        out["state.sha256"] = np.asarray(self.graph.sha256)
        if n:
            out["state.probs"], out["state.embedding"] = np.stack(self.probs), np.stack(self.embedding)
        return out

    def load(self, state: dict[str, np.ndarray]) -> None:
        if str(state.get("state.sha256", "")) != self.graph.sha256:
            raise InputError("state['state.sha256']", f"the step graph of this model ({self.graph.sha256[:16]}...)",
                             f"{str(state.get('state.sha256', 'none'))[:16]}...", "The state was saved with another model.")
        n = int(state["state.position"])
        if n > self.graph.max_len:
            raise InputError("state['state.position']", f"<= {self.graph.max_len} (cache capacity)", n)
        self.position = n
        for k, buf in self.buffers.items():
            saved = np.asarray(state[f"state.{k}"], np.float32)
            if k.startswith("past_"):
                buf[:n] = saved
            else:
                self.buffers[k] = saved.copy()
        self.probs = list(np.asarray(state["state.probs"])) if n else []
        self.embedding = list(np.asarray(state["state.embedding"])) if n else []


def step_batch(conversations: Sequence[Conversation], utterances: Sequence[Mapping[str, Any]]) -> list[Emotion]:
    """Add one utterance to each of many conversations and return each one's newest emotion, in ONE step-graph
    call (servers batch concurrent conversations with this). utterances[i] is like Conversation.add's arguments,
    {"speaker": 0, "t": ..., "a": ..., "v": ...} or {"speaker": 0, "text": "...", ...}, and goes to
    conversations[i]; each conversation ends exactly as `conversations[i].add(**utterances[i])` would leave it.
    All conversations must share one model. Nothing is changed unless every utterance is valid; errors name
    `utterances[i].field`. Models without a step graph (bidirectional) fall back to add() + latest, one by one.
    """
    from .conversation import Conversation, Emotion

    if isinstance(conversations, Conversation) or not isinstance(conversations, Sequence):
        raise InputError("conversations", "a list of Conversation", type(conversations).__name__)
    if isinstance(utterances, (Mapping, str, bytes)) or not isinstance(utterances, Sequence):
        raise InputError("utterances", "a list of dicts, one per conversation", type(utterances).__name__)
    if len(utterances) != len(conversations):
        raise InputError("utterances", f"{len(conversations)} utterances (one per conversation)", len(utterances))
    if not conversations:
        return []
    model = conversations[0].model if isinstance(conversations[0], Conversation) else None
    seen: set[int] = set()
    for i, conv in enumerate(conversations):
        if not isinstance(conv, Conversation) or conv.model is not model:
            raise InputError(f"conversations[{i}]", "a Conversation of the same model as conversations[0]",
                             type(conv).__name__ if not isinstance(conv, Conversation) else "another model")
        if id(conv) in seen:
            raise InputError(f"conversations[{i}]", "each conversation at most once per call", "a repeat")
        seen.add(id(conv))
    parsed = [_parse_utterance(conv, utt, i) for i, (conv, utt) in enumerate(zip(conversations, utterances))]
    texts: list[str | None] = [None] * len(parsed)
    given = [i for i, (_, feats) in enumerate(parsed) if "text" in feats]
    if given:  # one text-encoder call for every utterance given as text
        from .text import embed_utterances

        fields = [f"utterances[{i}].text" for i in given]
        for i, text in zip(given, embed_utterances(
                model, [conversations[i].past_turns(f) for i, f in zip(given, fields)], [parsed[i][0] for i in given],
                [parsed[i][1].pop("text") for i in given], [parsed[i][1] for i in given], fields)):
            texts[i] = text
    parsed = [(speaker, _check_features(conv, feats, i)) for i, (conv, (speaker, feats))
              in enumerate(zip(conversations, parsed))]
    graph = model.step_graph
    if graph is None:
        out = []
        for conv, (speaker, feats), text in zip(conversations, parsed, texts):
            conv.add(speaker, **feats)
            conv._texts[-1] = text
            out.append(conv.latest)
        return out

    order = sorted(range(len(conversations)), key=lambda i: id(conversations[i]))  # one lock order: no deadlock
    for i in order:
        conversations[i]._lock.acquire()
    try:
        streams = []
        for conv in conversations:  # utterances added with add() but not computed yet go through first
            if conv._stream.position < len(conv._speakers):
                conv._stream.catch_up(conv._speakers, conv._features)
            streams.append(conv._stream)
        replaced = [s["input"] for s in graph.state_spec if s["update"] == "replace"]
        before = [{k: stream.buffers[k] for k in replaced} for stream in streams]
        probs, emb = graph.run_batch([s.buffers for s in streams], [s.position for s in streams],
                                     [speaker for speaker, _ in parsed], [feats for _, feats in parsed],
                                     [f"utterances[{i}]" for i in range(len(parsed))])
        bad = nonfinite_rows(probs, emb)
        if len(bad):  # never hand out non-finite outputs: roll every conversation back (K/V rows past position
            for stream, saved in zip(streams, before):  # are not part of the state), name the utterances
                stream.buffers.update(saved)
            i = int(bad[0])
            raise nonfinite_output_error(f"utterances[{i}]", [0], {m: x[None] for m, x in parsed[i][1].items()},
                                         model.precision, "No conversation was changed.")
        out = []
        for b, (conv, stream, (speaker, feats)) in enumerate(zip(conversations, streams, parsed)):
            conv._speakers.append(speaker)
            conv._texts.append(texts[b])
            for m in model.modalities:
                conv._features[m].append(feats[m])
            conv._result = None
            conv._computed = len(conv._speakers)
            stream.probs.append(probs[b])
            stream.embedding.append(emb[b])
            stream.position += 1
            top = int(probs[b].argmax())
            out.append(Emotion(model.label_names[top], dict(zip(model.label_names, map(float, probs[b])))))
        return out
    finally:
        for i in order:
            conversations[i]._lock.release()


def _parse_utterance(conv: Conversation, utterance: Any, i: int) -> tuple[int, dict[str, Any]]:
    """Check utterances[i]'s shape and speaker as Conversation.add does, naming `utterances[i].field`."""
    from .validation import check_speaker

    field, spec = f"utterances[{i}]", conv.model.manifest
    if not isinstance(utterance, Mapping):
        raise InputError(field, "a dict with 'speaker' and one feature vector per modality (or 'text')",
                         type(utterance).__name__)
    if "speaker" not in utterance:
        raise InputError(f"{field}.speaker", f"an integer id in [0, {spec.num_speakers})", "missing")
    speaker = check_speaker(utterance["speaker"], spec, f"{field}.speaker")
    if len(conv) >= spec.max_len:
        raise InputError(field, f"at most {spec.max_len} utterances per conversation (the artifact's max_len)",
                         f"utterance {len(conv) + 1}", "Start a new Conversation with the most recent utterances.")
    return speaker, {k: v for k, v in utterance.items() if k != "speaker"}


def _check_features(conv: Conversation, features: dict[str, Any], i: int) -> dict[str, np.ndarray]:
    """The feature vectors of utterances[i], checked as Conversation.add checks them: m -> (d_m,)."""
    from .validation import check_utterance

    rows = check_utterance(features, conv.model.manifest, f"utterances[{i}].features")
    return {m: x[0] for m, x in rows.items()}
