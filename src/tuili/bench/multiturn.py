"""`tuili bench multiturn`: multi-turn chat on a KV pool too small for all conversations.

In-process with the Engine (no HTTP), one request at a time, so a request's TTFT is its
own queueing-free prefill: the part of its prompt not served from a KV cache, plus the
copies that bring cached blocks back. The workload: `--conversations` chats share a
system prompt of `--system-len` tokens; they take turns round-robin (turn 1 of every
chat, then turn 2 ...); each turn sends the whole history plus a new user message of
`--user-len` tokens and gets a greedy reply of `--reply-len` tokens, which joins the
history. Prompts are token windows of the shipped corpus joined directly (no chat
template), so lengths are exact. The device pool (`--kv-cache-tokens`) holds the system
prompt and about one conversation, so by the time a chat comes back its history has been
evicted from the pool.

Configurations, each in a fresh engine after a short warm-up request:
- `none`:  prefix caching on the device pool only (the system prompt stays hot);
- `tiers`: plus the host-memory tier (`--kv-host-memory`) and the disk tier;
- `disk`:  the disk tier alone (no host tier).

Restart: the `tiers` engine is closed (it saves its cache to disk); then, `--restarts`
times, a new engine on the same disk directory serves one conversation's next turn as
its first request (warm), and a new engine without tiers serves the same request (cold).
Each new engine first runs the same short warm-up request (sharing no prefix), so the
one-time costs of a fresh process's first forward pass are not in either figure.
The disk files were just written, so they are likely in the OS page cache: the warm
figure does not include reading a cold SSD.
"""
from __future__ import annotations

import argparse
import platform
import random
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import DEFAULT_MODEL
from .alone import run_alone
from .results import append_jsonl
from .workload import corpus_ids, corpus_window


@dataclass
class Workload:
    system: list[int]
    users: list[list[list[int]]]  # [conversation][turn] -> a user message's tokens
    reply_len: int

    @property
    def conversations(self) -> int:
        return len(self.users)


@dataclass
class RunResult:
    config: str
    ttfts: list[float] = field(default_factory=list)
    stats: dict[str, int] = field(default_factory=dict)
    elapsed_s: float = 0.0
    histories: list[list[int]] = field(default_factory=list)


def make_workload(tokenizer, conversations: int, turns: int, system_len: int, user_len: int, reply_len: int,
                  seed: int) -> Workload:
    rng = random.Random(seed)
    ids = corpus_ids(tokenizer)
    system = corpus_window(ids, rng, system_len)
    users = [[corpus_window(ids, rng, user_len) for _ in range(turns + 1)]  # +1: the restart turn
             for _ in range(conversations)]
    return Workload(system, users, reply_len)


def first_request(engine, prompt: list[int], params) -> tuple[float, list[int]]:
    """Run one request alone; returns (TTFT in seconds, generated token ids)."""
    run = run_alone(engine, prompt, params)
    return run.ttft, run.token_ids


def run_config(model: str, config: str, options: dict[str, Any], work: Workload, turns: int, params) -> RunResult:
    from ..engine.engine import Engine

    engine = Engine(model, **options)
    first_request(engine, work.users[0][-1][:32], params)  # warm-up, shares no prefix with the workload
    result = RunResult(config)
    histories = [list(work.system) for _ in range(work.conversations)]
    start = time.perf_counter()
    for turn in range(turns):
        for c in range(work.conversations):
            prompt = histories[c] + work.users[c][turn]
            ttft, reply = first_request(engine, prompt, params)
            result.ttfts.append(ttft)
            histories[c] = prompt + reply
        print(f"  {config}: turn {turn + 1}/{turns} done, TTFT p50 so far "
              f"{statistics.median(result.ttfts) * 1000:.0f} ms", flush=True)
    result.elapsed_s = time.perf_counter() - start
    result.stats = engine.stats()
    result.histories = histories
    engine.close()
    return result


def restart_ttfts(model: str, warm: dict[str, Any], cold: dict[str, Any], work: Workload,
                  histories: list[list[int]], restarts: int, params) -> tuple[list[float], list[float], list[int]]:
    """TTFT of the first request after a restart, with the warm disk tier and without tiers."""
    from ..engine.engine import Engine

    warm_t, cold_t, disk_hits = [], [], []
    for r in range(restarts):
        c = r % work.conversations
        prompt = histories[c] + work.users[c][-1]
        for options, out in ((warm, warm_t), (cold, cold_t)):
            engine = Engine(model, **options)
            first_request(engine, work.users[0][-1][:32], params)  # start-up warm-up, no shared prefix
            ttft, _ = first_request(engine, prompt, params)
            out.append(ttft)
            if out is warm_t:
                disk_hits.append(engine.stats()["prefix_hit_tokens_disk"])
            engine.close()
        print(f"  restart {r + 1}/{restarts}: warm {warm_t[-1] * 1000:.0f} ms, cold {cold_t[-1] * 1000:.0f} ms "
              f"({disk_hits[-1]} of {len(prompt)} prompt tokens from disk)", flush=True)
    return warm_t, cold_t, disk_hits


def run(args: argparse.Namespace, options: dict[str, Any]) -> dict[str, Any]:
    from ..engine.engine import Engine
    from ..sampling import SamplingParams

    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = set(configs) - {"none", "tiers", "disk"}
    if unknown or "none" not in configs:
        raise ValueError(f"configs: use a comma list of none, tiers, disk that includes none; got {args.configs!r}")
    disk_dir = Path(args.kv_disk_dir or tempfile.mkdtemp(prefix="tuili-bench-kv-"))
    fresh = args.kv_disk_dir is None
    base = dict(options, num_kv_blocks=args.kv_cache_tokens // options["block_size"], kv_host_memory=0,
                kv_disk_dir=None)
    variants = {"none": base,
                "tiers": dict(base, kv_host_memory=args.kv_host_memory, kv_disk_dir=str(disk_dir / "tiers")),
                "disk": dict(base, kv_disk_dir=str(disk_dir / "disk"))}
    probe = Engine(args.model, **dict(base, num_kv_blocks=1))
    work = make_workload(probe.tokenizer, args.conversations, args.turns, args.system_len, args.user_len,
                         args.reply_len, args.seed)
    dtype = str(probe.dtype).removeprefix("torch.")
    del probe
    params = SamplingParams(temperature=0, max_tokens=args.reply_len, ignore_eos=True)
    results = {}
    try:
        for name in configs:
            print(f"{name}: {args.conversations} conversations x {args.turns} turns", flush=True)
            results[name] = run_config(args.model, name, variants[name], work, args.turns, params)
        warm_name = "tiers" if "tiers" in results else ("disk" if "disk" in results else None)
        restart = None
        if warm_name and args.restarts > 0:
            print(f"restarts: warm ({warm_name} disk directory) vs cold", flush=True)
            warm, cold, hits = restart_ttfts(args.model, variants[warm_name], base, work,
                                             results[warm_name].histories, args.restarts, params)
            restart = {"warm_ttft_s": warm, "cold_ttft_s": cold, "disk_hit_tokens": hits,
                       "warm_ttft_p50_s": statistics.median(warm), "cold_ttft_p50_s": statistics.median(cold),
                       "speedup": statistics.median(cold) / statistics.median(warm)}
    finally:
        if fresh:
            shutil.rmtree(disk_dir, ignore_errors=True)
    p50 = {n: statistics.median(r.ttfts) for n, r in results.items()}
    record = {
        "bench": "multiturn", "model": args.model, "dtype": dtype, "machine": platform.machine(),
        "conversations": args.conversations, "turns": args.turns, "system_len": args.system_len,
        "user_len": args.user_len, "reply_len": args.reply_len, "kv_cache_tokens": args.kv_cache_tokens,
        "kv_host_memory": args.kv_host_memory, "block_size": options["block_size"],
        "ttft_p50_s": p50, "ttft_mean_s": {n: statistics.fmean(r.ttfts) for n, r in results.items()},
        "speedup_p50_vs_none": {n: p50["none"] / v for n, v in p50.items() if n != "none"},
        "elapsed_s": {n: r.elapsed_s for n, r in results.items()},
        "stats": {n: {k: v for k, v in r.stats.items() if k.startswith(("prefix", "kv_"))} for n, r in results.items()},
        "restart": restart,
    }
    return record


def report(record: dict[str, Any]) -> str:
    lines = [f"multi-turn chat: {record['conversations']} conversations x {record['turns']} turns, system prompt "
             f"{record['system_len']} tokens, user {record['user_len']}, reply {record['reply_len']}, "
             f"device pool {record['kv_cache_tokens']} tokens, {record['model']} {record['dtype']}"]
    for name, v in record["ttft_p50_s"].items():
        s = record["stats"][name]
        extra = "" if name == "none" else f"  ({record['speedup_p50_vs_none'][name]:.1f}x lower than none)"
        lines.append(f"  {name:5s} TTFT p50 {v * 1000:7.0f} ms{extra}; prompt tokens from device "
                     f"{s['prefix_hit_tokens_device']}, host {s['prefix_hit_tokens_host']}, "
                     f"disk {s['prefix_hit_tokens_disk']} of {s['prefix_query_tokens']}")
    r = record.get("restart")
    if r:
        lines.append(f"  first request after restart: warm disk {r['warm_ttft_p50_s'] * 1000:.0f} ms vs cold "
                     f"{r['cold_ttft_p50_s'] * 1000:.0f} ms ({r['speedup']:.1f}x lower), medians of "
                     f"{len(r['warm_ttft_s'])}")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--conversations", type=int, default=8)
    p.add_argument("--turns", type=int, default=6)
    p.add_argument("--system-len", type=int, default=1500)
    p.add_argument("--user-len", type=int, default=64)
    p.add_argument("--reply-len", type=int, default=16)
    p.add_argument("--kv-cache-tokens", type=int, default=3072, help="device pool size in tokens")
    p.add_argument("--configs", default="none,tiers", help="comma list of none, tiers, disk (disk: the disk tier alone)")
    p.add_argument("--restarts", type=int, default=3, help="warm/cold restart pairs to time")
    p.add_argument("--output", default="bench-results/multiturn.jsonl", help="JSON lines file to append to")


def run_from_args(args: argparse.Namespace, options: dict[str, Any]) -> int:
    for name in ("conversations", "turns", "system_len", "user_len", "reply_len", "kv_cache_tokens"):
        if getattr(args, name) < 1:
            raise ValueError(f"{name.replace('_', '-')}: must be >= 1")
    record = run(args, options)
    print(report(record))
    print(f"appended to {append_jsonl(args.output, record)}")
    return 0
