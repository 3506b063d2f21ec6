"""int8 weights with a scale per output column and block of 32 inputs (the CPU kernels' int8,
model/quant.py: quantize_int8_packed), against reference math in float64: the kernel's
product equals the product of the dequantized weight and the block-quantized activations
(`int8_activations`), for every row-tile size, K not divisible by 32, N not divisible by 16."""
import pytest
import torch

from tuili.model.kernels import cpu_kernels
from tuili.model.quant import dequantize_int8_groups, int8_activations, int8_groups, quantize_int8_packed

ext = cpu_kernels()
pytestmark = pytest.mark.skipif(ext is None or not ext.gemm_available(), reason="packed products need the AVX2 kernels")


def test_groups_of_32_bound_the_error_by_each_blocks_own_step():
    torch.manual_seed(0)
    w = torch.randn(24, 100)
    w[3, 5] = 40.0  # an outlier coarsens only its own block
    q, scale = int8_groups(w)
    assert q.shape == (24, 100) and scale.shape == (24, 4)
    err = (dequantize_int8_groups(q, scale) - w).abs()
    step = scale.repeat_interleave(32, dim=1)[:, :100]
    assert (err <= step / 2 + 1e-6).all()
    assert err[3, 32:].max() < 0.05 and err[3, :32].max() > 0.05


@pytest.mark.parametrize("rows", [1, 2, 7, 8, 9, 33])
@pytest.mark.parametrize("k", [64, 200, 576])
def test_grouped_int8_product_is_the_dequantized_product(rows, k):
    torch.manual_seed(rows * 1000 + k)
    n = 40
    w = torch.randn(n, k) * 0.05
    w[:, :5] *= 30  # a few large inputs, as in real layers
    x, bias = torch.randn(rows, k), torch.randn(n)
    x[0, :3] *= 40
    q, scale = int8_groups(w)
    deq = dequantize_int8_groups(q, scale).double()
    want = int8_activations(x) @ deq.T + bias.double()
    packed = quantize_int8_packed(w)
    got = packed.matmul(x.float(), bias=bias).double()
    # exact integer sums; only float32 rounding of the per-block scaling and summing remains
    torch.testing.assert_close(got, want, atol=1e-5 * want.abs().max().item(), rtol=1e-5)
    exact = x.double() @ w.double().T + bias.double()
    assert 0 < (got - exact).abs().max() < 0.02 * exact.abs().max()
    want_bf16 = int8_activations(x.bfloat16().float()) @ deq.T
    got_bf16 = packed.matmul(x.bfloat16())
    assert got_bf16.dtype is torch.bfloat16
    torch.testing.assert_close(got_bf16.double(), want_bf16, atol=1e-3 * want_bf16.abs().max().item(), rtol=2 ** -8)


def test_grouped_scales_must_match_the_weight():
    packed = quantize_int8_packed(torch.randn(16, 64))
    with pytest.raises(RuntimeError, match="scales"):
        ext.packed_linear(torch.randn(2, 64), packed.packed, 16, packed.scales[:, :1].contiguous(),
                          torch.empty(0), True)
