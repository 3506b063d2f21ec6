"""What structured output costs, and what it buys: `python -m tuili.bench.structured`.

One `tuili serve` (defaults), the schema set of bench/schemas.py, chat requests asking for
"an example record as JSON matching this schema: ..." (the schema in the prompt too, so an
unconstrained answer has every chance), streamed, temperature 1, seeded, max_tokens 128.

- Validity: each schema sampled `--samples` times with `response_format: json_schema` and
  the same request without it; an answer counts as valid when its text (inside a
  ```json fence if there is one) parses and validates with jsonschema.
- Cost, TPOT per request (time after the first token over the tokens after it), medians:
  c=1, one request at a time, constrained and free in alternation; c=16, a wave of 16
  constrained requests against a wave of 16 free ones; and a mixed wave (8 constrained, 8
  free) whose free requests are compared with the all-free wave's. Waves alternate order
  across `--repeats`.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import time
from pathlib import Path

import httpx

from .client import RequestResult, send_request
from .launch import free_port, launch, tuili_serve_cmd
from .results import append_jsonl, cpu_model
from .schemas import SCHEMAS

MAX_TOKENS = 128


def body(model: str, name: str, constrained: bool, seed: int) -> dict:
    schema = SCHEMAS[name]
    b = {"model": model, "stream": True, "stream_options": {"include_usage": True}, "max_tokens": MAX_TOKENS,
         "temperature": 1.0, "seed": seed,
         "messages": [{"role": "user", "content": "Give me an example record as JSON matching this schema: "
                                                  + json.dumps(schema)}]}
    if constrained:
        b["response_format"] = {"type": "json_schema", "json_schema": {"name": name, "schema": schema}}
    return b


def valid(text: str, name: str) -> bool:
    import jsonschema

    fenced = re.search(r"```(?:json)?\s*(.*?)```", text, re.S)
    try:
        jsonschema.validate(json.loads(fenced.group(1) if fenced else text), SCHEMAS[name])
        return True
    except (ValueError, jsonschema.ValidationError):
        return False


async def wave(base: str, bodies: list[dict]) -> list[RequestResult]:
    url = base + "/v1/chat/completions"
    t0 = time.perf_counter()
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0, connect=60.0), trust_env=False) as client:
        return await asyncio.gather(*(send_request(client, url, b, RequestResult(i), {}, t0)
                                      for i, b in enumerate(bodies)))


def tpot_ms(results: list[RequestResult]) -> float:
    values = [r.tpot for r in results if r.tpot is not None]
    return statistics.median(values) * 1000 if values else float("nan")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=3, help="answers per schema and arm for the validity rates")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--output", default="bench-results/structured.jsonl")
    args = p.parse_args(argv)
    names = list(SCHEMAS)
    port = free_port()
    server = launch(tuili_serve_cmd(port), port, Path("bench-results") / "structured-server.log")
    base, model = server.base_url, server.model
    out: dict = {"bench": "structured", "schemas": len(names)}
    try:
        asyncio.run(wave(base, [body(model, names[0], True, 0), body(model, names[0], False, 0)]))  # warm-up
        # validity, and c=1 TPOT from the same requests (one at a time, arms alternating)
        ok = {True: 0, False: 0}
        c1 = {True: [], False: []}
        for s in range(args.samples):
            for i, name in enumerate(names):
                for constrained in ((True, False) if (i + s) % 2 == 0 else (False, True)):
                    r = asyncio.run(wave(base, [body(model, name, constrained, 100 * s + i)]))[0]
                    ok[constrained] += r.success and valid(r.text, name)
                    c1[constrained].append(r)
            print(f"validity pass {s + 1}/{args.samples}: constrained {ok[True]}, free {ok[False]} valid so far",
                  flush=True)
        total = args.samples * len(names)
        out["valid_constrained"] = ok[True] / total
        out["valid_free"] = ok[False] / total
        out["c1_tpot_ms"] = {"constrained": tpot_ms(c1[True]), "free": tpot_ms(c1[False])}
        # c=16 waves
        tp: dict[str, list[float]] = {"constrained": [], "free": [], "mixed_free": [], "mixed_constrained": []}
        for rep in range(args.repeats):
            kinds = ["constrained", "free", "mixed"]
            if rep % 2:
                kinds.reverse()
            for kind in kinds:
                flags = {"constrained": [True] * 16, "free": [False] * 16, "mixed": [True, False] * 8}[kind]
                bodies = [body(model, names[j % len(names)], c, 1000 * rep + j) for j, c in enumerate(flags)]
                res = asyncio.run(wave(base, bodies))
                if kind == "mixed":
                    tp["mixed_constrained"].append(tpot_ms([r for r, c in zip(res, flags) if c]))
                    tp["mixed_free"].append(tpot_ms([r for r, c in zip(res, flags) if not c]))
                else:
                    tp[kind].append(tpot_ms(res))
                print(f"c=16 pass {rep + 1}/{args.repeats} {kind}: TPOT p50 "
                      f"{tp[kind if kind != 'mixed' else 'mixed_free'][-1]:.1f} ms", flush=True)
        out["c16_tpot_ms"] = {k: statistics.median(v) for k, v in tp.items()}
        out["c16_runs"] = tp
        text = httpx.get(base + "/metrics", timeout=30).text
        found = dict(re.findall(r'^(tuili_guided_mask_seconds_per_step)\{[^}]*\} (\S+)$', text, re.M))
        out["mask_ms_per_masked_step"] = float(found.get("tuili_guided_mask_seconds_per_step", "nan")) * 1000
    finally:
        server.stop()
    c1, c16 = out["c1_tpot_ms"], out["c16_tpot_ms"]
    out["ratios"] = {"c1_constrained_over_free": c1["constrained"] / c1["free"],
                     "c16_constrained_over_free": c16["constrained"] / c16["free"],
                     "c16_free_in_mixed_over_all_free": c16["mixed_free"] / c16["free"]}
    out["cpu"] = cpu_model()
    print(json.dumps(out, indent=1))
    append_jsonl(args.output, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
