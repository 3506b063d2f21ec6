"""`tuili plan --calibrate`: fit `local`'s efficiency factors to measured engine steps.

probe.py (run as its own process) times decode steps at several batch sizes and contexts
and single prefill steps of several lengths; this module fits the step model of
roofline.py to those times and stores the factors per weight format in the local cache
file, next to the `tuili bench machine` figures they scale. The fit minimises the squared
relative error of every point over six factors (fixed cost per step, per sequence, per
prefill chunk, and the shares of bandwidth for weights and for KV and of the matmul
rate), by Nelder-Mead on their logarithms: a few hundred evaluations of a closed-form
model, no numerical library needed.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from typing import Any, Callable

from . import hardware as hwmod
from .roofline import StepModel
from .shapes import load_shape

FACTORS = ("step_overhead_s", "seq_overhead_s", "chunk_overhead_s", "weight_bw", "kv_bw", "matmul")
START = {"step_overhead_s": 0.003, "seq_overhead_s": 0.0002, "chunk_overhead_s": 0.005, "weight_bw": 0.8,
         "kv_bw": 0.4, "matmul": 0.5}


def run_probe(model: str, quantization: str, extra: list[str] | None = None, timeout: float = 900,
              env: dict[str, str] | None = None) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "tuili.plan.probe", "--model", model, "--quantization", quantization, *(extra or [])]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                         env=None if env is None else {**os.environ, **env})
    if out.returncode != 0:
        raise RuntimeError(f"probe failed ({' '.join(cmd)}): {out.stderr.strip()[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def predict_point(model: StepModel, point: dict[str, Any]) -> float:
    if point["kind"] == "decode":
        b = point["batch"]
        return model.step_time(b, b * point["context"], [], b)
    n = point.get("prompts", 1)
    return model.step_time(0, 0.0, [(point["tokens"], 0)] * n, n)


def fit(shape, hw: hwmod.Hardware, quantization: str, points: list[dict[str, Any]]) -> dict[str, float]:
    """Factors minimising the relative error of the step model over the measured points
    (a point whose time came out non-positive, a long run beaten by a short one on a busy
    machine, is left out)."""
    points = [p for p in points if p["step_s"] > 0]

    def loss(logs: list[float]) -> float:
        factors = {k: math.exp(v) for k, v in zip(FACTORS, logs)}
        hw.efficiency = {**hw.efficiency, "by_quantization": {quantization: factors}}
        model = StepModel(shape, hw, quantization)
        err = sum((predict_point(model, p) / p["step_s"] - 1) ** 2 for p in points)
        # a weak pull toward the starting values keeps unidentifiable factors in range
        return err + 1e-4 * sum((v - math.log(START[k])) ** 2 for k, v in zip(FACTORS, logs))

    best = nelder_mead(loss, [math.log(START[k]) for k in FACTORS])
    return {k: math.exp(v) for k, v in zip(FACTORS, best)}


def nelder_mead(f: Callable[[list[float]], float], x0: list[float], step: float = 0.7, iters: int = 1500) -> list[float]:
    n = len(x0)
    simplex = [list(x0)] + [[x + (step if i == j else 0.0) for j, x in enumerate(x0)] for i in range(n)]
    values = [f(x) for x in simplex]
    for _ in range(iters):
        order = sorted(range(n + 1), key=values.__getitem__)
        simplex, values = [simplex[i] for i in order], [values[i] for i in order]
        if values[-1] - values[0] < 1e-10:
            break
        centroid = [sum(x[j] for x in simplex[:-1]) / n for j in range(n)]
        worst = simplex[-1]
        refl = [c + (c - w) for c, w in zip(centroid, worst)]
        fr = f(refl)
        if fr < values[0]:
            exp = [c + 2 * (c - w) for c, w in zip(centroid, worst)]
            fe = f(exp)
            simplex[-1], values[-1] = (exp, fe) if fe < fr else (refl, fr)
        elif fr < values[-2]:
            simplex[-1], values[-1] = refl, fr
        else:
            con = [c + 0.5 * (w - c) for c, w in zip(centroid, worst)]
            fc = f(con)
            if fc < values[-1]:
                simplex[-1], values[-1] = con, fc
            else:
                best = simplex[0]
                simplex = [best] + [[b + 0.5 * (x - b) for b, x in zip(best, s)] for s in simplex[1:]]
                values = [values[0]] + [f(s) for s in simplex[1:]]
    return simplex[min(range(n + 1), key=values.__getitem__)]


def serve_probe(model: str, quantization: str, shape, hw: hwmod.Hardware, prompt: int = 200,
                output: int = 32, requests: int = 3) -> dict[str, float]:
    """What serving adds to the engine's steps: `tuili serve` (subprocess) driven by
    `tuili bench serve` at concurrency 1 with a few short requests. The TPOT beyond the
    modelled batch-1 decode step is the server's per-step cost (event loop, detokenizing,
    streaming, and the client on the same cores); the TTFT beyond the modelled prefill is
    the per-request cost (HTTP, tokenizing)."""
    from ..bench.launch import free_port, launch, tuili_serve_cmd

    port = free_port()
    out = hwmod.cache_file().with_name(f"serve-probe-{quantization}.jsonl")
    server = launch(tuili_serve_cmd(port, model, "--dtype", "bfloat16", "--quantization", quantization), port,
                    out.with_suffix(".log"))
    try:
        cmd = [sys.executable, "-m", "tuili.cli", "bench", "serve", "--base-url", server.base_url, "--tokenizer",
               model, "--num-prompts", str(requests), "--max-concurrency", "1", "--input-len", f"{prompt}-{prompt}",
               "--output-len", str(output), "--seed", "99", "--output", str(out), "--plot", str(out.with_suffix(".png"))]
        subprocess.run(cmd, check=True, capture_output=True, text=True)
    finally:
        server.stop()
    got = json.loads(out.read_text().strip().splitlines()[-1])
    model_ = StepModel(shape, hw, quantization)
    tpot = sum(model_.decode_step(1, prompt + 1 + i) for i in range(output - 1)) / (output - 1)
    step = max(0.0, got["tpot_ms"]["p50"] / 1000 - tpot)
    req = max(0.0, got["ttft_ms"]["p50"] / 1000 - model_.prefill_time(prompt) - step)
    return {"serve_step_overhead_s": step, "request_overhead_s": req}


def calibrate(model: str, quantizations: list[str], verbose: bool = True, probe_args: list[str] | None = None,
              served: bool = True) -> dict:
    """Measure the machine (if not cached) and the engine's steps; store and return the fit."""
    hwmod.local_figures(measure=True, refresh=True)
    shape = load_shape(model)
    data = hwmod.read_local() or {}
    calib = data.get("calibration") or {"by_quantization": {}}
    for q in quantizations:
        if verbose:
            print(f"calibrating {q}: timing engine steps of {model} ...", file=sys.stderr, flush=True)
        probe = run_probe(model, q, probe_args)
        hw = hwmod.get("local")
        factors = fit(shape, hw, q, probe["points"])
        hw.efficiency = {**hw.efficiency, "by_quantization": {q: factors}}
        if served:
            if verbose:
                print(f"  serving overhead: tuili serve + tuili bench serve, concurrency 1 ...", file=sys.stderr, flush=True)
            factors.update(serve_probe(model, q, shape, hw))
            hw.efficiency = {**hw.efficiency, "by_quantization": {q: factors}}
        sm = StepModel(shape, hw, q)
        rows = [(p, predict_point(sm, p)) for p in probe["points"]]
        calib["by_quantization"][q] = {k: round(v, 6) for k, v in factors.items()}
        calib.setdefault("points", {})[q] = [{**p, "predicted_s": round(t, 5)} for p, t in rows]
        if verbose:
            for p, t in rows:
                what = f"decode B={p['batch']} ctx={p['context']:.0f}" if p["kind"] == "decode" else f"prefill {p['tokens']}"
                print(f"  {what:<26} measured {p['step_s'] * 1000:7.1f} ms  model {t * 1000:7.1f} ms", file=sys.stderr)
            print("  factors: " + ", ".join(f"{k}={v:.4g}" for k, v in factors.items()), file=sys.stderr)
    calib["model"] = model
    calib["time"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    calib["load_average"] = hwmod._load_average()
    data = hwmod.read_local() or {}
    data["calibration"] = calib
    hwmod.write_local(data)
    return calib


def calibrate_serving(model: str, quantizations: list[str], verbose: bool = True) -> dict:
    """Only the serving overheads, on top of the engine factors already stored."""
    data = hwmod.read_local() or {}
    calib = data.get("calibration") or {}
    shape = load_shape(model)
    for q in quantizations:
        hw = hwmod.get("local")
        extra = serve_probe(model, q, shape, hw)
        calib.setdefault("by_quantization", {}).setdefault(q, {}).update({k: round(v, 6) for k, v in extra.items()})
        if verbose:
            print(f"{q}: " + ", ".join(f"{k}={v:.4g}" for k, v in extra.items()), file=sys.stderr)
    data = hwmod.read_local() or {}
    data["calibration"] = calib
    hwmod.write_local(data)
    return calib
