"""Printing plans: one plan in full, a ranked table over the catalog, and the plot."""
from __future__ import annotations

from pathlib import Path

from .planner import Plan
from .shapes import ModelShape


def _size(n: float) -> str:
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= div:
            return f"{n / div:,.1f} {unit}"
    return f"{n:,.0f} B"


def _ms(s: float) -> str:
    return f"{s * 1000:,.0f} ms" if s >= 0.1 else f"{s * 1000:,.1f} ms"


def describe(shape: ModelShape) -> str:
    moe = f", MoE {shape.num_experts} experts, {shape.experts_per_token} active" if shape.num_experts else ""
    return (f"{shape.name}: {shape.architecture}, {shape.total_params / 1e9:.2f}B parameters "
            f"({shape.active_params / 1e9:.2f}B active){moe}, {shape.num_layers} layers")


def format_plan(plan: Plan, shape: ModelShape, quantization: str, kv_dtype: str) -> str:
    m = plan.memory
    lines = [describe(shape),
             f"hardware: {plan.hardware_name} x {plan.count}" + ("  (calibrated)" if plan.calibrated else ""),
             f"weights {quantization}, KV {kv_dtype}",
             "",
             "memory",
             f"  weights            {_size(m['weights_bytes'])} ({_size(m['weights_bytes_per_accelerator'])} per accelerator)",
             f"  KV per token       {m['kv_bytes_per_token']:,} B; per sequence {_size(m['kv_bytes_per_sequence'])}; "
             f"for the batch {_size(m['kv_bytes_for_batch'])}",
             f"  activations        {_size(m['activations_bytes'])} per step (per accelerator)",
             f"  KV pool            {_size(m['kv_pool_bytes'])} = {m['kv_pool_tokens']:,} tokens",
             f"  largest batch      {plan.max_batch} sequences on the device; KV tiers hold "
             f"{m['tier_sequences']['host']} more in host memory, {m['tier_sequences']['disk']} on disk (prefix reuse)",
             "",
             f"at concurrency {plan.concurrency}",
             f"  TTFT p50 / p99     {_ms(plan.ttft_s_p50)} / {_ms(plan.ttft_s_p99)}",
             f"  TPOT p50 / p99     {_ms(plan.tpot_s_p50)} / {_ms(plan.tpot_s_p99)}",
             f"  output             {plan.output_tok_s:,.1f} tok/s",
             f"  bound              prefill {plan.bound['prefill']}, decode {plan.bound['decode']}"]
    if plan.replica_requests_per_s is not None:
        lines += ["", f"traffic: one replica serves {plan.replica_requests_per_s:,.2f} req/s within the SLOs; "
                      f"{plan.replicas} replicas, {plan.accelerators} accelerators"]
    elif plan.meets_slo is not None:
        lines.append(f"  SLOs               {'met' if plan.meets_slo else 'missed'}")
    if plan.cost_per_million_output_tokens is not None:
        lines.append(f"  cost               ${plan.cost_per_million_output_tokens:,.3f} per million output tokens")
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(lines)


def format_table(plans: list[Plan], title: str, traffic: bool) -> str:
    head = ["#", "hardware", "xN", "weights/acc", "max batch", "conc", "TTFT p50", "TPOT p50", "tok/s/replica",
            "bound (prefill/decode)"]
    if traffic:
        head += ["req/s/replica", "replicas", "accelerators"]
    if any(p.cost_per_million_output_tokens is not None for p in plans):
        head.append("$/M out")
    rows = []
    for i, p in enumerate(plans, 1):
        if not p.memory["fits"]:
            rows.append([str(i), f"{p.hardware} (does not fit in {p.count})", str(p.count),
                         _size(p.memory["weights_bytes_per_accelerator"])] + ["-"] * (len(head) - 4))
            continue
        row = [str(i), p.hardware + ("" if p.memory["fits"] else " (does not fit)"), str(p.count), _size(p.memory["weights_bytes_per_accelerator"]), str(p.max_batch),
               str(p.concurrency), _ms(p.ttft_s_p50), _ms(p.tpot_s_p50), f"{p.output_tok_s:,.0f}",
               f"{p.bound['prefill']}/{p.bound['decode']}"]
        if traffic:
            ok = p.replicas > 0
            row += [f"{p.replica_requests_per_s or 0:,.2f}", str(p.replicas) if ok else "SLO missed",
                    str(p.accelerators) if ok else "-"]
        if "$/M out" in head:
            c = p.cost_per_million_output_tokens
            row.append(f"{c:,.3f}" if c is not None else "-")
        rows.append(row)
    widths = [max(len(h), *(len(r[j]) for r in rows)) for j, h in enumerate(head)]
    fmt = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths))
    return "\n".join([title, fmt(head), fmt(["-" * w for w in widths]), *map(fmt, rows)])


def write_plot(plans: list[Plan], path: str | Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conc = [p.concurrency for p in plans]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.plot(conc, [p.output_tok_s for p in plans], marker="o")
    a.set_xlabel("concurrency")
    a.set_ylabel("output tok/s")
    a.set_xscale("log", base=2)
    b.plot(conc, [p.ttft_s_p50 * 1000 for p in plans], marker="o", label="TTFT p50")
    b.plot(conc, [p.tpot_s_p50 * 1000 for p in plans], marker="s", label="TPOT p50")
    b.set_xlabel("concurrency")
    b.set_ylabel("ms")
    b.set_xscale("log", base=2)
    b.set_yscale("log")
    b.legend()
    fig.suptitle(title)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
