"""int8 (and int4) against bf16 weights on the CPU at hand, in one process, medians of several runs:
the model's own linear layers (all layers + head, as the engine holds them) at a few row
counts, in-engine prefill tok/s (one 1,024-token text in chunks of 256, through the model
and the paged cache) and in-engine decode tok/s (one request alone, 128 tokens).

    flock /tmp/tuili-bench.lock .venv/bin/python benchmarks/int8_ab.py [--runs 5]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time

import torch

from tuili.bench.decode import decode_once
from tuili.bench.workload import random_prompts
from tuili.engine.engine import Engine
from tuili.engine.evaluate import DEFAULT_TEXT
from tuili.model.kernels import cpu_kernels
from tuili.model.layers import linear
from tuili.model.quant import LINEARS


def matmul_ms(engine: Engine, rows: int, reps: int) -> float:
    m = engine.model
    weights = [getattr(layer, n) for layer in m.layers for n in LINEARS] + [m.lm_head]
    xs = {w.shape[1]: torch.randn(rows, w.shape[1]).bfloat16() for w in weights}
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        for w in weights:
            linear(xs[w.shape[1]], w)
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def prefill_tok_s(engine: Engine, ids: list[int], chunk: int = 256) -> float:
    table = list(range(-(-len(ids) // engine.config.block_size)))
    t = time.perf_counter()
    for start in range(0, len(ids), chunk):
        engine.runner.chunk_logits(ids[start:start + chunk], start, table)
    return len(ids) / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--rows", default="1,8,32,128,256")
    ap.add_argument("--quant", default="none,int8",
                    help="weight modes; the first is the baseline. int8/vnni: int8 with its products kept off "
                         "AMX tiles (the VNNI tiles at every row count), for an A/B on a CPU with AMX")
    args = ap.parse_args()
    cpu = subprocess.run("lscpu | grep 'Model name'", shell=True, capture_output=True, text=True).stdout.split(":")[-1].strip()
    engines = {q: Engine("smollm2-135m-instruct", dtype="bfloat16", quantization=q.split("/")[0], num_kv_blocks=80)
               for q in args.quant.split(",")}
    ext = cpu_kernels()
    amx_rows = ext.int8_amx_rows() if ext is not None and ext.gemm_available() else None

    def select(q: str) -> None:  # the int8 AMX setting is one per process: set before each mode runs
        if amx_rows is not None:
            ext.set_int8_amx_rows(1 << 40 if q.endswith("/vnni") else amx_rows)
    ids = engines["none"].encode(DEFAULT_TEXT.read_text())[:1024]
    prompt = random_prompts(engines["none"].tokenizer, 1, 100, 100, seed=0)[0]
    res: dict[str, dict[str, list[float]]] = {q: {} for q in engines}
    for q, e in engines.items():  # warm-up
        select(q)
        decode_once(e, prompt[:16], 4)
        prefill_tok_s(e, ids[:256])
    for r in range(args.runs):
        for q, e in engines.items():
            select(q)
            for rows in map(int, args.rows.split(",")):
                res[q].setdefault(f"matmul_ms_{rows}", []).append(matmul_ms(e, rows, 3))
            res[q].setdefault("prefill_tok_s", []).append(prefill_tok_s(e, ids))
            res[q].setdefault("decode_tok_s", []).append(decode_once(e, prompt, 128))
        print(f"run {r + 1}: " + ", ".join(f"{q} prefill {v['prefill_tok_s'][-1]:.0f} decode {v['decode_tok_s'][-1]:.1f}"
                                          for q, v in res.items()), flush=True)
    print(f"CPU: {cpu}, torch threads {torch.get_num_threads()}, medians of {args.runs}")
    modes = list(res)
    print(f"{'figure':>16} | " + " | ".join(f"{q:>9}" for q in modes) + " | " + " | ".join(f"{q} speed-up" for q in modes[1:]))
    for key in res[modes[0]]:
        meds = [statistics.median(res[q][key]) for q in modes]
        ratios = [(meds[0] / m if key.startswith("matmul") else m / meds[0]) for m in meds[1:]]
        print(f"{key:>16} | " + " | ".join(f"{m:9.2f}" for m in meds) + " | " + " | ".join(f"{r:.2f}x" for r in ratios))
    print(json.dumps({"cpu": cpu, "runs": args.runs, "results": {q: {k: statistics.median(v) for k, v in d.items()}
                                                                    for q, d in res.items()}}))


if __name__ == "__main__":
    main()
