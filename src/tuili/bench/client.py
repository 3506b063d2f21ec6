"""The streaming client of `tuili bench serve` (and of the peers harness and the soak run).

What is sent, what is measured and how load is spaced are described in serve_bench.py's
docstring; this module holds the per-request code: one `RequestResult` per request, filled
by `send_request` from the SSE stream, and `run_benchmark`, which sends a list of prompts
at a bounded concurrency with Poisson arrivals. Errors of any kind are recorded on the
result, never raised, so one bad request cannot stop a run.
"""
from __future__ import annotations

import asyncio
import gc
import json
import math
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
from tqdm import tqdm

ENDPOINTS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}
TIMEOUT = httpx.Timeout(3600.0, connect=60.0)


@dataclass
class RequestResult:
    index: int
    success: bool = False
    error: str = ""
    prompt_tokens: int | None = None
    output_tokens: int = 0
    ttft: float | None = None        # seconds
    itl: list[float] = field(default_factory=list)  # seconds
    e2e: float | None = None         # seconds
    start: float = 0.0               # seconds after the benchmark started, when the request was sent
    text: str = ""

    @property
    def tpot(self) -> float | None:
        if not self.success or self.ttft is None or self.e2e is None or self.output_tokens <= 1:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)

    @property
    def end(self) -> float:
        return self.start + (self.e2e or 0.0)


def normalize_base_url(base_url: str) -> str:
    """'http://h:8000/' and 'http://h:8000/v1' both -> 'http://h:8000'."""
    url = base_url.rstrip("/")
    return url[:-3] if url.endswith("/v1") else url


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def fetch_model(base_url: str, api_key: str | None = None) -> str:
    """The first model id listed by GET /v1/models."""
    url = normalize_base_url(base_url) + "/v1/models"
    try:
        r = httpx.get(url, headers=_headers(api_key), timeout=30.0, trust_env=False)
        r.raise_for_status()
        data = r.json().get("data") or []
        return str(data[0]["id"])
    except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
        raise ValueError(f"cannot get a model id from {url} ({e}); pass --model") from None


def request_body(endpoint: str, model: str, prompt: str, output_len: int, extras: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "max_tokens": output_len, "temperature": 0, "stream": True,
                            "stream_options": {"include_usage": True}}
    if endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    if extras:
        body["ignore_eos"] = True
        body["min_tokens"] = output_len
    return body


def _chunk_text(chunk: dict[str, Any]) -> str:
    choices = chunk.get("choices") or []
    if not choices or not isinstance(choices[0], dict):
        return ""
    choice = choices[0]
    if "delta" in choice:
        delta = choice.get("delta") or {}
        return "".join(delta.get(k) or "" for k in ("content", "reasoning_content", "reasoning")
                       if isinstance(delta.get(k), str))
    text = choice.get("text")
    return text if isinstance(text, str) else ""


def _error_text(payload: Any) -> str:
    if isinstance(payload, dict):
        err = payload.get("error", payload)
        if isinstance(err, dict):
            return str(err.get("message") or err)
        return str(err)
    return str(payload)


async def send_request(client: httpx.AsyncClient, url: str, body: dict[str, Any], result: RequestResult,
                       headers: dict[str, str], t0: float) -> RequestResult:
    """Stream one request, filling `result` with its timings."""
    start = time.perf_counter()
    result.start = start - t0
    last = start
    chunks = 0
    usage: dict[str, Any] | None = None
    parts: list[str] = []
    try:
        async with client.stream("POST", url, json=body, headers=headers) as response:
            if response.status_code != 200:
                raw = (await response.aread()).decode("utf-8", "replace")
                try:
                    detail = _error_text(json.loads(raw))
                except ValueError:
                    detail = raw
                result.error = f"HTTP {response.status_code}: {detail.strip()[:300]}"
                return result
            async for line in response.aiter_lines():
                line = line.strip()
                if not line.startswith("data:"):
                    continue  # blank separators, comments, `event:` lines
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                try:
                    chunk = json.loads(data)
                except ValueError:
                    result.error = f"bad SSE data: {data[:200]}"
                    return result
                if not isinstance(chunk, dict):
                    continue
                if chunk.get("error"):
                    result.error = f"stream error: {_error_text(chunk)[:300]}"
                    return result
                now = time.perf_counter()
                text = _chunk_text(chunk)
                if text:
                    if chunks == 0:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last = now
                    chunks += 1
                    parts.append(text)
                if isinstance(chunk.get("usage"), dict):
                    usage = chunk["usage"]
    except Exception as e:  # transport errors, bad URLs, broken streams: recorded, never raised
        result.error = f"{type(e).__name__}: {e}".strip()[:300]
        return result
    finally:
        result.e2e = time.perf_counter() - start
        result.text = "".join(parts)
    if chunks == 0:
        result.error = "no text in the stream"
        return result
    if usage and isinstance(usage.get("completion_tokens"), int):
        result.output_tokens = usage["completion_tokens"]
    else:
        result.output_tokens = chunks
    if usage and isinstance(usage.get("prompt_tokens"), int):
        result.prompt_tokens = usage["prompt_tokens"]
    result.success = True
    return result


def arrival_times(n: int, request_rate: float, seed: int) -> list[float]:
    """Seconds after the start at which each request arrives: 0 for all at an infinite rate,
    else a Poisson process (exponential gaps of mean 1/rate, the first request at 0)."""
    if not math.isfinite(request_rate):
        return [0.0] * n
    rng = random.Random(seed)
    times, t = [], 0.0
    for i in range(n):
        times.append(t)
        t += rng.expovariate(request_rate)
    return times


async def run_benchmark(base_url: str, model: str, prompts: list[str], output_len: int, max_concurrency: int,
                        request_rate: float = math.inf, endpoint: str = "completions", extras: bool = True,
                        seed: int = 0, *, tokenizer=None, api_key: str | None = None,
                        progress: bool = True) -> list[RequestResult]:
    """Send every prompt, at most `max_concurrency` at a time, starts spaced by Poisson arrivals
    of `request_rate` req/s (inf: no spacing). Results come back in prompt order; each one's
    `start` is seconds after the benchmark began, so `duration_of(results)` is the wall time."""
    if endpoint not in ENDPOINTS:
        raise ValueError(f"endpoint: expected one of {', '.join(ENDPOINTS)}, got {endpoint!r}")
    if max_concurrency < 1:
        raise ValueError(f"max concurrency must be >= 1, got {max_concurrency}")
    if not request_rate > 0:
        raise ValueError(f"request rate must be > 0, got {request_rate}")
    url = normalize_base_url(base_url) + ENDPOINTS[endpoint]
    headers = _headers(api_key)
    results = [RequestResult(index=i) for i in range(len(prompts))]
    # A full garbage collection over the objects of torch, transformers & co. takes ~0.2 s and
    # would show up as a stall in the latencies; freeze them so collections stay short.
    gc.freeze()
    try:
        await _run(url, headers, model, prompts, output_len, max_concurrency, request_rate, endpoint, extras,
                   seed, results, progress)
    finally:
        gc.unfreeze()
    if tokenizer is not None:
        for r in results:
            if r.prompt_tokens is None:
                r.prompt_tokens = len(tokenizer(prompts[r.index], add_special_tokens=False).input_ids)
    return results


async def _run(url, headers, model, prompts, output_len, max_concurrency, request_rate, endpoint, extras, seed,
               results, progress) -> None:
    semaphore = asyncio.Semaphore(max_concurrency)
    bar = tqdm(total=len(prompts), desc="requests", unit="req", file=sys.stderr, disable=not progress)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(limits=limits, timeout=TIMEOUT, trust_env=False) as client:
        t0 = time.perf_counter()

        async def one(i: int) -> None:
            async with semaphore:
                body = request_body(endpoint, model, prompts[i], output_len, extras)
                await send_request(client, url, body, results[i], headers, t0)
            bar.update(1)

        tasks = []
        for i, at in enumerate(arrival_times(len(prompts), request_rate, seed)):
            wait = t0 + at - time.perf_counter()
            if wait > 0:
                await asyncio.sleep(wait)
            tasks.append(asyncio.create_task(one(i)))
        await asyncio.gather(*tasks)
    bar.close()


