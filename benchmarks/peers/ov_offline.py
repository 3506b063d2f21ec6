"""Offline throughput of OpenVINO GenAI's ContinuousBatchingPipeline; runs inside the OpenVINO venv.

A standalone script (it imports nothing from tuili: the OpenVINO venv does not have it).
Every prompt is submitted at once with greedy decoding and exactly --output-len new tokens
(ignore_eos, min_new_tokens), after an untimed warm-up on two prompts. Prints one JSON
line: output_throughput (tok/s), duration_s, counts. This is an in-process upper bound:
no HTTP, no streaming, no per-request latencies.
"""
from __future__ import annotations

import argparse
import json
import sys
import time


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True, help="OpenVINO IR folder (optimum-cli export openvino)")
    p.add_argument("--prompts", required=True, help="JSON list of prompt strings")
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--cache-gib", type=float, default=2.0)
    p.add_argument("--threads", type=int, default=0, help="INFERENCE_NUM_THREADS (0: OpenVINO's default)")
    args = p.parse_args()

    import openvino_genai as ov_genai

    prompts = json.load(open(args.prompts))
    sched = ov_genai.SchedulerConfig()
    sched.cache_size = max(1, int(round(args.cache_gib)))
    sched.max_num_seqs = max(len(prompts), 1)
    sched.max_num_batched_tokens = 2048
    sched.enable_prefix_caching = False
    props = {"INFERENCE_NUM_THREADS": args.threads} if args.threads else {}
    t0 = time.perf_counter()
    pipe = ov_genai.ContinuousBatchingPipeline(args.model, sched, "CPU", props)
    load_s = time.perf_counter() - t0

    config = ov_genai.GenerationConfig()
    config.max_new_tokens = args.output_len
    config.min_new_tokens = args.output_len
    config.ignore_eos = True
    config.do_sample = False

    pipe.generate(prompts[:2], [config] * min(2, len(prompts)))  # warm-up, not timed
    start = time.perf_counter()
    results = pipe.generate(prompts, [config] * len(prompts))
    duration = time.perf_counter() - start

    tokenizer = pipe.get_tokenizer()
    texts = [r.m_generation_ids[0] if r.m_generation_ids else "" for r in results]
    reencoded = sum(int(tokenizer.encode(t).input_ids.get_shape()[-1]) for t in texts)
    output_tokens = args.output_len * sum(1 for t in texts if t)
    print(json.dumps({"load_s": load_s, "duration_s": duration, "completed": sum(1 for t in texts if t),
                      "failed": sum(1 for t in texts if not t), "total_output_tokens": output_tokens,
                      "reencoded_output_tokens": reencoded, "output_throughput": output_tokens / duration,
                      "sample": texts[0][:80]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
