"""Routing overhead per request, in-process: `tuili bench router` (or python -m tuili.bench.router).

Times `Router.route()` for model "auto" (features, classifier, and the strong engine's
stats for the overflow check) over N prompts drawn from the shipped router data set,
a quarter of them wrapped as chat messages and one in twenty padded to 2-30 thousand
characters (pasted documents), so the scan limit is exercised too. The peer, timed on
the same prompts in the same run, is what the server does to every request anyway:
tokenizing the prompt with the default model's tokenizer. Each figure is the median of
`--repeats` runs.

Two clocks: wall time (what a request waits) and the thread's CPU time (what routing
costs). On a shared machine the wall-clock tail is set by the OS scheduler (a thread
preempted mid-call waits a time slice of several milliseconds), not by the code; the
CPU-time percentiles show the code's own cost. Both are reported.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

from ..router import DEFAULT_ROUTER
from .results import append_jsonl
from ..router.classifier import RouterClassifier
from ..router.data import load_examples

DATA = Path("data") / "router"  # the repository's labelled prompts, from the repository root (--data)


class _IdleEngine:
    """Stands in for an AsyncEngine: stats() is a dict copy, as the real one's is."""

    def __init__(self) -> None:
        self._stats = {"running": 3, "waiting": 1, "pending_tokens": 300, "seconds_per_token": 0.004}

    def stats(self) -> dict:
        return dict(self._stats)


def workload(n: int, seed: int = 0, data: Path = DATA) -> list[dict]:
    files = [Path(data) / "train.jsonl", Path(data) / "heldout.jsonl"]
    missing = [str(f) for f in files if not f.exists()]
    if missing:
        raise ValueError(f"--data: {', '.join(missing)} not found; run from the repository root or pass --data DIR")
    examples = [e for f in files for e in load_examples(f)]
    rng = random.Random(seed)
    filler = "The quick brown fox jumps over the lazy dog. 敏捷的棕色狐狸跳过了懒狗。 "
    out = []
    for i in range(n):
        e = examples[rng.randrange(len(examples))]
        text = e.prompt if e.prompt is not None else e.messages[-1]["content"]
        if rng.random() < 0.05:
            text = filler * rng.randint(30, 400) + "\n\n" + text
        text = f"{text} (#{i})"
        if rng.random() < 0.25:
            out.append({"messages": [{"role": "system", "content": "You are helpful."},
                                     {"role": "user", "content": text}], "max_tokens": e.max_tokens})
        else:
            out.append({"prompt": text, "max_tokens": e.max_tokens})
    return out


def _percentiles(samples: list[float]) -> dict[str, float]:
    s = sorted(samples)
    pick = lambda q: s[min(len(s) - 1, int(q * len(s)))]  # noqa: E731
    return {"p50_us": pick(0.50) * 1e6, "p99_us": pick(0.99) * 1e6, "max_us": s[-1] * 1e6,
            "mean_us": statistics.fmean(s) * 1e6}


def run(num_prompts: int, repeats: int, data: Path = DATA) -> dict:
    from ..serve.router import Router

    clf = RouterClassifier.load(DEFAULT_ROUTER)
    router = Router("auto", "fast", "strong", clf, {"fast": _IdleEngine(), "strong": _IdleEngine()},
                    max_wait_ms=2000)
    tokenizer = _tokenizer()
    reqs = workload(num_prompts, data=data)
    runs = []
    for r in range(repeats):
        route_t, route_cpu, tok_t, strong = [], [], [], 0
        for req in reqs:
            c0 = time.thread_time()
            t0 = time.perf_counter()
            d = router.route("auto", req.get("prompt"), req.get("messages"), req["max_tokens"])
            t1 = time.perf_counter()
            route_cpu.append(time.thread_time() - c0)
            route_t.append(t1 - t0)
            strong += d.model == "strong"
            if tokenizer is not None:
                text = req.get("prompt") or "\n".join(m["content"] for m in req["messages"])
                t2 = time.perf_counter()
                tokenizer(text)
                tok_t.append(time.perf_counter() - t2)
        one = {"route": _percentiles(route_t), "route_cpu": _percentiles(route_cpu), "strong_share": strong / len(reqs)}
        if tok_t:
            one["tokenize"] = _percentiles(tok_t)
        runs.append(one)
        print(f"run {r + 1}/{repeats}: route p50 {one['route']['p50_us']:.1f} us, p99 {one['route']['p99_us']:.1f} us "
              f"(CPU time p50 {one['route_cpu']['p50_us']:.1f} us, p99 {one['route_cpu']['p99_us']:.1f} us)",
              file=sys.stderr)
    med = lambda part, key: statistics.median(x[part][key] for x in runs)  # noqa: E731
    result = {"bench": "router", "num_prompts": num_prompts, "repeats": repeats,
              "route_p50_us": med("route", "p50_us"), "route_p99_us": med("route", "p99_us"),
              "route_max_us": med("route", "max_us"), "route_cpu_p50_us": med("route_cpu", "p50_us"),
              "route_cpu_p99_us": med("route_cpu", "p99_us"), "route_cpu_max_us": med("route_cpu", "max_us"),
              "strong_share": runs[-1]["strong_share"]}
    if "tokenize" in runs[0]:
        result.update(tokenize_p50_us=med("tokenize", "p50_us"), tokenize_p99_us=med("tokenize", "p99_us"))
        result["route_over_tokenize_p50"] = result["route_p50_us"] / result["tokenize_p50_us"]
        result["route_over_tokenize_p99"] = result["route_p99_us"] / result["tokenize_p99_us"]
    return result


def _tokenizer():
    try:
        from ..config import DEFAULT_MODEL
        from ..engine.tokenizer import load_tokenizer
        from ..model.loader import resolve_model_path

        return load_tokenizer(resolve_model_path(DEFAULT_MODEL))
    except Exception as e:  # noqa: BLE001 - the peer is optional; the routing figures stand alone
        print(f"no tokenizer peer: {e}", file=sys.stderr)
        return None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num-prompts", type=int, default=10_000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--data", type=Path, default=DATA, help="folder with train.jsonl and heldout.jsonl")
    p.add_argument("--output", default=None, help="JSON lines file to append the result to")


def run_from_args(args: argparse.Namespace) -> int:
    if args.num_prompts < 1 or args.repeats < 1:
        raise ValueError("--num-prompts and --repeats must be >= 1")
    result = run(args.num_prompts, args.repeats, args.data)
    line = json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()})
    print(line)
    if args.output:
        append_jsonl(args.output, json.loads(line))
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m tuili.bench.router", description=__doc__.splitlines()[0])
    add_arguments(parser)
    sys.exit(run_from_args(parser.parse_args()))
