"""The browser face: the chat page at `/`, the dashboard at `/dashboard`, their static
assets under `/web/`, and the JSON the dashboard polls, `/v1/stats`.

Decisions:
- The pages and assets ship inside the package (`tuili/web/`) and are served from a fixed
  list of names, so no request path ever reaches the file system. Every page and asset
  carries a Content-Security-Policy that allows scripts, styles and connections from this
  origin only, and no inline script: even if model text became markup somewhere, it could
  not run.
- `/v1/stats` is derived from the same objects as `/metrics`: each engine's stats
  snapshot (`AsyncEngine.stats()`) and the Prometheus counters and histograms in
  `Metrics`. It sits under `/v1`, so the API key guards it like the rest of the API.
- Windows: rates and last-minute percentiles need earlier readings of the counters. A
  reading is taken when `/v1/stats` is asked (at most one per `MIN_GAP_S`) and kept for
  `WINDOW_S`; nothing runs in the background when no dashboard is open. Percentiles come
  from the histograms' bucket deltas between the oldest kept reading and now (linear
  inside a bucket, as Prometheus' histogram_quantile does); before there is an earlier
  reading the window is the server's whole life, and `window_s` says which it was.
- Token counters grow when a call finishes (as in `/metrics`), so tokens/s moves in steps
  when answers are long.
- Requests in flight: the engine exposes counts (running and waiting sequences, calls in
  flight), not per-request progress, so the stats give the counts per model and say so
  (`in_flight.per_request` is false) rather than invent rows.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from ..engine import TIERS
from .errors import APIError

web = APIRouter()

WINDOW_S = 60.0  # latency percentiles and hit rates
RATE_WINDOW_S = 10.0  # tokens per second
MIN_GAP_S = 0.5  # several dashboards polling share readings

CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "font-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
SECURITY_HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
                    "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}
TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
         ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}
PAGES = {"/": "chat.html", "/dashboard": "dashboard.html"}
ASSETS = ("chat.js", "dashboard.js", "common.js", "markdown.js", "style.css", "icon.svg")
_cache: dict[str, bytes] = {}


def asset(name: str) -> Response:
    if name not in _cache:
        _cache[name] = resources.files("tuili.web").joinpath(name).read_bytes()
    suffix = name[name.rindex("."):]
    return Response(_cache[name], media_type=TYPES[suffix], headers=SECURITY_HEADERS)


@web.get("/", include_in_schema=False)
async def chat_page() -> Response:
    return asset(PAGES["/"])


@web.get("/dashboard", include_in_schema=False)
async def dashboard_page() -> Response:
    return asset(PAGES["/dashboard"])


@web.get("/web/{name}", include_in_schema=False)
async def web_asset(name: str) -> Response:
    if name not in ASSETS:
        raise APIError(404, f"no web asset named {name!r}", code="not_found")
    return asset(name)


@web.get("/v1/stats", include_in_schema=False)
async def stats(request: Request) -> dict[str, Any]:
    state = request.app.state
    history = getattr(state, "web_stats_history", None)
    if history is None:
        history = state.web_stats_history = History()
    return build_stats(state.models, state.metrics, getattr(state, "router", None), history)


# ---- readings of the counters ----------------------------------------------------------

@dataclass
class Reading:
    """Cumulative counters at one moment, per model (histograms as cumulative bucket counts)."""
    t: float
    prompt: dict[str, float] = field(default_factory=dict)
    output: dict[str, float] = field(default_factory=dict)
    finished: dict[str, float] = field(default_factory=dict)
    ttft: dict[str, list[float]] = field(default_factory=dict)
    tpot: dict[str, list[float]] = field(default_factory=dict)
    queries: dict[str, float] = field(default_factory=dict)
    hits: dict[tuple[str, str], float] = field(default_factory=dict)  # (model, tier)
    decisions: dict[tuple[str, str], float] = field(default_factory=dict)  # (reason, model)


class History:
    """Readings of the last WINDOW_S seconds (plus one older, so the window is full)."""

    def __init__(self) -> None:
        self.readings: deque[Reading] = deque()

    def add(self, r: Reading) -> None:
        if self.readings and r.t - self.readings[-1].t < MIN_GAP_S:
            return
        self.readings.append(r)
        while len(self.readings) > 2 and self.readings[1].t <= r.t - WINDOW_S:
            self.readings.popleft()

    def since(self, now: float, seconds: float) -> Reading | None:
        """The newest reading at least `seconds` old, else the oldest one before `now`."""
        older = [r for r in self.readings if r.t < now - 1e-9]
        if not older:
            return None
        at_least = [r for r in older if r.t <= now - seconds]
        return at_least[-1] if at_least else older[0]


def _samples(metric, suffix: str):
    for family in metric.collect():
        for s in family.samples:
            if s.name.endswith(suffix):
                yield s.labels, s.value


def _by_model(counter) -> dict[str, float]:
    return {labels["model"]: v for labels, v in _samples(counter, "_total")}


def _buckets(histogram) -> tuple[list[float], dict[str, list[float]]]:
    bounds: list[float] = []
    per_model: dict[str, dict[float, float]] = {}
    for labels, v in _samples(histogram, "_bucket"):
        le = float(labels["le"])
        per_model.setdefault(labels["model"], {})[le] = v
        if le not in bounds:
            bounds.append(le)
    bounds.sort()
    return bounds, {m: [b.get(le, 0.0) for le in bounds] for m, b in per_model.items()}


def read(metrics, stats: dict[str, dict[str, Any]], now: float) -> tuple[Reading, list[float], list[float]]:
    r = Reading(now, _by_model(metrics.prompt_tokens), _by_model(metrics.generation_tokens))
    for labels, v in _samples(metrics.finished, "_total"):
        r.finished[labels["model"]] = r.finished.get(labels["model"], 0.0) + v
    ttft_bounds, r.ttft = _buckets(metrics.ttft)
    tpot_bounds, r.tpot = _buckets(metrics.tpot)
    for name, s in stats.items():
        r.queries[name] = float(s.get("prefix_query_tokens", 0))
        for t in TIERS:
            r.hits[name, t] = float(s.get(f"prefix_hit_tokens_{t}", 0))
    for labels, v in _samples(metrics.route_decisions, "_total"):
        r.decisions[labels["reason"], labels["model"]] = v
    return r, ttft_bounds, tpot_bounds


# ---- derived figures ---------------------------------------------------------------------

def quantile(q: float, bounds: list[float], counts: list[float]) -> float | None:
    """The q-quantile of a histogram given cumulative counts at each upper bound (+Inf last)."""
    if not counts or counts[-1] <= 0:
        return None
    rank = q * counts[-1]
    prev_bound, prev_count = 0.0, 0.0
    for bound, count in zip(bounds, counts):
        if count >= rank:
            if bound == float("inf"):
                return prev_bound  # above the last finite bound: the best a histogram can say
            inside = count - prev_count
            return prev_bound + (bound - prev_bound) * ((rank - prev_count) / inside if inside > 0 else 1.0)
        prev_bound, prev_count = bound, count
    return prev_bound


def _delta_buckets(now: dict[str, list[float]], then: dict[str, list[float]] | None, models: list[str]) -> list[float]:
    total: list[float] = []
    for m in models:
        cur = now.get(m)
        if cur is None:
            continue
        old = (then or {}).get(m) or [0.0] * len(cur)
        d = [a - b for a, b in zip(cur, old)]
        total = d if not total else [a + b for a, b in zip(total, d)]
    return total


def _latency(bounds: list[float], now: dict, then: dict | None, models: list[str]) -> dict[str, Any]:
    d = _delta_buckets(now, then, models)
    return {"p50": quantile(0.5, bounds, d), "p99": quantile(0.99, bounds, d), "count": int(d[-1]) if d else 0}


def _rate(now: dict, then: dict | None, keys: list, seconds: float | None) -> float | None:
    if then is None or not seconds:
        return None
    return sum(now.get(k, 0.0) - then.get(k, 0.0) for k in keys) / seconds


def _figures(models: list[str], stats: dict[str, dict], r: Reading, win: Reading | None, rate: Reading | None,
             ttft_bounds: list[float], tpot_bounds: list[float]) -> dict[str, Any]:
    """Figures for a set of models (one model, or all of them for the totals)."""
    s = [stats[m] for m in models]
    add = lambda key: sum(int(x.get(key, 0)) for x in s)  # noqa: E731
    rate_s = (r.t - rate.t) if rate is not None else None
    queries = sum(r.queries.get(m, 0.0) for m in models)
    win_queries = queries - sum(win.queries.get(m, 0.0) for m in models) if win is not None else None
    prefix: dict[str, Any] = {"query_tokens": int(queries)}
    for t in TIERS:
        hits = sum(r.hits.get((m, t), 0.0) for m in models)
        win_hits = hits - sum(win.hits.get((m, t), 0.0) for m in models) if win is not None else None
        prefix[t] = {"hit_tokens": int(hits), "hit_rate": hits / queries if queries else None,
                     "window_hit_rate": win_hits / win_queries if win_queries else None}
    return {
        "running": add("running"), "waiting": add("waiting"), "calls_in_flight": add("calls_in_flight"),
        "preemptions": add("preemptions"),
        "totals": {"prompt_tokens": int(sum(r.prompt.get(m, 0.0) for m in models)),
                   "output_tokens": int(sum(r.output.get(m, 0.0) for m in models)),
                   "requests_finished": int(sum(r.finished.get(m, 0.0) for m in models))},
        "rates": {"prompt_tokens_per_s": _rate(r.prompt, rate and rate.prompt, models, rate_s),
                  "output_tokens_per_s": _rate(r.output, rate and rate.output, models, rate_s)},
        "latency": {"ttft": _latency(ttft_bounds, r.ttft, win and win.ttft, models),
                    "tpot": _latency(tpot_bounds, r.tpot, win and win.tpot, models)},
        "kv": {"device": {"used": add("kv_blocks_used"), "free": add("kv_blocks_free"),
                          "total": add("kv_blocks_total")},
               "host": {"blocks": add("kv_host_blocks"), "bytes": add("kv_host_bytes")},
               "disk": {"blocks": add("kv_disk_blocks"), "bytes": add("kv_disk_bytes")}},
        "prefix": prefix,
    }


def _router(router, r: Reading, win: Reading | None) -> dict[str, Any] | None:
    if router is None:
        return None
    rows = [{"reason": reason, "model": model, "count": int(v),
             "window_count": int(v - win.decisions.get((reason, model), 0.0)) if win is not None else None}
            for (reason, model), v in sorted(r.decisions.items())]
    return {"name": router.name, "fast": router.fast, "strong": router.strong, "decisions": rows}


def build_stats(registry, metrics, router, history: History, now: float | None = None) -> dict[str, Any]:
    now = time.time() if now is None else now
    served = registry.all()
    names = [m.name for m in served]
    stats = {m.name: m.engine.stats() for m in served}
    r, ttft_bounds, tpot_bounds = read(metrics, stats, now)
    win = history.since(now, WINDOW_S)
    rate = history.since(now, RATE_WINDOW_S)
    history.add(r)
    per_model = []
    for m in served:
        f = _figures([m.name], stats, r, win, rate, ttft_bounds, tpot_bounds)
        per_model.append({"name": m.name, "max_model_len": m.max_model_len, **f})
    started = min((m.created for m in served), default=int(now))
    return {
        "time": now,
        "uptime_s": max(now - started, 0.0),
        "window_s": (now - win.t) if win is not None else None,
        "rate_window_s": (now - rate.t) if rate is not None else None,
        **_figures(names, stats, r, win, rate, ttft_bounds, tpot_bounds),
        "models": per_model,
        "router": _router(router, r, win),
        "decisions_by_reason": _by_reason(r),
        "replicas": _replicas(served),
        "in_flight": {"per_request": False,
                      "note": "the engine exposes counts per model (calls in flight, sequences running and "
                              "waiting), not per-request progress",
                      "by_model": [{"model": m["name"], "calls": m["calls_in_flight"], "running": m["running"],
                                    "waiting": m["waiting"]} for m in per_model]},
    }


def _by_reason(r: Reading) -> dict[str, int]:
    out: dict[str, int] = {}
    for (reason, _), v in r.decisions.items():
        out[reason] = out.get(reason, 0) + int(v)
    return out


def _replicas(served) -> list[dict[str, Any]] | None:
    """Per model served by Ray Serve replicas (`tuili serve --replicas N`), one row per replica;
    None for engines in this process. The figures above are already the replicas' sums."""
    remote = [m for m in served if hasattr(m.engine, "replica_stats")]
    if not remote:
        return None
    from .replicas.stats import replica_rows  # no Ray import: rows come from this process's routers

    return [{"model": m.name, "replicas": replica_rows(m.engine)} for m in remote]
