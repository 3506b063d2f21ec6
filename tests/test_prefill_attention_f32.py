"""The AVX2 float32 prefill-attention kernel (model/csrc/prefill_attention_avx2.cpp) against the
PyTorch path (gathered K/V, torch's scaled_dot_product_attention) and float64 attention, on random
paged caches."""
import pytest
import torch

from test_prefill_attention import CHUNKS, HEAD_SHAPES, case as random_case
from tuili.device import cpu_bf16_is_slow
from tuili.model import layers
from tuili.model.kernels import cpu_kernels
from tuili.model.layers import _f32_prefill_kernels, _prefill_attention, attention_paths

ext = cpu_kernels()
pytestmark = pytest.mark.skipif(ext is None or not ext.prefill_attention_f32_available(),
                                reason="needs the C++ kernels built with AVX2")


def case(heads, kv_heads, dim, q_len, ctx_len, block_size, dtype, seed=0):
    return random_case(heads, kv_heads, dim, q_len, ctx_len, 0, block_size, seed, cache_dtype=dtype, q_dtype=torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("heads,kv_heads,dim", HEAD_SHAPES)
@pytest.mark.parametrize("q_len,ctx_len,window,block_size", CHUNKS)
def test_matches_the_pytorch_path(heads, kv_heads, dim, q_len, ctx_len, window, block_size, dtype, monkeypatch):
    """The layer takes the kernel for float32 queries; its result agrees with torch's to float32
    rounding and is no further from the float64 attention than torch's is."""
    q, k, v, span = case(heads, kv_heads, dim, q_len, ctx_len, block_size, dtype)
    scale = dim ** -0.5
    assert _f32_prefill_kernels(q, k, None) is ext
    got = _prefill_attention(q, k, v, span, scale, None, window or None)
    monkeypatch.setattr(layers, "_f32_prefill_kernels", lambda *a: None)
    want = _prefill_attention(q, k, v, span, scale, None, window or None)
    exact = _prefill_attention(q.double(), k.double(), v.double(), span, scale, None, window or None)
    assert got.shape == want.shape == (q_len, heads, dim) and got.dtype is torch.float32
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    err_got, err_want = (got.double() - exact).abs().max(), (want.double() - exact).abs().max()
    assert err_got <= 3 * err_want + 1e-6, (err_got, err_want)


@pytest.mark.parametrize("heads,kv_heads,dim", [(4, 2, 48), (2, 1, 16)])  # an odd number of 16-dim panels
@pytest.mark.parametrize("q_len,ctx_len,window,block_size", [(200, 200, 0, 16), (37, 300, 0, 16), (120, 120, 50, 16)])
def test_head_dims_of_an_odd_number_of_panels(heads, kv_heads, dim, q_len, ctx_len, window, block_size, monkeypatch):
    test_matches_the_pytorch_path(heads, kv_heads, dim, q_len, ctx_len, window, block_size, torch.bfloat16,
                                  monkeypatch)


def test_positions_past_the_context_and_outside_the_window_weigh_nothing():
    """Rows past ctx_len are never read (here NaN), and positions a query may not see, though
    their scores are made in the same panel, get a weight of exactly 0 (here huge values)."""
    q, k, v, span = case(9, 3, 64, 40, 150, 16, torch.bfloat16, seed=2)  # queries at 110..149 see 51 onward
    clean = ext.paged_prefill_attention_f32(q, k, v, span.block_table, 150, 0.125, 60)
    kk, vv = k.clone(), v.clone()
    last = int(span.block_table[-1])
    kk[last, 150 % 16:], vv[last, 150 % 16:] = float("nan"), float("nan")
    hidden = int(span.block_table[3])  # positions 48-63: 48-50 lie before every query's window
    kk[hidden, :3], vv[hidden, :3] = 1e30, -1e30
    dirty = ext.paged_prefill_attention_f32(q, kk, vv, span.block_table, 150, 0.125, 60)
    assert torch.equal(clean, dirty)


def test_bf16_queries_are_widened_and_int8_caches_keep_the_pytorch_path():
    """Where AMX does not take a bf16 chunk, its queries are widened to float32 for this kernel and
    the result rounded back to bf16; int8 caches stay on torch's path."""
    q, k, v, span = case(9, 3, 64, 10, 20, 16, torch.bfloat16)
    qb = q.bfloat16()
    if layers._amx_prefill_kernels(qb, k, None) is None:
        assert _f32_prefill_kernels(qb, k, None) is ext
        got = _prefill_attention(qb, k, v, span, 0.125, None, None)
        want = ext.paged_prefill_attention_f32(qb.float(), k, v, span.block_table, 20, 0.125, 0).bfloat16()
        assert got.dtype is torch.bfloat16 and torch.equal(got, want)
    assert _f32_prefill_kernels(q, k.to(torch.int8), (torch.ones(1), torch.ones(1))) is None


@pytest.mark.parametrize("split", [1, 37, 100, 200])
@pytest.mark.parametrize("window", [0, 60])
def test_a_rows_result_does_not_depend_on_where_its_chunk_starts(split, window):
    """A prompt's rows give the same bits in one chunk as in two (the second over the first's
    cache): chunks cut elsewhere (by drafts or other sequences' rows in the step) change no token."""
    q, k, v, span = case(9, 3, 64, 245, 245, 16, torch.bfloat16, seed=4)
    whole = ext.paged_prefill_attention_f32(q, k, v, span.block_table, 245, 0.125, window)
    first = ext.paged_prefill_attention_f32(q[:split].contiguous(), k, v, span.block_table, split, 0.125, window)
    rest = ext.paged_prefill_attention_f32(q[split:].contiguous(), k, v, span.block_table, 245, 0.125, window)
    assert torch.equal(torch.cat([first, rest]), whole)


def test_bad_shapes_are_refused():
    q, k, v, span = case(9, 3, 64, 10, 20, 16, torch.bfloat16)
    with pytest.raises(RuntimeError, match="ctx_len"):
        ext.paged_prefill_attention_f32(q, k, v, span.block_table, 5, 0.125, 0)  # fewer positions than queries
    with pytest.raises(RuntimeError, match="float32"):
        ext.paged_prefill_attention_f32(q.bfloat16(), k, v, span.block_table, 20, 0.125, 0)
    with pytest.raises(RuntimeError, match="ctx_len"):
        ext.paged_prefill_attention_f32(q, k, v, span.block_table[:1], 20, 0.125, 0)  # table too short


def test_the_start_up_line_names_the_prefill_path():
    cpu = torch.device("cpu")
    line = attention_paths(torch.bfloat16, torch.bfloat16, cpu, 64)
    if cpu_bf16_is_slow(cpu):  # a bf16 model's queries are float32 here
        assert "prefill AVX2 float32 kernel (float32 queries)" in line
    assert "prefill AVX2 float32 kernel" in attention_paths(torch.float32, torch.float32, cpu, 64)
    assert "prefill PyTorch" in attention_paths(torch.float32, torch.int8, cpu, 64)  # int8 caches: not this kernel
    assert "prefill PyTorch" in attention_paths(torch.float32, torch.float32, cpu, 40)  # head dim not a multiple of 16
