"""bench.py's `quant` part: int8 / int4 weights and the int8 KV cache through PyTorch's ops on
the device. Each op tuili's quant_ops.py calls is checked against the dequantized weight at
the input widths of the benchmark shapes and timed against bf16 `F.linear` on the same
weight, prefill row counts included; then an engine per mode decodes the first shape."""
from __future__ import annotations

from typing import Any, Callable

import torch
from models import SHAPES

from tuili.bench.decode import decode_once
from tuili.sampling import SamplingParams


def run(bench: Any) -> None:
    """int8 / int4 weights and the int8 KV cache: the ops, then whole engines (see bench.py)."""
    ops(bench)
    shape = bench.shapes[0]
    prompt_len, out_len = (16, 16) if bench.tiny else (128, 128)
    for quant, kv in (("none", "auto"), ("int8", "auto"), ("int4", "auto"), ("int4:64", "auto"),
                      ("none", "int8"), ("int8", "int8")):
        def one() -> None:
            eng = bench.engine(shape, quantization=quant, kv_cache_dtype=kv)
            prompts = bench.prompts(shape, 4, prompt_len, prompt_len, seed=5)
            outs = eng.generate([(f"q{i}", p, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
                                 for i, p in enumerate(prompts)])
            ok = all(len(o.outputs[0].token_ids) == 16 for o in outs)
            decode_once(eng, prompts[0][:8], 4)
            tok_s = decode_once(eng, prompts[0], out_len)
            bench.emit({"part": "quant_engine", "shape": shape, "quantization": quant, "kv_cache_dtype": kv,
                       "weight_bytes": eng.model.weight_bytes(), "batch_generate_ok": ok,
                       "decode_tok_s": round(tok_s, 1),
                       "first_ids": outs[0].outputs[0].token_ids[:8]})
        bench.guard(one, f"quant engine {shape} {quant}/{kv}")
        bench.free()

def ops(bench: Any) -> None:
    """Each CUDA op tuili's quant.py calls, at the widths of the benchmark shapes."""
    try:  # the plain (non-CPU-kernel) quantized weights; quant.py re-exports them
        from tuili.model import quant_ops as q
    except ImportError:
        from tuili.model import quant as q

    widths = sorted({SHAPES[s]["hidden_size"] for s in bench.shapes} | {SHAPES[s]["intermediate_size"] for s in bench.shapes})
    g = torch.Generator(device=bench.device).manual_seed(0)
    n = 256 if bench.tiny else 2048
    row_counts = (1, 7, 64) if bench.tiny else (1, 16, 256, 2048)
    for k in widths:
        w = (torch.randn(n, k, generator=g, device=bench.device) * 0.02).to(torch.bfloat16)

        def int8() -> tuple[Any, torch.Tensor]:
            qw = q.quantize_int8(w)
            return qw, qw.dequantize(torch.float32)
        modes: dict[str, Callable[[], tuple[Any, torch.Tensor]]] = {"int8": int8}
        for group in (32, 64, 128):
            if k % group == 0:
                def int4(group: int = group) -> tuple[Any, torch.Tensor]:
                    qw = q.quantize_int4(w, group)
                    codes, scale, lo = q.int4_codes(w, group)  # the op: (q - 8) * scale + zero, both bf16
                    s_b, z_b = scale.to(torch.bfloat16).float(), (lo + 8 * scale).to(torch.bfloat16).float()
                    return qw, q.dequantize_int4_codes(codes - 8, s_b, z_b, group)
                modes[f"int4_g{group}"] = int4
        for name, make in modes.items():
            base = {"part": "quant_op", "op": name, "k": k, "n": n}
            try:
                qw, deq = make()
            except Exception as e:  # noqa: BLE001 - record and go on
                bench.emit({**base, "stage": "quantize", "ok": False, "error": bench.short(e)})
                continue
            for rows in row_counts:
                x = torch.randn(rows, k, generator=g, device=bench.device).to(torch.bfloat16)
                try:
                    got, want = qw.matmul(x, False).float(), x.float() @ deq.T
                    err = ((got - want).abs().max() / want.abs().max().clamp(min=1e-6)).item()
                    bench.emit({**base, "rows": rows, "max_rel_err": round(err, 5), "ok": err < 2e-2,
                               "op_ms": bench.time_ms(lambda: qw.matmul(x, False)),
                               "bf16_linear_ms": bench.time_ms(lambda: torch.nn.functional.linear(x, w))})
                except Exception as e:  # noqa: BLE001
                    bench.emit({**base, "rows": rows, "stage": "matmul", "ok": False, "error": bench.short(e)})
    kv = torch.randn(64, 3, 64, generator=g, device=bench.device).to(torch.bfloat16)
    from tuili.model.layers import quantize_kv
    codes, scales = quantize_kv(kv)
    err = ((codes.float() * scales[..., None] - kv.float()).abs().max() / kv.float().abs().max()).item()
    bench.emit({"part": "quant_op", "op": "int8_kv", "max_rel_err": round(err, 5), "ok": err < 1e-2})
