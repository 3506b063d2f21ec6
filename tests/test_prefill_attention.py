"""The AMX prefill-attention kernel (model/csrc/prefill_attention.cpp) against the PyTorch path
(gathered K/V, torch's scaled_dot_product_attention) on random paged bf16 caches."""
import pytest
import torch

from tuili.model.kernels import cpu_kernels
from tuili.model.layers import PrefillSpan, _amx_prefill_kernels, _prefill_attention

ext = cpu_kernels()
pytestmark = pytest.mark.skipif(ext is None or not ext.prefill_attention_available(),
                                reason="needs the C++ kernels on a CPU with AMX-BF16")


def case(heads, kv_heads, dim, q_len, ctx_len, window, block_size, seed=0, cache_dtype=torch.bfloat16,
         q_dtype=torch.bfloat16):
    """Random queries, a random paged cache and the chunk's span (also test_prefill_attention_f32.py's)."""
    g = torch.Generator().manual_seed(seed)
    num_blocks = (ctx_len + block_size - 1) // block_size + 7
    k = torch.randn(num_blocks, block_size, kv_heads, dim, generator=g).to(cache_dtype)
    v = torch.randn(num_blocks, block_size, kv_heads, dim, generator=g).to(cache_dtype)
    table = torch.randperm(num_blocks, generator=g)[: (ctx_len + block_size - 1) // block_size]
    q = torch.randn(q_len, heads, dim, generator=g).to(q_dtype)
    return q, k, v, PrefillSpan(q_start=0, q_len=q_len, ctx_len=ctx_len, block_table=table)


# Head shapes and (q_len, ctx_len, window, block_size) of the chunks both prefill kernels are
# checked on (also test_prefill_attention_f32.py's).
HEAD_SHAPES = [(9, 3, 64), (4, 1, 256), (8, 2, 128), (4, 4, 32), (6, 2, 96)]
CHUNKS = [
    (200, 200, 0, 16),   # a whole prompt
    (37, 300, 0, 16),    # a later chunk: 263 positions already cached
    (1, 45, 0, 16),      # one query
    (250, 250, 0, 8),    # blocks shorter than a 16-position tile
    (64, 700, 0, 32),    # blocks longer than a tile
    (120, 120, 50, 16),  # sliding window within the chunk
    (90, 500, 100, 16),  # sliding window, a later chunk
    (16, 2000, 64, 16),  # a window far behind: positions before it are not staged
]


@pytest.mark.parametrize("heads,kv_heads,dim", HEAD_SHAPES)
@pytest.mark.parametrize("q_len,ctx_len,window,block_size", CHUNKS)
def test_matches_the_pytorch_path(heads, kv_heads, dim, q_len, ctx_len, window, block_size, monkeypatch):
    """Same result as torch's flash attention up to bf16 rounding of the output, and no further
    from the float64 attention than torch's result is (both round the probabilities to bf16)."""
    q, k, v, span = case(heads, kv_heads, dim, q_len, ctx_len, window, block_size)
    scale = dim ** -0.5
    got = ext.paged_prefill_attention(q, k, v, span.block_table, ctx_len, scale, window)
    monkeypatch.setenv("TUILI_AMX", "0")
    assert _amx_prefill_kernels(q, k, None) is None  # TUILI_AMX=0: the PyTorch path
    want = _prefill_attention(q, k, v, span, scale, None, window or None)
    exact = _prefill_attention(q.double(), k.double(), v.double(), span, scale, None, window or None)
    assert got.shape == want.shape and got.dtype is torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), atol=1.6e-2, rtol=1e-2)
    err_got, err_want = (got.double() - exact).abs().mean(), (want.double() - exact).abs().mean()
    assert err_got <= 1.1 * err_want + 1e-6, (err_got, err_want)


def test_positions_past_the_context_and_outside_the_window_weigh_nothing():
    """Rows past ctx_len are never read (here NaN), and positions a query may not see, though
    their scores are made, get a weight of exactly 0 (here huge values): the same result."""
    q, k, v, span = case(9, 3, 64, 40, 150, 60, 16, seed=2)  # queries at 110..149 see 51 onward
    clean = ext.paged_prefill_attention(q, k, v, span.block_table, 150, 0.125, 60)
    kk, vv = k.clone(), v.clone()
    last = int(span.block_table[-1])
    kk[last, 150 % 16:], vv[last, 150 % 16:] = float("nan"), float("nan")
    hidden = int(span.block_table[2])  # positions 32-47: scored with 48-50 in one tile, outside every window
    kk[hidden], vv[hidden] = 1e30, -1e30
    dirty = ext.paged_prefill_attention(q, kk, vv, span.block_table, 150, 0.125, 60)
    assert torch.equal(clean, dirty)


def test_bad_shapes_are_refused():
    q, k, v, span = case(9, 3, 64, 10, 20, 0, 16)
    with pytest.raises(RuntimeError, match="ctx_len"):
        ext.paged_prefill_attention(q, k, v, span.block_table, 5, 0.125, 0)  # fewer positions than queries
    with pytest.raises(RuntimeError, match="bfloat16"):
        ext.paged_prefill_attention(q.float(), k, v, span.block_table, 20, 0.125, 0)
