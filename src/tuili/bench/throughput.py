"""`tuili bench throughput`: offline throughput of the engine, or of transformers as a baseline.

Both backends get the same token-id prompts and produce exactly `output_len` tokens per
request (EOS ignored). The transformers baseline runs `generate` in static batches of
`--hf-batch-size` prompts, left-padded, which is how one serves with transformers alone.
Model loading is excluded from the timing; the first request's warm-up is included for
neither (one short warm-up run precedes each timing).
"""
from __future__ import annotations

import platform
import time
from typing import Any

import torch
from tqdm import tqdm

from ..device import resolve_device, resolve_dtype
from .results import append_jsonl
from .workload import load_tokenizer, parse_range, random_prompts


def run_tuili(model: str, prompts: list[list[int]], output_len: int, options: dict[str, Any]) -> dict[str, Any]:
    from ..engine.llm import LLM
    from ..sampling import SamplingParams

    llm = LLM(model, **options)
    llm.generate([prompts[0][:16]], SamplingParams(max_tokens=4, ignore_eos=True))
    params = SamplingParams(max_tokens=output_len, temperature=1.0, ignore_eos=True, seed=0)
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=True)
    elapsed = time.perf_counter() - start
    produced = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"elapsed_s": elapsed, "output_tokens": produced, "dtype": str(llm.engine.dtype).removeprefix("torch.")}


def run_transformers(model: str, prompts: list[list[int]], output_len: int, dtype: str,
                     batch_size: int) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    from ..model.loader import resolve_model_path

    device = resolve_device("auto")
    torch_dtype = resolve_dtype(dtype, device)  # no tuili products here: auto is float32 without native bf16
    hf = AutoModelForCausalLM.from_pretrained(str(resolve_model_path(model)), dtype=torch_dtype).to(device).eval()
    pad = hf.config.pad_token_id if hf.config.pad_token_id is not None else 0

    def run_batch(batch: list[list[int]]) -> int:
        width = max(len(p) for p in batch)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)
        out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=output_len,
                          min_new_tokens=output_len, do_sample=False, pad_token_id=pad)
        return (out.shape[1] - width) * len(batch)

    with torch.inference_mode():
        run_batch([prompts[0][:16]])  # warm-up
        start = time.perf_counter()
        produced = 0
        for i in tqdm(range(0, len(prompts), batch_size), desc="transformers batches"):
            produced += run_batch(prompts[i:i + batch_size])
        elapsed = time.perf_counter() - start
    return {"elapsed_s": elapsed, "output_tokens": produced, "dtype": str(torch_dtype).removeprefix("torch."),
            "hf_batch_size": batch_size}


def run_from_args(args, options: dict[str, Any]) -> int:
    lo, hi = parse_range(args.input_len)
    tokenizer = load_tokenizer(args.model)
    prompts = random_prompts(tokenizer, args.num_prompts, lo, hi, args.seed)
    prompt_tokens = sum(len(p) for p in prompts)
    if args.backend == "tuili":
        result = run_tuili(args.model, prompts, args.output_len, options)
    else:
        result = run_transformers(args.model, prompts, args.output_len, args.dtype, args.hf_batch_size)
    elapsed = result["elapsed_s"]
    record = {
        "bench": "throughput", "backend": args.backend, "model": args.model,
        "num_prompts": args.num_prompts, "input_len": args.input_len, "output_len": args.output_len,
        "seed": args.seed, "prompt_tokens": prompt_tokens, **result,
        "requests_per_s": args.num_prompts / elapsed,
        "output_tok_s": result["output_tokens"] / elapsed,
        "total_tok_s": (result["output_tokens"] + prompt_tokens) / elapsed,
        "torch_threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    print(f"{args.backend}: {args.num_prompts} requests in {elapsed:.1f} s, "
          f"{record['output_tok_s']:.1f} output tok/s, {record['total_tok_s']:.1f} total tok/s ({result['dtype']})")
    append_jsonl(args.output, record)
    return 0
