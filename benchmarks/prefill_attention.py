"""Prefill attention on AMX tiles against the PyTorch path, alone and in the engine's prefill.

    flock /tmp/tuili-bench.lock .venv/bin/python benchmarks/prefill_attention.py [--runs 5]

Kernel: one chunk's attention at SmolLM2-135M's shape (9 query heads, 3 kv heads, head dim
64) over a paged bf16 cache, for a few (chunk, context) sizes; median microseconds of the
kernel (`paged_prefill_attention`) and of the PyTorch path (K/V gathered out of the blocks,
torch's flash attention), and their ratio. Engine: prefill tok/s of 100 prompts of 100-300
tokens (the peers workload's prompts, one output token each, prefix caching off), runs
alternating between the kernel and the PyTorch path in one process (the kernel is turned
off by replacing `layers._amx_prefill_kernels`), medians of --runs. Needs AMX-BF16.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from tuili.bench.machine import median_time
from tuili.model import layers
from tuili.model.kernels import cpu_kernels


def median_us(fn, reps: int) -> float:
    return median_time(fn, reps) * 1e6


def kernel_table(ext, reps: int) -> None:
    gen = torch.Generator().manual_seed(0)
    heads, kv_heads, dim, block = 9, 3, 64, 16
    print("| chunk x context | PyTorch path (us) | AMX kernel (us) | ratio |\n|---|---|---|---|")
    for q_len, ctx in [(100, 100), (200, 200), (300, 300), (256, 768), (512, 512), (64, 2048)]:
        nb = -(-ctx // block) + 4
        k, v = (torch.randn(nb, block, kv_heads, dim, generator=gen).bfloat16() for _ in range(2))
        table = torch.randperm(nb, generator=gen)[: -(-ctx // block)]
        q = torch.randn(q_len, heads, dim, generator=gen).bfloat16()
        span = layers.PrefillSpan(q_start=0, q_len=q_len, ctx_len=ctx, block_table=table)
        amx = median_us(lambda: ext.paged_prefill_attention(q, k, v, table, ctx, dim ** -0.5, 0), reps)
        orig = layers._amx_prefill_kernels
        layers._amx_prefill_kernels = lambda *a: None
        try:
            ref = median_us(lambda: layers._prefill_attention(q, k, v, span, dim ** -0.5, None), reps)
        finally:
            layers._amx_prefill_kernels = orig
        print(f"| {q_len} x {ctx} | {ref:.0f} | {amx:.0f} | {ref / amx:.2f}x |", flush=True)


def engine_ab(runs: int) -> None:
    from tuili.bench.workload import random_prompts
    from tuili.engine.llm import LLM
    from tuili.sampling import SamplingParams

    llm = LLM("smollm2-135m-instruct", dtype="bfloat16", enable_prefix_caching=False)
    prompts = random_prompts(llm.get_tokenizer(), 100, 100, 300, 1)
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    llm.engine.generate([(f"w{i}", p, params) for i, p in enumerate(prompts[:4])])
    tokens = sum(map(len, prompts))
    orig = layers._amx_prefill_kernels
    rates: dict[str, list[float]] = {"amx": [], "torch": []}
    for run in range(runs):
        for mode in (("amx", "torch") if run % 2 == 0 else ("torch", "amx")):
            layers._amx_prefill_kernels = orig if mode == "amx" else (lambda *a: None)
            t = time.perf_counter()
            llm.engine.generate([(f"{mode}{run}-{i}", p, params) for i, p in enumerate(prompts)])
            rates[mode].append(tokens / (time.perf_counter() - t))
            print(f"run {run + 1}/{runs} {mode}: {rates[mode][-1]:.0f} tok/s", flush=True)
    layers._amx_prefill_kernels = orig
    a, b = statistics.median(rates["amx"]), statistics.median(rates["torch"])
    print(f"engine prefill, {tokens} prompt tokens: PyTorch path {b:.0f} tok/s, AMX kernel {a:.0f} tok/s, {a / b:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5, help="engine runs per path")
    ap.add_argument("--reps", type=int, default=50, help="kernel calls per median")
    ap.add_argument("--skip-engine", action="store_true")
    args = ap.parse_args()
    ext = cpu_kernels()
    if ext is None or not ext.prefill_attention_available():
        raise SystemExit("prefill_attention: needs the CPU kernels on a CPU with AMX-BF16 (and TUILI_AMX not 0)")
    kernel_table(ext, args.reps)
    if not args.skip_engine:
        engine_ab(args.runs)


if __name__ == "__main__":
    main()
