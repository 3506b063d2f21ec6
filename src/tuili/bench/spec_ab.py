"""A/B of speculative decoding, served: `python -m tuili.bench.spec_ab [--runs R]`.

Two `tuili serve` processes of the default model run side by side, one plain and one with
`--speculative ngram`; every run sends each workload to one, then the other (alternating
which goes first), through the same streaming client as `tuili bench serve`:

- grounded c=1 and c=16: bench/grounded.py's prompts (a passage, then a task that asks for
  its words back), chat endpoint, greedy, natural stops (no ignore_eos), max_tokens cap; the
  c=16 run sends `--grounded-waves` (default 4) times as many prompts as clients: with one
  prompt per client the run lasted as long as its slowest request, and the requests whose
  drafts never land (a paraphrase rather than a copy) set the time whatever the others gained;
- open c=1: the peers workload (corpus windows, completions endpoint, greedy, exactly
  `--open-len` tokens via ignore_eos/min_tokens); `--open-conc 16,32` adds the same
  workload at those concurrencies (twice as many prompts as clients), where drafts must
  not cost throughput.

The plain server runs `--speculative none` (the default, auto, drafts where no token can
change, e.g. bf16 on AVX2), the other `--speculative ngram`.

Prints per-run output tok/s and the medians, the ratio spec/plain per workload, and
whether the two servers returned the same text for every grounded request (greedy).
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
from pathlib import Path

from ..config import DEFAULT_MODEL
from .client import run_benchmark
from .grounded import TASKS, grounded_prompt_texts
from .launch import free_port, launch, tuili_serve_cmd
from .results import append_jsonl, cpu_model
from .stats import duration_of, summarize
from .workload import load_tokenizer, random_prompt_texts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--prompts-c1", type=int, default=len(TASKS),
                   help="prompts of the c=1 runs (default: one per task kind of bench/grounded.py)")
    p.add_argument("--grounded-len", type=int, default=160, help="max_tokens of grounded requests")
    p.add_argument("--open-len", type=int, default=96)
    p.add_argument("--speculative-tokens", type=int, default=5)
    p.add_argument("--speculative-max-batch", type=int, default=None,
                   help="the spec server's --speculative-max-batch (default: the server's own)")
    p.add_argument("--c16", type=int, default=16, help="concurrency of the grounded batch run (0: skip)")
    p.add_argument("--grounded-waves", type=int, default=4,
                   help="prompts of the grounded batch run, in multiples of its concurrency")
    p.add_argument("--open-conc", default="", help="comma-separated concurrencies of open-ended batch runs")
    p.add_argument("--server-args", default="", help="extra `tuili serve` arguments for both servers, one string")
    p.add_argument("--output", default="bench-results/spec_ab.jsonl")
    args = p.parse_args(argv)
    tok = load_tokenizer(DEFAULT_MODEL)
    work = {
        "grounded c=1": (grounded_prompt_texts(tok, args.prompts_c1, 150, 400, 1), "chat", args.grounded_len, 1, False),
        "open c=1": (random_prompt_texts(tok, args.prompts_c1, 100, 300, 1), "completions", args.open_len, 1, True),
    }
    if args.c16:
        work[f"grounded c={args.c16}"] = (grounded_prompt_texts(tok, args.grounded_waves * args.c16, 150, 400, 2),
                                          "chat", args.grounded_len, args.c16, False)
    for c in (int(x) for x in args.open_conc.split(",") if x.strip()):
        work[f"open c={c}"] = (random_prompt_texts(tok, 2 * c, 100, 300, 3), "completions", args.open_len, c, True)
    servers = {}
    logs = Path("bench-results")
    try:
        spec = ["--speculative", "ngram", "--speculative-tokens", str(args.speculative_tokens)]
        if args.speculative_max_batch is not None:
            spec += ["--speculative-max-batch", str(args.speculative_max_batch)]
        for name, extra in (("plain", ["--speculative", "none"]), ("spec", spec)):
            port = free_port()
            servers[name] = launch(tuili_serve_cmd(port, *args.server_args.split(), *extra), port, logs / f"spec_ab-{name}.log")
        rates: dict[str, dict[str, list[float]]] = {w: {"plain": [], "spec": []} for w in work}
        same: dict[str, bool] = {}
        for run in range(args.runs):
            for w, (prompts, endpoint, out_len, conc, extras) in work.items():
                order = ("plain", "spec") if run % 2 == 0 else ("spec", "plain")
                texts = {}
                for name in order:
                    s = servers[name]
                    res = asyncio.run(run_benchmark(s.base_url, s.model, prompts, out_len, conc, endpoint=endpoint,
                                                    extras=extras, tokenizer=tok, progress=False))
                    summary = summarize(res, duration_of(res), {})
                    rates[w][name].append(summary["output_throughput"])
                    texts[name] = [r.text for r in res]
                    print(f"run {run} {w:>16} {name:>5}: {summary['output_throughput']:7.2f} tok/s "
                          f"({summary['completed']} ok)", flush=True)
                same[w] = same.get(w, True) and texts["plain"] == texts["spec"]
        print("\nmedians (output tok/s):")
        record = {"bench": "spec_ab", "args": vars(args), "results": {}}
        for w, r in rates.items():
            a, b = statistics.median(r["plain"]), statistics.median(r["spec"])
            print(f"{w:>16}: plain {a:7.2f}  spec {b:7.2f}  ratio {b / a:5.2f}x  same text: {same[w]}")
            record["results"][w] = {"plain": r["plain"], "spec": r["spec"], "ratio": b / a, "same_text": same[w]}
        record["cpu"] = cpu_model()
        print(record["cpu"])
        append_jsonl(args.output, record)
    finally:
        for s in servers.values():
            s.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
