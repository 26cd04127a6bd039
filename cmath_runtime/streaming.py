"""The streaming path of `Conversation`: model.step.onnx computes only the newest utterance (causal models).

The step graph (docs/artifact-format.md, export.json["step"]) takes the new utterance and the cached state and
returns the new utterance's probs/embedding plus the new state rows. The state is plain numpy:

* `position`: utterances seen so far,
* `tail_{m}`: (k-1, d_m) standardised input rows the convolution still needs,
* `past_key_{cs}` / `past_value_{cs}`: (max_len, d) preallocated K/V buffers, rows [:position] valid.

A step costs O(n d + d^2) instead of recomputing the whole conversation. Nothing here imports torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import ArtifactError, InputError
from .files import sha256_file

if TYPE_CHECKING:
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
                                    what="step graph").session
        self.file = path
        self.sha256: str = file["sha256"]
        self.max_len: int = int(entry["max_len"])
        self.state_spec: list[dict[str, Any]] = [s for s in entry["state"] if s["update"] != "increment"]
        self.output_names: list[str] = [o["name"] for o in entry["outputs"]]

    def empty_state(self) -> dict[str, np.ndarray]:
        return {s["input"]: np.zeros(s["shape"], np.float32) for s in self.state_spec}

    def run(self, buffers: dict[str, np.ndarray], position: int, speaker: int,
            features: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """One utterance at `position`; updates `buffers` in place; returns probs (C,), embedding (d,)."""
        if position >= self.max_len:
            raise InputError(f"utterances[{position}]", f"at most {self.max_len} utterances (the step graph's cache "
                                                        "capacity, max_len)", f"utterance {position + 1}",
                             "Start a new Conversation with the most recent utterances.")
        feeds: dict[str, np.ndarray] = {m: np.asarray(x, np.float32).reshape(1, -1) for m, x in features.items()}
        feeds["speaker"] = np.array([speaker], np.int64)
        feeds["position"] = np.array([position], np.int64)
        for s in self.state_spec:
            buf = buffers[s["input"]]
            feeds[s["input"]] = buf[:position] if s["update"] == "append" else buf
        out = dict(zip(self.output_names, self.session.run(self.output_names, feeds)))
        for s in self.state_spec:
            if s["update"] == "append":
                buffers[s["input"]][position] = out[s["output"]][0]
            else:
                buffers[s["input"]] = out[s["output"]]
        return out["probs"][0], out["embedding"][0]


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
