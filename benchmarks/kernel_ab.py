"""Two builds of the CPU kernels A/B in one process: the packed bf16 products over a whole
model's weights, and decode attention, alternating run by run (this host's speed drifts by
tens of percent within minutes, so only paired runs compare).

    cp .venv/tuili-cache/kernels/<old key>/tuili_cpu_<old key>.so /tmp/old/   # before the change
    flock /tmp/tuili-bench.lock .venv/bin/python benchmarks/kernel_ab.py /tmp/old/tuili_cpu_<key>.so \
        .venv/tuili-cache/kernels/<new key>/tuili_cpu_<new key>.so [--rows 1,6,16,32] [--attention 1,32]

Products: SmolLM2-135M's shapes (30 layers of qkv 960x576, o 576x576, gate/up 3072x576, down
576x1536, and the 49152x576 head), random bf16 weights (`--int8`: int8 in blocks of 32)
packed once, `--rows` activation rows; checks that both builds give the same bits.
Attention: `--attention` batch sizes over 30 distinct layer caches (contexts of 250-377
tokens), the model's queries in float32 as on CPUs without fast bf16 (`--bf16-queries`: in
bf16, as on CPUs with AVX512-BF16). Prints the medians of `--runs` paired runs and old / new.
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import time

import torch

from tuili.model.quant import quantize_int8_packed


def load(path: str):
    spec = importlib.util.spec_from_file_location(path.rsplit("/", 1)[-1].removesuffix(".so"), path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def paired(old, new, run, runs: int) -> tuple[float, float]:
    a, b = [], []
    for _ in range(runs):
        a.append(run(old))
        b.append(run(new))
    return statistics.median(a), statistics.median(b)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("--rows", default="1,6,16,32,64", help="activation rows of the products ('' to skip)")
    ap.add_argument("--attention", default="1,32", help="decode-attention batch sizes ('' to skip)")
    ap.add_argument("--runs", type=int, default=9)
    ap.add_argument("--int8", action="store_true", help="int8 weights (scales per block of 32) instead of bf16")
    ap.add_argument("--bf16-queries", action="store_true",
                    help="attention queries in bf16, as a bf16 model has them on CPUs with AVX512-BF16")
    args = ap.parse_args()
    old, new = load(args.old), load(args.new)
    gen = torch.Generator().manual_seed(0)
    empty = torch.empty(0)
    shapes = [(960, 576), (576, 576), (3072, 576), (576, 1536)] * 30 + [(49152, 576)]
    weights = []
    for n, k in shapes if args.rows else []:
        w = torch.randn(n, k, generator=gen) * 0.05
        if args.int8:  # the same layout in both builds (the current one packs it)
            q = quantize_int8_packed(w)
            weights.append((n, k, q.packed, q.scales))
        else:
            weights.append((n, k, new.pack_weight(w.bfloat16()), empty))
    for rows in [int(r) for r in args.rows.split(",") if r]:
        xs = {k: torch.randn(rows, k, generator=gen).bfloat16() for k in (576, 1536)}

        def products(m, xs=xs):
            t = time.perf_counter()
            for n, k, w, scales in weights:
                m.packed_linear(xs[k], w, n, scales, empty, False)
            return time.perf_counter() - t

        a, b = paired(old, new, products, args.runs)
        n, k, w, scales = weights[2]
        same = torch.equal(old.packed_linear(xs[k], w, n, scales, empty, False),
                           new.packed_linear(xs[k], w, n, scales, empty, False))
        print(f"products, {rows:4d} rows: old {1e3 * a:7.2f} ms  new {1e3 * b:7.2f} ms  old/new {a / b:.3f}"
              f"  ({'same bits' if same else 'RESULTS DIFFER'})", flush=True)
    heads, kv_heads, dim, block = 9, 3, 64, 16
    for batch in [int(x) for x in args.attention.split(",") if x]:
        lens = torch.randint(250, 378, (batch,), generator=gen)
        per_seq = -(-int(lens.max()) // block)
        blocks = batch * per_seq + 8
        caches = [tuple(torch.randn(blocks, block, kv_heads, dim, generator=gen).bfloat16() for _ in range(2))
                  for _ in range(30)]
        tables = torch.randperm(blocks, generator=gen)[: batch * per_seq].view(batch, per_seq)
        q = torch.randn(batch, heads, dim, generator=gen)
        q = q.bfloat16() if args.bf16_queries else q

        def attention(m, caches=caches, tables=tables, lens=lens, q=q):
            t = time.perf_counter()
            for k, v in caches:
                m.paged_decode_attention(q, k, v, tables, lens, dim ** -0.5, empty, empty, 0)
            return time.perf_counter() - t

        a, b = paired(old, new, attention, args.runs)
        k, v = caches[0]
        diff = (old.paged_decode_attention(q, k, v, tables, lens, 0.125, empty, empty, 0)
                - new.paged_decode_attention(q, k, v, tables, lens, 0.125, empty, empty, 0)).abs().max()
        print(f"decode attention, batch {batch:3d}: old {1e3 * a:7.2f} ms  new {1e3 * b:7.2f} ms  old/new {a / b:.3f}"
              f"  (max difference {float(diff):.1e})", flush=True)


if __name__ == "__main__":
    main()
