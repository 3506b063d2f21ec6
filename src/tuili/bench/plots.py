"""The latency histograms of `tuili bench serve` (PNG, matplotlib without pyplot)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .client import RequestResult


def write_plot(results: list[RequestResult], path: Path, title: str) -> None:
    """Histograms of TTFT, TPOT, ITL and E2E (ms) with their p50 and p99 marked."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state, renders with Agg

    ok = [r for r in results if r.success]
    series = [("TTFT", [r.ttft * 1000 for r in ok if r.ttft is not None]),
              ("TPOT", [t * 1000 for r in ok if (t := r.tpot) is not None]),
              ("ITL", [g * 1000 for r in ok for g in r.itl]),
              ("E2E", [r.e2e * 1000 for r in ok if r.e2e is not None])]
    fig = Figure(figsize=(11, 7.5))
    axes = fig.subplots(2, 2).ravel()
    for ax, (name, values) in zip(axes, series):
        ax.set_title(f"{name} (n={len(values)})")
        ax.set_xlabel("ms")
        ax.set_ylabel("count")
        if not values:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
            continue
        ax.hist(values, bins=min(50, max(5, len(values) // 2)), color="tab:blue", alpha=0.8)
        for p, style in ((50, "--"), (99, ":")):
            v = float(np.percentile(values, p))
            ax.axvline(v, color="tab:red", linestyle=style, label=f"p{p} {v:.1f} ms")
        ax.legend(fontsize="small")
    fig.suptitle(title)
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.07, top=0.9, hspace=0.35, wspace=0.2)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
