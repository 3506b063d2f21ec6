"""Low precision: int8 / int4 weights and the int8 KV cache, held to stated tolerances.

Tolerances, on the default model over the first tokens of the shipped corpus (windows of
256), each mode against the same model in full precision (bfloat16 weights and KV);
measured values are in brackets:
- int8 KV cache, over 2,048 tokens: perplexity at most 2% above, top-1 agreement >= 95%
  [+0.17% and 96.9% with torch's bf16 products (TUILI_PACKED=0 and the default on
  AVX512-BF16 without AMX), +0.34% and 96.3% with the packed bf16 products (TUILI_PACKED=1),
  +0.20% and 97.0% without the compiled kernels (TUILI_KERNELS=0)]. Over the first 256
  tokens alone the same paths gave +0.8%, +1.2% and +1.3%, an AMD EPYC (AVX512-BF16, no AMX)
  +3.7%, and single windows of 256 range from -0.5% to +1.3%: too few tokens for a 2% bound;
- int8 weights, over 256 tokens: perplexity at most 2% above, top-1 agreement >= 90%
  [per-column scales: +2.0%, 92.5% through the CPU kernel here; earlier +1.7% through torch's op, +2.6% through
  the kernel; over 2,048 tokens within both bounds];
- int4 weights (groups of 32), over 256 tokens: perplexity at most 8% above, agreement
  >= 85% [before the refit and int8 head: +2.1%, 91% here; earlier +4.7%; over 2,048 tokens +5.0% but 84.4% agreement,
  below this bound: see docs/BENCHMARKS.md's whole-text 85.2%];
- int8 weights with int8 KV, over 256 tokens: at most 3% above, agreement >= 90%
  [per-column scales: +5.5%, 91% here; over 2,048 tokens within both bounds].
Since int8 on the CPU kernels takes a scale per block of 32 inputs, int4 groups are refit by
least squares and an int4 model's head is int8 (model/quant.py), the kernels' figures are
int8 -3.9% and 93.3%, int4 -1.0% and 95.3%, int8 with int8 KV -2.4% and 93.7% (256 tokens
are noisy: whole texts in docs/BENCHMARKS.md, "Lossless int8"); the int8 and int8 + int8 KV
bounds (2% and 3%) and the kernels' int4 row (3%, 90%) hold for the kernels, which every
AVX2 CPU builds; the int4 "auto" row keeps 8% for torch's op (per-column int8, int4 head).
The weight modes stay on 256 tokens for run time, as a regression guard (at 2,048 tokens
each took 190-420 s on the loaded 2-core build machine, against 15-45 s for the int8 KV
case). The targets are on the whole text, in docs/BENCHMARKS.md (int8 weights and int8 KV
at most 0.5%, int4 at most 5%); the slow test below checks them there.
"""
import math
import subprocess
import sys

import pytest
import torch

from tuili.engine.engine import Engine
from tuili.engine.evaluate import DEFAULT_TEXT, evaluate
from tuili.model.quant import (dequantize_int4_codes, int4_codes, int8_activations, parse_quantization,
                               quantize_int4, quantize_int8)


def test_parse_quantization():
    assert parse_quantization(None) == ("none", 0)
    assert parse_quantization("int8") == ("int8", 0)
    assert parse_quantization("int4") == ("int4", 32)
    assert parse_quantization("int4:128") == ("int4", 128)
    for bad in ("int3", "int4:48", "int8:32", "fp8"):
        with pytest.raises(ValueError, match="quantization"):
            parse_quantization(bad)


@pytest.mark.parametrize("rows", [1, 3, 40])
def test_int8_matmul_equals_dequantized_weight(rows):
    torch.manual_seed(0)
    w = torch.randn(96, 64)
    qw = quantize_int8(w)
    deq = qw.dequantize(torch.float32)
    assert (deq - w).abs().max() <= w.abs().amax(1).max() / 127  # within half a step, plus bf16 scale rounding
    x = torch.randn(rows, 64)
    want = x.bfloat16().float() @ deq.T
    for slow_bf16 in (False, True):  # the op, and the dequantized float32 path for many rows
        got = qw.matmul(x, slow_bf16).float()
        torch.testing.assert_close(got, want, atol=0.05, rtol=0.02)


def test_int4_codes_reproduce_a_q4_1_grid_exactly():
    """Weights already on a 4-bit grid per group of 32 (llama.cpp's Q4_1) come back unchanged."""
    torch.manual_seed(1)
    codes = torch.randint(0, 16, (8, 64))
    codes[:, ::32] = 0  # every group uses its full range, as Q4_1 blocks do
    codes[:, 1::32] = 15
    scale = torch.rand(8, 2) + 0.1
    lo = torch.randn(8, 2)
    w = dequantize_int4_codes(codes, scale, lo, 32)
    q, s, m = int4_codes(w, 32)
    torch.testing.assert_close(dequantize_int4_codes(q, s, m, 32), w, atol=1e-5, rtol=0)


@pytest.mark.parametrize("group", [32, 64])
def test_int4_matmul_equals_dequantized_weight(group):
    torch.manual_seed(2)
    w = torch.randn(64, 128)
    x = torch.randn(5, 128)
    q, s, m = int4_codes(w, group)
    # the op reads scale and zero in bfloat16
    s_b, zero_b = s.bfloat16().float(), (m + 8 * s).bfloat16().float()
    deq = dequantize_int4_codes(q, s_b, zero_b - 8 * s_b, group)
    want = x.bfloat16().float() @ deq.T
    got = quantize_int4(w, group).matmul(x, slow_bf16=False).float()
    torch.testing.assert_close(got, want, atol=0.1, rtol=0.02)
    assert (deq - w).abs().max() < 0.6 * s.max() + 0.05  # half a step, plus bf16 rounding of scale/zero


@pytest.mark.parametrize("group", [32, 64])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 7])
def test_packed_int4_matmul_equals_dequantized_weight(group, rows):
    """The CPU kernel's int4 path computes with the same bf16-rounded scale and zero as the
    op, over a width (40) that leaves part of a 16-column panel empty."""
    from tuili.model.kernels import cpu_kernels
    from tuili.model.quant import quantize_int4_packed

    ext = cpu_kernels()
    if ext is None or not ext.gemm_available():
        pytest.skip("packed products need the AVX2 kernels")
    torch.manual_seed(3)
    w, x, bias = torch.randn(40, 128), torch.randn(rows, 128), torch.randn(40)
    q, s, m = int4_codes(w, group)
    s_b, zero_b = s.bfloat16().float(), (m + 8 * s).bfloat16().float()
    deq = dequantize_int4_codes(q, s_b, zero_b - 8 * s_b, group).double()
    want = (int8_activations(x) @ deq.T + bias.double()).float()  # int8 activations (gemm.cpp, gemm_q4a8)
    packed = quantize_int4_packed(w, group)
    got = packed.matmul(x, bias=bias)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
    exact = torch.nn.functional.linear(x, deq.float(), bias)
    assert 0 < (got - exact).abs().max() < 0.02 * exact.abs().max()
    assert packed.matmul(x.bfloat16()).dtype is torch.bfloat16


def test_int4_group_must_divide_the_input_width():
    with pytest.raises(ValueError, match="does not divide"):
        quantize_int4(torch.randn(4, 96), 64)


WINDOW = 256


@pytest.fixture(scope="module")
def reference(default_model_folder):
    return Engine(str(default_model_folder), dtype="bfloat16", num_kv_blocks=WINDOW // 16)


@pytest.fixture(scope="module")
def corpus_ids(reference):
    return reference.encode(DEFAULT_TEXT.read_text())


def check_quality(folder, ids, reference, quantization, kv, max_ppl_ratio, min_agree=None, window=WINDOW):
    engine = Engine(str(folder), dtype="bfloat16", num_kv_blocks=window // 16, quantization=quantization,
                    kv_cache_dtype=kv)
    r = evaluate(engine, ids, window=window, chunk=128, reference=reference, progress=False)
    print(f"\n{quantization}/{kv} on {r.tokens_scored} tokens: perplexity ratio "
          f"{r.perplexity / r.reference_perplexity:.4f}, top-1 agreement {r.top1_agreement:.3f}")
    assert r.tokens_scored == len(ids) - math.ceil(len(ids) / window)  # a window's first token has no context
    assert r.perplexity / r.reference_perplexity <= max_ppl_ratio
    assert min_agree is None or r.top1_agreement >= min_agree
    assert 0 < r.logit_mean_abs_diff < 1.0  # really quantized, and close
    if quantization != "none":
        assert r.weight_bytes < 0.75 * reference.model.weight_bytes()


@pytest.mark.parametrize("quantization,kv,max_ppl_ratio,min_agree,packed,tokens", [
    ("int8", "auto", 1.02, 0.90, "auto", 256),
    ("none", "int8", 1.02, 0.95, "auto", 2048),
    ("int4", "auto", 1.08, 0.85, "auto", 256),
    ("int8", "int8", 1.03, 0.90, "auto", 256),
    # The CPU kernels' int4 product (int8 activations) wherever they build, whatever this
    # CPU's default; int8 takes the kernels by default wherever they build.
    ("int4", "auto", 1.03, 0.90, "1", 256),
])
def test_quantized_model_stays_close_to_full_precision(default_model_folder, corpus_ids, reference, monkeypatch,
                                                       quantization, kv, max_ppl_ratio, min_agree, packed, tokens):
    monkeypatch.setenv("TUILI_PACKED", packed)
    check_quality(default_model_folder, corpus_ids[:tokens], reference, quantization, kv, max_ppl_ratio, min_agree)


@pytest.mark.slow
@pytest.mark.parametrize("quantization,kv,max_ppl_ratio", [("int8", "auto", 1.005), ("none", "int8", 1.005),
                                                            ("int4", "auto", 1.05)])
def test_quality_targets_on_the_whole_text(default_model_folder, corpus_ids, quantization, kv, max_ppl_ratio):
    """docs/BENCHMARKS.md's perplexity targets on the whole shipped text, in windows of 1,024."""
    reference = Engine(str(default_model_folder), dtype="bfloat16", num_kv_blocks=1024 // 16)
    check_quality(default_model_folder, corpus_ids, reference, quantization, kv, max_ppl_ratio, window=1024)


def test_int8_kv_pool_holds_about_twice_the_tokens(default_model_folder):
    full = Engine(str(default_model_folder), dtype="bfloat16", kv_cache_memory="32MiB")
    small = Engine(str(default_model_folder), dtype="bfloat16", kv_cache_memory="32MiB", kv_cache_dtype="int8")
    ratio = small.blocks.num_blocks / full.blocks.num_blocks
    assert 1.8 <= ratio <= 2.0  # 64 int8 + a 4-byte scale per row against 64 bf16 values: 128/68


@pytest.mark.parametrize("quantization,kv,answer", [
    # int4 costs this 135M model its "Paris" (on torch's op and the kernels alike), and its
    # wording flips with any change of summation order in a kernel ("L'Étoile, the capital of
    # France is Paris." / "L'Étoile, la Cité, le Régime (French"): its quality is held by the
    # perplexity test above, not by one answer.
    ("int4", "auto", None),
    # int8 weights with an int8 KV cache gave "The capital of France is Paris." / "L'Étoile (...) is
    # the capital of France" on the Xeons without AMX, and "L'Étoile, la Cité, le Régime, le" (no
    # "France" within 16 tokens) on the AMX Xeon with the same code at 7b7f773 and after: torch's
    # flash attention (the prefill) multiplies on AMX tiles there and rounds differently. So this
    # answer is not asserted either; the int8 / int8-KV quality is held by the perplexity tests.
    ("int8", "int8", None),
])
def test_quantized_engine_generates_in_a_batch(default_model_folder, quantization, kv, answer):
    """Batched decode with quantized weights, and with an int8 KV cache (prefill and decode products)."""
    from tuili import LLM, SamplingParams

    llm = LLM(str(default_model_folder), dtype="bfloat16", num_kv_blocks=64, quantization=quantization,
              kv_cache_dtype=kv)
    prompts = [[{"role": "user", "content": q}] for q in
               ("What is the capital of France?", "Name a color.", "Count from one to five.")]
    outs = llm.chat(prompts * 4, SamplingParams(max_tokens=16, temperature=0))
    texts = [o.outputs[0].text for o in outs]
    assert answer is None or answer in texts[0]
    assert len(set(texts[:3])) == 3  # three prompts, three different answers
    assert texts[:3] == texts[3:6]  # the same prompt gives the same greedy text wherever it sits in the batch
    assert llm.engine.blocks.num_used_blocks == 0


def test_cli_eval_perplexity_compare(default_model_folder):
    cmd = [sys.executable, "-m", "tuili.cli", "eval", "perplexity", str(default_model_folder), "--dtype", "bfloat16",
           "--quantization", "int8", "--compare", "--max-text-tokens", "200", "--window", "100",
           "--kv-cache-memory", "16MiB"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    import json

    record = json.loads(out.stdout.strip().splitlines()[-1])
    assert record["tokens_scored"] == 198 and record["quantization"] == "int8"
    assert 1 < record["perplexity"] < 100 and 0.9 <= record["top1_agreement"] <= 1


def test_cli_rejects_a_bad_quantization():
    out = subprocess.run([sys.executable, "-m", "tuili.cli", "eval", "perplexity", "--quantization", "int5"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().startswith("tuili: error: quantization") and "Traceback" not in out.stderr
