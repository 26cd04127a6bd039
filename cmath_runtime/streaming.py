"""The step path of `Conversation`: model.step.onnx computes only the newest utterance (causal models).

The step graph (docs/artifact-format.md, export.json["step"]) takes a batch of B conversations, one new
utterance each, at different positions, with their cached state, and returns each new utterance's
probs/embedding plus the new state rows. The state of one conversation (`Stream`) is plain numpy:

* `position`: utterances seen so far,
* `tail_{m}`: (k-1, d_m) standardised input rows the convolution still needs,
* `past_key_{cs}` / `past_value_{cs}`: (max_len, d) preallocated K/V buffers, rows [:position] valid.

`StepGraph.run_batch` is the one cache-update loop: it stacks the states (past K/V padded to the longest history;
batch 1 passes a view, no copy), runs the graph once and writes each conversation's new rows back. A `Stream`
steps itself through it (`catch_up`), and `Stream.step_many` steps many at once (`Conversation.step_batch`);
cmath-export's step parity runs the same `Stream`. A step costs O(n d + d^2) instead of recomputing the whole
conversation. This module knows graphs and states only: which file a model's step graph is, and whose
conversation a state is, are `EmotionModel`'s and `Conversation`'s.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ArtifactError
from .validation import check_max_len, nonfinite_output_error, nonfinite_rows


class StepGraph:
    """model.step.onnx on a session (`EmotionModel.step_graph` opens it; cmath-export opens its fresh graph)
    and its export.json entry: the state layout and the cache capacity."""

    def __init__(self, session: Any, entry: dict[str, Any], file: Path | None = None) -> None:
        self.session = session
        self.file = file  # the graph's file, when it was opened from one
        self.sha256: str = entry["sha256"]
        self.max_len: int = int(entry["max_len"])
        self.state_spec: list[dict[str, Any]] = [s for s in entry["state"] if s["update"] != "increment"]
        self.output_names: list[str] = [o["name"] for o in entry["outputs"]]
        speaker = next(i for i in entry["inputs"] if i["name"] == "speaker")
        if speaker["shape"] == [1]:  # every input has a leading batch axis: B conversations per call
            raise ArtifactError(
                entry.get("file", "step graph"),
                "this step graph takes one conversation per "
                "call (inputs without a batch axis), which this cmath does not run; "
                "re-export it",
            )

    def empty_state(self) -> dict[str, np.ndarray]:
        return {s["input"]: np.zeros(s["shape"], np.float32) for s in self.state_spec}

    def run(
        self, buffers: dict[str, np.ndarray], position: int, speaker: int, features: dict[str, np.ndarray]
    ) -> tuple[np.ndarray, np.ndarray]:
        """One utterance at `position`; updates `buffers` in place; returns probs (C,), embedding (d,)."""
        probs, emb = self.run_batch([buffers], [position], [speaker], [features])
        return probs[0], emb[0]

    def run_batch(
        self,
        buffers: Sequence[dict[str, np.ndarray]],
        positions: Sequence[int],
        speakers: Sequence[int],
        features: Sequence[Mapping[str, Any]],
        fields: Sequence[str] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """B conversations, one new utterance each, in one graph call: conversation b's state `buffers[b]` at
        `positions[b]`. Updates every buffers[b] in place; returns probs (B, C), embedding (B, d)."""
        for b, position in enumerate(positions):
            check_max_len(
                position + 1,
                self.max_len,
                fields[b] if fields else f"utterances[{position}]",
                "the step graph's cache capacity, max_len",
            )
        out = self._call(buffers, positions, speakers, features)
        for b, position in enumerate(positions):
            for s in self.state_spec:
                if s["update"] == "append":
                    buffers[b][s["input"]][position] = out[s["output"]][b].reshape(-1)
                else:
                    buffers[b][s["input"]] = out[s["output"]][b]
        return out["probs"], out["embedding"]

    def _call(
        self,
        buffers: Sequence[dict[str, np.ndarray]],
        positions: Sequence[int],
        speakers: Sequence[int],
        features: Sequence[Mapping[str, Any]],
    ) -> dict[str, np.ndarray]:
        """One session.run over the stacked states; every output has a leading batch axis."""
        n, history = len(positions), max(positions)
        feeds: dict[str, np.ndarray] = {
            m: np.stack([np.asarray(f[m], np.float32).reshape(-1) for f in features]) for m in features[0]
        }
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
        return dict(zip(self.output_names, self.session.run(self.output_names, feeds)))


class Stream:
    """The step state of one conversation plus the outputs computed so far."""

    def __init__(self, graph: StepGraph) -> None:
        self.graph = graph
        self.position = 0
        self.buffers = graph.empty_state()
        self.probs: list[np.ndarray] = []
        self.embedding: list[np.ndarray] = []

    def catch_up(
        self, speakers: list[int], features: dict[str, list[np.ndarray]]
    ) -> tuple[np.ndarray, np.ndarray]:
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

    def load(self, state: Mapping[str, np.ndarray]) -> None:
        """Continue from `state_dict()`'s keys (checked by the caller: cmath_runtime.state.check_state)."""
        n = int(state["state.position"])
        self.position = n
        for k, buf in self.buffers.items():
            saved = np.asarray(state[f"state.{k}"], np.float32)
            if k.startswith("past_"):
                buf[:n] = saved
            else:
                self.buffers[k] = saved.copy()
        self.probs = list(np.asarray(state["state.probs"])) if n else []
        self.embedding = list(np.asarray(state["state.embedding"])) if n else []

    @staticmethod
    def step_many(
        streams: Sequence[Stream],
        speakers: Sequence[int],
        features: Sequence[Mapping[str, np.ndarray]],
        precision: str,
    ) -> tuple[np.ndarray, np.ndarray]:
        """One new utterance for each of `streams` (all on one graph, each caught up) in ONE graph call:
        (probs (B, C), embedding (B, d)). All or nothing: when any output is not finite, every stream is left
        as it was (K/V rows past `position` are not part of a state) and an InputError names
        `utterances[i]`."""
        graph = streams[0].graph
        replaced = [s["input"] for s in graph.state_spec if s["update"] == "replace"]
        before = [{k: stream.buffers[k] for k in replaced} for stream in streams]
        fields = [f"utterances[{i}]" for i in range(len(streams))]
        probs, emb = graph.run_batch(
            [s.buffers for s in streams], [s.position for s in streams], speakers, features, fields
        )
        bad = nonfinite_rows(probs, emb)
        if len(bad):
            for stream, saved in zip(streams, before):
                stream.buffers.update(saved)
            i = int(bad[0])
            raise nonfinite_output_error(
                f"utterances[{i}]",
                [0],
                {m: np.asarray(x)[None] for m, x in features[i].items()},
                precision,
                "No conversation was changed.",
            )
        for b, stream in enumerate(streams):
            stream.probs.append(probs[b])
            stream.embedding.append(emb[b])
            stream.position += 1
        return probs, emb
