"""`tuili bench tenants`: many users over a few long shared system prompts, as a multi-tenant
deployment sees them, against `tuili serve --replicas N` with each routing policy in turn,
and against one engine with all the CPUs as the baseline, in one run.

Each tenant has a long system prompt of its own; each request is one user's short question
under one tenant's prompt (tenants drawn at random, seeded). Per configuration the server is
started, warmed with one request per tenant, and the same request list is sent `--repeats`
times at `--concurrency`; reported are the medians over repeats of TTFT p50 and output
tokens/s, and the prefix-cache hit rate over the measured requests (from /v1/stats).
The KV pool per replica (`--kv-per-replica`) is chosen to hold about half the tenants'
prompts, as a busy deployment's pool would: a router that spreads a tenant's requests over
every replica makes each replica hold every prompt and evict them in turn.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from .client import RequestResult, send_request
from .launch import free_port, launch, tuili_serve_cmd
from .results import append_jsonl, cpu_model

WORDS = ("harbour ledger invoice tariff vessel cargo manifest berth crane pilot customs quay tide draft "
         "container tonnage schedule anchor buoy dredge permit inspector freight broker warehouse").split()


def system_prompt(tenant: int, words: int) -> str:
    rng = random.Random(1000 + tenant)
    body = " ".join(rng.choice(WORDS) for _ in range(words))
    return f"You are the assistant of tenant {tenant}. House rules follow. {body}"


def requests(args) -> list[dict]:
    rng = random.Random(args.seed)
    out = []
    for i in range(args.num_requests):
        t = rng.randrange(args.tenants)
        out.append({"model": "", "max_tokens": args.output_len, "temperature": 0, "stream": True,
                    "stream_options": {"include_usage": True}, "user": f"user-{i}",
                    "messages": [{"role": "system", "content": system_prompt(t, args.prompt_words)},
                                 {"role": "user", "content": f"Question {i}: what is rule {rng.randrange(99)}?"}]})
    return out


async def run_load(base: str, model: str, bodies: list[dict], concurrency: int) -> tuple[list[RequestResult], float]:
    sem = asyncio.Semaphore(concurrency)
    t0 = time.perf_counter()
    async with httpx.AsyncClient(timeout=600) as c:
        async def one(i, body):
            async with sem:
                return await send_request(c, base + "/v1/chat/completions", dict(body, model=model),
                                          RequestResult(i), {}, t0)
        results = await asyncio.gather(*(one(i, b) for i, b in enumerate(bodies)))
    return list(results), time.perf_counter() - t0


def prefix_counts(base: str) -> tuple[int, int]:
    s = httpx.get(base + "/v1/stats", timeout=30).json()
    hits = sum(s["prefix"][t]["hit_tokens"] for t in ("device", "host", "disk"))
    return hits, s["prefix"]["query_tokens"]


def route_decisions(base: str) -> dict[str, int]:
    """Routing decisions by reason, summed over replicas (empty for a single engine)."""
    out: dict[str, int] = {}
    for model in httpx.get(base + "/v1/stats", timeout=30).json().get("replicas") or []:
        for row in model.get("replicas") or []:
            for reason, n in (row.get("route_decisions") or {}).items():
                out[reason] = out.get(reason, 0) + n
    return out


def measure(name: str, extra: list[str], args, bodies: list[dict]) -> dict:
    port = free_port()
    log = Path(tempfile.gettempdir()) / f"tuili-bench-tenants-{name}.log"
    server = launch(tuili_serve_cmd(port, *extra), port, log, timeout_s=600)
    try:
        # one request per tenant, each from its own user (one user for all of them would make the
        # session rule put every tenant's prompt on one replica)
        warm = [dict(bodies[0], user=f"warm-up-{t}",
                     messages=[{"role": "system", "content": system_prompt(t, args.prompt_words)},
                               {"role": "user", "content": "warm up"}]) for t in range(args.tenants)]
        asyncio.run(run_load(server.base_url, server.model, warm, 1))
        ttfts, tputs, errors = [], [], 0
        h0, q0 = prefix_counts(server.base_url)
        for _ in range(args.repeats):
            results, seconds = asyncio.run(run_load(server.base_url, server.model, bodies, args.concurrency))
            ok = [r for r in results if r.success]
            errors += len(results) - len(ok)
            ttfts.append(statistics.median(r.ttft for r in ok) if ok else float("nan"))
            tputs.append(sum(r.output_tokens for r in ok) / seconds)
        h1, q1 = prefix_counts(server.base_url)
        decisions = route_decisions(server.base_url)
    finally:
        server.stop(grace_s=60)
    row = {"config": name, "ttft_p50_s": statistics.median(ttfts), "ttft_p50_runs": ttfts,
           "output_tok_s": statistics.median(tputs), "tok_s_runs": tputs, "errors": errors,
           "prefix_hit_rate": (h1 - h0) / (q1 - q0) if q1 > q0 else None, "route_decisions": decisions}
    print(json.dumps(row), flush=True)
    return row


def run_from_args(args: argparse.Namespace) -> int:
    bodies = requests(args)
    common = ["--kv-cache-memory", args.kv_per_replica, "--max-num-seqs", str(args.concurrency)]
    rows = []
    for routing in args.routings.split(","):
        rows.append(measure(routing, [*common, "--replicas", str(args.replicas), "--cpus-per-replica",
                                      str(args.cpus_per_replica), "--routing", routing], args, bodies))
    if args.baseline:
        mib = int(args.kv_per_replica.removesuffix("MiB")) * args.replicas
        rows.append(measure("single", ["--kv-cache-memory", f"{mib}MiB", "--max-num-seqs", str(args.concurrency)],
                            args, bodies))
    cpu = cpu_model()
    by = {r["config"]: r for r in rows}
    ca = by.get("cache-aware")
    print(f"\n{cpu}\n{'config':<12} {'TTFT p50 (s)':>12} {'tok/s':>8} {'prefix hit':>10} {'errors':>6}")
    for r in rows:
        hit = "-" if r["prefix_hit_rate"] is None else f"{r['prefix_hit_rate']:.2f}"
        print(f"{r['config']:<12} {r['ttft_p50_s']:>12.3f} {r['output_tok_s']:>8.1f} {hit:>10} {r['errors']:>6}")
    if ca:
        for other in ("pow2", "round-robin"):
            if other in by:
                print(f"cache-aware TTFT p50 / {other}: {ca['ttft_p50_s'] / by[other]['ttft_p50_s']:.2f}")
        best = max(r["output_tok_s"] for r in rows if r["config"] != "single")
        print(f"cache-aware tok/s / best of the replicated: {ca['output_tok_s'] / best:.2f}")
    append_jsonl(args.output, {"bench": "tenants", "cpu": cpu, "args": {k: v for k, v in vars(args).items()
                                                                      if k != "func"}, "rows": rows})
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tenants", type=int, default=8)
    p.add_argument("--prompt-words", type=int, default=700, help="words of each tenant's system prompt")
    p.add_argument("--num-requests", type=int, default=48)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--output-len", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--cpus-per-replica", type=int, default=1)
    p.add_argument("--kv-per-replica", default="96MiB", help="KV pool of each replica (the baseline gets the sum)")
    p.add_argument("--routings", default="cache-aware,pow2,round-robin")
    p.add_argument("--no-baseline", dest="baseline", action="store_false", help="skip the single-engine run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default="bench-results/tenants.jsonl", help="JSON lines file to append to")
