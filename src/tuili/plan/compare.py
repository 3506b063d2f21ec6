"""`python -m tuili.plan.compare`: the planner's prediction beside `tuili bench serve` of `tuili serve`.

For each weight format: start `tuili serve` (subprocess, `tuili.bench.launch`), run
`tuili bench serve` (subprocess) at each concurrency with prompts of `--input-len` tokens
and `--output-len` out, read its JSON line, and put the planner's prediction for `local`
(same lengths, same number of requests, closed loop) beside it. Prints a markdown table
and appends every row as JSON to `--output`. The server and the client share this
machine's cores, as they do in the measurement the prediction is held to. The planner models
the plain engine, so the server runs without drafts (`--speculative none`): where `auto`
drafts, a served c=1 can run twice as fast as any prediction here.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from ..bench.launch import free_port, launch, tuili_serve_cmd
from . import hardware as hwmod
from .planner import Options, Workload, plan_one
from .shapes import load_shape


def measure(base_url: str, model: str, concurrency: int, num_prompts: int, input_len: str, output_len: int,
            seed: int, out: Path) -> dict:
    import subprocess

    cmd = [sys.executable, "-m", "tuili.cli", "bench", "serve", "--base-url", base_url, "--tokenizer", model,
           "--num-prompts", str(num_prompts), "--max-concurrency", str(concurrency), "--input-len", input_len,
           "--output-len", str(output_len), "--seed", str(seed), "--output", str(out),
           "--plot", str(out.with_suffix(f".c{concurrency}.png"))]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.read_text().strip().splitlines()[-1])


def predict(model: str, quantization: str, concurrency: int, num_prompts: int, lo: int, hi: int,
            output_len: int, seed: int) -> dict:
    w = Workload(prompt=(lo, hi), output=(output_len, output_len), concurrency=concurrency,
                 num_requests=num_prompts, seed=seed)
    plan = plan_one(load_shape(model), hwmod.get("local"), Options(quantization=quantization), w)
    return {"output_tok_s": plan.output_tok_s, "ttft_s_p50": plan.ttft_s_p50, "tpot_s_p50": plan.tpot_s_p50}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--quantizations", default="none,int8")
    p.add_argument("--concurrency", default="1,8,16")
    p.add_argument("--num-prompts", default="1=8,8=24,16=32", help="C=N pairs: requests per concurrency")
    p.add_argument("--input-len", default="100-300")
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--output", default="bench-results/plan-compare.jsonl")
    p.add_argument("--predict-only", action="store_true",
                   help="no measuring: redo the predictions for the rows already in --output (after --calibrate)")
    args = p.parse_args(argv)
    if args.predict_only:
        return repredict(Path(args.output), args.model)
    lo, _, hi = args.input_len.partition("-")
    counts = dict(tuple(int(x) for x in kv.split("=")) for kv in args.num_prompts.split(","))
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    raw = out.with_name(out.stem + "-serve.jsonl")
    rows = []
    for q in args.quantizations.split(","):
        port = free_port()
        server = launch(tuili_serve_cmd(port, args.model, "--dtype", "bfloat16", "--quantization", q,
                                        "--speculative", "none"), port,
                        out.with_name(f"plan-compare-serve-{q}.log"))
        try:
            for c in (int(x) for x in args.concurrency.split(",")):
                n = counts.get(c, 4 * c)
                load = round(os.getloadavg()[0], 2)
                got = measure(server.base_url, args.model, c, n, args.input_len, args.output_len, c, raw)
                try:
                    pred = predict(args.model, q, c, n, int(lo), int(hi or lo), args.output_len, c)
                except LookupError:  # `local` not measured yet: predict later with --predict-only
                    pred = {"output_tok_s": 0.0, "ttft_s_p50": 0.0, "tpot_s_p50": 0.0}
                row = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "quantization": q, "concurrency": c,
                       "requests": n, "load_average": load, "input_len": [int(lo), int(hi or lo)],
                       "output_len": args.output_len,
                       "measured": {"output_tok_s": got["output_throughput"], "ttft_s_p50": got["ttft_ms"]["p50"] / 1000,
                                    "tpot_s_p50": got["tpot_ms"]["p50"] / 1000},
                       "predicted": pred}
                rows.append(row)
                with out.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                print(_row(row), flush=True)
        finally:
            server.stop()
    return 0


def repredict(path: Path, model: str) -> int:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    print("| weights | C | requests | measured tok/s | predicted | error | measured TTFT p50 ms | predicted | error "
          "| measured TPOT p50 ms | predicted | load |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        lo, hi = r.get("input_len", (100, 300))
        r["predicted"] = predict(model, r["quantization"], r["concurrency"], r["requests"], lo, hi,
                                 r.get("output_len", 128), r["concurrency"])
        print(_row(r))
    return 0


def _row(r: dict) -> str:
    m, p = r["measured"], r["predicted"]
    err = lambda k: f"{(p[k] / m[k] - 1) * 100:+.0f}%" if m[k] else "-"
    return (f"| {r['quantization']} | {r['concurrency']} | {r['requests']} | {m['output_tok_s']:.1f} | {p['output_tok_s']:.1f} | "
            f"{err('output_tok_s')} | {m['ttft_s_p50'] * 1000:.0f} | {p['ttft_s_p50'] * 1000:.0f} | {err('ttft_s_p50')} | "
            f"{m['tpot_s_p50'] * 1000:.1f} | {p['tpot_s_p50'] * 1000:.1f} | {r['load_average']} |")


if __name__ == "__main__":
    raise SystemExit(main())
