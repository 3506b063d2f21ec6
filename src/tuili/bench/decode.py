"""`tuili bench decode`: batch-1 decode speed of several weight/KV settings, side by side.

Every setting gets its own engine, all loaded up front in one process; the runs are
interleaved (setting A, B, C, then A, B, C again ...) so that drift in the machine's
load hits all of them alike, and each setting's median over `--runs` is reported with
its ratio to the first setting. A run is one request: a prompt of `--input-len` tokens
from the shipped corpus, then `--output-len` tokens with EOS ignored; decode speed is
(output tokens - 1) over the time from the first token to the last, so prefill is out.
"""
from __future__ import annotations

import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from ..engine.engine import Engine
from ..sampling import SamplingParams
from .alone import run_alone
from .results import append_jsonl
from .workload import random_prompts


def parse_configs(text: str) -> list[tuple[str, str]]:
    configs = []
    for item in text.split(","):
        quant, _, kv = item.strip().partition("/")
        configs.append((quant or "none", kv or "auto"))
    if not configs:
        raise ValueError("--configs: give at least one QUANTIZATION/KV_DTYPE pair")
    return configs


def decode_once(engine: Engine, prompt: list[int], output_len: int) -> float:
    """Decode tokens per second of one request run alone (from the first token's step to the last)."""
    params = SamplingParams(max_tokens=output_len, ignore_eos=True)
    marks = run_alone(engine, prompt, params).marks
    if len(marks) < 2 or marks[-1][1] <= marks[0][1]:
        raise RuntimeError("decode benchmark produced too few tokens")
    (first, count), (last, produced) = marks[0], marks[-1]
    return (produced - count) / (last - first)


def run_from_args(args, options: dict[str, Any]) -> int:
    configs = parse_configs(args.configs)
    engines = []
    for quant, kv in configs:
        engines.append(Engine(args.model, **{**options, "quantization": quant, "kv_cache_dtype": kv}))
    prompt = random_prompts(engines[0].tokenizer, 1, args.input_len, args.input_len, seed=0)[0]
    for e in engines:  # warm-up: first calls allocate and pick kernels
        decode_once(e, prompt[:16], 4)
    speeds: list[list[float]] = [[] for _ in configs]
    for r in range(args.runs):
        for i, e in enumerate(engines):
            speeds[i].append(decode_once(e, prompt, args.output_len))
        print(f"run {r + 1}/{args.runs}: " + ", ".join(f"{q}/{kv} {s[-1]:.1f}" for (q, kv), s in zip(configs, speeds)),
              flush=True)
    base = statistics.median(speeds[0])
    out = Path(args.output)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    for (quant, kv), s, e in zip(configs, speeds, engines):
        med = statistics.median(s)
        record = {"bench": "decode", "model": args.model, "dtype": str(e.dtype).removeprefix("torch."),
                  "quantization": quant, "kv_cache_dtype": kv, "input_len": args.input_len,
                  "output_len": args.output_len, "runs": args.runs, "decode_tok_s_median": round(med, 2),
                  "decode_tok_s_runs": [round(x, 2) for x in s], "ratio_to_first": round(med / base, 3),
                  "weight_bytes": e.model.weight_bytes(), "kv_bytes_per_token": e.kv_bytes_per_block // e.config.block_size,
                  "torch_threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
                  "time": stamp}
        print(f"{quant:>8}/{kv:<5} decode {med:6.1f} tok/s (x{med / base:.2f})  weights {record['weight_bytes'] / 1e6:.1f} MB")
        append_jsonl(out, record)
    return 0
