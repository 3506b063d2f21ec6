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
import math
import sys
import time
from pathlib import Path

from ..config import DEFAULT_MODEL
from .client import ENDPOINTS, fetch_model, normalize_base_url, run_benchmark
from .plots import write_plot
from .results import append_jsonl
from .stats import duration_of, format_table, parse_goodput, summarize
from .workload import load_tokenizer, parse_range, random_prompt_texts

DEFAULT_OUTPUT = "bench-results/serve.jsonl"


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
    parser.add_argument("--tokenizer", default=DEFAULT_MODEL,
                        help="HF folder or known model name whose tokenizer makes the prompts")
    parser.add_argument("--api-key", default=None, help="sent as a Bearer token")
    parser.add_argument("--output", default=DEFAULT_OUTPUT, help="JSON lines file to append to")
    parser.add_argument("--plot", default=None,
                        help="PNG of the latency distributions (default: serve-<timestamp>.png next to --output)")


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
