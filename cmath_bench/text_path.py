"""Raw text -> emotion for one new utterance in a live conversation: each engine against the text path's floor.

    python -m cmath_bench.text_path RUN_DIR --csv-dir DIR [--export DIR] [--threads N] [--quick] [--parity]
                                   [--frozen-encoder DIR] [--out DIR]

One timed call (batch 1) is what an agent does when a line arrives: `conv.add(speaker, text=...)` on a conversation
that already holds HISTORY (20) turns, then reading `conv.latest`. The text encoder reads the new utterance with its
speaker and past turns (cmath_runtime.turns), the model gives its emotion. The 20-turn conversations are built before
any timing from real texts (MELD dev, consecutive utterances; else the export's probe texts) and every timed call
adds to a copy of one of them (Conversation.copy(), made untimed before each block of calls).

Contenders, timed in interleaved rounds (cmath_bench.timing; the machine is let go quiet after every block):
- runtime fp32 / runtime int8: cmath_runtime.load(precision=...); int8 reads text_encoder.int8.onnx + model.int8.onnx;
- pytorch: the same pipeline in PyTorch: the same token ids (tokenizer.json through `tokenizers` + cmath_runtime.turns,
  as cmath-prepare builds them), the encoder's torch twin (PooledEncoder on the fine-tuned HF model) and the run's
  checkpoint in eager mode on the whole conversation; torch threads = the runtime's threads;
- frozen: the plain all-MiniLM-L6-v2 reading the utterance alone (exported to ONNX once, in a temp dir) + the same
  fp32 model: what reading the context costs.
Two read-bandwidth probes (roofline.ReadProbe: numpy sums and an onnxruntime GEMV over a buffer 4x the last-level
cache or more) run in the same rounds.

The floor of a contender's call is max(weight bytes read / read bandwidth, FLOPs / fp32 matmul peak): the bytes are
the initializers its encoder graph and model graph read in that call (embedding tables: the rows of its tokens only;
roofline.WeightReads), the FLOPs those of the encoder at the call's token count (the median timed utterance) plus
the model graph's (roofline.FlopCounter), the read bandwidth the faster of the two probes' medians in the same rounds.
Every record carries p50 / floor; the report gives int8 vs fp32 (bar 1.6x), runtime fp32 vs PyTorch and context vs
frozen, all from the same run.

Parity (`replay_parity`, --parity): MELD dev dialogues replayed utterance by utterance through
Conversation.add(text=) against the PyTorch pipeline on each whole dialogue, max |dp| of the final probabilities
(bar 1e-4, fp32), and the int8 path's argmax agreement with fp32 (bar 99%).

cmath-bench calls `report_text_path` (bench_text.json, bench_text.md, bench_text.png) when the export has a text
encoder.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import host, roofline
from .timing import Budget, interleaved, percentiles_ms, quiesce

DEV_CSV = "dev_sent_emo.csv"
HISTORY = 20  # turns a live conversation holds before the timed utterance
BUDGET = Budget(warmup=3, iterations=60, seconds=4.0, min_iterations=10, rounds=6)
QUICK_BUDGET = Budget(warmup=1, iterations=8, seconds=1.0, min_iterations=3, rounds=2)
LIVE, QUICK_LIVE = 12, 4  # distinct live conversations the timed calls cycle through
PARITY_DIALOGUES = 100
EXACT = 1e-4  # max |dp| of the fp32 runtime vs the PyTorch pipeline
INT8_AGREEMENT = 0.99  # int8 path's argmax agreement with fp32
INT8_SPEEDUP = 1.6  # int8 text path vs fp32, p50, same run
FP32, INT8, TORCH, FROZEN = "runtime fp32", "runtime int8", "pytorch", "frozen"
PEAK_N = 1024  # the peak probes' MatMul size (2.1 GFLOP a call: short enough to sit among the contenders)
PROBE_CALLS = 3  # probe calls per block at most (each reads 256 MiB or does 2 GFLOP)


@dataclass(frozen=True)
class Dialogue:
    """Texts and integer speaker ids of one conversation, in order."""

    texts: list[str]
    speakers: list[int]


def dev_dialogues(csv_file: Path, num_speakers: int, limit: int | None = None) -> list[Dialogue]:
    """The dialogues of a MELD-style CSV read as cmath-prepare reads them (cleaned texts; speaker ids by first
    appearance in the dialogue, cmath-prepare's default mapping)."""
    from cmath_train.prepare.csv_source import read_conversations
    from cmath_train.prepare.speakers import OrderSpeakers

    ids = OrderSpeakers(num_speakers)
    return [
        Dialogue(list(d.texts), [int(s) for s in ids.ids(d.speakers)])
        for d in read_conversations(csv_file).dialogues[:limit]
    ]


def probe_dialogue() -> Dialogue:
    """The export's probe texts (cmath_export.text_encoder.PROBE_TEXTS) as one two-speaker conversation."""
    from cmath_export.text_encoder import PROBE_TEXTS

    return Dialogue(list(PROBE_TEXTS), [i % 2 for i in range(len(PROBE_TEXTS))])


def text_source(csv_dir: Path | None, num_speakers: int) -> tuple[list[Dialogue], str]:
    """MELD dev dialogues from `csv_dir`, or the export's probe texts when no folder is given."""
    if csv_dir is None:
        return [probe_dialogue()], "the export's probe texts (no MELD dev CSV given)"
    csv_file = csv_dir / DEV_CSV
    if not csv_file.is_file():
        raise FileNotFoundError(f"--csv-dir: expected a folder holding {DEV_CSV}, got {csv_dir}")
    return dev_dialogues(csv_file, num_speakers), f"MELD dev ({DEV_CSV})"


def live_conversations(
    dialogues: Sequence[Dialogue], count: int, num_speakers: int, history: int = HISTORY
) -> list[Dialogue]:
    """`count` conversations of history + 1 utterances (the past, then the timed one): consecutive utterances of the
    dialogues read as one stream (round and round when it is short), speaker ids counted anew in each."""
    stream = [(t, (k, s)) for k, d in enumerate(dialogues) for t, s in zip(d.texts, d.speakers, strict=True)]
    if not stream:
        raise ValueError("live_conversations: no texts")
    n = history + 1
    out = []
    for c in range(count):
        part = [stream[(c * n + i) % len(stream)] for i in range(n)]
        first: dict[tuple[int, int], int] = {}
        speakers = [first.setdefault(who, min(len(first), num_speakers - 1)) for _, who in part]
        out.append(Dialogue([t for t, _ in part], speakers))
    return out


class TurnTokens:
    """(input_ids, token_type_ids) of a new utterance as the encoder reads it: the runtime's own
    `TextEncoder.inputs` (tokenizer.json through `tokenizers`, then cmath_runtime.turns, as cmath-prepare makes them;
    a plain encoder: [CLS] text [SEP], cut at max_seq_length)."""

    def __init__(self, spec: Any) -> None:  # cmath_runtime.text.TextEncoderSpec
        from cmath_runtime.text import TextEncoder

        self.spec = spec
        self.encoder = TextEncoder(spec, threads=1, verify=False)

    def __call__(
        self, texts: Sequence[str], speakers: Sequence[int], speaker: int, text: str
    ) -> tuple[list[int], list[int]]:
        return self.encoder.inputs([([*texts, text], [*speakers, speaker], len(texts))])[0]

    def feeds(self, pair: tuple[list[int], list[int]]) -> dict[str, np.ndarray]:
        """The encoder graph's feeds for one input (batch 1, no padding)."""
        return self.encoder.feeds([pair])


class TorchPipeline:
    """The runtime's text path in PyTorch: TurnTokens -> PooledEncoder (the encoder's torch twin, on the fine-tuned HF
    model export.json's `text_encoder.source` names) -> the run's checkpoint, eager, on the whole conversation."""

    def __init__(self, run_dir: Path, source: str | Path, spec: Any, feature_dims: dict[str, int]) -> None:
        from cmath_train.checkpoint import load_checkpoint
        from cmath_train.prepare.pooled import PooledEncoder
        from cmath_train.prepare.text_encoder import SentenceTransformerEncoder

        st = SentenceTransformerEncoder.load(source)
        self.encoder = PooledEncoder(
            st.model[0].auto_model, spec.pooling, spec.normalize, first_segment=spec.turns is not None
        ).eval()
        self.net = load_checkpoint(run_dir).model.eval()
        self.tokens = TurnTokens(spec)
        self.others = {
            m: d for m, d in feature_dims.items() if m != "t"
        }  # zeros: the text path gives only "t"

    def embed(self, dialogue: Dialogue) -> np.ndarray:
        """(n, dim) features of every utterance, each read with its own past (batched, for set-up and parity)."""
        from cmath_train.prepare.pooled import embed

        d = dialogue
        return embed(
            self.encoder,
            [
                self.tokens(d.texts[:i], d.speakers[:i], d.speakers[i], d.texts[i])
                for i in range(len(d.texts))
            ],
        )

    def probs(self, features: Any, speakers: Sequence[int]) -> np.ndarray:
        """(n, classes) probabilities of a whole conversation from its (n, dim) text features."""
        import torch

        x = torch.as_tensor(np.asarray(features, np.float32))[None]
        n = x.shape[1]
        feats = {"t": x, **{m: torch.zeros(1, n, d) for m, d in self.others.items()}}
        with torch.inference_mode():
            out = self.net(feats, torch.tensor([list(speakers)]), torch.ones(1, n, dtype=torch.bool))
            return torch.softmax(out.logits, -1)[0].numpy()

    def start(self, dialogue: Dialogue) -> tuple[Dialogue, Any]:
        import torch

        past = Dialogue(dialogue.texts[:-1], dialogue.speakers[:-1])
        return past, torch.from_numpy(self.embed(past))

    def call(self, state: tuple[Dialogue, Any], speaker: int, text: str) -> np.ndarray:
        """The timed call: tokens of the new utterance with its past -> encoder -> model on the whole conversation."""
        import torch

        from cmath_train.prepare.pooled import collate

        past, feats = state
        batch = collate([self.tokens(past.texts, past.speakers, speaker, text)])
        with torch.inference_mode():
            row = self.encoder(**{k: v for k, v in batch.items() if k in self.tokens.spec.inputs})
            x = torch.cat([feats, row])
        return self.probs(x, [*past.speakers, speaker])[-1]


@dataclass
class Contender:
    """One way to add the new utterance: `start` (untimed) makes a live conversation of a dialogue's past, `fork`
    (untimed) a private copy for one call, `call(state, speaker, text)` (timed) adds the utterance and returns its
    probabilities. `cost` is the work of one call, for the floor."""

    name: str
    encoder: str  # what reads the text
    precision: str
    start: Callable[[Dialogue], Any]
    fork: Callable[[Any], Any]
    call: Callable[[Any, int, str], Any]
    model: Any = None  # the cmath_runtime.EmotionModel it runs on (runtime and frozen contenders)
    cost: dict[str, Any] = field(default_factory=dict)


def runtime_contender(name: str, model: Any, encoder: str) -> Contender:
    """cmath_runtime: Conversation.add(text=) + .latest, on a copy of a conversation holding the past."""
    from cmath_runtime import Conversation

    others = {m: np.zeros(d, np.float32) for m, d in model.feature_dims.items() if m != "t"}

    def start(d: Dialogue) -> Any:
        conv = Conversation(model)
        for s, t in zip(d.speakers[:-1], d.texts[:-1], strict=True):
            conv.add(s, text=t, **others)
        conv.latest  # noqa: B018  computed now (step path: the cached state), not in the timed call
        return conv

    def call(conv: Any, speaker: int, text: str) -> Any:
        return conv.add(speaker, text=text, **others).latest

    return Contender(name, encoder, model.precision, start, lambda conv: conv.copy(), call, model)


def frozen_contender(model: Any, frozen: Any, label: str) -> Contender:
    """The plain sentence encoder (a cmath_runtime.text.TextEncoder) reading the utterance alone, + the model."""
    from cmath_runtime import Conversation

    others = {m: np.zeros(d, np.float32) for m, d in model.feature_dims.items() if m != "t"}

    def start(d: Dialogue) -> Any:
        conv = Conversation(model)
        for s, row in zip(d.speakers[:-1], frozen.encode(d.texts[:-1]), strict=True):
            conv.add(s, t=row, **others)
        conv.latest  # noqa: B018
        return conv

    def call(conv: Any, speaker: int, text: str) -> Any:
        return conv.add(speaker, t=frozen.encode([text])[0], **others).latest

    return Contender(
        FROZEN, f"{label} (frozen), the utterance alone", "fp32", start, lambda conv: conv.copy(), call, model
    )


@contextlib.contextmanager
def frozen_encoder(model_dir: Path | None, text_normalisation: str | None) -> Iterator[tuple[Any, str]]:
    """(TextEncoderSpec, name) of a plain sentence-transformers encoder (default: the bundled all-MiniLM-L6-v2)
    exported to ONNX in a temp dir by cmath_export's text-encoder export (parity-checked against
    sentence-transformers there), for as long as the context lasts."""
    from cmath_export.text_encoder import export_text_encoder
    from cmath_runtime.text import TextEncoderSpec
    from cmath_train.prepare.text_encoder import SentenceTransformerEncoder

    meta = SentenceTransformerEncoder.load(model_dir).describe()
    with tempfile.TemporaryDirectory(prefix="cmath-frozen-") as tmp:
        staging = Path(tmp)
        entry = export_text_encoder(
            {"data": {"text_encoder": meta, "text_normalisation": text_normalisation}}, ("t",), staging
        )
        assert entry is not None  # a sentence-transformers encoder always exports
        files = {k: (staging / v["file"], v["sha256"]) for k, v in entry["files"].items()}
        spec = TextEncoderSpec(
            files["onnx"][0],
            files["tokenizer"][0],
            files,
            tuple(entry["inputs"]),
            int(entry["max_seq_length"]),
            str(entry["pooling"]),
            bool(entry["normalize"]),
            int(entry["dim"]),
            entry["text_normalisation"],
        )
        yield spec, str(entry["name"])


@contextlib.contextmanager
def recording(holder: Any) -> Iterator[dict[str, np.ndarray]]:
    """While inside, `holder.session.run` records its last feeds into the yielded dict (for counting FLOPs and bytes
    of a real call)."""
    session, feeds = holder.session, {}

    class Recorder:
        def run(self, names: Any, inputs: dict[str, np.ndarray]) -> Any:
            feeds.clear()
            feeds.update(inputs)
            return session.run(names, inputs)

        def __getattr__(self, name: str) -> Any:
            return getattr(session, name)

    holder.session = Recorder()
    try:
        yield feeds
    finally:
        holder.session = session


def model_graph(model: Any) -> Path:
    """The graph a Conversation of `model` runs for a new utterance: its step graph, else its model file."""
    from cmath_runtime.session import PRECISIONS

    graph = model.step_graph
    if graph is not None:
        return Path(graph.file)
    return model.manifest.artifacts[PRECISIONS[model.precision].artifact_key("cpu")].path


def model_feeds(model: Any, conv: Any, dialogue: Dialogue) -> dict[str, np.ndarray]:
    """The model graph's feeds when `conv` (a live runtime conversation, copied here) gets the dialogue's last
    utterance."""
    from cmath_runtime.batching import pad_conversations

    conv = conv.copy()
    others = {m: np.zeros(d, np.float32) for m, d in model.feature_dims.items() if m != "t"}
    graph = model.step_graph
    if graph is None:
        conv.add(dialogue.speakers[-1], text=dialogue.texts[-1], **others)
        feats, speaker, mask = pad_conversations([conv.features], [conv.speakers], model.modalities)
        return {**feats, "speaker": speaker, "mask": mask}
    with recording(graph) as feeds:
        conv.add(dialogue.speakers[-1], text=dialogue.texts[-1], **others).latest  # noqa: B018
        return dict(feeds)


class CostCounter:
    """Weight bytes read and FLOPs of one call (roofline.WeightReads / FlopCounter), one counter per graph file."""

    def __init__(self) -> None:
        self.reads: dict[Path, roofline.WeightReads] = {}
        self.flops: dict[Path, roofline.FlopCounter] = {}

    def __call__(
        self,
        encoder: tuple[Path, Path, dict[str, np.ndarray]],
        model: tuple[Path, Path, dict[str, np.ndarray]],
    ) -> dict[str, Any]:
        """encoder / model: (graph the contender runs, its fp32 twin, feeds); FLOPs are counted on the fp32 twin."""
        parts = {}
        for part, (graph, fp32, feeds) in (("encoder", encoder), ("model", model)):
            reads = self.reads.setdefault(graph, roofline.WeightReads(graph))
            count = self.flops.setdefault(fp32, roofline.FlopCounter(fp32))
            parts[part] = (reads(feeds), count(feeds))
        return {
            "weight_bytes": parts["encoder"][0] + parts["model"][0],
            "flops": parts["encoder"][1] + parts["model"][1],
            "encoder_weight_bytes": parts["encoder"][0],
            "model_weight_bytes": parts["model"][0],
            "encoder_flops": parts["encoder"][1],
            "model_flops": parts["model"][1],
            "graphs": f"{encoder[0].name} + {model[0].name}",
        }


def _median_call(
    tokens: Callable[[Dialogue], tuple[list[int], list[int]]], live: list[Dialogue]
) -> tuple[int, Dialogue, list[int]]:
    """(index, dialogue) of the live conversation whose new utterance has the median token count, and all counts."""
    counts = [len(tokens(d)[0]) for d in live]
    order = np.argsort(counts, kind="stable")
    k = int(order[len(order) // 2])
    return k, live[k], counts


def _timer(
    c: Contender, states: list[Any], live: list[Dialogue]
) -> Callable[[int, float | None], list[float]]:
    """cmath_bench.timing's Timer for a contender: forks `count` live conversations (untimed), then times one call on
    each, cycling through them, stopping early at the block's deadline."""
    turn = itertools.count()

    def run(count: int, seconds: float | None) -> list[float]:
        jobs = []
        for _ in range(count):
            k = next(turn) % len(live)
            jobs.append((c.fork(states[k]), live[k].speakers[-1], live[k].texts[-1]))
        deadline = None if seconds is None else time.perf_counter() + seconds
        times = []
        for state, speaker, text in jobs:
            start = time.perf_counter()
            c.call(state, speaker, text)
            times.append(time.perf_counter() - start)
            if deadline is not None and time.perf_counter() > deadline:
                break
        return times

    return run


def _probe_timer(probe: Callable[[], float]) -> Callable[[int, float | None], list[float]]:
    """A probe's Timer: at most PROBE_CALLS calls a block (each call returns its own seconds)."""

    def run(count: int, seconds: float | None) -> list[float]:
        deadline = None if seconds is None else time.perf_counter() + seconds
        times = []
        for _ in range(min(count, PROBE_CALLS)):
            times.append(probe())
            if deadline is not None and time.perf_counter() > deadline:
                break
        return times

    return run


def run_text_path(
    run_dir: Path,
    export_dir: Path,
    threads: int = 1,
    budget: Budget = BUDGET,
    live: int = LIVE,
    dialogues: list[Dialogue] | None = None,
    csv_dir: Path | None = None,
    frozen_dir: Path | None = None,
    machine: roofline.Machine | None = None,
    read_mib: int | None = None,
    peak_n: int = PEAK_N,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """The text-path report (JSON-able): one record per contender (p50/p90, tokens, weight bytes, FLOPs, floor,
    x floor), the machine's limits measured in the same rounds (make_probes) and the ratios. `dialogues` (default:
    text_source(csv_dir)) give the live conversations' texts; `frozen_dir` the plain encoder (default: the bundled
    all-MiniLM-L6-v2); `machine` the limits cmath-bench measured before any contender (reported beside, not used);
    `read_mib` / `peak_n` the probes' sizes (tests make them small)."""
    import cmath_runtime
    from cmath_runtime.manifest import read_manifest
    from cmath_runtime.text import TextEncoder

    from .backends import set_torch_threads

    set_torch_threads(threads)
    fp32 = cmath_runtime.load(export_dir, backend="cpu", threads=threads)
    spec = fp32.text_encoder.spec
    source = f"{len(dialogues)} given dialogues" if dialogues is not None else ""
    if dialogues is None:
        dialogues, source = text_source(csv_dir, fp32.num_speakers)
    convs = live_conversations(dialogues, live, fp32.num_speakers, min(HISTORY, fp32.max_len - 1))
    history = len(convs[0].texts) - 1
    log(f"text path: {len(convs)} live conversations of {history} turns from {source}, {threads} threads")
    reads = "fine-tuned, reads speaker + past turns" if spec.turns else "reads the utterance alone"
    contenders = {FP32: runtime_contender(FP32, fp32, f"{spec.onnx_file.name} ({reads})")}
    skipped: dict[str, str] = {}
    try:
        int8 = cmath_runtime.load(export_dir, backend="cpu", precision="int8", threads=threads)
        contenders[INT8] = runtime_contender(INT8, int8, f"{int8.text_encoder.spec.onnx_file.name} ({reads})")
    except cmath_runtime.CmathError as e:
        skipped[INT8] = str(e)
    encoder_source = read_manifest(export_dir).to_json()["text_encoder"]["source"]
    torch_path = TorchPipeline(run_dir, encoder_source, spec, fp32.feature_dims)
    contenders[TORCH] = Contender(
        TORCH,
        "PooledEncoder (torch twin of the encoder) + checkpoint, eager",
        "fp32",
        torch_path.start,
        lambda state: state,
        torch_path.call,
    )
    with contextlib.ExitStack() as stack:
        frozen = None
        try:
            frozen_spec, frozen_name = stack.enter_context(
                frozen_encoder(frozen_dir, spec.text_normalisation)
            )
            if frozen_spec.dim != fp32.feature_dims["t"]:
                raise ValueError(
                    f"it gives {frozen_spec.dim}-d features, the model reads {fp32.feature_dims['t']}-d"
                )
            frozen = TextEncoder(frozen_spec, threads=threads, verify=False)
            contenders[FROZEN] = frozen_contender(fp32, frozen, frozen_name)
        except (cmath_runtime.CmathError, ValueError, OSError) as e:
            skipped[FROZEN] = f"{type(e).__name__}: {e}"
        for name, why in skipped.items():
            log(f"text path: skipped {name}: {why}")
        count_costs(contenders, fp32, convs, frozen)
        states = {name: [c.start(d) for d in convs] for name, c in contenders.items()}
        timers = {name: _timer(c, states[name], convs) for name, c in contenders.items()}
        probes = make_probes(threads, read_mib, peak_n)
        timers.update({name: _probe_timer(p) for name, p in probes.items()})
        timings = interleaved(timers, budget, settle=lambda _name: quiesce())
    limits = probe_limits(probes, timings.times)
    records = []
    for name, c in contenders.items():
        if not timings.times.get(name):
            skipped[name] = timings.errors.get(name, "no timed call")
            continue
        rec = {
            "contender": name,
            "encoder": c.encoder,
            "precision": c.precision,
            "batch": 1,
            "history": history,
            "threads": threads,
            "iterations": len(timings.times[name]),
            **percentiles_ms(timings.times[name]),
            **c.cost,
        }
        records.append({**rec, **floor(rec, limits)})
    return {
        "benchmark": "text_path",
        "call": "conv.add(speaker, text=...) + conv.latest, batch 1, on a live conversation "
        f"of {history} turns",
        "history": history,
        "conversations": len(convs),
        "texts": source,
        "host": host.describe(),
        "threads": threads,
        "budget": {"iterations": budget.iterations, "seconds": budget.seconds, "rounds": budget.rounds},
        "machine": limits,
        "machine_start_of_run": machine.to_json() if machine is not None else None,
        "records": records,
        "ratios": ratios(records),
        "skipped": skipped,
        "settle_s": timings.settle_s,
        "floor_reliable": all(r["latency_x_floor"] >= 1 for r in records),
    }


def floor(rec: dict[str, Any], limits: dict[str, Any]) -> dict[str, Any]:
    """A record's floor at the probes' median rates (like for like with its p50) and its p50 against the floor at
    their best rates (the machine unloaded). int8 calls' FLOPs are held to the faster of the int8 and fp32 peaks
    (their attention products stay fp32; either way the floor stays a lower bound)."""

    def peak(stat: str) -> float:
        fp32 = limits[f"fp32_{stat}gflop_s"]
        return max(fp32, limits.get(f"int8_{stat}gop_s", 0.0)) if rec["precision"] == "int8" else fp32

    out = {
        **roofline.floor_ms(rec["weight_bytes"], rec["flops"], limits["read_gb_s"], peak("")),
        "read_gb_s": limits["read_gb_s"],
        "peak_gflop_s": peak(""),
    }
    out["latency_x_floor"] = rec["p50_ms"] / out["floor_ms"]
    best = roofline.floor_ms(rec["weight_bytes"], rec["flops"], limits["read_best_gb_s"], peak("best_"))
    out.update(best_floor_ms=best["floor_ms"], latency_x_best_floor=rec["p50_ms"] / best["floor_ms"])
    return out


def make_probes(threads: int, read_mib: int | None = None, peak_n: int = PEAK_N) -> dict[str, Any]:
    """The machine's limits as contenders of the same rounds: copy (reported), read (sum, GEMV), fp32 / int8 peak."""
    mib = read_mib or roofline.read_buffer_mib()
    return {
        "probe/copy": roofline.BandwidthProbe(threads, mib),
        "probe/read-sum": roofline.ReadProbe("sum", threads, mib),
        "probe/read-gemv": roofline.ReadProbe("gemv", threads, mib),
        "probe/peak-fp32": roofline.PeakProbe("fp32", threads, peak_n),
        "probe/peak-int8": roofline.PeakProbe("int8", threads, peak_n),
    }


def probe_limits(probes: dict[str, Any], times: dict[str, list[float]]) -> dict[str, Any]:
    """The probes' medians (the floor's rates, like for like with the contenders' p50) and their best calls. The
    floor's read bandwidth is the faster of the two read probes; the copy rate (read + write) is reported only."""

    def rate(name: str, statistic: str) -> float:
        probe, t = probes[name], times[name]
        return (
            probe.gflop_s(t, statistic) if isinstance(probe, roofline.PeakProbe) else probe.gb_s(t, statistic)
        )

    keys = {
        "probe/copy": ("copy", "gb_s"),
        "probe/read-sum": ("read_sum", "gb_s"),
        "probe/read-gemv": ("read_gemv", "gb_s"),
        "probe/peak-fp32": ("fp32", "gflop_s"),
        "probe/peak-int8": ("int8", "gop_s"),
    }
    out: dict[str, Any] = {}
    for name, (what, unit) in keys.items():
        if times.get(name):
            out[f"{what}_{unit}"] = rate(name, "p50")
            out[f"{what}_best_{unit}"] = rate(name, "best")
    out["read_gb_s"] = max(out.get("read_sum_gb_s", 0.0), out.get("read_gemv_gb_s", 0.0))
    out["read_best_gb_s"] = max(out.get("read_sum_best_gb_s", 0.0), out.get("read_gemv_best_gb_s", 0.0))
    out.update(
        read_buffer_mib=probes["probe/read-sum"].nbytes / 2**20,
        peak_n=round((probes["probe/peak-fp32"].flops / 2) ** (1 / 3)),
        rule="medians of probes timed in the same rounds as the "
        "contenders; read = the faster of numpy sum and onnxruntime GEMV; int8 calls' FLOPs held to the faster "
        "of the int8 (MatMulInteger) and fp32 peaks",
    )
    return out


def count_costs(
    contenders: dict[str, Contender], fp32: Any, convs: list[Dialogue], frozen: Any = None
) -> None:
    """Fill each contender's `cost`: weight bytes read and FLOPs of its call on the live conversation whose new
    utterance has the median token count. Runtime and pytorch read the same turns (pytorch: the fp32 graphs'
    figures, the same weights and arithmetic); the frozen encoder reads the utterance alone."""
    spec = fp32.text_encoder.spec
    tokens = TurnTokens(spec)
    _, median, counts = _median_call(
        lambda d: tokens(d.texts[:-1], d.speakers[:-1], d.speakers[-1], d.texts[-1]), convs
    )
    feeds = model_feeds(fp32, runtime_contender(FP32, fp32, "").start(median), median)
    enc_feeds = tokens.feeds(
        tokens(median.texts[:-1], median.speakers[:-1], median.speakers[-1], median.texts[-1])
    )
    fp32_graph, counter = model_graph(fp32), CostCounter()
    for name, c in contenders.items():
        if name != FROZEN:
            model = c.model or fp32
            c.cost = {
                "tokens": int(enc_feeds["input_ids"].shape[1]),
                "tokens_p50": float(np.median(counts)),
                **counter(
                    (model.text_encoder.spec.onnx_file, spec.onnx_file, enc_feeds),
                    (model_graph(model), fp32_graph, feeds),
                ),
            }
    if FROZEN in contenders:
        plain = TurnTokens(frozen.spec)
        _, alone, alone_counts = _median_call(lambda d: plain([], [], 0, d.texts[-1]), convs)
        f_feeds = plain.feeds(plain([], [], 0, alone.texts[-1]))
        contenders[FROZEN].cost = {
            "tokens": int(f_feeds["input_ids"].shape[1]),
            "tokens_p50": float(np.median(alone_counts)),
            **counter(
                (frozen.spec.onnx_file, frozen.spec.onnx_file, f_feeds), (fp32_graph, fp32_graph, feeds)
            ),
        }


def ratios(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """p50 ratios of the same run: int8 vs fp32 (bar INT8_SPEEDUP), runtime fp32 vs pytorch, context vs frozen."""
    p50 = {r["contender"]: r["p50_ms"] for r in records}
    out = {}
    for key, slow, fast, what in (
        ("int8_vs_fp32", FP32, INT8, "runtime fp32 p50 / runtime int8 p50 (int8 speed-up)"),
        ("runtime_vs_pytorch", TORCH, FP32, "pytorch p50 / runtime fp32 p50 (runtime speed-up)"),
        ("context_vs_frozen", FP32, FROZEN, "runtime fp32 p50 / frozen p50 (what the context costs)"),
    ):
        if slow in p50 and fast in p50:
            out[key] = {"ratio": p50[slow] / p50[fast], "what": what}
    if "int8_vs_fp32" in out:
        out["int8_vs_fp32"].update(bar=INT8_SPEEDUP, passed=out["int8_vs_fp32"]["ratio"] >= INT8_SPEEDUP)
    return out


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        f"# Raw text -> emotion: one new utterance into a live {report['history']}-turn conversation",
        "",
        f"Each call: {report['call']}; {report['conversations']} conversations from {report['texts']}; "
        f"{report['threads']} threads for every contender on {report['host']['cpu']} "
        f"({report['host']['cores']} cores); interleaved rounds, p50 of the timed calls.",
        "",
        f"Machine, in the same rounds (medians): read bandwidth **{m['read_gb_s']:.2f} GB/s** (the floor's: "
        f"the faster of numpy sum {m.get('read_sum_gb_s', 0):.2f} and onnxruntime GEMV "
        f"{m.get('read_gemv_gb_s', 0):.2f} GB/s over {m['read_buffer_mib']:.0f} MiB), copy bandwidth "
        f"{m.get('copy_gb_s', 0):.2f} GB/s (read + write, reported only), matmul peak fp32 "
        f"**{m.get('fp32_gflop_s', 0):.0f} GFLOP/s**, int8 **{m.get('int8_gop_s', 0):.0f} GOP/s** "
        f"({m['peak_n']}^3; int8 records' FLOPs are held to the faster of the two peaks).",
        "",
        "| contender | encoder | tokens | p50 ms | p90 ms | calls | weights read MB | GFLOP | bytes floor ms "
        "| FLOPs floor ms | floor ms | x floor | x floor (best rates) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["records"]:
        lines.append(
            f"| {r['contender']} | {r['encoder']} | {r['tokens']} | {r['p50_ms']:.2f} | {r['p90_ms']:.2f} "
            f"| {r['iterations']} | {r['weight_bytes'] / 1e6:.1f} | {r['flops'] / 1e9:.3f} "
            f"| {r['bytes_floor_ms']:.2f} | {r['flops_floor_ms']:.2f} | {r['floor_ms']:.2f} "
            f"| {r['latency_x_floor']:.2f} | {r['latency_x_best_floor']:.2f} |"
        )
    lines += [
        "",
        "Floor = max(weights read / read bandwidth, FLOPs / peak) at the probes' medians; weights read: the "
        "encoder's and the model graph's initializers the call reads (embedding tables: the rows of its tokens "
        "only); FLOPs: the encoder's at the median utterance's token count (`tokens`) + the model graph's; "
        "'best rates': the same floor at the probes' fastest calls.",
        "",
    ]
    if not report.get("floor_reliable", True):
        lines += [
            "**Floor unreliable in this run**: a p50 is below its floor, so the probes' medians were measured "
            "under heavier load than the contenders met; compare with the best-rates column.",
            "",
        ]
    for key, r in report["ratios"].items():
        bar = f" (bar {r['bar']}x): {'PASS' if r['passed'] else 'FAIL'}" if "bar" in r else ""
        lines.append(f"- {key}: **{r['ratio']:.2f}x**, {r['what']}{bar}")
    for name, why in report["skipped"].items():
        lines.append(f"- skipped {name}: {why}")
    if report.get("parity"):
        lines += ["", "## Raw-text parity", "", *parity_lines(report["parity"])]
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    """p50 per contender (bar to p90) with its floor."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cmath_runtime.files import atomic_open

    recs = report["records"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    xs = np.arange(len(recs))
    p50 = [r["p50_ms"] for r in recs]
    ax.bar(
        xs,
        p50,
        color="tab:blue",
        yerr=[[0] * len(recs), [r["p90_ms"] - r["p50_ms"] for r in recs]],
        capsize=4,
        label="p50 (whisker to p90)",
    )
    ax.scatter(
        xs,
        [r["floor_ms"] for r in recs],
        marker="_",
        s=900,
        color="k",
        zorder=3,
        label="floor: max(weights read / read bandwidth, FLOPs / peak)",
    )
    for x, r in zip(xs, recs, strict=True):
        ax.annotate(
            f"{r['p50_ms']:.1f} ms\n{r['latency_x_floor']:.1f}x floor",
            (x, r["p90_ms"]),
            ha="center",
            va="bottom",
            fontsize=7,
            xytext=(0, 3),
            textcoords="offset points",
        )
    ax.set_xticks(xs, [f"{r['contender']}\n{r['tokens']} tokens" for r in recs], fontsize=8)
    ax.set_yscale("log")
    ax.set_ylim(top=3 * max(r["p90_ms"] for r in recs))
    ax.set_ylabel("ms per new utterance (raw text -> emotion)")
    ax.set_title(
        f"one new utterance into a {report['history']}-turn conversation, batch 1, {report['threads']} "
        f"threads; read {report['machine']['read_gb_s']:.1f} GB/s",
        fontsize=9,
    )
    ax.grid(True, axis="y", which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)


def write_report(report: dict[str, Any], out_dir: Path) -> str:
    """bench_text.json, bench_text.md and bench_text.png in out_dir; returns the markdown."""
    from cmath_runtime.files import atomic_open, atomic_write_json

    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "bench_text.json", report)
    text = markdown(report)
    with atomic_open(out_dir / "bench_text.md", "w") as f:
        f.write(text)
    if report["records"]:
        plot(report, out_dir / "bench_text.png")
    return text


def replay_parity(
    run_dir: Path,
    export_dir: Path,
    dialogues: Sequence[Dialogue],
    threads: int = 1,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Dialogues replayed utterance by utterance through Conversation.add(text=) (runtime fp32, and int8 when the
    export has it) against the PyTorch pipeline on each whole dialogue (TorchPipeline: the same token ids, the
    encoder's torch twin, the checkpoint eager): the final probabilities of every utterance, compared by
    cmath_runtime.compare (fp32: max |dp| <= EXACT; int8: argmax agreement with fp32 >= INT8_AGREEMENT)."""
    import cmath_runtime
    from cmath_runtime.compare import compare, max_abs
    from cmath_runtime.manifest import read_manifest

    from .backends import set_torch_threads

    set_torch_threads(threads)
    fp32 = cmath_runtime.load(export_dir, backend="cpu", threads=threads)
    torch_path = TorchPipeline(
        run_dir,
        read_manifest(export_dir).to_json()["text_encoder"]["source"],
        fp32.text_encoder.spec,
        fp32.feature_dims,
    )
    models = {"fp32": fp32}
    try:
        models["int8"] = cmath_runtime.load(export_dir, backend="cpu", precision="int8", threads=threads)
    except cmath_runtime.CmathError as e:
        log(f"parity: no int8 path ({e})")
    ref = [{"probs": torch_path.probs(torch_path.embed(d), d.speakers)} for d in dialogues]
    got = {k: [{"probs": replay(m, d)} for d in dialogues] for k, m in models.items()}
    data = f"{len(dialogues)} dialogues replayed utterance by utterance through Conversation.add(text=)"
    reports = {
        "fp32": compare(
            ref,
            got["fp32"],
            {"probs": max_abs(EXACT)},
            artifact="text path fp32",
            reference_name="PyTorch pipeline (torch encoder twin + checkpoint, eager)",
            runtime="cmath_runtime fp32",
            data=data,
            conversations=len(dialogues),
        )
    }
    if "int8" in got:
        reports["int8"] = compare(
            got["fp32"],
            got["int8"],
            {"probs": max_abs(None)},
            min_argmax_agreement=INT8_AGREEMENT,
            artifact="text path int8",
            reference_name="cmath_runtime fp32",
            runtime="cmath_runtime int8",
            data=data,
            conversations=len(dialogues),
        )
    for r in reports.values():
        log(r.summary())
    return {k: r.to_json() for k, r in reports.items()}


def replay(model: Any, dialogue: Dialogue) -> np.ndarray:
    """(n, classes) final probabilities of a dialogue added utterance by utterance as raw text."""
    import cmath_runtime

    others = {m: np.zeros(d, np.float32) for m, d in model.feature_dims.items() if m != "t"}
    conv = cmath_runtime.Conversation(model)
    for s, t in zip(dialogue.speakers, dialogue.texts, strict=True):
        conv.add(s, text=t, **others).latest  # noqa: B018  as an agent reads it, utterance by utterance
    return conv.probs()


def parity_lines(parity: dict[str, Any]) -> list[str]:
    out = []
    f = parity.get("fp32")
    if f:
        probs = f["outputs"][0]
        out.append(
            f"- Raw-text parity: {f['conversations']} dialogues ({f['rows']} utterances) replayed utterance by "
            f"utterance through Conversation.add(text=...) vs the PyTorch pipeline: max |dp| "
            f"**{probs['max_abs']:.2g}** (bar {EXACT:g}), argmax agreement {100 * f['argmax_agreement']:.2f}%: "
            f"{'PASS' if f['passed'] else 'FAIL'}"
        )
    q = parity.get("int8")
    if q:
        out.append(
            f"- int8 text path argmax agreement with fp32: **{100 * q['argmax_agreement']:.2f}%** (bar "
            f"{100 * INT8_AGREEMENT:g}%), max |dp| {q['outputs'][0]['max_abs']:.3g}: "
            f"{'PASS' if q['passed'] else 'FAIL'}"
        )
    return out


def report_text_path(
    run_dir: Path,
    export_dir: Path,
    threads: int | None,
    quick: bool,
    out_dir: Path | None = None,
    machine: roofline.Machine | None = None,
    csv_dir: Path | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any] | None:
    """cmath-bench's text-path section: the report, written to out_dir (bench_text.json/.md/.png); None when the
    export has no text encoder."""
    raw = json.loads((export_dir / "export.json").read_text())
    if not raw.get("text_encoder"):
        return None
    report = run_text_path(
        run_dir,
        export_dir,
        threads or 1,
        QUICK_BUDGET if quick else BUDGET,
        QUICK_LIVE if quick else LIVE,
        csv_dir=csv_dir,
        machine=machine,
        log=log,
    )
    if out_dir is not None:
        write_report(report, out_dir)
    return report


def summary(report: dict[str, Any]) -> str:
    """One line per contender and the ratios, for the console."""
    parts = [
        f"{r['contender']} {r['p50_ms']:.1f} ms ({r['latency_x_floor']:.1f}x floor)"
        for r in report["records"]
    ]
    ratio = ", ".join(f"{k} {v['ratio']:.2f}x" for k, v in report["ratios"].items())
    return (
        f"raw text -> emotion, new utterance into a {report['history']}-turn conversation, p50: "
        + "; ".join(parts)
        + (f" | {ratio}" if ratio else "")
    )


def main() -> None:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--export", type=Path, default=None, help="export folder (default: RUN_DIR/export)")
    p.add_argument("--csv-dir", type=Path, required=True, help=f"folder with MELD's {DEV_CSV}")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="few conversations and calls")
    p.add_argument(
        "--parity",
        action="store_true",
        help=f"also replay {PARITY_DIALOGUES} MELD dev dialogues against "
        "the PyTorch pipeline (the raw-text parity bar)",
    )
    p.add_argument("--parity-dialogues", type=int, default=PARITY_DIALOGUES)
    p.add_argument("--no-latency", action="store_true", help="only the parity replay")
    p.add_argument(
        "--frozen-encoder",
        type=Path,
        default=None,
        help="plain sentence-transformers dir for the frozen contender (default: bundled all-MiniLM-L6-v2)",
    )
    p.add_argument("--out", type=Path, default=None, help="where bench_text.* go (default: RUN_DIR)")
    args = p.parse_args()
    if not (args.csv_dir / DEV_CSV).is_file():
        p.error(f"--csv-dir: expected a folder holding {DEV_CSV}, got {args.csv_dir}")
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    export_dir = args.export or args.run_dir / "export"
    report: dict[str, Any] = {"records": [], "ratios": {}, "skipped": {}}
    if not args.no_latency:
        report = run_text_path(
            args.run_dir,
            export_dir,
            args.threads,
            QUICK_BUDGET if args.quick else BUDGET,
            QUICK_LIVE if args.quick else LIVE,
            csv_dir=args.csv_dir,
            frozen_dir=args.frozen_encoder,
        )
        print(summary(report), flush=True)
    if args.parity:
        from cmath_runtime.manifest import read_manifest

        dialogues = dev_dialogues(
            args.csv_dir / DEV_CSV, read_manifest(export_dir).num_speakers, args.parity_dialogues
        )
        report["parity"] = replay_parity(args.run_dir, export_dir, dialogues, args.threads)
        print("\n".join(parity_lines(report["parity"])), flush=True)
    out = args.out or args.run_dir
    if args.no_latency:
        from cmath_runtime.files import atomic_write_json

        atomic_write_json(out / "bench_text_parity.json", report["parity"] if args.parity else {})
        print(f"wrote {out / 'bench_text_parity.json'}")
        return
    print(write_report(report, out))
    print(f"wrote {out / 'bench_text.json'}, bench_text.md, bench_text.png")


if __name__ == "__main__":
    main()
