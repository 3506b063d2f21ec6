"""`tuili plan` / `python -m tuili.plan`: arguments, then one plan or a ranked table.

The workload is a concurrency (closed loop, as `tuili bench serve --max-concurrency`), or
a traffic target: `--requests-per-second R` or `--tokens-per-day T` (output tokens per
day; R = T / 86,400 / mean output length). Lengths are `N` or a uniform range `A-B`.
"""
from __future__ import annotations

import argparse
import json
import sys

from . import hardware as hwmod
from .planner import Options, Workload, plan_one, sweep
from .report import describe, format_plan, format_table, write_plot
from .shapes import load_shape

DEFAULT_MODEL = "smollm2-135m-instruct"  # tuili.config.DEFAULT_MODEL, without importing torch


def _range(text: str) -> tuple[int, int]:
    lo, _, hi = str(text).partition("-")
    a, b = int(float(lo)), int(float(hi or lo))
    if a < 1 or b < a:
        raise argparse.ArgumentTypeError(f"length {text!r}: give N or A-B with 1 <= A <= B")
    return a, b


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                   help="known name, HF folder or config.json (default: %(default)s)")
    p.add_argument("--hardware", default=None, help="catalog entry or 'local' (default: rank the whole catalog)")
    p.add_argument("--count", type=int, default=None, help="accelerators per replica (default: fewest that fit)")
    p.add_argument("--quantization", choices=["none", "int8", "int4"], default="none")
    p.add_argument("--kv-cache-dtype", choices=["auto", "int8"], default="auto")
    p.add_argument("--kv-cache-memory", default=None, help="KV pool size (default: local 1GiB as tuili serve; "
                   "accelerators: 90%% of memory after weights and activations)")
    p.add_argument("--kv-host-memory", default="0", help="host-memory KV tier size, e.g. 8GiB")
    p.add_argument("--kv-disk-size", default="0", help="disk KV tier size, e.g. 100GiB")
    p.add_argument("--concurrency", type=int, default=None, help="requests in flight (closed loop)")
    p.add_argument("--prompt-len", type=_range, default=(100, 300), help="N or A-B tokens (default 100-300)")
    p.add_argument("--output-len", type=_range, default=(128, 128), help="N or A-B tokens (default 128)")
    p.add_argument("--requests-per-second", type=float, default=None, help="traffic to serve")
    p.add_argument("--tokens-per-day", type=float, default=None, help="traffic as output tokens per day")
    p.add_argument("--num-requests", type=int, default=None, help="requests replayed (default max(16, 4 x concurrency))")
    p.add_argument("--slo-ttft", type=float, default=None, help="seconds")
    p.add_argument("--slo-tpot", type=float, default=None, help="seconds")
    p.add_argument("--slo-percentile", type=float, choices=[50, 90, 99], default=50)
    p.add_argument("--price-per-hour", type=float, default=None, help="USD per accelerator-hour")
    p.add_argument("--json", action="store_true", help="print one JSON object (a list of them when ranking)")
    p.add_argument("--plot", default=None, metavar="FILE.png", help="throughput and latency against concurrency")
    p.add_argument("--calibrate", action="store_true",
                   help="measure this machine's engine steps and store the efficiency factors of `local`")
    p.add_argument("--calibrate-quantizations", default="none,int8", help="weight formats to calibrate")


def add_plan_parser(subparsers) -> argparse.ArgumentParser:
    """Register `plan` on the `tuili` command's subparsers; its func is `run`."""
    p = subparsers.add_parser("plan", help="capacity planner: memory, latency, throughput and accelerators needed")
    add_arguments(p)
    p.set_defaults(func=run)
    return p


def build(args: argparse.Namespace) -> tuple[Options, Workload]:
    if args.requests_per_second is not None and args.tokens_per_day is not None:
        raise ValueError("give --requests-per-second or --tokens-per-day, not both")
    opts = Options(quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype, count=args.count,
                   kv_cache_memory=hwmod.parse_size(args.kv_cache_memory) if args.kv_cache_memory else None,
                   kv_host_memory=hwmod.parse_size(args.kv_host_memory),
                   kv_disk_size=hwmod.parse_size(args.kv_disk_size), price_per_hour=args.price_per_hour)
    w = Workload(prompt=args.prompt_len, output=args.output_len, concurrency=args.concurrency,
                 slo_ttft=args.slo_ttft, slo_tpot=args.slo_tpot, slo_percentile=args.slo_percentile,
                 num_requests=args.num_requests)
    if args.tokens_per_day is not None:
        w.requests_per_s = args.tokens_per_day / 86400 / w.mean_output
    elif args.requests_per_second is not None:
        w.requests_per_s = args.requests_per_second
    return opts, w


def run(args: argparse.Namespace) -> int:
    try:
        if args.calibrate:
            from .calibrate import calibrate
            calibrate(args.model if args.model else DEFAULT_MODEL,
                      [q for q in args.calibrate_quantizations.split(",") if q], verbose=not args.json)
            if args.hardware is None:
                args.hardware = "local"
        shape = load_shape(args.model)
        opts, workload = build(args)
        if args.hardware:
            return _one(args, shape, opts, workload)
        return _ranked(args, shape, opts, workload)
    except (ValueError, KeyError, FileNotFoundError, LookupError) as e:
        print(f"tuili plan: {e}", file=sys.stderr)
        return 2


def _one(args, shape, opts: Options, workload: Workload) -> int:
    hw = hwmod.get(args.hardware)
    plan = plan_one(shape, hw, opts, workload)
    if args.json:
        print(json.dumps({"model": shape.name, "quantization": opts.quantization,
                          "kv_cache_dtype": opts.kv_cache_dtype, **plan.as_dict()}))
    else:
        print(format_plan(plan, shape, opts.quantization, opts.kv_cache_dtype))
    if args.plot:
        top = max(1, min(plan.max_batch, 256))
        concs = sorted({c for c in (1, 2, 4, 8, 16, 32, 64, 128, 256) if c <= top} | {top})
        plans = sweep(shape, hw, opts, workload, concs)
        write_plot(plans, args.plot, f"{shape.name} on {hw.name} x {plan.count} ({opts.quantization})")
        if not args.json:
            print(f"plot: {args.plot}")
    return 0


def _ranked(args, shape, opts: Options, workload: Workload) -> int:
    plans, skipped = [], []
    for key in hwmod.catalog_keys():
        try:
            hw = hwmod.get(key, measure=False)
        except LookupError:
            skipped.append(key)
            continue
        plans.append(plan_one(shape, hw, opts, workload))
    traffic = workload.requests_per_s is not None
    if traffic:
        plans.sort(key=lambda p: (p.replicas == 0, p.cost_per_million_output_tokens or 0, p.accelerators,
                                  -p.output_tok_s))
    else:
        plans.sort(key=lambda p: -p.output_tok_s / p.count)
    if args.json:
        print(json.dumps([{"model": shape.name, **p.as_dict()} for p in plans]))
        return 0
    what = (f"{workload.requests_per_s:,.2f} req/s" if traffic else
            f"concurrency {workload.concurrency or 'max batch'}")
    slo = ", ".join(s for s in (f"TTFT p{workload.slo_percentile:g} <= {workload.slo_ttft:g} s" if workload.slo_ttft else "",
                                f"TPOT p{workload.slo_percentile:g} <= {workload.slo_tpot:g} s" if workload.slo_tpot else "")
                    if s)
    title = (f"{describe(shape)}\nweights {opts.quantization}, KV {opts.kv_cache_dtype}; prompts "
             f"{workload.prompt[0]}-{workload.prompt[1]}, outputs {workload.output[0]}-{workload.output[1]} tokens; "
             f"{what}" + (f"; {slo}" if slo else "") +
             ("\nranked by accelerators needed" if traffic else "\nranked by output tok/s per accelerator"))
    print(format_table(plans, title, traffic))
    if skipped:
        print(f"(not ranked: {', '.join(skipped)} - run `tuili plan --hardware local` once to measure it)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tuili plan", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))
