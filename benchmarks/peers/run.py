"""`python -m benchmarks.peers run`: tuili and every installed peer, one at a time, on one workload.

For each server in turn (or, with --interleave, all servers started first and each repeat
and concurrency run on one after the other, alternating which goes first): start it on 127.0.0.1 (time to ready is recorded), send a few
warm-up requests (not measured: first-request costs such as lazy compilation would
otherwise land in the c=1 run), then for each repeat and each concurrency run the
`tuili bench serve` client (tuili.bench.client.run_benchmark: same requests, same measurements
as the command) on fresh prompt text of the same lengths, then stop it. Run k of every
server gets the same text, so servers compare on identical requests while no server sees
a prompt twice. Each run appends one JSON line to --out; at the end the markdown table
and the plot of this invocation (medians over repeats) are written next to it.

OpenVINO GenAI has no server here: its row is an offline, in-process run of all prompts
at once (ContinuousBatchingPipeline, see ov_offline.py), an upper bound on what a server
around it could do, shown apart from the served rows.
"""
from __future__ import annotations

import asyncio
import json
import math
import subprocess
import time
import uuid
from pathlib import Path

from tuili.bench.client import run_benchmark
from tuili.bench.launch import free_port
from tuili.bench.results import append_jsonl
from tuili.bench.stats import duration_of, summarize
from tuili.bench.workload import load_tokenizer, parse_range

from . import cold_start
from .common import Layout, log, model_folder
from .prompts import PromptSource
from .report import write_report
from .servers import ServerSpec, llama_spec, start, tuili_spec, vllm_spec

SERVERS = ("tuili", "llama", "vllm", "openvino")
OV_SCRIPT = Path(__file__).with_name("ov_offline.py")


def parse_num_prompts(spec: str, concurrencies: list[int]) -> dict[int, int]:
    """'64' -> 64 for every concurrency; '64,1=16' -> 16 at c=1 and 64 elsewhere."""
    default, per = None, {}
    for part in spec.split(","):
        part = part.strip()
        try:
            if "=" in part:
                c, n = part.split("=", 1)
                per[int(c)] = int(n)
            else:
                default = int(part)
        except ValueError:
            raise ValueError(f"--num-prompts: expected N or C=N items, got {part!r}") from None
    out = {c: per.get(c, default if default is not None else 64) for c in concurrencies}
    if any(n < 1 for n in out.values()):
        raise ValueError(f"--num-prompts: every count must be >= 1, got {spec!r}")
    return out


def add_arguments(p) -> None:
    p.add_argument("--out", default="bench-results/peers.jsonl",
                   help="JSON lines to append to; the table (.md) and plot (.png) go next to it")
    p.add_argument("--servers", default=",".join(SERVERS),
                   help="comma-separated subset of tuili,llama,vllm,openvino (peers not installed are skipped)")
    p.add_argument("--tuili-dtypes", default="bfloat16,float32",
                   help="one tuili server per dtype (auto, float32, bfloat16)")
    p.add_argument("--tuili-args", default="", help="extra `tuili serve` arguments, one string")
    p.add_argument("--concurrency", default="1,16,32", help="comma-separated max concurrencies")
    p.add_argument("--num-prompts", default="64",
                   help="requests per run: N, or N with per-concurrency overrides, e.g. '64,1=16'")
    p.add_argument("--input-len", default="100-300", help="A-B: prompt lengths in tokens")
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--endpoint", choices=["completions", "chat"], default="completions")
    p.add_argument("--repeats", type=int, default=2, help="runs per server and concurrency (medians reported)")
    p.add_argument("--warmup", type=int, default=4, help="unmeasured requests after a server is ready")
    p.add_argument("--interleave", action="store_true",
                   help="start every server first, then run each repeat and concurrency on one server after "
                        "the other (a noisy host then weighs on all servers alike)")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: 4 requests at c=1 and c=4, 32 output tokens, one repeat, 2 warm-ups")
    p.add_argument("--cold-start", type=int, default=0, metavar="N",
                   help="also measure `tuili serve` cold start N times per dtype")
    p.add_argument("--ready-timeout", type=float, default=600.0, help="seconds a server may take to start")
    p.add_argument("--threads", type=int, default=2, help="llama-server -t")
    p.add_argument("--llama-slots", type=int, default=32, help="llama-server -np")
    p.add_argument("--llama-slot-ctx", type=int, default=1024, help="context per slot (-c is slots x this)")
    p.add_argument("--vllm-threads-bind", default="0-1", help="VLLM_CPU_OMP_THREADS_BIND")
    p.add_argument("--vllm-kv-gib", type=int, default=2, help="VLLM_CPU_KVCACHE_SPACE")
    p.add_argument("--ov-cache-gib", type=float, default=2.0, help="OpenVINO KV cache size")


def apply_quick(args) -> None:
    args.concurrency, args.num_prompts, args.output_len, args.repeats, args.warmup = "1,4", "4", 32, 1, 2


def server_specs(args, layout: Layout, folder: Path) -> list[tuple[ServerSpec, int]]:
    """(spec, port) of every requested server that is installed; missing peers are named and skipped."""
    wanted = [s.strip() for s in args.servers.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in SERVERS]
    if unknown:
        raise ValueError(f"--servers: unknown {', '.join(unknown)} (known: {', '.join(SERVERS)})")
    specs = []
    if "tuili" in wanted:
        extra = args.tuili_args.split() if args.tuili_args else []
        for dtype in [d.strip() for d in args.tuili_dtypes.split(",") if d.strip()]:
            port = free_port()
            specs.append((tuili_spec(args.model, dtype, port, extra), port))
    if "llama" in wanted:
        if layout.llama_server.exists() and layout.gguf.exists():
            port = free_port()
            specs.append((llama_spec(layout, port, args.llama_slots, args.llama_slot_ctx, args.threads), port))
        else:
            log(f"llama: not installed ({layout.llama_server} or {layout.gguf} missing), skipped")
    if "vllm" in wanted:
        if layout.vllm_python.exists():
            port = free_port()
            specs.append((vllm_spec(layout, folder, port, args.vllm_threads_bind, args.vllm_kv_gib), port))
        else:
            log(f"vllm: not installed ({layout.vllm_python} missing), skipped")
    return specs


def warm_up(spec: ServerSpec, server, args, source: PromptSource) -> None:
    if args.warmup:
        warm = source.texts(-1, args.warmup)
        asyncio.run(run_benchmark(server.base_url, server.model, warm, args.output_len, len(warm),
                                  endpoint=args.endpoint, extras=spec.endpoint_extras, progress=False))


def measure(spec: ServerSpec, server, args, source: PromptSource, c: int, repeat: int, run_index: int, n: int,
            tokenizer, base: dict) -> dict:
    """One measured run of `n` requests at concurrency c on a started server: its JSON record."""
    prompts = source.texts(run_index, n)
    log(f"{spec.name}: c={c} repeat {repeat + 1}/{args.repeats}, {len(prompts)} requests")
    results = asyncio.run(run_benchmark(server.base_url, server.model, prompts, args.output_len, c,
                                        math.inf, args.endpoint, spec.endpoint_extras, run_index,
                                        tokenizer=tokenizer, progress=False))
    summary = summarize(results, duration_of(results))
    expected = args.output_len * summary["completed"]
    if summary["total_output_tokens"] != expected:
        log(f"{spec.name}: WARNING {summary['total_output_tokens']} output tokens, expected {expected} "
            "(the server stopped early or counts differently)")
    log(f"{spec.name}: c={c}: {summary['output_throughput']:.1f} output tok/s, "
        f"TTFT p50 {summary['ttft_ms']['p50'] or 0:.0f} ms, {summary['failed']} failed")
    return {**base, "server": spec.name, "label": spec.label, "kind": "serve", "cmd": spec.cmd, "env": spec.env,
            "model": server.model, "start_s": server.start_s, "concurrency": c, "repeat": repeat,
            "text_seed": run_index, "num_prompts": len(prompts), **summary}


def bench_server(spec: ServerSpec, port: int, args, source: PromptSource, concurrencies: list[int],
                 num_prompts: dict[int, int], tokenizer, log_dir: Path, base: dict) -> list[dict]:
    server = start(spec, port, log_dir, args.ready_timeout)
    records = []
    try:
        warm_up(spec, server, args, source)
        for repeat in range(args.repeats):
            for ci, c in enumerate(concurrencies):
                run_index = repeat * len(concurrencies) + ci
                records.append(measure(spec, server, args, source, c, repeat, run_index, num_prompts[c],
                                       tokenizer, base))
    finally:
        server.stop()
    return records


def bench_interleaved(specs: list[tuple[ServerSpec, int]], args, source: PromptSource, concurrencies: list[int],
                      num_prompts: dict[int, int], tokenizer, log_dir: Path, base: dict,
                      append, failed: list[str]) -> None:
    """--interleave: every server started (and warmed up) first, then each (repeat, concurrency)
    run on one server after the other, so a busy spell of the host lands on all servers' runs
    alike instead of on one server's whole series. The idle servers stay up meanwhile."""
    servers = []
    try:
        for spec, port in specs:
            try:
                server = start(spec, port, log_dir, args.ready_timeout)
            except RuntimeError as e:
                log(f"{spec.name}: FAILED: {e}")
                failed.append(spec.name)
                continue
            servers.append((spec, server))
            warm_up(spec, server, args, source)
        for repeat in range(args.repeats):
            for ci, c in enumerate(concurrencies):
                run_index = repeat * len(concurrencies) + ci
                order = servers if repeat % 2 == 0 else servers[::-1]  # neither always first
                for spec, server in order:
                    if spec.name in failed:
                        continue
                    try:
                        append([measure(spec, server, args, source, c, repeat, run_index, num_prompts[c],
                                        tokenizer, base)])
                    except RuntimeError as e:
                        log(f"{spec.name}: FAILED: {e}")
                        failed.append(spec.name)
    finally:
        for _, server in servers:
            server.stop()


def bench_openvino(args, layout: Layout, source: PromptSource, n: int, base: dict) -> list[dict]:
    """The offline in-process OpenVINO GenAI row (one record per repeat)."""
    records = []
    for repeat in range(args.repeats):
        prompts = source.texts(100 + repeat, n)
        prompt_file = layout.root / "openvino" / "prompts.json"
        prompt_file.parent.mkdir(parents=True, exist_ok=True)
        prompt_file.write_text(json.dumps(prompts))
        cmd = [str(layout.ov_python), str(OV_SCRIPT), "--model", str(layout.ov_model), "--prompts", str(prompt_file),
               "--output-len", str(args.output_len), "--cache-gib", str(args.ov_cache_gib),
               "--threads", str(args.threads)]
        log(f"openvino: offline run {repeat + 1}/{args.repeats}, {n} prompts at once")
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"openvino offline run failed: {done.stderr.strip().splitlines()[-3:]}")
        result = json.loads(done.stdout.strip().splitlines()[-1])
        log(f"openvino: {result['output_throughput']:.1f} output tok/s offline")
        records.append({**base, "server": "openvino", "label": "OpenVINO GenAI (offline, in-process)",
                        "kind": "offline", "cmd": cmd, "concurrency": n, "repeat": repeat, **result})
    return records


def run_from_args(args, layout: Layout) -> int:
    if args.quick:
        apply_quick(args)
    concurrencies = [int(c) for c in args.concurrency.split(",") if c.strip()]
    if not concurrencies or min(concurrencies) < 1:
        raise ValueError(f"--concurrency: expected positive integers, got {args.concurrency!r}")
    if args.repeats < 1 or args.output_len < 1:
        raise ValueError("--repeats and --output-len must be >= 1")
    num_prompts = parse_num_prompts(args.num_prompts, concurrencies)
    lo, hi = parse_range(args.input_len)
    folder = model_folder(args.model)
    specs = server_specs(args, layout, folder)
    ov = "openvino" in args.servers.split(",")
    if ov and not (layout.ov_python.exists() and (layout.ov_model / "openvino_model.xml").exists()):
        log(f"openvino: not installed ({layout.ov_python} or {layout.ov_model} missing), skipped")
        ov = False

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    log_dir = layout.logs / "servers"
    run_id = time.strftime("%Y%m%dT%H%M%S-") + uuid.uuid4().hex[:6]
    base = {"bench": "peers", "run_id": run_id, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "input_len": args.input_len, "output_len": args.output_len, "endpoint": args.endpoint,
            "quick": args.quick}
    tokenizer = load_tokenizer(str(folder))
    source = PromptSource(tokenizer, max(num_prompts.values()), lo, hi)
    log(f"run {run_id}: {len(specs)} server(s){' + openvino offline' if ov else ''}, c={concurrencies}, "
        f"requests {num_prompts}, {args.repeats} repeat(s) -> {out}")

    def append(records: list[dict]) -> None:
        for r in records:
            append_jsonl(out, r)

    failed: list[str] = []
    if args.interleave:
        bench_interleaved(specs, args, source, concurrencies, num_prompts, tokenizer, log_dir, base, append, failed)
    for spec, port in [] if args.interleave else specs:
        try:
            append(bench_server(spec, port, args, source, concurrencies, num_prompts, tokenizer, log_dir, base))
        except RuntimeError as e:
            log(f"{spec.name}: FAILED: {e}")
            failed.append(spec.name)
    if ov:
        try:
            append(bench_openvino(args, layout, source, max(num_prompts.values()), base))
        except (RuntimeError, ValueError, KeyError) as e:
            log(f"openvino: FAILED: {e}")
            failed.append("openvino")
    if args.cold_start:
        dtypes = [d.strip() for d in args.tuili_dtypes.split(",") if d.strip()]
        try:
            append([{**base, **r} for r in cold_start.run(args.model, dtypes, args.cold_start, log_dir)])
        except RuntimeError as e:
            log(f"cold start: FAILED: {e}")
            failed.append("cold-start")

    table, plot = write_report(out, run_id)
    print(table)
    log(f"table in {out.with_suffix('.md')}, plot in {plot}")
    if failed:
        log(f"failed: {', '.join(failed)}")
        return 1
    return 0
