"""Statistics of a benchmark run: throughput, latency percentiles, goodput, the text table."""
from __future__ import annotations

from typing import Any

import numpy as np

from .client import RequestResult

SLO_KEYS = ("ttft", "tpot", "e2e")
PERCENTILES = (50, 90, 99)


def duration_of(results: list[RequestResult]) -> float:
    """Seconds from the benchmark's start to the end of its last request."""
    return max((r.end for r in results), default=0.0)


def _stats_ms(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, **{f"p{p}": None for p in PERCENTILES}}
    a = np.asarray(values, dtype=float) * 1000.0
    return {"mean": float(a.mean()), **{f"p{p}": float(np.percentile(a, p)) for p in PERCENTILES}}


def meets_slo(r: RequestResult, goodput: dict[str, float]) -> bool:
    if not r.success:
        return False
    values = {"ttft": r.ttft, "tpot": r.tpot, "e2e": r.e2e}
    for key, limit_ms in goodput.items():
        v = values[key]
        if v is not None and v * 1000.0 > limit_ms:
            return False
        if v is None and key != "tpot":
            return False
    return True


def summarize(results: list[RequestResult], duration: float, goodput: dict[str, float] | None = None) -> dict:
    ok = [r for r in results if r.success]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens or 0 for r in ok)
    rate = (lambda x: x / duration) if duration > 0 else (lambda x: 0.0)
    errors: dict[str, int] = {}
    for r in results:
        if not r.success:
            errors[r.error] = errors.get(r.error, 0) + 1
    summary: dict[str, Any] = {
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "duration_s": duration,
        "total_input_tokens": in_tokens,
        "total_output_tokens": out_tokens,
        "request_throughput": rate(len(ok)),
        "output_throughput": rate(out_tokens),
        "total_token_throughput": rate(in_tokens + out_tokens),
        "ttft_ms": _stats_ms([r.ttft for r in ok if r.ttft is not None]),
        "tpot_ms": _stats_ms([t for r in ok if (t := r.tpot) is not None]),
        "itl_ms": _stats_ms([g for r in ok for g in r.itl]),
        "e2e_ms": _stats_ms([r.e2e for r in ok if r.e2e is not None]),
        "errors": dict(sorted(errors.items(), key=lambda kv: -kv[1])[:5]),
    }
    if goodput:
        good = sum(meets_slo(r, goodput) for r in results)
        summary["goodput_slo_ms"] = dict(goodput)
        summary["good_requests"] = good
        summary["goodput"] = rate(good)
    return summary


def parse_goodput(specs: list[str] | None) -> dict[str, float] | None:
    """['ttft:500', 'tpot:50'] -> {'ttft': 500.0, 'tpot': 50.0} (milliseconds)."""
    if not specs:
        return None
    slo: dict[str, float] = {}
    for spec in specs:
        key, _, value = spec.partition(":")
        key = key.strip().lower().removesuffix("l")  # accept vLLM's "e2el"
        try:
            ms = float(value)
        except ValueError:
            ms = -1.0
        if key not in SLO_KEYS or not ms > 0:
            raise ValueError(f"goodput: expected KEY:MS with KEY in {', '.join(SLO_KEYS)} and MS > 0, got {spec!r}")
        slo[key] = ms
    return slo


def format_table(summary: dict, title: str) -> str:
    def num(v: float | None, fmt: str = "{:.2f}") -> str:
        return "-" if v is None else fmt.format(v)

    width = 56
    lines = [f" {title} ".center(width, "="),
             f"{'Completed requests:':<36}{summary['completed']:>20}",
             f"{'Failed requests:':<36}{summary['failed']:>20}",
             f"{'Duration (s):':<36}{num(summary['duration_s']):>20}",
             f"{'Total input tokens:':<36}{summary['total_input_tokens']:>20}",
             f"{'Total output tokens:':<36}{summary['total_output_tokens']:>20}",
             f"{'Request throughput (req/s):':<36}{num(summary['request_throughput']):>20}",
             f"{'Output token throughput (tok/s):':<36}{num(summary['output_throughput']):>20}",
             f"{'Total token throughput (tok/s):':<36}{num(summary['total_token_throughput']):>20}"]
    if "goodput" in summary:
        slo = " ".join(f"{k}:{v:g}" for k, v in summary["goodput_slo_ms"].items())
        lines.append(f"{'Goodput (req/s) [' + slo + ']:':<36}{num(summary['goodput']):>20}")
        lines.append(f"{'Requests meeting the SLO:':<36}{summary['good_requests']:>20}")
    lines.append("-" * width)
    lines.append(f"{'(ms)':<12}" + "".join(f"{h:>11}" for h in ("mean", "p50", "p90", "p99")))
    for key, name in (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL"), ("e2e_ms", "E2E")):
        s = summary[key]
        lines.append(f"{name:<12}" + "".join(f"{num(s[k]):>11}" for k in ("mean", "p50", "p90", "p99")))
    for err, n in summary["errors"].items():
        lines.append(f"error x{n}: {err}"[:200])
    lines.append("=" * width)
    return "\n".join(lines)
