"""A prompt's attention over 30 layers: the CPU kernel the engine takes against the PyTorch path.

    flock /tmp/tuili-bench.lock .venv/bin/python benchmarks/prefill_attention_avx2.py [--tokens 245] [--runs 7]

SmolLM2-135M's shape (9 query heads, 3 kv heads, head dim 64), one chunk of `--tokens` queries
over a paged bf16 cache of as many positions, through `model.layers._prefill_attention` as the
engine calls it (float32 queries where bf16 is slow: the AVX2 float32 kernel; bf16 on AMX:
the AMX kernel) and with the kernels turned off for that call (gathered K/V, torch's
scaled_dot_product_attention). Alternating, medians of `--runs`.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import time

import torch

from tuili.device import cpu_bf16_is_slow
from tuili.model import layers
from tuili.model.layers import PrefillSpan, _prefill_attention


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=245)
    ap.add_argument("--runs", type=int, default=7)
    args = ap.parse_args()
    gen = torch.Generator().manual_seed(0)
    n, block = args.tokens, 16
    blocks = -(-n // block) + 8
    k, v = (torch.randn(blocks, block, 3, 64, generator=gen).bfloat16() for _ in range(2))
    span = PrefillSpan(q_start=0, q_len=n, ctx_len=n, block_table=torch.randperm(blocks, generator=gen)[: -(-n // block)])
    q = torch.randn(n, 9, 64, generator=gen)
    q = q if cpu_bf16_is_slow(q.device) else q.bfloat16()
    kernel_paths = (layers._amx_prefill_kernels, layers._f32_prefill_kernels)

    def run(with_kernels: bool) -> float:
        if not with_kernels:
            layers._amx_prefill_kernels = layers._f32_prefill_kernels = lambda *a: None
        t = time.perf_counter()
        for _ in range(30):
            _prefill_attention(q, k, v, span, 0.125, None, None)
        layers._amx_prefill_kernels, layers._f32_prefill_kernels = kernel_paths
        return time.perf_counter() - t

    a, b = [], []
    for _ in range(args.runs):
        a.append(run(True))
        b.append(run(False))
    cpu = subprocess.run("lscpu | grep 'Model name'", shell=True, capture_output=True, text=True).stdout
    ka, kb = statistics.median(a), statistics.median(b)
    print(f"{cpu.split(':')[-1].strip()}, {torch.get_num_threads()} threads, {str(q.dtype).removeprefix('torch.')} "
          f"queries, {n} tokens x 30 layers: kernel {1e3 * ka:.1f} ms, PyTorch path {1e3 * kb:.1f} ms "
          f"({kb / ka:.2f}x), medians of {args.runs}")


if __name__ == "__main__":
    main()
