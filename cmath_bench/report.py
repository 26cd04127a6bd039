"""bench.json (the records), bench.md (tables: latency with speed-ups, throughput, load/memory, the bar) and
bench_latency.png (p50 latency vs conversation length, one line per contender)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cmath_runtime.files import atomic_open, atomic_write_json

# The speed bar, checked on the onnxruntime fp32 path at batch 1: minimum speed-up vs PyTorch eager.
BAR = {1: 2.5, 2: 2.5, 5: 2.5, 10: 2.5, 50: 1.5}


def label(rec: dict[str, Any]) -> str:
    return f"{rec['backend']} {rec['precision']}"


def _contenders(records: list[dict]) -> list[str]:
    seen: dict[str, None] = {}
    for r in records:
        if r["kind"] in ("latency", "throughput"):
            seen[label(r)] = None
    return list(seen)


def _ms(x: float | None) -> str:
    return "-" if x is None else (f"{x:.2f}" if x < 100 else f"{x:.0f}")


def latency_table(records: list[dict]) -> str:
    names = _contenders(records)
    rows = {}
    for r in records:
        if r["kind"] == "latency":
            speed = (
                f" ({r['speedup_vs_eager']:.2f}x)"
                if r.get("speedup_vs_eager") and r["backend"] != "pytorch-eager"
                else ""
            )
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
    seen = set()
    for r in records:
        if r["kind"] == "streaming":
            continue
        key = label(r)
        if key in seen:
            continue
        seen.add(key)
        th = r.get("threads") or {}
        threads = (
            f"{th.get('torch', '-')} / {th.get('ort_intra_op', '-')}, idle: {th.get('idle', '-')}"
            if th
            else "-"
        )
        diff = f"{r['max_abs_diff_vs_eager']:.1e}" if r.get("max_abs_diff_vs_eager") is not None else "-"
        imported = "-" if "torch_imported" not in r else ("yes" if r["torch_imported"] else "no")
        note = (r.get("note") or "").replace("|", "/")
        if r.get("compiled_graphs"):
            cache = r.get("inductor_cache") or {}
            note = (
                f"{r['compiled_graphs']} graphs compiled (inductor cache {cache.get('hit', 0)} hits, "
                f"{cache.get('miss', 0)} misses); compile s = first call. {note}".strip()
            )
        lines.append(
            f"| {r['backend']} | {r['precision']} | {r.get('provider', '-')} | {threads} | {_num(r, 'import_s', 2)} "
            f"| {_num(r, 'load_s', 2)} | {_num(r, 'compile_s', 1)} | {_num(r, 'peak_rss_mb', 0)} "
            f"| {_num(r, 'rss_delta_mb', 0)} | {diff} | {imported} | {note} |"
        )
    return "\n".join(lines)


def _num(rec: dict[str, Any], key: str, digits: int) -> str:
    return "-" if rec.get(key) is None else f"{rec[key]:.{digits}f}"


def bar_check(records: list[dict]) -> list[str]:
    """The speed bar on this run: onnxruntime fp32 vs eager (>= BAR[n]) and vs torch.compile (faster), batch 1."""
    lat = {(r["backend"], r["precision"], r["utterances"]): r for r in records if r["kind"] == "latency"}
    out = []
    for n, need in BAR.items():
        ort, eager = lat.get(("onnxruntime", "fp32", n)), lat.get(("pytorch-eager", "fp32", n))
        if not ort or not eager:
            continue
        comp = lat.get(("torch-compile", "fp32", n))
        ratio = eager["p50_ms"] / ort["p50_ms"]
        vs_compile = comp["p50_ms"] / ort["p50_ms"] if comp else None
        ok = ratio >= need and (vs_compile is None or vs_compile > 1)
        out.append(
            f"- {n} utterances: onnxruntime fp32 {ort['p50_ms']:.2f} ms vs eager {eager['p50_ms']:.2f} ms = "
            f"**{ratio:.2f}x** (bar {need}x)"
            + (
                f", vs torch.compile {comp['p50_ms']:.2f} ms = {vs_compile:.2f}x"
                if comp
                else ", torch.compile not measured"
            )
            + f": {'PASS' if ok else 'FAIL'}"
        )
    return out


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


def _lat(records: list[dict], backend: str, precision: str, n: int) -> dict | None:
    return next(
        (
            r
            for r in records
            if r["kind"] == "latency"
            and r["backend"] == backend
            and r["precision"] == precision
            and r["utterances"] == n
        ),
        None,
    )


def _step(records: list[dict], backend: str, precision: str, n: int) -> dict | None:
    return next(
        (
            r
            for r in records
            if r["kind"] == "streaming"
            and r["path"] == "step"
            and r["backend"] == backend
            and r["precision"] == precision
            and r["n"] == n
        ),
        None,
    )


EXACT = 1e-4  # max |dp| vs PyTorch eager for an "exact" (fp32-parity) path


def int8_bars(records: list[dict], env: dict[str, Any]) -> list[str]:
    """The int8 and step-path bars on this run (batch 1, p50, same run)."""
    out = []
    int8 = (env.get("parity") or {}).get("int8")
    agree = (
        (
            f"agreement {100 * int8['argmax_agreement']:.2f}% / max |dp| {int8['probs_max_abs']:.3g} on "
            f"{int8['rows']} validation rows ({'met' if int8['passed'] else 'NOT met'})"
        )
        if int8
        else "no int8 record"
    )
    for n in (1, 50):
        q, f = _lat(records, "onnxruntime", "int8", n), _lat(records, "onnxruntime", "fp32", n)
        if q and f:
            ratio = f["p50_ms"] / q["p50_ms"]
            ok = ratio >= 1.6 and bool(int8 and int8["passed"])
            out.append(
                f"- int8 vs fp32 runtime at {n} utterances: {f['p50_ms']:.2f} / {q['p50_ms']:.2f} ms = "
                f"**{ratio:.2f}x** (bar 1.6x), {agree}: {'PASS' if ok else 'FAIL'}"
            )
    exact = {
        (r["backend"], r["precision"])
        for r in records
        if r["kind"] == "latency"
        and r.get("max_abs_diff_vs_eager") is not None
        and r["max_abs_diff_vs_eager"] <= EXACT
        and r["backend"] not in ("pytorch-eager", "torch-compile")
    }
    for n in (10, 50):
        f = _lat(records, "onnxruntime", "fp32", n)
        cands = [r for r in (_lat(records, b, p, n) for b, p in exact) if r]
        if f and cands:
            best = min(cands, key=lambda r: r["p50_ms"])
            ratio = f["p50_ms"] / best["p50_ms"]
            out.append(
                f"- best exact path (max |dp| vs eager <= {EXACT:g}) at {n} utterances: {label(best)} "
                f"{best['p50_ms']:.2f} ms vs onnxruntime fp32 (today's settings) {f['p50_ms']:.2f} ms = "
                f"**{ratio:.2f}x** (bar 1.2x): {'PASS' if ratio >= 1.2 else 'FAIL'}"
            )
    s32, s8 = _step(records, "onnxruntime", "fp32", 50), _step(records, "onnxruntime", "int8", 50)
    steps = [
        r
        for r in records
        if r["kind"] == "streaming"
        and r["path"] == "step"
        and r["precision"] == "fp32"
        and r["n"] == 50
        and r.get("bytes_floor_ms")
    ]
    for i, r in enumerate(
        sorted(steps, key=lambda r: r["p50_ms"])
    ):  # the best fp32 step engine first: its bar
        x = r["p50_ms"] / r["bytes_floor_ms"]
        verdict = "PASS" if 1 <= x <= 1.5 else "FAIL" if x > 1.5 else "UNRELIABLE"
        out.append(
            f"- {'best ' if i == 0 else ''}fp32 step at history 50, {r['backend']}: {r['p50_ms']:.3f} ms vs its weight-bytes floor "
            f"{r['bytes_floor_ms']:.3f} ms ({r['weight_bytes'] / 1e6:.1f} MB / "
            + (
                f"{r['bandwidth_gb_s']:.1f} GB/s, the median copy bandwidth of the same rounds"
                if r.get("bandwidth_gb_s")
                else "bandwidth"
            )
            + f") = **{x:.2f}x** "
            f"(bar 1.5x): {verdict}"
            + (
                " (faster than its floor: this run measured the bandwidth too low, the machine was busy)"
                if x < 1
                else ""
            )
            + (
                f" [against the fastest copy of those rounds, {r['bandwidth_best_gb_s']:.1f} GB/s: "
                f"{r['latency_x_best_bytes_floor']:.2f}x]"
                if r.get("bandwidth_best_gb_s")
                else ""
            )
            + (
                f"; its MatMul twin (the same {r['twin_weight_bytes'] / 1e6:.1f} MB of weights as GEMVs and "
                f"nothing else, same engine) takes {r['twin_ms']:.3f} ms here ({r['twin_read_gb_s']:.1f} GB/s "
                f"read) = {r['twin_ms'] / r['bytes_floor_ms']:.2f}x the floor: the step is "
                f"{r['latency_x_twin']:.2f}x its twin"
                if r.get("twin_ms")
                else ""
            )
        )
    if s32 and s8:
        ratio = s32["p50_ms"] / s8["p50_ms"]
        st = (env.get("parity") or {}).get("step_int8")
        out.append(
            f"- int8 step vs fp32 step at history 50: {s32['p50_ms']:.3f} / {s8['p50_ms']:.3f} ms = "
            f"**{ratio:.2f}x** (bar 1.6x)"
            + (f", step int8 agreement {100 * st['argmax_agreement']:.2f}%" if st else "")
            + f": {'PASS' if ratio >= 1.6 else 'FAIL'}"
        )
    return out


def streaming_table(records: list[dict]) -> str:
    rows = [r for r in records if r["kind"] == "streaming"]
    names = list(dict.fromkeys(f"{r['path']} {r['backend']} {r['precision']}" for r in rows))
    table = {}
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
    parts = [
        f"# {title}",
        "",
        f"{env['cpu']}, {env['cores']} cores, {env['threads']} threads for every contender (torch.set_num_threads "
        f"and onnxruntime intra_op_num_threads); python {env['python']}, torch {env['torch']}, onnxruntime "
        f"{env['onnxruntime']}; load average at start {env['load_average']}"
        + (f", at the end {env['load_average_end']}" if env.get("load_average_end") else "")
        + ".",
        "",
        "## Latency, batch 1 (p50 ms; speed-up vs PyTorch eager)",
        "",
        latency_table(records),
        "",
    ]
    bar = bar_check(records)
    if bar:
        parts += [
            "## The bar (onnxruntime fp32 vs PyTorch eager and torch.compile, batch 1, p50)",
            "",
            *bar,
            "",
        ]
    bars = int8_bars(records, env)
    if bars:
        parts += ["## int8, best exact path, step path vs its floor", "", *bars, ""]
    if env.get("machine"):
        parts += [
            "## Roofline: each record against this machine's limits",
            "",
            roofline_table(records, env),
            "",
        ]
    if any(r["kind"] == "streaming" for r in records):
        parts += [
            "## Streaming: one new utterance at history n (step graph per engine vs full recompute)",
            "",
            streaming_table(records),
            "",
        ]
    parts += [
        "## Throughput",
        "",
        detail_table(records, "throughput"),
        "",
        "## Contenders (each in its own process): import and load time, peak memory (VmHWM) and its growth "
        "over the bare interpreter, agreement with eager",
        "",
        contender_table(records),
        "",
        "## Latency detail",
        "",
        detail_table(records, "latency"),
        "",
    ]
    return "\n".join(parts)


def plot(records: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in _contenders(records):
        pts = sorted(
            (r["utterances"], r["p50_ms"], r["p90_ms"])
            for r in records
            if r["kind"] == "latency" and label(r) == name
        )
        if pts:
            xs, p50, p90 = zip(*pts)
            (line,) = ax.plot(xs, p50, marker="o", label=name)
            ax.fill_between(xs, p50, p90, color=line.get_color(), alpha=0.15)
    for precision, style in (("fp32", "k--"), ("int8", "k:")):
        floor = sorted(
            (r["utterances"], r["floor_ms"])
            for r in records
            if r["kind"] == "latency"
            and r["backend"] == "onnxruntime"
            and r["precision"] == precision
            and r.get("floor_ms")
        )
        if floor:
            ax.plot(
                *zip(*floor),
                style,
                lw=1.5,
                label=f"floor {precision}: max(weight bytes / bandwidth, FLOPs / peak)",
            )
    ax.set_xlabel("utterances in the conversation (batch 1)")
    ax.set_ylabel("latency ms (p50, band to p90)")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)


def write(records: list[dict], env: dict[str, Any], out_dir: Path, title: str) -> str:
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "bench.json", records)
    text = markdown(records, env, title)
    with atomic_open(out_dir / "bench.md", "w") as f:
        f.write(text)
    plot(records, out_dir / "bench_latency.png", title)
    return text
