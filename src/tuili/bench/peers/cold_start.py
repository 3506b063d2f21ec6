"""Cold start of `tuili serve`: process start to the first streamed token of one request.

What a user waits for after typing the command, with the converted model cache present:
Python and torch imports, loading the weights, the engine's start-up (kernel load, KV
pool), the HTTP server, then one request's prefill and first decode. The clock starts
just before the process is spawned; /health is polled every 50 ms; the request is sent
as soon as the server is ready and the time of its first non-empty SSE chunk is kept.
"""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import httpx

from .common import free_port, log
from .servers import ServerSpec, start, tuili_spec


def first_token_s(base_url: str, model: str, t0: float) -> float:
    """Seconds from t0 to the first streamed token of a short greedy completion."""
    body = {"model": model, "prompt": "The capital of France is", "max_tokens": 4, "temperature": 0,
            "stream": True}
    with httpx.Client(timeout=120.0, trust_env=False) as client:
        with client.stream("POST", base_url + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                raise RuntimeError(f"HTTP {r.status_code}: {r.read().decode(errors='replace')[:200]}")
            for line in r.iter_lines():
                if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                    continue
                choices = json.loads(line[5:]).get("choices") or [{}]
                if choices[0].get("text"):
                    return time.perf_counter() - t0
    raise RuntimeError("the stream carried no text")


def measure(spec_for_port, log_dir: Path) -> dict[str, float]:
    """One cold start of the server that `spec_for_port(port)` describes."""
    port = free_port()
    spec: ServerSpec = spec_for_port(port)
    t0 = time.perf_counter()
    server = start(spec, port, log_dir)
    try:
        first = first_token_s(server.base_url, server.model, t0)
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
