"""The compiled CPU decode-attention kernel against the PyTorch path, on random paged caches."""
import pytest
import torch

from tuili.model.kernels import cpu_kernels
from tuili.model.layers import AttentionMetadata, decode_attention_torch, quantize_kv

ext = cpu_kernels()
NONE = torch.empty(0)
pytestmark = pytest.mark.skipif(ext is None, reason="the C++ kernel could not be built on this machine")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8])
@pytest.mark.parametrize("heads,kv_heads,dim", [(9, 3, 64), (4, 4, 32), (8, 2, 48)])
def test_kernel_matches_torch_path(dtype, heads, kv_heads, dim):
    torch.manual_seed(0)
    num_blocks, block_size = 40, 16
    k_cache = torch.randn(num_blocks, block_size, kv_heads, dim)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, dim)
    scales = None
    if dtype is torch.int8:  # codes and a float32 scale per token and head
        (k_cache, ks), (v_cache, vs) = quantize_kv(k_cache), quantize_kv(v_cache)
        scales = (ks, vs)
    k_cache, v_cache = k_cache.to(dtype), v_cache.to(dtype)
    lens = torch.tensor([1, 17, 70, 33, 160])
    width = int((lens.max() + block_size - 1) // block_size)
    tables = torch.stack([torch.randperm(num_blocks)[:width] for _ in lens])
    q = torch.randn(len(lens), heads, dim)
    meta = AttentionMetadata(slot_mapping=torch.zeros(0, dtype=torch.long), num_decodes=len(lens),
                             decode_block_tables=tables, decode_context_lens=lens,
                             decode_max_context=int(lens.max()))
    got = ext.paged_decode_attention(q, k_cache, v_cache, tables, lens, dim ** -0.5, *(scales or (NONE, NONE)))
    want = decode_attention_torch(q, k_cache, v_cache, meta, dim ** -0.5, scales)
    torch.testing.assert_close(got, want.float(), atol=2e-5, rtol=1e-4)


def test_kernel_ignores_blocks_past_the_length():
    torch.manual_seed(1)
    k_cache = torch.randn(8, 4, 2, 16)
    v_cache = torch.randn(8, 4, 2, 16)
    q = torch.randn(1, 4, 16)
    tables = torch.tensor([[3, 5, 7]])
    a = ext.paged_decode_attention(q, k_cache, v_cache, tables, torch.tensor([6]), 0.25, NONE, NONE)
    k_cache[7] = 1e6  # beyond the 6 live tokens (blocks 3 and half of 5)
    k_cache[5, 2:] = -1e6
    b = ext.paged_decode_attention(q, k_cache, v_cache, tables, torch.tensor([6]), 0.25, NONE, NONE)
    torch.testing.assert_close(a, b)


def test_int8_cache_is_close_to_the_full_precision_one():
    """Quantizing K/V per token and head moves attention outputs by under 0.5% of V's range."""
    torch.manual_seed(2)
    k, v = torch.randn(10, 16, 3, 64), torch.randn(10, 16, 3, 64)
    (kq, ks), (vq, vs) = quantize_kv(k), quantize_kv(v)
    tables, lens, q = torch.arange(10).view(1, 10), torch.tensor([150]), torch.randn(1, 9, 64)
    exact = ext.paged_decode_attention(q, k, v, tables, lens, 0.125, NONE, NONE)
    approx = ext.paged_decode_attention(q, kq, vq, tables, lens, 0.125, ks, vs)
    assert (approx - exact).abs().max() < 0.005 * v.abs().max()
    assert not torch.equal(approx, exact)


@pytest.mark.parametrize("window", [1, 5, 16, 40])
def test_sliding_window_reads_only_the_last_positions(window):
    """Kernel and PyTorch path agree with a window, and both equal attention over the last
    `window` positions gathered by hand."""
    torch.manual_seed(2)
    num_blocks, block_size, kvh, heads, dim = 24, 8, 2, 4, 16
    k_cache = torch.randn(num_blocks, block_size, kvh, dim)
    v_cache = torch.randn(num_blocks, block_size, kvh, dim)
    lens = torch.tensor([3, 9, 33, 60])
    width = int((lens.max() + block_size - 1) // block_size)
    tables = torch.stack([torch.randperm(num_blocks)[:width] for _ in lens])
    q = torch.randn(len(lens), heads, dim)
    meta = AttentionMetadata(slot_mapping=torch.zeros(0, dtype=torch.long), num_decodes=len(lens),
                             decode_block_tables=tables, decode_context_lens=lens,
                             decode_max_context=int(lens.max()))
    got = ext.paged_decode_attention(q, k_cache, v_cache, tables, lens, 0.25, NONE, NONE, window)
    want = decode_attention_torch(q, k_cache, v_cache, meta, 0.25, None, window)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    for b, n in enumerate(lens.tolist()):
        k = k_cache[tables[b]].reshape(-1, kvh, dim)[max(0, n - window):n]
        v = v_cache[tables[b]].reshape(-1, kvh, dim)[max(0, n - window):n]
        k, v = k.repeat_interleave(heads // kvh, 1), v.repeat_interleave(heads // kvh, 1)
        w = torch.softmax(torch.einsum("hd,thd->ht", q[b], k) * 0.25, dim=-1)
        torch.testing.assert_close(got[b], torch.einsum("ht,thd->hd", w, v), atol=2e-5, rtol=1e-4)
