"""`tuili bench soak`: does a running server survive what clients do, and give back what it took?

The run: read the server's gauges (GET /metrics), send a warm-up batch, read them again,
then send `--requests` requests of the seeded mix in soak_plan.py (good chat and
completions requests, streamed or not; about 20% streamed and abandoned after their first
chunk; about 5% malformed), at most `--concurrency` in flight, over one httpx client.
Afterwards the KV gauge is polled for up to `--settle` seconds until it is back at its
starting count (aborted requests free their blocks a step later), then read a last time.

Gauges (Prometheus text, summed over models): `tuili_kv_blocks_used` (any metric named
`*kv_blocks_used`) and `process_resident_memory_bytes` (prometheus-client's process
collector). A gauge the server does not export is reported missing, and its check fails.

PASS needs all of: no response with a status >= 500; no good request that failed without
a status (a transport error, an error event inside its stream, a stream cut short, a 200
that is not a completion); KV blocks in use back at their starting count; RSS growth
from after the warm-up to the end under `--max-rss-growth` (5%). Malformed requests
answered with a 4xx are counted and shown but are not part of the verdict (a lax server
that accepts one is not unreliable). Exit status 0 on PASS, 1 on FAIL.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families
from tqdm import tqdm

from .client import fetch_model, normalize_base_url
from .soak_plan import SoakRequest, make_plan

KV_SUFFIX = "kv_blocks_used"
RSS_METRIC = "process_resident_memory_bytes"
TIMEOUT = httpx.Timeout(300.0, connect=30.0)


@dataclass
class SoakResult:
    index: int
    malformed: str
    abandon: bool
    status: int | None = None
    outcome: str = ""  # completed, abandoned, refused, transport_error, stream_error, incomplete, bad_response
    error: str = ""


@dataclass
class Gauges:
    kv_blocks_used: float | None = None
    rss_bytes: float | None = None


def parse_gauges(text: str) -> Gauges:
    """KV blocks in use (summed over models) and resident memory from Prometheus text."""
    kv = rss = None
    for family in text_string_to_metric_families(text):
        values = [s.value for s in family.samples if s.name == family.name]
        if family.name.endswith(KV_SUFFIX) and values:
            kv = (kv or 0.0) + sum(values)
        elif family.name == RSS_METRIC and values:
            rss = sum(values)
    return Gauges(kv, rss)


async def read_gauges(client: httpx.AsyncClient, base_url: str, headers: dict[str, str]) -> Gauges:
    try:
        r = await client.get(base_url + "/metrics", headers=headers)
        return parse_gauges(r.text) if r.status_code == 200 else Gauges()
    except (httpx.HTTPError, ValueError):
        return Gauges()


async def send_one(client: httpx.AsyncClient, base_url: str, req: SoakRequest,
                   headers: dict[str, str]) -> SoakResult:
    """Send one request of the plan; never raises (what happened is in the result)."""
    res = SoakResult(req.index, req.malformed, req.abandon)
    url = base_url + req.path
    headers = {**headers, "Content-Type": "application/json"}
    try:
        if not req.stream:
            r = await client.post(url, content=req.content(), headers=headers)
            res.status = r.status_code
            if r.status_code != 200:
                res.outcome, res.error = "refused", r.text[:200]
            else:
                body = r.json()
                ok = isinstance(body, dict) and isinstance(body.get("choices"), list)
                res.outcome = "completed" if ok else "bad_response"
            return res
        async with client.stream("POST", url, content=req.content(), headers=headers) as r:
            res.status = r.status_code
            if r.status_code != 200:
                res.outcome, res.error = "refused", (await r.aread()).decode("utf-8", "replace")[:200]
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    res.outcome = "completed"
                    return res
                if req.abandon:  # leaving the block closes the connection mid-stream
                    res.outcome = "abandoned"
                    return res
                chunk = json.loads(data)
                if isinstance(chunk, dict) and chunk.get("error"):
                    res.outcome, res.error = "stream_error", data[:200]
                    return res
            res.outcome = "incomplete"
    except (httpx.HTTPError, ValueError) as e:
        res.outcome, res.error = "transport_error" if isinstance(e, httpx.HTTPError) else "bad_response", \
            f"{type(e).__name__}: {e}"[:200]
    return res


async def send_all(client: httpx.AsyncClient, base_url: str, plan: list[SoakRequest], headers: dict[str, str],
                   concurrency: int, desc: str) -> list[SoakResult]:
    semaphore = asyncio.Semaphore(concurrency)
    bar = tqdm(total=len(plan), desc=desc, unit="req", file=sys.stderr, leave=False)

    async def one(req: SoakRequest) -> SoakResult:
        async with semaphore:
            res = await send_one(client, base_url, req, headers)
        bar.update(1)
        return res

    results = await asyncio.gather(*(one(r) for r in plan))
    bar.close()
    return list(results)


async def settle(client: httpx.AsyncClient, base_url: str, headers: dict[str, str], start: float | None,
                 seconds: float) -> tuple[Gauges, float]:
    """Poll until KV blocks in use are back at `start` (or `seconds` pass); the last gauges and the wait."""
    t0 = time.perf_counter()
    while True:
        gauges = await read_gauges(client, base_url, headers)
        waited = time.perf_counter() - t0
        back = start is not None and gauges.kv_blocks_used is not None and gauges.kv_blocks_used <= start
        if back or waited >= seconds:
            return gauges, waited
        await asyncio.sleep(0.25)


async def run_soak(base_url: str, model: str, requests: int, concurrency: int, seed: int = 0, warmup: int = 16,
                   settle_s: float = 10.0, api_key: str | None = None) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=TIMEOUT, limits=limits, trust_env=False) as client:
        before = await read_gauges(client, base_url, headers)
        await send_all(client, base_url, make_plan(warmup, model, seed + 1), headers, concurrency, "warm-up")
        warm, _ = await settle(client, base_url, headers, before.kv_blocks_used, settle_s)
        t0 = time.perf_counter()
        results = await send_all(client, base_url, make_plan(requests, model, seed), headers, concurrency, "soak")
        duration = time.perf_counter() - t0
        end, waited = await settle(client, base_url, headers, before.kv_blocks_used, settle_s)
    report = build_report(results, before, warm, end)
    report.update(base_url=base_url, model=model, concurrency=concurrency, seed=seed, warmup_requests=warmup,
                  duration_s=round(duration, 2), settle_wait_s=round(waited, 2))
    return report


def build_report(results: list[SoakResult], before: Gauges, warm: Gauges, end: Gauges) -> dict[str, Any]:
    """Counts and gauges of a run, and the verdict (`failures`: empty means PASS)."""
    statuses = Counter(str(r.status) for r in results if r.status is not None)
    good = [r for r in results if not r.malformed]
    failed_good = Counter(r.outcome for r in good if r.outcome not in ("completed", "abandoned", "refused"))
    malformed = [r for r in results if r.malformed]
    growth = None
    if warm.rss_bytes and end.rss_bytes is not None:
        growth = (end.rss_bytes - warm.rss_bytes) / warm.rss_bytes
    report: dict[str, Any] = {
        "requests": len(results),
        "completed": sum(r.outcome == "completed" for r in good if not r.abandon),
        "good_requests": sum(not r.abandon for r in good),
        "abandoned": sum(r.outcome == "abandoned" for r in good),
        "abandon_planned": sum(r.abandon for r in good),
        "malformed": len(malformed),
        "malformed_answered_4xx": sum(r.status is not None and 400 <= r.status < 500 for r in malformed),
        "malformed_accepted": sorted({r.malformed for r in malformed if r.status == 200}),
        "status_counts": dict(sorted(statuses.items())),
        "errors_by_status": {s: n for s, n in sorted(statuses.items()) if s != "200"},
        "server_errors": sum(n for s, n in statuses.items() if int(s) >= 500),
        "failures_without_status": dict(failed_good),
        "kv_blocks_used": {"before": before.kv_blocks_used, "after": end.kv_blocks_used},
        "rss_bytes": {"before_warmup": before.rss_bytes, "after_warmup": warm.rss_bytes, "end": end.rss_bytes},
        "rss_growth_after_warmup": growth,
        "missing_metrics": [name for name, v in (("kv_blocks_used", end.kv_blocks_used), (RSS_METRIC, end.rss_bytes))
                            if v is None],
    }
    return report


def verdict(report: dict[str, Any], max_rss_growth: float = 0.05) -> list[str]:
    """Why the run fails; an empty list is a PASS."""
    reasons = []
    if report["server_errors"]:
        reasons.append(f"{report['server_errors']} responses with status >= 500")
    failed = report["failures_without_status"]
    for outcome, n in sorted(failed.items()):
        reasons.append(f"{n} good requests ended in {outcome}")
    kv = report["kv_blocks_used"]
    if kv["before"] is None or kv["after"] is None:
        reasons.append("KV blocks in use: not in /metrics")
    elif kv["after"] > kv["before"]:
        reasons.append(f"KV blocks in use {kv['after']:g} after the run, {kv['before']:g} before")
    growth = report["rss_growth_after_warmup"]
    if growth is None:
        reasons.append(f"RSS: {RSS_METRIC} not in /metrics")
    elif growth >= max_rss_growth:
        reasons.append(f"RSS grew {growth:.1%} after the warm-up (limit {max_rss_growth:.0%})")
    return reasons


def _gib(v: float | None) -> str:
    return "missing" if v is None else f"{v / 2**30:.3f} GiB"


def format_report(report: dict[str, Any]) -> str:
    kv, rss, growth = report["kv_blocks_used"], report["rss_bytes"], report["rss_growth_after_warmup"]
    lines = [
        f"soak: {report['requests']} requests to {report.get('base_url', '?')} (model {report.get('model', '?')}), "
        f"concurrency {report.get('concurrency', '?')}, seed {report.get('seed', '?')}, "
        f"{report.get('duration_s', 0):.1f} s",
        f"completed {report['completed']} of {report['good_requests']} good requests; abandoned "
        f"{report['abandoned']} of {report['abandon_planned']} after their first chunk; malformed "
        f"{report['malformed']}, {report['malformed_answered_4xx']} answered 4xx",
        "HTTP status: " + (", ".join(f"{s} x{n}" for s, n in report["status_counts"].items()) or "none"),
    ]
    if report["malformed_accepted"]:
        lines.append("malformed but answered 200: " + ", ".join(report["malformed_accepted"]))
    if report["failures_without_status"]:
        lines.append("failed without a status: " + ", ".join(f"{k} x{n}"
                                                           for k, n in report["failures_without_status"].items()))
    fmt = (lambda v: "missing" if v is None else f"{v:g}")
    lines.append(f"KV blocks in use: {fmt(kv['before'])} before, {fmt(kv['after'])} after "
                 f"(waited {report.get('settle_wait_s', 0):.1f} s)")
    lines.append(f"RSS: {_gib(rss['before_warmup'])} before warm-up, {_gib(rss['after_warmup'])} after, "
                 f"{_gib(rss['end'])} at the end" + ("" if growth is None else f" ({growth:+.1%} after warm-up)"))
    reasons = report["verdict"]["reasons"]
    lines.append("PASS" if not reasons else "FAIL: " + "; ".join(reasons))
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", required=True, help="server root, e.g. http://127.0.0.1:8000")
    p.add_argument("--requests", type=int, default=300, help="requests in the measured run")
    p.add_argument("--concurrency", type=int, default=16, help="requests in flight at most")
    p.add_argument("--model", default=None, help="model name to send (default: first id of GET /v1/models)")
    p.add_argument("--api-key", default=None, help="sent as a Bearer token")
    p.add_argument("--seed", type=int, default=0, help="seed of the request mix")
    p.add_argument("--warmup", type=int, default=16, help="requests sent before the RSS baseline is read")
    p.add_argument("--settle", type=float, default=10.0, metavar="SECONDS",
                   help="how long KV blocks may take to come back after the run")
    p.add_argument("--max-rss-growth", type=float, default=0.05, help="RSS growth after warm-up that fails the run")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")


def run_from_args(args: argparse.Namespace) -> int:
    if args.requests < 1 or args.concurrency < 1 or args.warmup < 0:
        raise ValueError("--requests and --concurrency must be >= 1, --warmup >= 0")
    base_url = normalize_base_url(args.base_url)
    model = args.model or fetch_model(base_url, args.api_key)
    report = asyncio.run(run_soak(base_url, model, args.requests, args.concurrency, args.seed, args.warmup,
                                  args.settle, args.api_key))
    reasons = verdict(report, args.max_rss_growth)
    report["verdict"] = {"pass": not reasons, "reasons": reasons}
    print(json.dumps(report) if args.json else format_report(report))
    return 0 if not reasons else 1
