"""The `tuili` command: parses arguments, then hands over to one part of the package.

Errors a user can cause (a bad path, an unknown option value, a prompt too long) end
with one line on stderr and exit status 2, never a traceback.

The engine options are `EngineConfig`'s fields (names, defaults and types come from the
dataclass), so a field added there is an option here without further work; only the help
text and a few choices live in this file. A boolean field that defaults to True becomes a
`--no-...` switch (`enable_prefix_caching` -> `--no-prefix-caching`).
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import typing
from typing import Any, Callable

from .config import DEFAULT_MODEL, EngineConfig, parse_size

ENGINE_HELP: dict[str, str] = {
    "dtype": "auto, float32 or bfloat16 (auto: bfloat16 on CUDA and where the CPU or its compiled kernels run it)",
    "device": "auto, cpu or cuda",
    "block_size": "tokens per KV block (a power of two)",
    "kv_cache_memory": "KV pool budget, e.g. 512MiB, 2GiB",
    "num_kv_blocks": "KV pool size in blocks (overrides --kv-cache-memory)",
    "max_num_seqs": "sequences running at once at most",
    "max_num_batched_tokens": "tokens per step (default: 512 on a CPU, 2048 on CUDA)",
    "long_prefill_token_threshold": "largest prefill chunk of one request in a step (default: the whole budget)",
    "max_model_len": "context length (default: the model's)",
    "enable_prefix_caching": "turn prefix reuse off",
    "seed": "seed for requests that bring none",
    "quantization": "weights: none, int8 (per channel) or int4 (groups of 32; int4:64, int4:128)",
    "kv_cache_dtype": "KV cache entries: auto (the model dtype) or int8 (a scale per token and head)",
    "kv_host_memory": "host-memory KV tier behind the pool, e.g. 4GiB (0: off)",
    "kv_disk_dir": "directory of the disk KV tier (kept across restarts)",
    "kv_disk_size": "size bound of the disk KV tier",
    "speculative": "speculative decoding: auto (default: ngram where drafts cannot change a token, none elsewhere), "
                   "none, or ngram (drafts from n-gram matches in prompt and output)",
    "speculative_tokens": "most draft tokens per sequence and step (when drafting)",
    "speculative_max_batch": "draft only while at most this many sequences run (default: no limit; drafts follow their measured gain)",
}
ENGINE_CHOICES: dict[str, list[str]] = {"kv_cache_dtype": ["auto", "int8"], "speculative": ["auto", "none", "ngram"]}


def _engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    hints = typing.get_type_hints(EngineConfig)
    for f in dataclasses.fields(EngineConfig):
        help_text = ENGINE_HELP.get(f.name, f"EngineConfig.{f.name}")
        hint = hints[f.name]
        if hint is bool:
            if f.default is True:
                flag = "--no-" + f.name.removeprefix("enable_").replace("_", "-")
                g.add_argument(flag, dest=f.name, action="store_false", help=help_text)
            else:
                g.add_argument("--" + f.name.replace("_", "-"), action="store_true", help=help_text)
            continue
        kinds = set(typing.get_args(hint)) - {type(None)} or {hint}
        kind = int if kinds == {int} else str  # sizes ("1GiB" or bytes) stay strings; EngineConfig parses them
        g.add_argument("--" + f.name.replace("_", "-"), type=kind, default=f.default, help=help_text,
                       choices=ENGINE_CHOICES.get(f.name))


def engine_options(args: argparse.Namespace) -> dict[str, Any]:
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(EngineConfig)}


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


def _serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    p.add_argument("model", nargs="?", default=None, help=f"one model to serve (default {DEFAULT_MODEL})")
    p.add_argument("--model", dest="models", action="append", metavar="NAME=MODEL[,key=value...]",
                   help="serve MODEL as NAME with its own engine; keys are engine options, e.g. "
                        "fast=smollm2-135m-instruct,kv_cache_memory=256MiB (repeatable)")
    p.add_argument("--router", default=None, metavar="fast=NAME,strong=NAME",
                   help="route requests for --router-name between these two served models")
    p.add_argument("--router-name", default="auto", help="model name that asks for routing")
    p.add_argument("--router-signal", choices=("auto", "probe", "features"), default="auto",
                   help="probe: the fast model's hidden state (its prefill is reused); features: the text's "
                        "surface; auto: the probe when it was fitted on the fast model, else features")
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
    p.add_argument("--shutdown-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="on SIGTERM, how long requests in flight may finish before they are ended")
    p.add_argument("--max-request-bytes", type=parse_size, default="4MiB", metavar="SIZE",
                   help="larger request bodies get HTTP 413, e.g. 512KiB, 4MiB")
    g = p.add_argument_group("replicas (Ray Serve)")
    g.add_argument("--replicas", type=int, default=None, metavar="N",
                   help="serve each model from N engine replicas on Ray Serve (default: one engine, no Ray)")
    g.add_argument("--routing", choices=["cache-aware", "pow2", "round-robin"], default="cache-aware",
                   help="how a request picks its replica")
    g.add_argument("--cpus-per-replica", type=float, default=1.0, metavar="K",
                   help="CPUs (and torch threads) of each replica")
    g.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="join this Ray cluster (e.g. auto, or HOST:6379 of `ray start --head`); default: a local Ray")
    g.add_argument("--min-replicas", type=int, default=None, help="autoscale down to this many replicas")
    g.add_argument("--max-replicas", type=int, default=None, help="autoscale up to this many replicas")
    _engine_args(p)
    p.set_defaults(func=cmd_serve)


def _bench_parsers(sub) -> None:
    from .bench import multiturn, perplexity, router, serve_bench, soak

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
    p.set_defaults(func=_with_engine("throughput"), seed=0)

    p = bench.add_parser("multiturn", help="multi-turn chat TTFT with and without KV tiers, and after a restart")
    multiturn.add_arguments(p)
    _engine_args(p)
    p.set_defaults(func=_with_engine("multiturn"), kv_host_memory="1GiB")

    p = bench.add_parser("serve", help="online benchmark of any OpenAI-compatible server")
    serve_bench.add_arguments(p)
    p.set_defaults(func=_plain("serve_bench"))

    p = bench.add_parser("soak", help="reliability soak of a running server: aborts, malformed requests, leaks")
    soak.add_arguments(p)
    p.set_defaults(func=_plain("soak"))

    p = bench.add_parser("decode", help="batch-1 decode speed of several quantization settings, side by side")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--configs", default="none/auto,int8/auto,int4/auto",
                   help="comma-separated QUANTIZATION/KV_DTYPE pairs, run interleaved in one process")
    p.add_argument("--input-len", type=int, default=100)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--runs", type=int, default=5, help="runs per setting; the median is reported")
    p.add_argument("--output", default="bench-results/decode.jsonl", help="JSON lines file to append to")
    _engine_args(p)
    p.set_defaults(func=_with_engine("decode"))

    p = bench.add_parser("matmul", help="the linear layers through torch's ops and through the CPU kernel")
    p.add_argument("--rows", default="1,4,16,32,64,256", help="comma-separated row counts")
    p.add_argument("--formats", default="bf16,int8,int4", help="comma-separated: bf16, int8, int4")
    p.add_argument("--repeats", type=int, default=5, help="timings per case; the median is reported")
    p.add_argument("--output", default="bench-results/matmul.jsonl", help="JSON lines file to append to")
    p.set_defaults(func=_plain("matmul"))

    p = bench.add_parser("tenants", help="multi-tenant shared system prompts on Ray Serve replicas, by routing policy")
    from .bench import tenants

    tenants.add_arguments(p)
    p.set_defaults(func=_plain("tenants"))

    p = bench.add_parser("router", help="in-process routing overhead per request")
    router.add_arguments(p)
    p.set_defaults(func=_plain("router"))

    ev = sub.add_parser("eval", help="quality evaluation").add_subparsers(dest="eval", required=True)
    p = ev.add_parser("perplexity", help="perplexity on a fixed text (and agreement with full precision)")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    perplexity.add_arguments(p)
    _engine_args(p)
    p.set_defaults(func=_with_engine("perplexity"))


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

    _serve_parser(sub)
    _bench_parsers(sub)
    from .plan.cli import add_plan_parser  # the planner imports neither torch nor the engine

    add_plan_parser(sub)

    from .router.commands import add_arguments as add_router_arguments

    add_router_arguments(sub.add_parser("router", help="train, evaluate and explain the model router")
                         .add_subparsers(dest="router_command", required=True))
    return parser


def _with_engine(module: str) -> Callable[[argparse.Namespace], int]:
    """A command whose body is `tuili.bench.<module>.run_from_args(args, engine options)`."""
    def run(args: argparse.Namespace) -> int:
        from importlib import import_module

        return import_module(f".bench.{module}", __package__).run_from_args(args, engine_options(args))
    return run


def _plain(module: str) -> Callable[[argparse.Namespace], int]:
    """A command whose body is `tuili.bench.<module>.run_from_args(args)`."""
    def run(args: argparse.Namespace) -> int:
        from importlib import import_module

        return import_module(f".bench.{module}", __package__).run_from_args(args)
    return run


def _print_now(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def cmd_generate(args: argparse.Namespace) -> int:
    from .bench.alone import run_alone
    from .engine.llm import LLM

    llm = LLM(args.model, **engine_options(args))
    prompt = llm.chat_prompt_ids([{"role": "user", "content": args.prompt}]) if args.chat else args.prompt
    run_alone(llm.engine, prompt, sampling_params(args), on_text=_print_now)
    print()
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from .bench.alone import run_alone
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
        reply = run_alone(llm.engine, llm.chat_prompt_ids(messages), params, on_text=_print_now).text
        print()
        messages.append({"role": "assistant", "content": reply})


def cmd_serve(args: argparse.Namespace) -> int:
    if args.replicas is not None:  # Ray Serve replicas: the only path that imports Ray
        from .serve.replicas.launch import serve_replicas

        return serve_replicas(args, engine_options(args))
    from .serve.launch import serve

    return serve(args, engine_options(args))


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
