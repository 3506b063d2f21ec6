"""The markdown table and the plot of one peers run, from its JSON lines (medians over repeats).

`python -m tuili.bench.peers report --out FILE [--run-id ID]` rebuilds them from the file
(default: its latest run), so a table can be redrawn without rerunning anything.
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path


def load_run(out: Path, run_id: str | None) -> list[dict]:
    if not out.exists():
        raise FileNotFoundError(f"no results file {out}")
    records = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    records = [r for r in records if str(r.get("bench", "")).startswith("peers")]
    if not records:
        raise ValueError(f"{out} holds no peers records")
    run_id = run_id or records[-1]["run_id"]
    chosen = [r for r in records if r.get("run_id") == run_id]
    if not chosen:
        raise ValueError(f"{out} holds no run {run_id!r}")
    return chosen


def _median(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def aggregate(records: list[dict]) -> tuple[dict, list[int]]:
    """{server: {"label", "start_s", "failed", c: {"tok_s", "ttft_ms", "n"}}} over served records; concurrencies."""
    table: dict[str, dict] = {}
    concurrencies = sorted({r["concurrency"] for r in records if r.get("kind") == "serve"})
    for r in records:
        if r.get("kind") != "serve":
            continue
        row = table.setdefault(r["server"], {"label": r["label"], "start_s": r.get("start_s"), "failed": 0, "runs": {}})
        row["failed"] += r.get("failed", 0)
        row["runs"].setdefault(r["concurrency"], []).append(r)
    for row in table.values():
        for c, runs in list(row["runs"].items()):
            row[c] = {"tok_s": _median([x["output_throughput"] for x in runs]),
                      "ttft_ms": _median([x["ttft_ms"]["p50"] for x in runs]),
                      "tpot_ms": _median([x["tpot_ms"]["p50"] for x in runs]), "n": len(runs)}
    return table, concurrencies


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def markdown(records: list[dict]) -> str:
    table, cs = aggregate(records)
    first = records[0]
    served = [r for r in records if r.get("kind") == "serve"]
    repeats = max((r["repeat"] for r in served), default=0) + 1
    sizes = sorted({(r["concurrency"], r["num_prompts"]) for r in served})
    lines = [f"Peers run `{first['run_id']}` ({first['time']}): prompts {first['input_len']} tokens, "
             f"{first['output_len']} output tokens, streaming `/v1/{first['endpoint']}`"
             + (", requests per run " + ", ".join(f"{n} at c={c}" for c, n in sizes) if sizes else "")
             + f"; medians of {repeats} run(s), fresh prompt text every run."
             + (" QUICK SMOKE RUN: not a measurement." if first.get("quick") else ""), ""]
    if table:
        head = ["server", "ready (s)"] + [f"tok/s c={c}" for c in cs] + [f"TTFT p50 c={c}" for c in cs] + \
               [f"TPOT p50 c={c}" for c in cs] + ["failed"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for row in table.values():
            cells = [row["label"], _fmt(row["start_s"], ".1f")]
            cells += [_fmt(row.get(c, {}).get("tok_s"), ".1f") for c in cs]
            cells += [_fmt(None if row.get(c, {}).get("ttft_ms") is None else row[c]["ttft_ms"] / 1000, ".3f") + " s"
                      for c in cs]
            cells += [_fmt(row.get(c, {}).get("tpot_ms"), ".1f") + " ms" for c in cs]
            cells.append(str(row["failed"]))
            lines.append("| " + " | ".join(cells) + " |")
    offline = [r for r in records if r.get("kind") == "offline"]
    if offline:
        tok_s = _median([r["output_throughput"] for r in offline])
        lines += ["", f"{offline[0]['label']}: {tok_s:.1f} output tok/s, all {offline[0]['concurrency']} prompts "
                      f"submitted at once (no HTTP, no streaming; medians of {len(offline)} run(s))."]
    cold = [r for r in records if r.get("bench") == "peers-cold-start"]
    if cold:
        lines += ["", "| cold start (process start, converted cache present) | ready (s) | first token (s) |",
                  "|---|---|---|"]
        lines += [f"| {r['label']} | {r['ready_s']:.2f} | {r['first_token_s']:.2f} |" for r in cold]
    return "\n".join(lines) + "\n"


def plot(records: list[dict], path: Path) -> Path | None:
    """Output tok/s and TTFT p50 against concurrency, one line per server. None without matplotlib."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None
    table, cs = aggregate(records)
    fig = Figure(figsize=(12, 5))
    ax_tp, ax_ttft = fig.subplots(1, 2)
    for row in table.values():
        xs = [c for c in cs if row.get(c, {}).get("tok_s") is not None]
        ax_tp.plot(xs, [row[c]["tok_s"] for c in xs], marker="o", label=row["label"])
        ax_ttft.plot(xs, [row[c]["ttft_ms"] / 1000 for c in xs], marker="o", label=row["label"])
    offline = [r for r in records if r.get("kind") == "offline"]
    if offline:
        tok_s = _median([r["output_throughput"] for r in offline])
        ax_tp.axhline(tok_s, color="gray", linestyle="--", label=f"{offline[0]['label']}")
    for ax, ylabel in ((ax_tp, "output tok/s"), (ax_ttft, "TTFT p50 (s)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(cs, [str(c) for c in cs])
        ax.set_xlabel("concurrent requests")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    ax_tp.set_title("output throughput (higher is better)")
    ax_ttft.set_title("time to first token, p50 (lower is better)")
    ax_tp.legend(fontsize="small")
    fig.suptitle(f"peers run {records[0]['run_id']}" + (" (quick smoke run)" if records[0].get("quick") else ""))
    fig.subplots_adjust(left=0.06, right=0.98, bottom=0.12, top=0.86, wspace=0.22)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def write_report(out: Path, run_id: str | None) -> tuple[str, Path | None]:
    records = load_run(out, run_id)
    text = markdown(records)
    out.with_suffix(".md").write_text(text)
    return text, plot(records, out.with_suffix(".png"))
