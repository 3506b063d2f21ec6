"""A decode-only step of the default model at a served batch's shape, through the CPU kernels'
whole-stack call (model/csrc/decoder.cpp): packed weights and K/V caches in ordinary memory
(4 KB pages) against the same bytes on 2 MB pages (model/hugepages.py), in one process.

    flock /tmp/tuili-bench.lock .venv/bin/python benchmarks/decode_step.py [--batch 32] [--runs 15]

The default model's weights (packed as the server packs them), `--batch` sequences with
contexts of 250-377 tokens (the peers workload near its last decode steps), their K/V in
blocks of 16 placed at random in one bf16 cache per layer (about 230 MB at batch 32: read
from memory each step, as in a served step after the weights have streamed through). The two
layouts alternate run by run; prints the median step time of each and their ratio.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import time

import torch

from tuili.engine.llm import LLM
from tuili.model import hugepages


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--runs", type=int, default=15, help="runs per layout")
    ap.add_argument("--steps", type=int, default=10, help="steps per run")
    args = ap.parse_args()
    if not hugepages.available():
        raise SystemExit("decode_step: this machine lends no transparent huge pages (THP mode "
                         f"{hugepages.thp_mode() or 'unknown'})")
    llm = LLM(speculative="none")
    model = llm.engine.runner.model
    ext = model._fused_kernels(llm.engine.runner.kv_caches)
    if ext is None:
        raise SystemExit("decode_step: the CPU kernels' fused path does not apply here")
    cfg, layer = model.cfg, model.layers[0]
    kv_heads, dim, block = layer.num_kv_heads, cfg.head_dim, 16
    gen = torch.Generator().manual_seed(0)
    batch = args.batch
    lens = torch.randint(250, 378, (batch,), generator=gen)
    per_seq = -(-int(lens.max()) // block)
    blocks = batch * per_seq + 8
    tables = torch.randperm(blocks, generator=gen)[: batch * per_seq].view(batch, per_seq).contiguous()
    positions = lens - 1
    slots = tables.gather(1, (positions // block).view(-1, 1)).view(-1) * block + positions % block
    ids = torch.randint(0, cfg.vocab_size, (batch,), generator=gen)
    caches = [tuple(torch.randn(blocks, block, kv_heads, dim, generator=gen).to(model.dtype) * 0.5
                    for _ in range(2)) for _ in range(cfg.num_layers)]
    norms, stack_caches, linears, sizes = model._decode_stack(caches)

    # as the server lays them out: one mapping for the packed panels, one for the caches
    panels = hugepages.Arena(hugepages.arena_bytes([w[0] for w in linears]))
    kv = hugepages.Arena(hugepages.arena_bytes([t for c in stack_caches for t in c[:2]]))
    layouts = {
        "4 KB pages": ([[t.clone() for t in c] for c in stack_caches], [[w[0].clone()] + w[1:] for w in linears]),
        "2 MB pages": ([[kv.take(c[0]), kv.take(c[1])] + c[2:] for c in stack_caches],
                       [[panels.take(w[0])] + w[1:] for w in linears]),
    }

    def step(c, w) -> None:
        x = torch.nn.functional.embedding(ids, model.embed)
        ext.llama_decode_layers(x, positions, model.rotary.cos, model.rotary.sin, norms, c, w, sizes, slots, tables,
                                lens, layer.num_heads, layer.num_kv_heads, model.norm.eps, layer.scale,
                                model.norm.weight)

    times: dict[str, list[float]] = {k: [] for k in layouts}
    for c, w in layouts.values():  # warm-up
        step(c, w)
    for _ in range(args.runs):
        for name, (c, w) in layouts.items():
            t = time.perf_counter()
            for _ in range(args.steps):
                step(c, w)
            times[name].append((time.perf_counter() - t) / args.steps)
    cpu = subprocess.run("lscpu | grep 'Model name'", shell=True, capture_output=True, text=True).stdout
    print(f"{cpu.split(':')[-1].strip()}, {torch.get_num_threads()} threads, batch {batch}, contexts 250-377, "
          f"{cfg.num_layers} layers, median of {args.runs} runs of {args.steps} steps (THP {hugepages.thp_mode()}, "
          f"{hugepages.process_huge_bytes() / 1e6:.0f} MB of this process on huge pages):")
    first = statistics.median(times["4 KB pages"])
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"  {name}: {med * 1000:.2f} ms a step (runs {min(ts) * 1000:.2f}-{max(ts) * 1000:.2f}), "
              f"{first / med:.3f}x")


if __name__ == "__main__":
    main()
