"""The CPU decode-attention kernel alone, at a served batch's shape, over 30 layers' caches.

    flock /tmp/tuili-bench.lock .venv/bin/python benchmarks/decode_attention.py [--batch 32] [--kv bf16|int8]

SmolLM2-135M's attention shape (9 query heads, 3 kv heads, head dim 64), `--batch`
sequences with contexts of 250-377 tokens (the peers workload at its last decode steps:
prompts of 100-300 tokens plus up to 128 generated), blocks of 16 tokens placed at random
in the pool, one cache per layer (30 layers, about 230 MB of bf16 K/V at batch 32, well
past the L2 caches: every step reads them from memory, as a served step does after the
weights have streamed through). Prints the median time of a step's 30 attention calls and
the K/V bytes read per second. `--layers 1` repeats one layer's cache 30 times instead (it
then stays in the last-level cache): the gap between the two is the time spent waiting on
memory. `--ab-amx` alternates runs with the AMX score tiles allowed and turned off
(TUILI_AMX=1 / 0, read at each call) and prints both medians and their ratio.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import time

import torch

from tuili.model.kernels import cpu_kernels


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--kv", choices=["bf16", "int8"], default="bf16")
    ap.add_argument("--layers", type=int, default=30, help="distinct caches (30: one per layer)")
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--ab-amx", action="store_true", help="alternate TUILI_AMX=1 and 0, paired runs")
    args = ap.parse_args()
    ext = cpu_kernels()
    if ext is None:
        raise SystemExit("decode_attention: the CPU kernels are not available here")
    gen = torch.Generator().manual_seed(0)
    batch, heads, kv_heads, dim, block = args.batch, 9, 3, 64, 16
    lens = torch.randint(250, 378, (batch,), generator=gen)
    per_seq = -(-int(lens.max()) // block)
    blocks = batch * per_seq + 8
    caches = []
    for _ in range(args.layers):
        if args.kv == "int8":
            k, v = (torch.randint(-127, 128, (blocks, block, kv_heads, dim), dtype=torch.int8, generator=gen)
                    for _ in range(2))
            ks, vs = (torch.rand(blocks, block, kv_heads, generator=gen) * 0.01 for _ in range(2))
        else:
            k, v = (torch.randn(blocks, block, kv_heads, dim, generator=gen).bfloat16() for _ in range(2))
            ks = vs = torch.empty(0)
        caches.append((k, v, ks, vs))
    tables = torch.randperm(blocks, generator=gen)[: batch * per_seq].view(batch, per_seq)
    q = torch.randn(batch, heads, dim, generator=gen).bfloat16()
    row_bytes = kv_heads * dim * (2 if args.kv == "bf16" else 1) * 2  # K and V
    step_bytes = int(lens.sum()) * row_bytes * 30
    modes = ["1", "0"] if args.ab_amx else [os.environ.get("TUILI_AMX", "")]
    times: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(args.runs):
        for mode in modes:
            os.environ["TUILI_AMX"] = mode
            t = time.perf_counter()
            for i in range(30):
                k, v, ks, vs = caches[i % args.layers]
                ext.paged_decode_attention(q, k, v, tables, lens, dim ** -0.5, ks, vs, 0)
            times[mode].append(time.perf_counter() - t)
    cpu = subprocess.run("lscpu | grep 'Model name'", shell=True, capture_output=True, text=True).stdout
    for mode in modes:
        ms = statistics.median(times[mode]) * 1000
        label = f"TUILI_AMX={mode}: " if args.ab_amx else ""
        print(f"{cpu.split(':')[-1].strip()}, {torch.get_num_threads()} threads: {label}batch {batch}, {args.kv} cache, "
              f"{args.layers} distinct layer caches: {ms:.1f} ms per step (30 layers, median of {args.runs}), "
              f"{step_bytes / 1e6:.0f} MB of K/V -> {step_bytes / ms / 1e6:.1f} GB/s")
    if args.ab_amx:
        print(f"AMX scores: {statistics.median(times['0']) / statistics.median(times['1']):.2f}x the vector loops")


if __name__ == "__main__":
    main()
