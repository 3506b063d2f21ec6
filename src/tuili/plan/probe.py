"""`python -m tuili.plan.probe`: time engine steps on this machine, for `tuili plan --calibrate`.

Run only as its own process (calibrate.py starts it): it is the one file of the planner
that loads a model, and it does so through the offline API (`tuili.LLM` and its engine's
add_request / step, as `tuili.bench.alone` steps it), never by
importing the engine into the planner. For each weight format it measures

- decode steps: B requests with random prompts of `context` tokens are added at once to
  the LLM's engine, which is stepped by hand (as `tuili.bench.alone` does) and each step
  timed; the median of the last `long - 1` steps (decodes only) is the time of a decode
  step of batch B at a context of about `context + long / 2`. A median, not a difference
  of two runs: on a busy machine a difference of totals can even come out negative;
- prefill steps: N requests of T prompt tokens and one output token each (N x T within
  the step budget, so one step of N chunks): the first step's time.

Prompts are random token ids drawn fresh for every run, so the prefix cache never hits.
Each point is the median of `--repeats` runs. Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import time


def _prompts(rng: random.Random, n: int, length: int, vocab: int) -> list[list[int]]:
    return [[rng.randrange(100, vocab - 100) for _ in range(length)] for _ in range(n)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--quantization", default="none")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--decode", default="1:64,8:64,16:64,16:400", help="BATCH:CONTEXT points")
    p.add_argument("--prefill", default="64,256,512,4x128",
                   help="prefill steps: T (one prompt of T tokens) or NxT (N prompts of T tokens in one step)")
    p.add_argument("--long", type=int, default=20, help="tokens generated per decode run")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    import torch
    from tuili import LLM, SamplingParams

    t0 = time.perf_counter()
    # The planner models the plain engine: no drafts (speculative="auto" would draft on
    # CPUs whose products do not depend on the row count, and a step's rows with it).
    llm = LLM(args.model, dtype=args.dtype, quantization=args.quantization, speculative="none")
    load_s = time.perf_counter() - t0
    vocab = llm.get_tokenizer().vocab_size if hasattr(llm.get_tokenizer(), "vocab_size") else 32000
    rng = random.Random(args.seed)

    ids = iter(range(10**9))

    def step_times(prompts: list[list[int]], out: int) -> list[float]:
        """Add the prompts at once, step the engine until done; the time of every step."""
        params = SamplingParams(max_tokens=out, ignore_eos=True, temperature=0.0)
        for prompt in prompts:
            llm.engine.add_request(f"probe-{next(ids)}", prompt, params)
        times = []
        while llm.engine.has_unfinished_requests():
            start = time.perf_counter()
            llm.engine.step()
            times.append(time.perf_counter() - start)
        return times

    step_times(_prompts(rng, 2, 32, vocab), 4)  # warm-up: allocations, kernel choice
    points = []
    for item in args.decode.split(","):
        batch, context = (int(x) for x in item.split(":"))
        runs = []
        for _ in range(args.repeats):
            runs += step_times(_prompts(rng, batch, context, vocab), args.long)[-(args.long - 1):]
        points.append({"kind": "decode", "batch": batch, "context": context + args.long / 2,
                       "step_s": statistics.median(runs), "steps": len(runs)})
    for item in args.prefill.split(","):
        count, _, tokens = item.rpartition("x")
        count, tokens = int(count or 1), int(tokens)
        runs = [step_times(_prompts(rng, count, tokens, vocab), 1)[0] for _ in range(args.repeats)]
        points.append({"kind": "prefill", "tokens": tokens, "prompts": count, "step_s": statistics.median(runs),
                       "runs": runs})
    print(json.dumps({"model": args.model, "quantization": args.quantization, "dtype": args.dtype,
                      "threads": torch.get_num_threads(), "load_s": load_s, "points": points}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
