"""The `tuili` command: parses arguments, then hands over to one part of the package.

Errors a user can cause (a bad path, an unknown option value, a prompt too long) end
with one line on stderr and exit status 2, never a traceback.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Any, Callable

DEFAULT_MODEL = "smollm2-135m-instruct"


def _engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--dtype", default="auto", help="auto, float32 or bfloat16 (auto: bfloat16 where the CPU has it)")
    g.add_argument("--device", default="auto", help="auto, cpu or cuda")
    g.add_argument("--kv-cache-memory", default="1GiB", help="KV pool budget, e.g. 512MiB, 2GiB")
    g.add_argument("--block-size", type=int, default=16)
    g.add_argument("--max-num-seqs", type=int, default=256)
    g.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="tokens per step (default: 512 on a CPU, 2048 on CUDA)")
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--no-prefix-caching", action="store_true", help="turn prefix reuse off")
    g.add_argument("--seed", type=int, default=None, help="seed for requests that bring none")
    g.add_argument("--quantization", default="none",
                   help="weights: none, int8 (per channel) or int4 (groups of 32; int4:64, int4:128)")
    g.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "int8"],
                   help="KV cache entries: auto (the model dtype) or int8 (a scale per token and head)")
    g.add_argument("--kv-host-memory", default="0", help="host-memory KV tier behind the pool, e.g. 4GiB (0: off)")
    g.add_argument("--kv-disk-dir", default=None, help="directory of the disk KV tier (kept across restarts)")
    g.add_argument("--kv-disk-size", default="20GiB", help="size bound of the disk KV tier")


def engine_options(args: argparse.Namespace) -> dict[str, Any]:
    return dict(dtype=args.dtype, device=args.device, kv_cache_memory=args.kv_cache_memory,
                block_size=args.block_size, max_num_seqs=args.max_num_seqs,
                max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len,
                enable_prefix_caching=not args.no_prefix_caching, seed=args.seed,
                quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype,
                kv_host_memory=args.kv_host_memory, kv_disk_dir=args.kv_disk_dir, kv_disk_size=args.kv_disk_size)


def _sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=-1)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--sample-seed", type=int, default=None, dest="sample_seed")
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")


def sampling_params(args: argparse.Namespace):
    from .sampling import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                          seed=args.sample_seed, stop=args.stop)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tuili", description="LLM inference server on PyTorch")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="one-shot generation from the shell")
    p.add_argument("model", help="HF folder, .gguf file or known name")
    p.add_argument("prompt")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    _engine_args(p)
    _sampling_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive terminal chat")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    p.add_argument("--system", default=None, help="system prompt")
    _engine_args(p)
    _sampling_args(p)
    p.set_defaults(func=cmd_chat, max_tokens=512)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    p.add_argument("model", nargs="?", default=None, help=f"one model to serve (default {DEFAULT_MODEL})")
    p.add_argument("--model", dest="models", action="append", metavar="NAME=MODEL[,key=value...]",
                   help="serve MODEL as NAME with its own engine; keys are engine options, e.g. "
                        "fast=smollm2-135m-instruct,kv_cache_memory=256MiB (repeatable)")
    p.add_argument("--router", default=None, metavar="fast=NAME,strong=NAME",
                   help="route requests for --router-name between these two served models")
    p.add_argument("--router-name", default="auto", help="model name that asks for routing")
    p.add_argument("--router-model", default=None, help="router file from `tuili router train` (default: built in)")
    p.add_argument("--router-strong-share", type=float, default=0.2,
                   help="share of routed requests the classifier sends to the strong model")
    p.add_argument("--router-max-wait", type=float, default=None, metavar="MS",
                   help="send routed requests to the fast model while the strong one's estimated wait is longer")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None)
    p.add_argument("--served-model-name", default=None)
    p.add_argument("--max-queue", type=int, default=1024, help="waiting requests beyond this get HTTP 429")
    _engine_args(p)
    p.set_defaults(func=cmd_serve)

    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)
    p = bench.add_parser("throughput", help="offline throughput of the engine (or transformers)")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--backend", choices=["tuili", "transformers"], default="tuili")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len", default="100-300", help="A-B: prompt lengths drawn uniformly")
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--hf-batch-size", type=int, default=16, help="static batch size of the transformers backend")
    p.add_argument("--output", default="bench-results/throughput.jsonl", help="JSON lines file to append to")
    _engine_args(p)
    p.set_defaults(func=cmd_bench_throughput, seed=0)

    from .bench.multiturn import add_arguments as add_multiturn_arguments

    p = bench.add_parser("multiturn", help="multi-turn chat TTFT with and without KV tiers, and after a restart")
    add_multiturn_arguments(p)
    _engine_args(p)
    p.set_defaults(func=cmd_bench_multiturn, kv_host_memory="1GiB")

    from .bench.serve_bench import add_arguments as add_serve_bench_arguments
    from .router.commands import add_arguments as add_router_arguments

    add_router_arguments(sub.add_parser("router", help="train, evaluate and explain the model router")
                         .add_subparsers(dest="router_command", required=True))

    p = bench.add_parser("serve", help="online benchmark of any OpenAI-compatible server")
    add_serve_bench_arguments(p)
    p.set_defaults(func=cmd_bench_serve)

    p = bench.add_parser("decode", help="batch-1 decode speed of several quantization settings, side by side")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--configs", default="none/auto,int8/auto,int4/auto",
                   help="comma-separated QUANTIZATION/KV_DTYPE pairs, run interleaved in one process")
    p.add_argument("--input-len", type=int, default=100)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--runs", type=int, default=5, help="runs per setting; the median is reported")
    p.add_argument("--output", default="bench-results/decode.jsonl", help="JSON lines file to append to")
    _engine_args(p)
    p.set_defaults(func=cmd_bench_decode)

    p = bench.add_parser("matmul", help="the linear layers through torch's ops and through the CPU kernel")
    p.add_argument("--rows", default="1,4,16,32,64,256", help="comma-separated row counts")
    p.add_argument("--formats", default="bf16,int8,int4", help="comma-separated: bf16, int8, int4")
    p.add_argument("--repeats", type=int, default=5, help="timings per case; the median is reported")
    p.add_argument("--output", default="bench-results/matmul.jsonl", help="JSON lines file to append to")
    p.set_defaults(func=cmd_bench_matmul)

    ev = sub.add_parser("eval", help="quality evaluation").add_subparsers(dest="eval", required=True)
    p = ev.add_parser("perplexity", help="perplexity on a fixed text (and agreement with full precision)")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    p.add_argument("--text", default=None, help="UTF-8 text file (default: the shipped public-domain corpus)")
    p.add_argument("--max-text-tokens", type=int, default=None, help="score only the first N tokens")
    p.add_argument("--window", type=int, default=1024, help="tokens per window (no overlap)")
    p.add_argument("--chunk", type=int, default=256, help="prefill chunk size inside a window")
    p.add_argument("--compare", action="store_true",
                   help="also run the full-precision model and report top-1 agreement and logit error")
    p.add_argument("--output", default=None, help="JSON lines file to append the result to")
    _engine_args(p)
    p.set_defaults(func=cmd_eval_perplexity)

    from .bench.router import add_arguments as add_router_bench_arguments

    p = bench.add_parser("router", help="in-process routing overhead per request")
    add_router_bench_arguments(p)
    p.set_defaults(func=cmd_bench_router)
    return parser


def cmd_generate(args: argparse.Namespace) -> int:
    from .engine.llm import LLM

    llm = LLM(args.model, **engine_options(args))
    prompt = llm.chat_prompt_ids([{"role": "user", "content": args.prompt}]) if args.chat else args.prompt
    _stream(llm, prompt, sampling_params(args))
    return 0


def _stream(llm, prompt, params) -> str:
    """Print a completion as it is generated; returns its text."""
    engine = llm.engine
    rid = f"cli-{id(prompt)}"
    engine.add_request(rid, prompt, params)
    shown = ""
    while engine.has_unfinished_requests():
        for out in engine.step():
            text = out.outputs[0].text
            sys.stdout.write(text[len(shown):])
            sys.stdout.flush()
            shown = text
    sys.stdout.write("\n")
    return shown


def cmd_chat(args: argparse.Namespace) -> int:
    from .engine.llm import LLM

    llm = LLM(args.model, **engine_options(args))
    messages = [{"role": "system", "content": args.system}] if args.system else []
    params = sampling_params(args)
    print("tuili chat: type a message, Ctrl-D to quit.", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        reply = _stream(llm, llm.chat_prompt_ids(messages), params)
        messages.append({"role": "assistant", "content": reply})


def cmd_serve(args: argparse.Namespace) -> int:
    from .serve.app import serve

    return serve(args, engine_options(args))


def cmd_bench_throughput(args: argparse.Namespace) -> int:
    from .bench.throughput import run_from_args

    return run_from_args(args, engine_options(args))


def cmd_bench_router(args: argparse.Namespace) -> int:
    from .bench.router import run_from_args

    return run_from_args(args)


def cmd_bench_multiturn(args: argparse.Namespace) -> int:
    from .bench.multiturn import run_from_args

    return run_from_args(args, engine_options(args))


def cmd_bench_serve(args: argparse.Namespace) -> int:
    from .bench.serve_bench import run_from_args

    return run_from_args(args)


def cmd_bench_decode(args: argparse.Namespace) -> int:
    from .bench.decode import run_from_args

    return run_from_args(args, engine_options(args))


def cmd_bench_matmul(args: argparse.Namespace) -> int:
    from .bench.matmul import run_from_args

    return run_from_args(args)


def cmd_eval_perplexity(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from .engine.engine import Engine
    from .engine.evaluate import DEFAULT_TEXT, evaluate

    path = Path(args.text) if args.text else DEFAULT_TEXT
    if not path.is_file():
        raise FileNotFoundError(f"--text: no such file {path}")
    options = engine_options(args)
    engine = Engine(args.model, **options)
    ids = engine.encode(path.read_text(encoding="utf-8"))[: args.max_text_tokens]
    reference = None
    if args.compare:
        reference = Engine(args.model, **{**options, "quantization": "none", "kv_cache_dtype": "auto"})
    result = evaluate(engine, ids, window=args.window, chunk=args.chunk, reference=reference)
    record = {"model": engine.model_name, "text": path.name, "dtype": str(engine.dtype).removeprefix("torch."),
              "quantization": args.quantization, "kv_cache_dtype": args.kv_cache_dtype, "window": args.window,
              **result.to_dict()}
    line = json.dumps(record)
    print(line)
    if args.output:
        from .bench.results import append_jsonl

        append_jsonl(args.output, record)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per HTTP call drowns the output
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except (ValueError, FileNotFoundError) as e:
        if args.verbose:
            raise
        print(f"tuili: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
