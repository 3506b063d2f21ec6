"""`tuili bench matmul`: the linear layers of one decoder stack, PyTorch's ops against the
CPU kernel's packed products, in one process and on the same weights.

For each row count (1 is batch-1 decode, a few dozen is batched decode, hundreds is a
prefill chunk) it times all projections of all layers (fused q/k/v, o, gate/up, down)
plus the output head, with random weights of the model's shapes:

- bf16: torch as the model ran before the kernel (`F.linear` in bf16 up to 8 rows, above
  that float32 from the bf16 weight) against `packed_linear`;
- int8: `aten._weight_int8pack_mm` (float32 dequantized above 128 rows, as `Int8Weight`)
  against `packed_linear` on int8 codes with one scale per column and block of 32 (as served);
- int4 (group 32): `aten._weight_int4pack_mm_for_cpu` against `packed_linear_q4`.

Medians of `--repeats` timings; the ratio is torch time over kernel time.
"""
from __future__ import annotations

import platform
import time

import torch

from ..model.kernels import cpu_kernels
from ..model.layers import linear
from ..model.quant import pack_weight, quantize_int4, quantize_int4_packed, quantize_int8, quantize_int8_packed
from ..model.paths import bf16_paths, int8_paths
from .machine import median_time
from .results import append_jsonl

# SmolLM2-135M: hidden 576, 9 heads and 3 kv heads of 64, intermediate 1536, vocab 49152, 30 layers.
DEFAULT_SHAPES = dict(hidden=576, q_size=576, kv_size=192, intermediate=1536, vocab=49152, layers=30)


def layer_shapes(s: dict[str, int]) -> list[tuple[int, int]]:
    h = s["hidden"]
    return [(s["q_size"] + 2 * s["kv_size"], h), (h, s["q_size"]), (2 * s["intermediate"], h), (h, s["intermediate"])]


def run_from_args(args) -> int:
    ext = cpu_kernels()
    if ext is None or not ext.gemm_available():
        print("tuili bench matmul: the CPU kernels are not available here (need a C++ compiler and AVX2)")
        return 1
    rows_list = [int(r) for r in args.rows.split(",")]
    formats = [f.strip() for f in args.formats.split(",")]
    shapes = DEFAULT_SHAPES
    torch.manual_seed(0)
    dense = [[torch.randn(n, k).mul_(0.05).to(torch.bfloat16) for n, k in layer_shapes(shapes)]
             for _ in range(shapes["layers"])]
    dense.append([torch.randn(shapes["vocab"], shapes["hidden"]).mul_(0.05).to(torch.bfloat16)])  # the head
    convert = {"bf16": (lambda w: w, pack_weight),
               "int8": (quantize_int8, quantize_int8_packed),
               "int4": (lambda w: quantize_int4(w, 32), lambda w: quantize_int4_packed(w, 32))}
    print(f"tuili bench matmul: {shapes['layers']} layers + head, {torch.get_num_threads()} threads, "
          f"medians of {args.repeats}")
    choice = bf16_paths(layer_shapes(shapes))
    print(f"  the engine's choice here: {choice.describe()}")
    int8_choice = int8_paths(layer_shapes(shapes)) if "int8" in formats or "int4" in formats else None
    if int8_choice is not None:
        print(f"  the engine's choice here: {int8_choice.describe()}")
    for fmt in formats:
        to_torch, to_kernel = convert[fmt]
        print(f"  preparing {fmt} weights...", flush=True)
        torch_w = [[to_torch(w) for w in layer] for layer in dense]
        kernel_w = [[to_kernel(w) for w in layer] for layer in dense]
        for rows in rows_list:
            xs = {k: torch.randn(rows, k).to(torch.bfloat16) for k in {w.shape[1] for layer in dense for w in layer}}

            def run(weights):
                return lambda: [linear(xs[w.shape[1]], w) for layer in weights for w in layer]

            t_torch = median_time(run(torch_w), args.repeats) * 1000
            t_kernel = median_time(run(kernel_w), args.repeats) * 1000
            record = {"bench": "matmul", "format": fmt, "rows": rows, "torch_ms": round(t_torch, 2),
                      "kernel_ms": round(t_kernel, 2), "ratio": round(t_torch / t_kernel, 2),
                      "engine_path": (choice.path_for(rows) if fmt == "bf16" else
                                      int8_choice.path_for(rows) if fmt == "int8" else "packed"),
                      "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
                      "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
            print(f"  {fmt:5s} rows {rows:4d}: torch {t_torch:8.1f} ms  kernel {t_kernel:8.1f} ms  "
                  f"x{t_torch / t_kernel:.2f}  engine takes: {record['engine_path']}", flush=True)
            append_jsonl(args.output, record)
    return 0
