"""The compiled CPU decode-attention kernel against the PyTorch path, on random paged caches."""
import pytest
import torch

from tuili.model.kernels import cpu_kernels
from tuili.model.layers import AttentionMetadata, decode_attention_torch, quantize_kv
from tuili.model.quant import int8_activations

ext = cpu_kernels()
NONE = torch.empty(0)
pytestmark = pytest.mark.skipif(ext is None, reason="the C++ kernel could not be built on this machine")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8])
@pytest.mark.parametrize("heads,kv_heads,dim", [(9, 3, 64), (4, 4, 32), (8, 2, 48), (4, 2, 20)])  # 20: the scalar path
def test_kernel_matches_torch_path(dtype, heads, kv_heads, dim):
    torch.manual_seed(0)
    check_against_torch(dtype, heads, kv_heads, dim, [1, 17, 70, 33, 160], num_blocks=40)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.int8])
@pytest.mark.parametrize("heads,kv_heads,dim", [(9, 3, 64), (8, 1, 48), (12, 2, 40)])  # 40: G unknown to the template
@pytest.mark.parametrize("lens,window", [([300], 0), ([65], 0), ([1000], 0), ([300], 100), ([500, 7], 0)])
def test_long_contexts_are_cut_into_chunks_and_merged(dtype, heads, kv_heads, dim, lens, window):
    """A context longer than a chunk (128 positions) is cut into chunks, so that one or two
    sequences still keep both threads busy, and merged with their softmax maxima and sums;
    the merged result equals the PyTorch path (65 positions: one chunk, for contrast)."""
    torch.manual_seed(3)
    check_against_torch(dtype, heads, kv_heads, dim, lens, num_blocks=80, window=window)


@pytest.mark.parametrize("heads,kv_heads,dim", [(9, 3, 64), (4, 1, 256), (8, 2, 128), (4, 4, 32)])
@pytest.mark.parametrize("lens,window,block_size", [([1, 17, 70, 33, 160], 0, 16), ([300], 0, 16), ([500, 7], 0, 32),
                                                    ([300, 41], 100, 16), ([90, 3], 0, 8)])
@pytest.mark.parametrize("amx", ["1", "0"])
def test_bf16_queries_on_a_bf16_cache(heads, kv_heads, dim, lens, window, block_size, amx, monkeypatch):
    """bf16 queries on a bf16 cache take the AVX512-BF16 loops where they apply (16 positions
    of a block per vdpbf16ps pass, 64-dim output slices; not for 32 dims or 8-row blocks), and
    on AMX CPUs the score tiles unless TUILI_AMX=0 (read at each call): either way the same
    attention as the PyTorch path on the float32 values."""
    monkeypatch.setenv("TUILI_AMX", amx)
    torch.manual_seed(6)
    check_against_torch(torch.bfloat16, heads, kv_heads, dim, lens, num_blocks=80, window=window,
                        block_size=block_size, q_dtype=torch.bfloat16)


@pytest.mark.parametrize("dtype,q_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                           (torch.int8, torch.float32), (torch.bfloat16, torch.bfloat16)])
@pytest.mark.parametrize("heads,kv_heads,dim,window", [(9, 3, 64, 0), (9, 3, 64, 100), (8, 1, 48, 0)])
def test_a_rows_attention_does_not_depend_on_the_batch(dtype, q_dtype, heads, kv_heads, dim, window):
    """Each sequence's output has the same bits alone as in a batch of any size (the chunks of
    a context follow its own length only): the k+1 rows of a verification and a plain decode
    step attend alike, so greedy text does not change with speculative decoding."""
    torch.manual_seed(8)
    block_size, num_blocks = 16, 120
    k_cache, v_cache = torch.randn(num_blocks, block_size, kv_heads, dim), torch.randn(num_blocks, block_size, kv_heads, dim)
    scales = (NONE, NONE)
    if dtype is torch.int8:
        (k_cache, ks), (v_cache, vs) = quantize_kv(k_cache), quantize_kv(v_cache)
        scales = (ks, vs)
    k_cache, v_cache = k_cache.to(dtype), v_cache.to(dtype)
    lens = torch.tensor([1, 17, 64, 65, 130, 300, 377, 301, 302, 303, 304, 40])
    width = int((lens.max() + block_size - 1) // block_size)
    tables = torch.stack([torch.randperm(num_blocks)[:width] for _ in lens])
    q = torch.randn(len(lens), heads, dim).to(q_dtype)

    def run(rows):
        return ext.paged_decode_attention(q[rows].contiguous(), k_cache, v_cache, tables[rows].contiguous(),
                                          lens[rows].contiguous(), dim ** -0.5, *scales, window)

    everything = run(list(range(len(lens))))
    for rows in ([6], [5], [0], [6, 7, 8, 9, 10], [6, 7], [11, 5, 0, 6], list(range(len(lens)))[::-1]):
        assert torch.equal(run(rows), everything[rows]), rows


def check_against_torch(dtype, heads, kv_heads, dim, lens, num_blocks, window=0, block_size=16, q_dtype=torch.float32):
    """The kernel on a random paged cache (int8: codes and a float32 scale per token and head)
    against `decode_attention_torch`, one query per sequence of the given lengths."""
    k_cache = torch.randn(num_blocks, block_size, kv_heads, dim)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, dim)
    scales = None
    if dtype is torch.int8:
        (k_cache, ks), (v_cache, vs) = quantize_kv(k_cache), quantize_kv(v_cache)
        scales = (ks, vs)
    k_cache, v_cache = k_cache.to(dtype), v_cache.to(dtype)
    lens = torch.tensor(lens)
    width = int((lens.max() + block_size - 1) // block_size)
    tables = torch.stack([torch.randperm(num_blocks)[:width] for _ in lens])
    q = torch.randn(len(lens), heads, dim).to(q_dtype)
    meta = AttentionMetadata(slot_mapping=torch.zeros(0, dtype=torch.long), num_decodes=len(lens),
                             decode_block_tables=tables, decode_context_lens=lens,
                             decode_max_context=int(lens.max()))
    got = ext.paged_decode_attention(q, k_cache, v_cache, tables, lens, dim ** -0.5, *(scales or (NONE, NONE)), window)
    want = decode_attention_torch(q.float(), k_cache, v_cache, meta, dim ** -0.5, scales, window or None)
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


@pytest.mark.parametrize("dim", [16, 12])  # 12: the scalar path (head dims not a multiple of 8)
@pytest.mark.parametrize("window", [1, 5, 16, 40])
def test_sliding_window_reads_only_the_last_positions(window, dim):
    """Kernel and PyTorch path agree with a window, and both equal attention over the last
    `window` positions gathered by hand."""
    torch.manual_seed(2)
    num_blocks, block_size, kvh, heads = 24, 8, 2, 4
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


# ---- matrix products from packed weights (csrc/gemm.cpp) ---------------------------------
gemm = pytest.mark.skipif(ext is None or not ext.gemm_available(), reason="packed products need AVX2")


@gemm
@pytest.mark.parametrize("wdtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows", [1, 2, 5, 6, 7, 33, 130])
def test_packed_linear_matches_float32_product(wdtype, rows):
    """Every row-tile size (1..6 and remainders), a width that is not a multiple of 16, and
    row blocks (130 rows of K=200): equal to a float32 product of the same values."""
    torch.manual_seed(3)
    n, k = 40, 200
    w = torch.randn(n, k).to(wdtype)
    bias = torch.randn(n)
    x = torch.randn(rows, k)
    if wdtype is torch.bfloat16 and ext.gemm_bf16_pairs():  # AVX512-BF16: bf16 activations
        x = x.bfloat16().float()
    want = torch.nn.functional.linear(x, w.float(), bias)
    got = ext.packed_linear(x, ext.pack_weight(w), n, NONE, bias, True)
    torch.testing.assert_close(got, want, atol=1e-6 * want.abs().max().item(), rtol=1e-5)
    got_bf16 = ext.packed_linear(x.bfloat16(), ext.pack_weight(w), n, NONE, NONE, False)
    assert got_bf16.dtype is torch.bfloat16
    want_bf16 = torch.nn.functional.linear(x.bfloat16().float(), w.float())
    torch.testing.assert_close(got_bf16.float(), want_bf16, atol=1e-3 * want_bf16.abs().max().item(), rtol=2 ** -8)


@pytest.fixture
def widen_rows():
    """Sets the row count from which bf16 products widen to float32 (ext.set_bf16_widen_rows)
    for one test, and puts the process's setting back after it."""
    before = ext.bf16_widen_rows()
    yield ext.set_bf16_widen_rows
    ext.set_bf16_widen_rows(before)


@gemm
@pytest.mark.parametrize("form", ["bf16", "bf16 widened", "float32", "int8", "int4"])
def test_a_rows_product_does_not_depend_on_the_row_count(widen_rows, form):
    """Every tile size, remainders and widened blocks (24 rows on) sum a row in the same order:
    each row of an M-row product has the bits of its 1-row product, for every weight form that
    paths.bf16_rows_invariant / quant.rows_invariant count as such (bf16 with vdpbf16ps or
    widened throughout; int8 on the VNNI / AVX2 tiles; int4). What lets speculation=auto
    draft without changing a token."""
    from tuili.model.paths import NEVER, bf16_rows_invariant
    from tuili.model.quant import quantize_int4_packed, quantize_int8_packed

    torch.manual_seed(5)
    n, k = 100, 576
    w = torch.randn(n, k)
    x = torch.randn(70, k)
    if form.startswith("bf16"):
        widen_rows(1 if form == "bf16 widened" else NEVER)
        if not bf16_rows_invariant():
            pytest.skip("bf16 products here run on AMX tiles (never checked)")
        packed, scales, x = ext.pack_weight(w.bfloat16()), NONE, x.bfloat16()
    elif form == "int8":
        q8 = quantize_int8_packed(w)
        packed, scales = q8.packed, q8.scales
    elif form == "float32":
        packed, scales = ext.pack_weight(w), NONE
    q4 = quantize_int4_packed(w, 32) if form == "int4" else None

    def product(rows):  # float32 out: every bit of the sums compared
        if form == "int4":
            return ext.packed_linear_q4(rows, q4.codes, q4.scales, q4.mins, n, q4.group_size, NONE, True)
        return ext.packed_linear(rows, packed, n, scales, NONE, True)

    alone = torch.cat([product(x[r:r + 1]) for r in range(len(x))])
    for rows in (2, 3, 4, 5, 6, 7, 8, 9, 12, 13, 16, 17, 23, 24, 25, 31, 48, 70):
        assert torch.equal(product(x[:rows]), alone[:rows]), rows


@gemm
@pytest.mark.parametrize("rows", [1, 8, 32, 70])
def test_a_product_does_not_depend_on_the_thread_count(rows):
    """However the panels are handed to the threads (fixed shares, or taken from both ends of
    a range as the threads go: the bf16 pair tiles from 8 rows), each panel is computed
    whole by one thread: 1, 2 and 3 threads give the same bits, and every column is there
    (23 panels and a partial one, so an odd last pair and ranges of unequal length)."""
    torch.manual_seed(9)
    n, k = 16 * 23 + 5, 576
    w = torch.randn(n, k).bfloat16()
    x = torch.randn(rows, k).bfloat16()
    packed = ext.pack_weight(w)
    before = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            outs.append(ext.packed_linear(x, packed, n, NONE, NONE, True))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    want = torch.nn.functional.linear(x.float(), w.float())
    torch.testing.assert_close(outs[0], want, atol=1e-3 * want.abs().max().item(), rtol=1e-3)


@pytest.mark.skipif(ext is None or not ext.gemm_bf16_pairs(), reason="pair-packed bf16 needs AVX512-BF16")
@pytest.mark.parametrize("path", ["amx", "vdpbf16ps", "widened"])
@pytest.mark.parametrize("rows", [1, 11, 12, 13, 15, 16, 17, 32, 33, 70])
@pytest.mark.parametrize("k", [200, 256])
def test_bf16_pair_products_amx_tiles_and_vector_tiles(monkeypatch, widen_rows, path, rows, k):
    """bf16 products from the pair-packed weight, on AMX tiles (16-row tiles, 32 rows x 2
    panels at a time: remainders of rows and an odd panel count), and with TUILI_AMX=0 on
    the vdpbf16ps tiles or widened to float32 FMAs (tiles of up to 12 rows, balanced): a
    float32 product of the same bf16 values, up to summation order."""
    if path == "amx" and not ext.gemm_amx_available():
        pytest.skip("no AMX tiles on this CPU")
    monkeypatch.setenv("TUILI_AMX", "1" if path == "amx" else "0")
    widen_rows(1 if path == "widened" else 1 << 40)
    torch.manual_seed(4)
    n = 40  # three panels of 16
    w = torch.randn(n, k).bfloat16()
    bias = torch.randn(n)
    x = torch.randn(rows, k).bfloat16()
    want = torch.nn.functional.linear(x.double(), w.double(), bias.double())
    packed = ext.pack_weight(w)
    assert packed.shape == (3, (k + 31) // 32 * 32, 16)
    got = ext.packed_linear(x, packed, n, NONE, bias, True)
    torch.testing.assert_close(got.double(), want, atol=1e-5 * want.abs().max().item(), rtol=1e-5)
    got_bf16 = ext.packed_linear(x, packed, n, NONE, bias, False)
    assert got_bf16.dtype is torch.bfloat16 and torch.equal(got_bf16, got.bfloat16())


@gemm
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 9, 130])
@pytest.mark.parametrize("k", [200, 256])
def test_int8_packed_linear_is_the_product_of_int8_activations(rows, k):
    """int8 weights multiply int8 activations (csrc/gemm.cpp, gemm_a8): equal to a float64
    product of the block-quantized activations, for every row-tile size, a K that is not a
    multiple of 32, a width that is not a multiple of 16, and row blocks; and within the
    quantization's error of the float32 product."""
    torch.manual_seed(3)
    n = 40
    w = (torch.randn(n, k) * 40).clamp(-127, 127).to(torch.int8)
    scales = torch.rand(n) + 0.5
    bias = torch.randn(n)
    x = torch.randn(rows, k)
    x[0, :7] *= 50  # an outlier block: only its own block loses resolution
    wf = w.double() * scales.double()[:, None]
    want = (int8_activations(x) @ wf.T + bias.double()).float()
    packed = ext.pack_weight(w)
    got = ext.packed_linear(x, packed, n, scales, bias, True)
    torch.testing.assert_close(got, want, atol=2e-6 * want.abs().max().item(), rtol=1e-5)
    exact = torch.nn.functional.linear(x, wf.float(), bias)
    assert (got - exact).abs().max() < 0.03 * exact.abs().max()
    assert not torch.equal(got, exact)  # the activations really are quantized
    got_bf16 = ext.packed_linear(x.bfloat16(), packed, n, scales, NONE, False)
    assert got_bf16.dtype is torch.bfloat16
    want_bf16 = (int8_activations(x.bfloat16().float()) @ wf.T).float()
    torch.testing.assert_close(got_bf16.float(), want_bf16, atol=1e-3 * want_bf16.abs().max().item(), rtol=2 ** -8)


@pytest.fixture
def int8_amx_rows():
    """Sets the row count from which int8 products run on AMX tiles (ext.set_int8_amx_rows)
    for one test, and puts the process's setting back after it."""
    before = ext.int8_amx_rows()
    yield ext.set_int8_amx_rows
    ext.set_int8_amx_rows(before)


@pytest.mark.skipif(ext is None or not ext.gemm_amx_int8_available(), reason="no AMX int8 tiles on this CPU")
@pytest.mark.parametrize("rows", [1, 15, 16, 17, 32, 33, 70])
@pytest.mark.parametrize("k", [200, 576])
@pytest.mark.parametrize("blocks", [True, False])
def test_int8_products_on_amx_tiles_equal_the_vnni_tiles(int8_amx_rows, rows, k, blocks):
    """int8 products on AMX tiles (gemm_amx_a8: 32 rows x 2 panels per step, remainders of
    rows, an odd panel count, K not a multiple of 32) give exactly the VNNI tiles' results,
    with scales per block of 32 inputs and per column, bias, float32 and bf16 output."""
    torch.manual_seed(5)
    n = 40
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    packed = ext.pack_weight(w)
    scales = (torch.rand(packed.shape[0], -(-k // 32), 16) + 0.5 if blocks else torch.rand(n) + 0.5)
    bias = torch.randn(n)
    x = torch.randn(rows, k)
    x[0, :7] *= 50
    results = {}
    for path, from_rows in (("vnni", 1 << 40), ("amx", 1)):
        int8_amx_rows(from_rows)
        results[path] = (ext.packed_linear(x, packed, n, scales, bias, True),
                         ext.packed_linear(x.bfloat16(), packed, n, scales, NONE, False))
    assert torch.equal(results["amx"][0], results["vnni"][0])
    assert torch.equal(results["amx"][1], results["vnni"][1])
    wf = w.double() * (scales.double()[:, None] if not blocks else
                       scales.transpose(1, 2).reshape(-1, scales.shape[1])[:n].double().repeat_interleave(32, 1)[:, :k])
    want = int8_activations(x) @ wf.T + bias.double()
    torch.testing.assert_close(results["amx"][0].double(), want, atol=2e-6 * want.abs().max().item(), rtol=1e-5)


@gemm
def test_packed_linear_rejects_a_mismatched_weight():
    with pytest.raises(RuntimeError, match="does not match"):
        ext.packed_linear(torch.randn(2, 64), ext.pack_weight(torch.randn(16, 32)), 16, NONE, NONE, True)


# ---- fused element-wise steps (csrc/fused.cpp) ----------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_rms_norm_with_residual_add(dtype):
    from tuili.model.layers import RMSNorm

    torch.manual_seed(4)
    norm = RMSNorm(96, 1e-5, dtype, torch.device("cpu"))
    norm.weight.data = torch.randn(96).to(dtype)
    x, delta = torch.randn(7, 96).to(dtype), torch.randn(7, 96).to(dtype)
    want_x = x + delta
    want = norm(want_x)
    got = ext.rms_norm(x, norm.weight, norm.eps, delta)
    assert torch.equal(x, want_x)  # the residual add happened in place, rounded as torch rounds
    if dtype is torch.bfloat16:  # the sum of squares is float32 either way; bf16 results agree to 1 ulp
        torch.testing.assert_close(got.float(), want.float(), atol=0, rtol=2 ** -7)
    else:
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ext.rms_norm(want_x, norm.weight, norm.eps, NONE), got, atol=0, rtol=0)


@pytest.mark.parametrize("d", [32, 64, 24])  # 16-lane loops (a multiple of 32), and the scalar one
@pytest.mark.parametrize("dtype,kv", [(torch.float32, "same"), (torch.bfloat16, "same"), (torch.bfloat16, "int8"),
                                      (torch.float32, "int8")])
def test_fused_rope_and_kv_write_match_the_torch_steps(dtype, kv, d):
    from tuili.config import ModelConfig
    from tuili.model.layers import Rotary, write_kv

    torch.manual_seed(5)
    heads, kv_heads, t = 6, 2, 5
    cfg = ModelConfig(architecture="llama", vocab_size=10, hidden_size=heads * d, intermediate_size=8, num_layers=1, num_heads=heads,
                      num_kv_heads=kv_heads, head_dim=d, rope_theta=10000.0)
    rot = Rotary(cfg, 64, dtype, torch.device("cpu"))
    qkv = torch.randn(t, (heads + 2 * kv_heads) * d).to(dtype)
    qkv[1, ::7] = 0.0  # signed zeros come out as torch's (position 0: sin 0)
    qkv[2, 3::11] = -0.0
    positions = torch.tensor([3, 0, 17, 63, 5])
    slots = torch.tensor([9, 2, 30, 11, 0])
    cache_dtype = torch.int8 if kv == "int8" else dtype
    shape = (4, 8, kv_heads, d)

    def caches():
        c = (torch.zeros(shape, dtype=cache_dtype), torch.zeros(shape, dtype=cache_dtype))
        return c + ((torch.zeros(shape[:-1]), torch.zeros(shape[:-1])) if kv == "int8" else ())

    q, k, v = qkv.split([heads * d, kv_heads * d, kv_heads * d], dim=-1)
    want_q, want_k = rot(q.reshape(t, heads, d), k.reshape(t, kv_heads, d), positions)
    want = caches()
    write_kv(want[0], want[1], want_k, v.reshape(t, kv_heads, d), slots, want[2:] or None)
    got = caches()
    got_q = ext.rope_write_kv(qkv, positions, rot.cos, rot.sin, heads, kv_heads, got[0], got[1], slots,
                              *(got[2:] or (NONE, NONE)))
    def bits(x):  # compared bit for bit: -0.0 and 0.0 differ
        return x.view({torch.bfloat16: torch.int16, torch.float32: torch.int32}.get(x.dtype, x.dtype))

    assert torch.equal(bits(got_q), bits(want_q))
    for a, b in zip(got, want):
        assert torch.equal(bits(a), bits(b))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_silu_mul(dtype):
    torch.manual_seed(6)
    gate_up = (torch.randn(3, 2 * 50) * 4).to(dtype)
    gate, up = gate_up.chunk(2, dim=-1)
    want = torch.nn.functional.silu(gate) * up
    got = ext.silu_mul(gate_up)
    tol = dict(atol=0, rtol=2 ** -7) if dtype is torch.bfloat16 else dict(atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got.float(), want.float(), **tol)


@pytest.mark.parametrize("rows,n", [(1, 1), (3, 7), (5, 33), (32, 300), (2, 49152)])
def test_argmax_rows_is_torch_max_index(rows, n):
    """Greedy sampling's argmax (sampler.greedy_ids): each row's first maximal index, a NaN as
    the largest, exactly as torch.max(dim=-1), through ties, infinities and NaNs, on either side
    of the vector body's multiple of 32 and its 8-wide scan."""
    from tuili.engine.sampler import greedy_ids

    gen = torch.Generator().manual_seed(rows * 1000 + n)
    cases = [torch.randn(rows, n, generator=gen), (torch.randn(rows, n, generator=gen) * 2).round()]
    x = torch.randn(rows, n, generator=gen)
    x[torch.rand(rows, n, generator=gen) < 0.1] = float("inf")
    cases.append(x)
    x = torch.randn(rows, n, generator=gen)
    x[torch.rand(rows, n, generator=gen) < 0.05] = float("nan")
    x[-1, -1] = float("nan")  # a NaN in the scalar tail
    cases += [x, torch.full((rows, n), float("-inf"))]
    for x in cases:
        want = x.max(dim=-1).indices
        assert torch.equal(ext.argmax_rows(x), want)
        assert torch.equal(greedy_ids(x), want)
    strided = torch.randn(rows, 2 * n, generator=gen)[:, ::2]
    assert torch.equal(greedy_ids(strided), strided.max(dim=-1).indices)


@pytest.fixture(scope="module")
def small_models(tiny_model):
    """Two random-weight models (conftest's `tiny_model`): Llama (GQA, untied) and Qwen2 (q/k/v bias)."""
    shape = dict(vocab_size=300, intermediate_size=128, seed=5)
    return [tiny_model("llama", **shape), tiny_model("qwen2", **shape)]


@gemm
@pytest.mark.parametrize("quant,kv", [("none", "auto"), ("int8", "auto"), ("int4", "auto"), ("none", "int8")])
def test_decode_stack_in_one_call_is_bit_identical_to_the_per_layer_path(small_models, monkeypatch, quant, kv):
    """`llama_decode_layers` (decoder.cpp) walks the same kernels as DecoderLayer.forward_fused;
    the tokens and their logprobs (to the last bit) must not depend on which path ran."""
    import tuili.device
    import tuili.model.llama as llama
    from tuili import LLM, SamplingParams

    # The packed products (and so the stack) are what a CPU without native bf16 gets; a CPU
    # with it uses torch's matmul. Test the kernels on either.
    monkeypatch.setattr(tuili.device, "cpu_has_fast_bf16", lambda: False)

    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=3)
    prompts = [[5, 9, 17, 33, 2, 8], [41, 7], list(range(20, 47))]
    for folder in small_models:
        results = []
        for stack in (True, False):
            monkeypatch.setattr(llama, "DECODE_STACK", stack)
            llm = LLM(str(folder), dtype="bfloat16", quantization=quant, kv_cache_dtype=kv, block_size=4,
                      num_kv_blocks=64)
            assert llm.engine.model._decode_stack(llm.engine.runner.kv_caches) is not None
            outs = llm.generate(prompts, params)
            results.append([(o.outputs[0].token_ids, [(lp.logprob, lp.top) for lp in o.outputs[0].logprobs])
                            for o in outs])
        assert results[0] == results[1]


def test_auto_dtype_is_bf16_where_the_packed_products_run_bf16_weights(monkeypatch, tiny_model):
    """`auto` on a CPU without native bf16: bf16 when the compiled products take bf16 weights
    (half the bytes, float32 arithmetic), float32 when they are off or missing, and for code
    without them (the transformers baseline)."""
    import tuili.device as device
    import tuili.model.quant as quant
    from tuili.engine.engine import Engine

    cpu = torch.device("cpu")
    monkeypatch.setattr(device, "cpu_has_fast_bf16", lambda: False)
    assert device.resolve_dtype("auto", cpu, packed_products=True) is torch.bfloat16
    assert device.resolve_dtype("auto", cpu) is torch.float32
    assert device.resolve_dtype("float32", cpu, packed_products=True) is torch.float32
    folder = tiny_model("llama", vocab_size=300, intermediate_size=128, seed=5)
    monkeypatch.setenv("TUILI_PACKED", "auto")
    built = cpu_kernels() is not None and cpu_kernels().gemm_available()
    assert Engine(str(folder), num_kv_blocks=16).dtype is (torch.bfloat16 if built else torch.float32)
    monkeypatch.setenv("TUILI_PACKED", "0")
    assert Engine(str(folder), num_kv_blocks=16).dtype is torch.float32
    monkeypatch.setenv("TUILI_PACKED", "auto")
    monkeypatch.setattr(quant, "cpu_kernels", lambda: None)
    assert Engine(str(folder), num_kv_blocks=16).dtype is torch.float32
    monkeypatch.setattr(device, "cpu_has_fast_bf16", lambda: True)
    assert device.resolve_dtype("auto", cpu) is torch.bfloat16


def test_a_finished_build_loads_without_running_ninja_again(monkeypatch, tmp_path):
    """Once built under its key, the extension is imported directly: torch's `load` (ninja, which
    rebuilds everything when a different ninja made the build) is not called; a file that does not
    import is handed to `load` to rebuild."""
    import torch.utils.cpp_extension as cpp_extension

    import tuili.model.kernels as kernels

    if cpu_kernels() is None:
        pytest.skip("no CPU kernels here")
    assert kernels._load_built(tmp_path / "missing.so") is None
    (tmp_path / "broken.so").write_bytes(b"not an ELF file")
    assert kernels._load_built(tmp_path / "broken.so") is None

    def no_build(*args, **kwargs):
        raise AssertionError("torch's load ran although the extension was built")

    monkeypatch.setattr(cpp_extension, "load", no_build)
    monkeypatch.setattr(kernels, "_tried", False)
    monkeypatch.setattr(kernels, "_ext", None)
    ext = kernels.cpu_kernels()
    assert ext is not None and ext.gemm_available() == cpu_kernels().gemm_available()
