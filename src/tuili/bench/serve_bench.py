"""`tuili bench serve`: online benchmark of any OpenAI-compatible server (tuili, vLLM, llama-server).

The same client measures every server, so numbers of peers compare like for like.

What is sent
    `--num-prompts` text prompts of real text (`workload.random_prompt_texts`, lengths in
    tokens drawn from `--input-len A-B` with the `--tokenizer` tokenizer; lengths are
    approximate after the server re-encodes the text). Each request streams
    (`"stream": true, "stream_options": {"include_usage": true}`) with greedy sampling and
    `max_tokens = --output-len`. Unless `--no-extras`, the body also carries `"ignore_eos":
    true` and `"min_tokens": K`, extras that vLLM, llama-server and tuili honour so every
    request produces exactly K tokens; a strict OpenAI server may reject them, hence the flag.
    `--endpoint completions` posts the prompt to /v1/completions; `--endpoint chat` posts
    it as one user message to /v1/chat/completions (the server adds its chat template).

Load
    At most `--max-concurrency` requests are in flight (a semaphore). `--request-rate R`
    (req/s, default inf = all at once) spaces request *starts* with Poisson arrivals:
    exponential gaps drawn from an RNG seeded by `--seed`. A request that arrives while
    the concurrency limit is reached waits in the client; that wait is not part of its
    latencies (the clock starts when the request is sent), but it is part of the duration.

What is measured (wall clock, `time.perf_counter`, per request)
    TTFT  time from sending the request to the first SSE chunk carrying non-empty text
          (`choices[0].text`, or `delta.content` / `delta.reasoning_content` for chat).
          Connection set-up, server queueing and prefill are all inside it.
    ITL   the gaps between consecutive non-empty text chunks. A server that packs several
          tokens into one chunk (or holds back bytes of an incomplete UTF-8 character)
          shows one longer gap; ITL is what a streaming user sees, not a per-token time.
    E2E   time from sending the request to the end of its stream.
    TPOT  (E2E - TTFT) / (output_tokens - 1), for requests with more than one output
          token: the mean time per output token after the first one.
    Output tokens come from the `usage` of the final chunk when the server sends it,
    otherwise from the number of non-empty text chunks. Prompt tokens come from `usage`,
    otherwise from the tokenizer (chat usage includes the server's template tokens).
    A request fails on an HTTP status other than 200, a transport error, an `error`
    object in the stream, or a stream without any text; its error text is kept.

Report
    completed / failed, duration (first request sent to last one finished), request
    throughput, output tok/s and total (prompt + output) tok/s, mean/p50/p90/p99 of TTFT,
    TPOT, ITL and E2E in ms, and goodput: completed requests per second that meet every
    SLO given with `--goodput ttft:MS tpot:MS e2e:MS` (a request without a TPOT meets
    the TPOT SLO). A table goes to stdout, one JSON line (all arguments, timestamp,
    results) is appended to `--output`, and histograms of the four latencies go to
    `--plot` (default: bench-results/serve-<timestamp>.png next to the JSON lines).

The client does its work in one asyncio loop over one shared `httpx.AsyncClient` without
connection limits, and ignores proxy environment variables (a proxy would be measured too).
The objects alive at the start are frozen out of garbage collection for the run: a full
collection over torch's objects pauses the client ~0.2 s, which would show up as latency.
When the client runs on the same machine as the server it takes some CPU from it.
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import json
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from tqdm import tqdm

from .results import append_jsonl
from .workload import parse_range, random_prompt_texts

DEFAULT_TOKENIZER = "smollm2-135m-instruct"
DEFAULT_OUTPUT = "bench-results/serve.jsonl"
ENDPOINTS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}
SLO_KEYS = ("ttft", "tpot", "e2e")
PERCENTILES = (50, 90, 99)
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


# ---------------------------------------------------------------------------- client

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


# ---------------------------------------------------------------------------- report

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


# ---------------------------------------------------------------------------- command line

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base-url", required=True, help="server root, e.g. http://127.0.0.1:8000")
    parser.add_argument("--model", default=None, help="model name to send (default: first id of GET /v1/models)")
    parser.add_argument("--endpoint", choices=list(ENDPOINTS), default="completions")
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--max-concurrency", type=int, default=8, help="requests in flight at most")
    parser.add_argument("--request-rate", type=float, default=math.inf,
                        help="requests/s with Poisson arrivals (default inf: no spacing)")
    parser.add_argument("--input-len", default="100-300", help="A-B: prompt lengths (tokens) drawn uniformly")
    parser.add_argument("--output-len", type=int, default=128, help="max_tokens of every request")
    parser.add_argument("--goodput", nargs="+", default=None, metavar="KEY:MS",
                        help="SLOs for goodput, e.g. ttft:500 tpot:50 (keys: ttft, tpot, e2e)")
    parser.add_argument("--no-extras", action="store_true",
                        help="omit ignore_eos and min_tokens (for servers that reject them)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the prompts and of the arrivals")
    parser.add_argument("--tokenizer", default=DEFAULT_TOKENIZER,
                        help="HF folder or known model name whose tokenizer makes the prompts")
    parser.add_argument("--api-key", default=None, help="sent as a Bearer token")
    parser.add_argument("--output", default=DEFAULT_OUTPUT, help="JSON lines file to append to")
    parser.add_argument("--plot", default=None,
                        help="PNG of the latency distributions (default: serve-<timestamp>.png next to --output)")


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    path = Path(name)
    if not path.is_dir():
        from ..model.loader import resolve_model_path

        path = resolve_model_path(name)
    return AutoTokenizer.from_pretrained(str(path))


def run_from_args(args: argparse.Namespace) -> int:
    if args.num_prompts < 1:
        raise ValueError(f"--num-prompts must be >= 1, got {args.num_prompts}")
    if args.output_len < 1:
        raise ValueError(f"--output-len must be >= 1, got {args.output_len}")
    lo, hi = parse_range(args.input_len)
    goodput = parse_goodput(args.goodput)
    base_url = normalize_base_url(args.base_url)
    api_key = getattr(args, "api_key", None)
    model = args.model or fetch_model(base_url, api_key)
    tokenizer = load_tokenizer(args.tokenizer)
    prompts = random_prompt_texts(tokenizer, args.num_prompts, lo, hi, args.seed)

    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    results = asyncio.run(run_benchmark(base_url, model, prompts, args.output_len, args.max_concurrency,
                                        args.request_rate, args.endpoint, not args.no_extras, args.seed,
                                        tokenizer=tokenizer, api_key=api_key))
    summary = summarize(results, duration_of(results), goodput)
    if summary["completed"] == 0:
        first = results[0].error if results else "no requests"
        print(f"tuili bench serve: all {len(results)} requests to {base_url} failed: {first}", file=sys.stderr)
        return 1

    concurrency = f"concurrency {args.max_concurrency}"
    if math.isfinite(args.request_rate):
        concurrency += f", {args.request_rate:g} req/s"
    title = f"{base_url}  {model}  {concurrency}"
    print(format_table(summary, f"serve benchmark: {model} @ {base_url}"))

    out = Path(args.output)
    plot = Path(args.plot) if args.plot else out.parent / f"serve-{stamp.replace(':', '').replace('-', '')}.png"
    write_plot(results, plot, title)
    settings = {k: v for k, v in vars(args).items() if not callable(v) and k != "api_key"}
    if not math.isfinite(settings.get("request_rate", 0.0)):
        settings["request_rate"] = "inf"  # JSON has no infinity
    record = {"bench": "serve", "time": stamp, "args": settings, "base_url": base_url, "model": model,
              "endpoint": args.endpoint, "extras": not args.no_extras, "plot": str(plot), **summary}
    append_jsonl(out, record)
    print(f"appended to {out}; plot in {plot}", file=sys.stderr)
    return 0
