"""Packed bf16 products with vdpbf16ps against the same packed weights widened to float32
FMAs, in one process, interleaved: SmolLM2-135M's linear layers (30 layers + head, random
weights of its shapes) per call, at a few row counts; medians of `--repeats`.

    flock /tmp/tuili-bench.lock .venv/bin/python benchmarks/widen_ab.py [--rows 1,4,8,16,32,64,256]

Only on CPUs where both kernels exist (AVX512-BF16; with AMX the AMX tiles take bf16
products and this compares the two vector kernels with TUILI_AMX=0).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from tuili.bench.results import cpu_model
from tuili.model.kernels import cpu_kernels

LAYER_SHAPES = [(576 + 2 * 192, 576), (576, 576), (2 * 1536, 576), (576, 1536)]  # qkv, o, gate_up, down
HEAD = (49152, 576)
NEVER = 1 << 40


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default="1,4,8,9,13,16,24,32,64,128,256")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    os.environ["TUILI_AMX"] = "0"
    ext = cpu_kernels()
    if ext is None or not ext.gemm_bf16_pairs():
        print("widen_ab: needs the CPU kernels built with AVX512-BF16")
        return 1
    print(f"CPU: {cpu_model()}, {torch.get_num_threads()} threads", flush=True)
    gen = torch.Generator().manual_seed(0)
    empty = torch.empty(0)
    weights = [((n, k), ext.pack_weight((torch.randn(n, k, generator=gen) * 0.05).bfloat16()))
               for _ in range(30) for n, k in LAYER_SHAPES]
    weights.append((HEAD, ext.pack_weight((torch.randn(*HEAD, generator=gen) * 0.05).bfloat16())))
    before = ext.bf16_widen_rows()
    try:
        for rows in [int(r) for r in args.rows.split(",")]:
            xs = {k: torch.randn(rows, k, generator=gen).bfloat16() for k in (576, 1536)}

            def stack(widen_rows):
                ext.set_bf16_widen_rows(widen_rows)
                t = time.perf_counter()
                for (n, k), p in weights:
                    ext.packed_linear(xs[k], p, n, empty, empty, False)
                return time.perf_counter() - t

            stack(NEVER), stack(1)  # warm-up
            dp, wide = zip(*[(stack(NEVER), stack(1)) for _ in range(args.repeats)])
            d, w = statistics.median(dp) * 1e3, statistics.median(wide) * 1e3
            print(f"rows {rows:5d}: vdpbf16ps {d:8.1f} ms  widened {w:8.1f} ms  vdpbf16ps/widened x{d / w:.2f}",
                  flush=True)
    finally:
        ext.set_bf16_widen_rows(before)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
