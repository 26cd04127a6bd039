"""bench.json (the records), bench.md (tables: latency with speed-ups, throughput, load/memory, the bar) and
bench_latency.png (p50 latency vs conversation length, one line per contender)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from cmath_runtime.files import atomic_open, atomic_write_json


def label(rec: dict[str, Any]) -> str:
    return f"{rec['backend']} {rec['precision']}"


def _contenders(records: list[dict]) -> list[str]:
    return list(dict.fromkeys(label(r) for r in records if r["kind"] in ("latency", "throughput")))


def _ms(x: float | None) -> str:
    return "-" if x is None else (f"{x:.2f}" if x < 100 else f"{x:.0f}")


def latency_table(records: list[dict]) -> str:
    names = _contenders(records)
    rows: dict[int, dict[str, str]] = {}
    for r in records:
        if r["kind"] == "latency":
            sp = r.get("speedup_vs_eager") if r["backend"] != "pytorch-eager" else None
            speed = f" ({sp:.2f}x)" if sp else ""
            rows.setdefault(r["utterances"], {})[label(r)] = f"{_ms(r['p50_ms'])}{speed}"
    head = "| utterances | " + " | ".join(f"{n} p50 ms" for n in names) + " |"
    lines = [head, "|---:|" + "---:|" * len(names)]
    for n in sorted(rows):
        lines.append(f"| {n} | " + " | ".join(rows[n].get(name, "-") for name in names) + " |")
    return "\n".join(lines)


def detail_table(records: list[dict], kind: str) -> str:
    lines = [
        "| backend | precision | batch | utterances | p50 ms | p90 ms | p99 ms | speed-up vs eager | utt/s | conv/s "
        "| iterations |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in records:
        if r["kind"] == kind:
            sp = f"{r['speedup_vs_eager']:.2f}x" if r.get("speedup_vs_eager") else "-"
            ups = f"{r['utterances_per_s']:.0f}" if "utterances_per_s" in r else "-"
            cps = f"{r['conversations_per_s']:.1f}" if "conversations_per_s" in r else "-"
            lines.append(
                f"| {r['backend']} | {r['precision']} | {r['batch']} | {r['utterances']} | {_ms(r['p50_ms'])} "
                f"| {_ms(r['p90_ms'])} | {_ms(r['p99_ms'])} | {sp} | {ups} | {cps} | {r['iterations']} |"
            )
    return "\n".join(lines)


def contender_table(records: list[dict]) -> str:
    lines = [
        "| backend | precision | provider | threads (torch / ort intra-op) | import s | load s | compile s "
        "| peak RSS MiB | RSS growth MiB | max abs diff vs eager | torch imported | note |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    first: dict[str, dict] = {}
    for r in records:
        if r["kind"] != "streaming":
            first.setdefault(label(r), r)
    for r in first.values():
        threads = "-"
        if th := r.get("threads"):
            threads = f"{th.get('torch', '-')} / {th.get('ort_intra_op', '-')}, idle: {th.get('idle', '-')}"
        diff = f"{r['max_abs_diff_vs_eager']:.1e}" if r.get("max_abs_diff_vs_eager") is not None else "-"
        imported = "-" if "torch_imported" not in r else ("yes" if r["torch_imported"] else "no")
        note = (r.get("note") or "").replace("|", "/")
        lines.append(
            f"| {r['backend']} | {r['precision']} | {r.get('provider', '-')} | {threads} | {_num(r, 'import_s', 2)} "
            f"| {_num(r, 'load_s', 2)} | {_num(r, 'compile_s', 1)} | {_num(r, 'peak_rss_mb', 0)} "
            f"| {_num(r, 'rss_delta_mb', 0)} | {diff} | {imported} | {note} |"
        )
    return "\n".join(lines)


def _num(rec: dict[str, Any], key: str, digits: int) -> str:
    return "-" if rec.get(key) is None else f"{rec[key]:.{digits}f}"


def roofline_table(records: list[dict], env: dict[str, Any]) -> str:
    """Every timed record's distance to this machine's limit: floor = max(weight bytes / bandwidth, FLOPs / peak)."""
    m = env.get("machine") or {}
    lines = [
        f"Measured this run ({m.get('threads')} threads): copy bandwidth **{m.get('bandwidth_gb_s', 0):.1f} GB/s** "
        f"(numpy, read + write), float32 matmul peak **{m.get('fp32_gflop_s', 0):.0f} GFLOP/s** (onnxruntime, "
        "2048^3). FLOPs counted from the graph at each shape (MatMul/Gemm/Conv, attention included).",
        "",
        "| path | backend | precision | batch | utterances | p50 ms | weight MB | GFLOP | bytes floor ms "
        "| FLOPs floor ms | bound | x floor |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in records:
        if r.get("floor_ms") is None:
            continue
        path = r.get("path", "full")
        n = r.get("utterances") or r.get("n")
        lines.append(
            f"| {path} | {r['backend']} | {r['precision']} | {r['batch']} | {n} | {_ms(r['p50_ms'])} "
            f"| {r['weight_bytes'] / 1e6:.1f} | {r['flops'] / 1e9:.3f} | {r['bytes_floor_ms']:.2f} "
            f"| {r['flops_floor_ms']:.2f} | {r['bound']} | {r['latency_x_floor']:.2f} |"
        )
    return "\n".join(lines)


def streaming_table(records: list[dict]) -> str:
    rows = [r for r in records if r["kind"] == "streaming"]
    names = list(dict.fromkeys(f"{r['path']} {r['backend']} {r['precision']}" for r in rows))
    table: dict[int, dict[str, str]] = {}
    for r in rows:
        table.setdefault(r["n"], {})[f"{r['path']} {r['backend']} {r['precision']}"] = _ms(r["p50_ms"])
    lines = [
        "| history n | " + " | ".join(f"{n} p50 ms" for n in names) + " |",
        "|---:|" + "---:|" * len(names),
    ]
    for n in sorted(table):
        lines.append(f"| {n} | " + " | ".join(table[n].get(name, "-") for name in names) + " |")
    return "\n".join(lines)


def markdown(records: list[dict], env: dict[str, Any], title: str) -> str:
    head = (
        f"{env['cpu']} (ISA class {env.get('isa', '-')}), {env['cores']} cores, {env['threads']} threads for every contender (torch.set_num_threads "
        f"and onnxruntime intra_op_num_threads); python {env['python']}, torch {env['torch']}, onnxruntime "
        f"{env['onnxruntime']}; load average at start {env['load_average']}"
        + (f", at the end {env['load_average_end']}" if env.get("load_average_end") else "")
        + "."
    )
    sections = {"Latency, batch 1 (p50 ms; speed-up vs PyTorch eager)": latency_table(records)}
    if env.get("machine"):
        sections["Roofline: each record against this machine's limits"] = roofline_table(records, env)
    if any(r["kind"] == "streaming" for r in records):
        streaming = "Streaming: one new utterance at history n (step graph per engine vs full recompute)"
        sections[streaming] = streaming_table(records)
    sections["Throughput"] = detail_table(records, "throughput")
    contenders = (
        "Contenders (each in its own process): import and load time, peak memory (VmHWM) and its growth over the "
        "bare interpreter, agreement with eager"
    )
    sections[contenders] = contender_table(records)
    sections["Latency detail"] = detail_table(records, "latency")
    return "\n".join([f"# {title}", "", head, "", *(f"## {h}\n\n{body}\n" for h, body in sections.items())])


def plot(records: list[dict], path: Path, title: str) -> None:
    """p50 latency vs conversation length (band to p90), one line per contender, and the onnxruntime floors."""
    latency = [r for r in records if r["kind"] == "latency"]
    with figure(path) as ax:
        for name in _contenders(records):
            pts = sorted((r["utterances"], r["p50_ms"], r["p90_ms"]) for r in latency if label(r) == name)
            if pts:
                xs, p50, p90 = zip(*pts)
                (line,) = ax.plot(xs, p50, marker="o", label=name)
                ax.fill_between(xs, p50, p90, color=line.get_color(), alpha=0.15)
        _floor_lines(
            ax, latency, "utterances", "floor {}: max(weight bytes / bandwidth, FLOPs / peak)", lw=1.5
        )
        ax.set_xlabel("utterances in the conversation (batch 1)")
        ax.set_ylabel("latency ms (p50, band to p90)")
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7)


def _floor_lines(ax: Any, rows: list[dict[str, Any]], x: str, text: str, **style: Any) -> None:
    """The onnxruntime records' floor per precision (fp32 dashed, int8 dotted) against `x`."""
    for precision, line in (("fp32", "k--"), ("int8", "k:")):
        floor = sorted(
            (r[x], r["floor_ms"])
            for r in rows
            if r["backend"] == "onnxruntime" and r["precision"] == precision and r.get("floor_ms")
        )
        if floor:
            ax.plot(*zip(*floor), line, label=text.format(precision), **style)


def write(records: list[dict], env: dict[str, Any], out_dir: Path, title: str) -> str:
    plots = {"bench_latency.png": lambda path: plot(records, path, title)}
    if any(r.get("benchmark") == "streaming" for r in records):
        plots["bench_streaming.png"] = lambda path: plot_streaming(records, path)
    return write_pages(out_dir, "bench", records, markdown(records, env, title), plots)


def write_pages(
    out_dir: Path, stem: str, data: Any, text: str, plots: dict[str, Callable[[Path], None]] | None = None
) -> str:
    """The one report writer: STEM.json (the data), STEM.md (the text) and each plot (file name -> what draws it)
    in out_dir, every file written atomically; returns the text."""
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / f"{stem}.json", data)
    with atomic_open(out_dir / f"{stem}.md", "w") as f:
        f.write(text)
    for name, draw in (plots or {}).items():
        draw(out_dir / name)
    return text


@contextlib.contextmanager
def figure(path: Path, size: tuple[float, float] = (7, 4.5), cols: int = 1) -> Iterator[Any]:
    """A matplotlib figure (yields its Axes, or `cols` of them), saved atomically to `path` as PNG on leaving."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, cols, figsize=size)
    try:
        yield axes
        fig.tight_layout()
        with atomic_open(path, "wb") as f:
            fig.savefig(f, format="png", dpi=110)
    finally:
        plt.close(fig)


def plot_streaming(records: list[dict[str, Any]], path: Path) -> None:
    """p50 per new utterance vs history: the full recompute, the step graph per engine and precision, and the
    step graph's floor where the run measured it."""
    rows = [r for r in records if r.get("benchmark") == "streaming"]
    with figure(path) as ax:
        for key in dict.fromkeys((r["path"], r["backend"], r["precision"]) for r in rows):
            pts = sorted(
                (r["n"], r["p50_ms"]) for r in rows if (r["path"], r["backend"], r["precision"]) == key
            )
            ax.plot(
                *zip(*pts),
                "o-" if key[0] == "full" else "s-",
                ms=3,
                label=f"{key[0]} {key[1]} {key[2]}" + (" (whole conversation)" if key[0] == "full" else ""),
            )
        _floor_lines(ax, [r for r in rows if r["path"] == "step"], "n", "step floor {} (roofline)")
        threads = ", ".join(map(str, sorted({r["threads"] for r in rows})))
        ax.set(
            xlabel="history n (utterances, the new one included)",
            ylabel="latency of one new utterance, p50 (ms)",
            yscale="log",
            title=f"streaming: step vs full recompute (threads {threads})",
        )
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
