"""What the router's probe costs a request, in time to first token, on a running server.

One `tuili serve` with the default model twice (`small` and `big`) and the router behind
`auto`. Each held-out router prompt (data/router/heldout.jsonl) is sent, one request at a
time, to `small` directly and to `auto`, the order alternating; every request carries a
unique tag at the front of its message, so no request finds another's prompt in the prefix
cache. Streamed, one output token, TTFT measured by the client. Reported, medians over the
prompts: TTFT of `auto` requests the probe kept on `small` against the same prompts sent
to `small` directly (the probe's cost when it keeps the request: its read-out and the
routing), and TTFT of `auto` requests sent to `big` against `small` direct (what a strong
request waits for the fast prefill; `big` is the same model here, so this is the fast
prefill plus the strong one). Also the fast engine's prompt tokens looked up in its prefix
cache against the prompt tokens of the requests started on it (1.0: no prompt taken twice).

    python -m tuili.bench.router_ttft [--repeats 3] [--limit N]
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import time
from pathlib import Path

import httpx

from ..router.data import load_examples
from .launch import free_port, launch, tuili_serve_cmd
from .results import append_jsonl, cpu_model

HELDOUT = Path(__file__).resolve().parents[3] / "data" / "router" / "heldout.jsonl"


def metric(base: str, name: str, **labels) -> float:
    text = httpx.get(base + "/metrics", timeout=30).text
    for m in re.finditer(rf"^{name}\{{([^}}]*)\}} (\S+)$", text, re.M):
        if dict(re.findall(r'(\w+)="([^"]*)"', m.group(1))) == labels:
            return float(m.group(2))
    return 0.0


def ttft(client: httpx.Client, base: str, model: str, content: str) -> tuple[float, str, int]:
    """(seconds to the first content chunk, model that answered, prompt tokens)."""
    body = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 1,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first, answered, prompt = None, "", 0
    with client.stream("POST", base + "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        answered = r.headers.get("x-tuili-routed-to", model)
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                prompt = chunk["usage"]["prompt_tokens"]
            if first is None and any(c.get("delta", {}).get("content") for c in chunk.get("choices", [])):
                first = time.perf_counter() - start
    return (first if first is not None else time.perf_counter() - start), answered, prompt


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3, help="passes over the prompts (medians per prompt)")
    p.add_argument("--limit", type=int, default=0, help="first N held-out prompts only (0: all)")
    p.add_argument("--output", default="bench-results/router_ttft.jsonl")
    args = p.parse_args(argv)
    prompts = [e.prompt or "" for e in load_examples(HELDOUT) if e.prompt]
    if args.limit:
        prompts = prompts[: args.limit]
    port = free_port()
    server = launch(tuili_serve_cmd(port, "--model", "small=smollm2-135m-instruct", "--model",
                                    "big=smollm2-135m-instruct", "--router", "fast=small,strong=big"),
                    port, Path("bench-results") / "router_ttft-server.log")
    base = server.base_url
    direct: dict[int, list[float]] = {}
    routed: dict[int, list[tuple[float, str]]] = {}
    try:
        with httpx.Client(timeout=300) as client:
            for i in range(3):  # warm-up: the first requests of a fresh server are slower
                ttft(client, base, "small", f"[warm-up {i}] hello")
                ttft(client, base, "auto", f"[warm-up {i}] hello again")
            looked_before = metric(base, "tuili_prefix_cache_query_tokens", model="small")
            started_on_fast = 0
            for rep in range(args.repeats):
                for i, text in enumerate(prompts):
                    arms = ("small", "auto") if (i + rep) % 2 == 0 else ("auto", "small")
                    for arm in arms:
                        took, answered, n = ttft(client, base, arm, f"[r{rep} p{i} {arm}] {text}")
                        started_on_fast += n  # every auto request starts on small too (same tokenizer)
                        if arm == "small":
                            direct.setdefault(i, []).append(took)
                        else:
                            routed.setdefault(i, []).append((took, answered))
                print(f"pass {rep + 1}/{args.repeats} done ({len(prompts)} prompts x 2)", flush=True)
            looked = metric(base, "tuili_prefix_cache_query_tokens", model="small") - looked_before
            probes = {k: metric(base, "tuili_router_probe_total", outcome=k) for k in ("used", "fallback")}
    finally:
        server.stop()
    kept = [statistics.median(t for t, m in routed[i] if m == "small") / statistics.median(direct[i])
            for i in routed if any(m == "small" for _, m in routed[i])]
    sent = [statistics.median(t for t, m in routed[i] if m == "big") / statistics.median(direct[i])
            for i in routed if any(m == "big" for _, m in routed[i])]
    d = statistics.median(statistics.median(v) for v in direct.values())
    cpu = cpu_model()
    result = {
        "bench": "router_ttft", "cpu": cpu, "prompts": len(prompts), "repeats": args.repeats,
        "direct_ttft_ms_p50": d * 1000,
        "kept_fast": len(kept), "kept_over_direct_p50": statistics.median(kept) if kept else None,
        "sent_strong": len(sent), "strong_over_direct_p50": statistics.median(sent) if sent else None,
        "fast_lookups_over_prompt_tokens": looked / max(started_on_fast, 1), "probes": probes,
    }
    print(json.dumps(result, indent=1))
    append_jsonl(args.output, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
