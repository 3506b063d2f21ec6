"""Cold start of `tuili serve`: process start to the first streamed token of one request.

What a user waits for after typing the command, with the converted model cache present:
Python and torch imports, loading the weights, the engine's start-up (kernel load, KV
pool), the HTTP server, then one request's prefill and first decode. The clock starts
just before the process is spawned; /health is polled every 50 ms; the request is sent
as soon as the server is ready and the time of its first non-empty SSE chunk is kept
(the `tuili bench serve` client measures it).
"""
from __future__ import annotations

import asyncio
import statistics
import time
from pathlib import Path

import httpx

from tuili.bench.client import RequestResult, request_body, send_request
from tuili.bench.launch import free_port
from tuili.bench.results import append_jsonl

from .common import Layout, log
from .servers import ServerSpec, start, tuili_spec


async def first_token_s(base_url: str, model: str, t0: float) -> float:
    """Seconds from t0 (a perf_counter() reading) to the first streamed token of a short greedy completion."""
    body = request_body("completions", model, "The capital of France is", 4, extras=False)
    result = RequestResult(index=0)
    async with httpx.AsyncClient(timeout=120.0, trust_env=False) as client:
        await send_request(client, base_url + "/v1/completions", body, result, {}, t0)
    if not result.success or result.ttft is None:
        raise RuntimeError(f"first request failed: {result.error}")
    return result.start + result.ttft


def measure(spec_for_port, log_dir: Path) -> dict[str, float]:
    """One cold start of the server that `spec_for_port(port)` describes."""
    port = free_port()
    spec: ServerSpec = spec_for_port(port)
    t0 = time.perf_counter()
    server = start(spec, port, log_dir)
    try:
        first = asyncio.run(first_token_s(server.base_url, server.model, t0))
    finally:
        server.stop()
    return {"ready_s": server.start_s, "first_token_s": first}


def run(model: str, dtypes: list[str], repeats: int, log_dir: Path) -> list[dict]:
    """Cold starts of `tuili serve` for each dtype, `repeats` times; one record per dtype with the medians."""
    records = []
    for dtype in dtypes:
        runs = []
        for i in range(repeats):
            m = measure(lambda port: tuili_spec(model, dtype, port), log_dir)
            log(f"cold start tuili ({dtype}) {i + 1}/{repeats}: ready {m['ready_s']:.2f} s, "
                f"first token {m['first_token_s']:.2f} s")
            runs.append(m)
        records.append({"bench": "peers-cold-start", "server": f"tuili-{dtype}", "label": f"tuili ({dtype})",
                        "repeats": repeats, "runs": runs,
                        "ready_s": statistics.median(r["ready_s"] for r in runs),
                        "first_token_s": statistics.median(r["first_token_s"] for r in runs)})
    return records


def run_from_args(args, layout: Layout) -> int:
    """The `cold-start` command: medians per dtype on stdout, records appended to --out."""
    if args.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    stamp = time.strftime("%Y%m%dT%H%M%S")
    records = [{**r, "run_id": f"cold-{stamp}", "time": stamp}
               for r in run(args.model, dtypes, args.repeats, layout.logs / "servers")]
    for r in records:
        print(f"{r['label']}: ready {r['ready_s']:.2f} s, first token {r['first_token_s']:.2f} s "
              f"(median of {r['repeats']})")
        if args.out:
            append_jsonl(args.out, r)
    return 0
