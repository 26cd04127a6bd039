"""Raw text -> emotion for one new utterance in a live conversation: each engine against the text path's floor.

One timed call (batch 1) is what an agent does when a line arrives: `conv.add(speaker, text=...)` on a copy of a
conversation that already holds HISTORY turns of real texts, then reading `conv.latest`. Contenders: runtime fp32
and int8, the same pipeline in PyTorch (TorchPipeline) and a frozen plain encoder reading the utterance alone (what
reading the context costs), timed in interleaved rounds with the machine's probes, which give each call's floor
(roofline.record_floor). cmath-bench calls `report_text_path` when the export has a text encoder.
"""

from __future__ import annotations

import contextlib
import itertools
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import cmath_runtime
from cmath_runtime.batching import pad_conversations
from cmath_runtime.compare import compare, max_abs
from cmath_runtime.manifest import read_manifest
from cmath_runtime.session import PRECISIONS
from cmath_runtime.text import TextEncoder, TextEncoderSpec

from . import host, roofline
from .backends import Contender, set_torch_threads
from .report import figure, write_pages
from .timing import Budget, Timer, interleaved, percentiles_ms, quiesce, repeating, timer

DEV_CSV = "dev_sent_emo.csv"
HISTORY = 20  # turns a live conversation holds before the timed utterance
BUDGET = Budget(warmup=3, iterations=60, seconds=4.0, min_iterations=10, rounds=6)
QUICK_BUDGET = Budget(warmup=1, iterations=8, seconds=1.0, min_iterations=3, rounds=2)
LIVE, QUICK_LIVE = 12, 4  # distinct live conversations the timed calls cycle through
EXACT = 1e-4  # max |dp| of the fp32 runtime vs the PyTorch pipeline
INT8_AGREEMENT = 0.99  # int8 path's argmax agreement with fp32
FP32, INT8, TORCH, FROZEN = "runtime fp32", "runtime int8", "pytorch", "frozen"
PROBE_CALLS = 3  # probe calls per block at most (each reads 256 MiB or does 2 GFLOP)


@dataclass(frozen=True)
class Dialogue:
    """Texts and integer speaker ids of one conversation, in order."""

    texts: list[str]
    speakers: list[int]

    @property
    def past(self) -> Dialogue:
        """All but its last utterance."""
        return Dialogue(self.texts[:-1], self.speakers[:-1])


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


def text_source(csv_dir: Path | None, num_speakers: int) -> tuple[list[Dialogue], str]:
    """MELD dev dialogues from `csv_dir`, or the export's probe texts (one two-speaker conversation) without one."""
    if csv_dir is None:
        from cmath_export.text_encoder import PROBE_TEXTS

        probe = Dialogue(list(PROBE_TEXTS), [i % 2 for i in range(len(PROBE_TEXTS))])
        return [probe], "the export's probe texts (no MELD dev CSV given)"
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


def turn_tokens(encoder: TextEncoder, d: Dialogue, i: int) -> tuple[list[int], list[int]]:
    """(input_ids, token_type_ids) of utterance i of `d` with its past, as `encoder` reads it."""
    return encoder.inputs([(d.texts[: i + 1], d.speakers[: i + 1], i)])[0]


class TorchPipeline:
    """The runtime's text path in PyTorch: the runtime's token ids -> PooledEncoder (the encoder's torch twin, on the
    fine-tuned HF model export.json's `text_encoder.source` names) -> the run's checkpoint, eager, on the whole
    conversation. `model`: the runtime's fp32 model of the run's export."""

    def __init__(self, run_dir: Path, model: Any) -> None:
        from cmath_train.checkpoint import load_checkpoint
        from cmath_train.prepare.pooled import PooledEncoder
        from cmath_train.prepare.text_encoder import SentenceTransformerEncoder

        spec, feature_dims = model.text_encoder.spec, model.feature_dims
        st = SentenceTransformerEncoder.load(model.manifest.text_encoder["source"])
        transformer: Any = st.model[0].auto_model
        self.encoder = PooledEncoder(
            transformer, spec.pooling, spec.normalize, first_segment=spec.turns is not None
        ).eval()
        self.net = load_checkpoint(run_dir).model.eval()
        self.text = TextEncoder(spec, threads=1, verify=False)  # its tokenizer
        # zeros for the other modalities: the text path gives only "t"
        self.others = {m: d for m, d in feature_dims.items() if m != "t"}

    def embed(self, d: Dialogue) -> np.ndarray:
        """(n, dim) features of every utterance, each read with its own past (batched, for set-up and parity)."""
        from cmath_train.prepare.pooled import embed

        return embed(self.encoder, [turn_tokens(self.text, d, i) for i in range(len(d.texts))])

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

        return dialogue.past, torch.from_numpy(self.embed(dialogue.past))

    def call(self, state: tuple[Dialogue, Any], speaker: int, text: str) -> np.ndarray:
        """The timed call: tokens of the new utterance with its past -> encoder -> model on the whole conversation."""
        import torch

        from cmath_train.prepare.pooled import collate

        past, feats = state
        batch = collate(self.text.inputs([([*past.texts, text], [*past.speakers, speaker], len(past.texts))]))
        with torch.inference_mode():
            row = self.encoder(**{k: v for k, v in batch.items() if k in self.text.spec.inputs})
            x = torch.cat([feats, row])
        return self.probs(x, [*past.speakers, speaker])[-1]


def live_contender(
    name: str,
    encoder: str,
    precision: str,
    start: Callable[[Dialogue], Any],
    call: Callable[..., Any],
    fork: Callable[[Any], Any] = lambda state: state,
    **info: Any,
) -> Contender:
    """A text-path contender: `prepare(dialogue)` (untimed) forks the live state holding the dialogue's past
    (`start(dialogue)`, built once per dialogue) and returns the timed call, `call(fork, speaker, text)` with the
    dialogue's last utterance."""
    started: dict[int, Any] = {}

    def prepare(d: Dialogue) -> Callable[[], Any]:
        state = started.get(id(d))
        if state is None:
            state = started[id(d)] = start(d)
        own = fork(state)
        return lambda: call(own, d.speakers[-1], d.texts[-1])

    return Contender(name, precision, encoder, prepare, np.asarray, info={"cost": {}, **info})


def zero_rows(model: Any) -> dict[str, np.ndarray]:
    """A zero row of every modality but text: what the text path gives the model's other inputs."""
    return {m: np.zeros(d, np.float32) for m, d in model.feature_dims.items() if m != "t"}


def add_text(conv: Any, speaker: int, text: str, others: dict[str, np.ndarray], frozen: Any = None) -> Any:
    """conv.add of one utterance given as text, `others` (zero_rows) for the other modalities; with `frozen` (a
    plain cmath_runtime.text.TextEncoder) that encoder reads the utterance alone and the model gets its row."""
    if frozen is None:
        return conv.add(speaker, text=text, **others)
    return conv.add(speaker, t=frozen.encode([text])[0], **others)


def replay(model: Any, d: Dialogue, frozen: Any = None) -> Any:
    """A runtime Conversation of the dialogue, added utterance by utterance as raw text (add_text) and read after
    each one, as an agent reads it."""
    conv, others = cmath_runtime.Conversation(model), zero_rows(model)
    for s, t in zip(d.speakers, d.texts, strict=True):
        add_text(conv, s, t, others, frozen).latest  # noqa: B018
    return conv


def runtime_contender(name: str, model: Any, encoder: str, frozen: Any = None) -> Contender:
    """cmath_runtime: Conversation.add(text=) + .latest on a copy of a conversation holding the past."""
    precision, others = "fp32" if frozen is not None else model.precision, zero_rows(model)
    return live_contender(
        name,
        encoder,
        precision,
        lambda d: replay(model, d.past, frozen),
        lambda conv, s, t: add_text(conv, s, t, others, frozen).latest,
        lambda conv: conv.copy(),
        model=model,
    )


@contextlib.contextmanager
def frozen_encoder(model_dir: Path | None, text_normalisation: str | None) -> Iterator[tuple[Any, str]]:
    """(TextEncoderSpec, name) of a plain sentence-transformers encoder (default: the bundled all-MiniLM-L6-v2)
    exported to ONNX in a temp dir by cmath_export's text-encoder export, for as long as the context lasts."""
    from cmath_export.text_encoder import export_text_encoder
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


def model_graph(model: Any) -> Path:
    """The graph a Conversation of `model` runs for a new utterance: its step graph, else its model file."""
    graph = model.step_graph
    if graph is not None:
        return Path(graph.file)
    return model.manifest.artifacts[PRECISIONS[model.precision].artifact_key("cpu")].path


def model_feeds(model: Any, conv: Any, dialogue: Dialogue) -> dict[str, np.ndarray]:
    """The model graph's feeds when (a copy of) `conv` gets the dialogue's last utterance."""
    conv = conv.copy()
    graph = model.step_graph
    if graph is None:
        add_text(conv, dialogue.speakers[-1], dialogue.texts[-1], zero_rows(model))
        feats, speaker, mask = pad_conversations([conv.features], [conv.speakers], model.modalities)
        return {**feats, "speaker": speaker, "mask": mask}
    with roofline.recording(graph) as feeds:
        add_text(conv, dialogue.speakers[-1], dialogue.texts[-1], zero_rows(model)).latest  # noqa: B018
        return dict(feeds)


def _median_call(
    encoder: TextEncoder, live: list[Dialogue], alone: bool = False
) -> tuple[Dialogue, tuple[list[int], list[int]], float]:
    """The live conversation whose new utterance has the median token count as `encoder` reads it (with its past,
    or `alone`), that utterance's tokens, and the median count."""
    news = [Dialogue(d.texts[-1:], [0]) if alone else d for d in live]
    pairs = [turn_tokens(encoder, d, len(d.texts) - 1) for d in news]
    counts = [len(ids) for ids, _ in pairs]
    k = int(np.argsort(counts, kind="stable")[len(counts) // 2])
    return live[k], pairs[k], float(np.median(counts))


def live_timer(c: Contender, live: list[Dialogue]) -> Timer:
    """The contender's Timer, one call on each live conversation in turn (their pasts started before any timing)."""
    for d in live:
        c.prepare(d)
    turn = itertools.count()
    return timer(lambda: c.prepare(live[next(turn) % len(live)]))


def report_text_path(
    run_dir: Path,
    export_dir: Path,
    threads: int | None = 1,
    quick: bool = False,
    out_dir: Path | None = None,
    machine: roofline.Machine | None = None,
    csv_dir: Path | None = None,
    parity_dialogues: int = 0,
    frozen_dir: Path | None = None,
    log: Callable[[str], None] = print,
    *,
    budget: Budget | None = None,
    dialogues: list[Dialogue] | None = None,
) -> dict[str, Any] | None:
    """cmath-bench's text-path section (JSON-able), written to out_dir (bench_text.json/.md/.png); None when the
    export has no text encoder. One record per contender, the machine's limits measured in the same rounds and the
    ratios; `dialogues` (default: text_source(csv_dir)) give the live conversations' texts; `machine` the limits
    cmath-bench measured before any contender (reported beside, not used); `budget` (default: by `quick`) the
    timing's. With `parity_dialogues`, that many of csv_dir's dialogues go to replay_parity."""
    if not read_manifest(export_dir).text_encoder:
        return None
    threads, budget = threads or 1, budget or (QUICK_BUDGET if quick else BUDGET)
    set_torch_threads(threads)
    fp32 = cmath_runtime.load(export_dir, backend="cpu", threads=threads)
    if dialogues:
        source = f"{len(dialogues)} given dialogues"
    else:
        dialogues, source = text_source(csv_dir, fp32.num_speakers)
    convs = live_conversations(
        dialogues, QUICK_LIVE if quick else LIVE, fp32.num_speakers, min(HISTORY, fp32.max_len - 1)
    )
    history = len(convs[0].texts) - 1
    log(f"text path: {len(convs)} live conversations of {history} turns from {source}, {threads} threads")
    with contextlib.ExitStack() as stack:
        contenders, skipped, frozen = load_contenders(run_dir, export_dir, fp32, threads, frozen_dir, stack)
        for name, why in skipped.items():
            log(f"text path: skipped {name}: {why}")
        count_costs(contenders, fp32, convs, frozen)
        timers = {name: live_timer(c, convs) for name, c in contenders.items()}
        probes = roofline.make_probes(threads)
        timers.update({name: repeating(p, cap=PROBE_CALLS) for name, p in probes.items()})
        timings = interleaved(timers, budget, settle=lambda _name: quiesce())
    limits = {
        **roofline.rates(probes, timings.times),
        "read_buffer_mib": probes["read_sum"].amount / 2**20,
        "peak_n": roofline.PROBE_N,
        "rule": "medians of probes timed in the same rounds as the contenders; read = the faster of numpy sum and "
        "onnxruntime GEMV; int8 calls' FLOPs held to the faster of the int8 (MatMulInteger) and fp32 peaks",
    }
    records = []  # one per contender that was timed (p50/p90, its cost, its floor); the others go to `skipped`
    for name, c in contenders.items():
        if not (times := timings.times.get(name)):
            skipped[name] = timings.errors.get(name, "no timed call")
            continue
        rec = {
            "contender": name,
            "encoder": c.provider,
            "precision": c.precision,
            "batch": 1,
            "history": history,
        }
        rec.update(threads=threads, iterations=len(times), **percentiles_ms(times), **c.info["cost"])
        records.append({**rec, **roofline.record_floor(rec, limits)})
    report = {
        "benchmark": "text_path",
        "call": f"conv.add(speaker, text=...) + conv.latest, batch 1, on a live conversation of {history} turns",
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
    if parity_dialogues and csv_dir is not None:
        parity = dev_dialogues(csv_dir / DEV_CSV, fp32.num_speakers, parity_dialogues)
        report["parity"] = replay_parity(run_dir, export_dir, parity, threads, log)
    if out_dir is not None:  # bench_text.json, bench_text.md and bench_text.png
        plots = {"bench_text.png": lambda path: plot(report, path)} if records else {}
        write_pages(out_dir, "bench_text", report, markdown(report), plots)
    return report


def load_contenders(
    run_dir: Path,
    export_dir: Path,
    fp32: Any,
    threads: int,
    frozen_dir: Path | None,
    stack: contextlib.ExitStack,
) -> tuple[dict[str, Contender], dict[str, str], Any]:
    """(contenders by name, skipped ones and why, the frozen TextEncoder or None): runtime fp32 and int8, the
    PyTorch pipeline and the frozen plain encoder (its temporary export kept open on `stack`)."""
    spec = fp32.text_encoder.spec
    reads = "fine-tuned, reads speaker + past turns" if spec.turns else "reads the utterance alone"
    contenders = {FP32: runtime_contender(FP32, fp32, f"{spec.onnx_file.name} ({reads})")}
    skipped: dict[str, str] = {}
    try:
        int8 = cmath_runtime.load(export_dir, backend="cpu", precision="int8", threads=threads)
        contenders[INT8] = runtime_contender(INT8, int8, f"{int8.text_encoder.spec.onnx_file.name} ({reads})")
    except cmath_runtime.CmathError as e:
        skipped[INT8] = str(e)
    torch_path = TorchPipeline(run_dir, fp32)
    twin = "PooledEncoder (torch twin of the encoder) + checkpoint, eager"
    contenders[TORCH] = live_contender(TORCH, twin, "fp32", torch_path.start, torch_path.call)
    frozen = None
    try:
        frozen_spec, frozen_name = stack.enter_context(frozen_encoder(frozen_dir, spec.text_normalisation))
        if frozen_spec.dim != (dim := fp32.feature_dims["t"]):
            raise ValueError(f"it gives {frozen_spec.dim}-d features, the model reads {dim}-d")
        frozen = TextEncoder(frozen_spec, threads=threads, verify=False)
        alone = f"{frozen_name} (frozen), the utterance alone"
        contenders[FROZEN] = runtime_contender(FROZEN, fp32, alone, frozen)
    except (cmath_runtime.CmathError, ValueError, OSError) as e:
        skipped[FROZEN] = f"{type(e).__name__}: {e}"
    return contenders, skipped, frozen


def count_costs(
    contenders: dict[str, Contender], fp32: Any, convs: list[Dialogue], frozen: Any = None
) -> None:
    """Fill each contender's `cost`: weight bytes its encoder and model graphs read and their FLOPs (roofline.CallWork;
    FLOPs on the fp32 graphs: the same arithmetic) in its call on the live conversation whose
    new utterance has the median token count (pytorch: the fp32 graphs' figures, the same weights)."""
    median, pair, tokens_p50 = _median_call(fp32.text_encoder, convs)
    feeds = model_feeds(fp32, replay(fp32, median.past), median)
    fp32_graph = model_graph(fp32)
    model_flops = roofline.CallWork(fp32_graph).flops(feeds)

    def cost(encoder: Path, enc_fp32: Path, enc_feeds: dict[str, np.ndarray], p50: float, graph: Path) -> Any:
        enc_bytes = roofline.CallWork(encoder).weight_bytes(enc_feeds)
        model_bytes = roofline.CallWork(graph).weight_bytes(feeds)
        enc_flops = roofline.CallWork(enc_fp32).flops(enc_feeds)
        return {
            "tokens": int(enc_feeds["input_ids"].shape[1]),
            "tokens_p50": p50,
            "weight_bytes": enc_bytes + model_bytes,
            "flops": enc_flops + model_flops,
            "encoder_weight_bytes": enc_bytes,
            "model_weight_bytes": model_bytes,
            "encoder_flops": enc_flops,
            "model_flops": model_flops,
            "graphs": f"{encoder.name} + {graph.name}",
        }

    enc_feeds, enc_fp32 = fp32.text_encoder.feeds([pair]), fp32.text_encoder.spec.onnx_file
    for name, c in contenders.items():
        if name != FROZEN:
            model = c.info.get("model") or fp32
            c.info["cost"] = cost(
                model.text_encoder.spec.onnx_file, enc_fp32, enc_feeds, tokens_p50, model_graph(model)
            )
    if FROZEN in contenders:
        _, alone, alone_p50 = _median_call(frozen, convs, alone=True)
        f_file = frozen.spec.onnx_file
        contenders[FROZEN].info["cost"] = cost(f_file, f_file, frozen.feeds([alone]), alone_p50, fp32_graph)


def ratios(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """p50 ratios of the same run: int8 vs fp32, runtime fp32 vs pytorch, context vs frozen."""
    p50 = {r["contender"]: r["p50_ms"] for r in records}
    out = {}
    for key, slow, fast, what in (
        ("int8_vs_fp32", FP32, INT8, "runtime fp32 p50 / runtime int8 p50 (int8 speed-up)"),
        ("runtime_vs_pytorch", TORCH, FP32, "pytorch p50 / runtime fp32 p50 (runtime speed-up)"),
        ("context_vs_frozen", FP32, FROZEN, "runtime fp32 p50 / frozen p50 (what the context costs)"),
    ):
        if slow in p50 and fast in p50:
            out[key] = {"ratio": p50[slow] / p50[fast], "what": what}
    return out


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        f"# Raw text -> emotion: one new utterance into a live {report['history']}-turn conversation",
        "",
        f"Each call: {report['call']}; {report['conversations']} conversations from {report['texts']}; "
        f"{report['threads']} threads for every contender on {report['host']['cpu']} (ISA class {report['host'].get('isa', '-')}) "
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
        lines.append(f"- {key}: **{r['ratio']:.2f}x**, {r['what']}")
    for name, why in report["skipped"].items():
        lines.append(f"- skipped {name}: {why}")
    if report.get("parity"):
        lines += ["", "## Raw-text parity", "", *parity_lines(report["parity"])]
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    """p50 per contender (bar to p90) with its floor."""
    recs = report["records"]
    xs = np.arange(len(recs))
    p50 = [r["p50_ms"] for r in recs]
    with figure(path) as ax:
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


def replay_parity(
    run_dir: Path,
    export_dir: Path,
    dialogues: Sequence[Dialogue],
    threads: int = 1,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Dialogues replayed utterance by utterance through Conversation.add(text=) (runtime fp32, and int8 when the
    export has it) against the PyTorch pipeline on each whole dialogue: the final probabilities, compared by
    cmath_runtime.compare (fp32: max |dp| <= EXACT; int8: argmax agreement with fp32 >= INT8_AGREEMENT)."""
    set_torch_threads(threads)
    fp32 = cmath_runtime.load(export_dir, backend="cpu", threads=threads)
    torch_path = TorchPipeline(run_dir, fp32)
    models = {"fp32": fp32}
    try:
        models["int8"] = cmath_runtime.load(export_dir, backend="cpu", precision="int8", threads=threads)
    except cmath_runtime.CmathError as e:
        log(f"parity: no int8 path ({e})")
    ref = [{"probs": torch_path.probs(torch_path.embed(d), d.speakers)} for d in dialogues]
    got = {k: [{"probs": replay(m, d).probs()} for d in dialogues] for k, m in models.items()}
    data = f"{len(dialogues)} dialogues replayed utterance by utterance through Conversation.add(text=)"
    # precision -> (its reference, the reference's name, its checks, its bar of argmax agreement)
    checks = {
        "fp32": (ref, "PyTorch pipeline (torch encoder twin + checkpoint, eager)", max_abs(EXACT), None),
        "int8": (got["fp32"], "cmath_runtime fp32", max_abs(None), INT8_AGREEMENT),
    }
    reports = {
        k: compare(
            reference,
            got[k],
            {"probs": check},
            min_argmax_agreement=agreement,
            artifact=f"text path {k}",
            reference_name=name,
            runtime=f"cmath_runtime {k}",
            data=data,
            conversations=len(dialogues),
        )
        for k, (reference, name, check, agreement) in checks.items()
        if k in got
    }
    for r in reports.values():
        log(r.summary())
    return {k: r.to_json() for k, r in reports.items()}


def parity_lines(parity: dict[str, Any]) -> list[str]:
    out = []
    if f := parity.get("fp32"):
        probs = f["outputs"][0]
        out.append(
            f"- Raw-text parity: {f['conversations']} dialogues ({f['rows']} utterances) replayed utterance by "
            f"utterance through Conversation.add(text=...) vs the PyTorch pipeline: max |dp| "
            f"**{probs['max_abs']:.2g}** (bar {EXACT:g}), argmax agreement {100 * f['argmax_agreement']:.2f}%: "
            f"{'PASS' if f['passed'] else 'FAIL'}"
        )
    if q := parity.get("int8"):
        out.append(
            f"- int8 text path argmax agreement with fp32: **{100 * q['argmax_agreement']:.2f}%** (bar "
            f"{100 * INT8_AGREEMENT:g}%), max |dp| {q['outputs'][0]['max_abs']:.3g}: "
            f"{'PASS' if q['passed'] else 'FAIL'}"
        )
    return out


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
