"""Weight-only low precision on PyTorch's own ops: int8 per output channel, int4 in groups along the input.

Weights are quantized at load time from the full-precision tensors; activations stay in
the model's dtype. The matmuls are PyTorch's own low-precision ops:

- int8: `aten._weight_int8pack_mm(x, w_int8 [N, K], scales [N])`, symmetric per output row.
- int4: asymmetric per group of `group_size` inputs (a scale and a zero point per group and
  output row, as llama.cpp's Q4_1), packed by `aten._convert_weight_to_int4pack_for_cpu`
  and multiplied by `aten._weight_int4pack_mm_for_cpu` (on CUDA by their CUDA twins).

These ops want bfloat16 activations; a float32 model casts the rows in and the result
back. On a CPU without native bfloat16 the int8 op falls behind a float32 GEMM once there
are many rows, so above `DEQUANT_MIN_ROWS` rows (prefill) the int8 weight is dequantized
to float32 on the fly: one extra pass over the weight, then float32 matmul speed.
Measured on the 2-core AVX2 machine, one thread, the four matrices of a SmolLM2 layer:
int8 op vs bf16 F.linear 3.7 vs 15.0 ms (x10, 1 row); int8 op vs dequantized float32
192 vs 266 ms at 64 rows, 94 vs 49 ms at 256 rows. The int4 op has no such fallback
(its packed layout is the op's own); its prefill runs about 2x slower than float32.

These are the forms used where the CPU kernels are not (CUDA, `TUILI_KERNELS=0`, no AVX2);
`packed.py` holds the CPU kernels' forms and `quant.py` chooses between them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Above this many rows a CPU without native bf16 runs int8 weights as a dequantized float32
# matmul (the int8 op with bf16 activations falls behind float32 GEMM there).
DEQUANT_MIN_ROWS = 128
INT8_CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)
INT4_REFITS = 4  # least-squares refits of each int4 group's scale and min (int4_codes)


class FeatureShape:
    """`shape` ([out, in], as a weight tensor's) of the weight classes that keep their
    dimensions as `out_features` and `in_features`."""

    out_features: int
    in_features: int

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.out_features, self.in_features))


@dataclass
class Int8Weight:
    """Symmetric int8 per output channel: w ≈ q * scale[:, None]."""

    q: torch.Tensor  # [N, K] int8
    scales: torch.Tensor  # [N] bfloat16 (what the op multiplies with)
    scales_f32: torch.Tensor  # [N] float32 (for the dequantized path)

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    def nbytes(self) -> int:
        return self.q.numel() + self.scales.numel() * self.scales.element_size()

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        return (self.q.to(torch.float32) * self.scales_f32[:, None]).to(dtype)

    def matmul(self, x: torch.Tensor, slow_bf16: bool) -> torch.Tensor:
        if slow_bf16 and x.shape[0] > DEQUANT_MIN_ROWS:
            return F.linear(x.float(), self.dequantize(torch.float32)).to(x.dtype)
        out = torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16).contiguous(), self.q, self.scales)
        return out.to(x.dtype)


@dataclass
class Int4Weight(FeatureShape):
    """Asymmetric int4 in groups along K: w ≈ (q - 8) * scale + zero, per (group, output row)."""

    packed: torch.Tensor  # the op's packed layout
    scales_zeros: torch.Tensor  # [K / group, N, 2] bfloat16
    group_size: int
    out_features: int
    in_features: int

    def nbytes(self) -> int:
        return self.packed.numel() * self.packed.element_size() + self.scales_zeros.numel() * 2

    def matmul(self, x: torch.Tensor, slow_bf16: bool) -> torch.Tensor:
        xb = x.to(torch.bfloat16).contiguous()
        if x.device.type == "cpu":
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(xb, self.packed, self.group_size, self.scales_zeros)
        else:
            out = torch.ops.aten._weight_int4pack_mm(xb, self.packed, self.group_size, self.scales_zeros)
        return out.to(x.dtype)



def quantize_int8(w: torch.Tensor) -> Int8Weight:
    w32 = w.to(torch.float32)
    # Each row's scale is the one, among a few clipping ratios of its abs-max, with the least
    # squared error: clipping a row's rare outliers a little buys a finer step for the rest.
    # The op multiplies by a bf16 scale, so candidates are rounded to bf16 before they are tried.
    amax = w32.abs().amax(dim=1).clamp(min=1e-8)
    best_err = torch.full_like(amax, float("inf"))
    best = amax
    for ratio in INT8_CLIP_RATIOS:
        s = (amax * ratio / 127.0).to(torch.bfloat16).to(torch.float32)
        err = (torch.round(w32 / s[:, None]).clamp(-127, 127) * s[:, None] - w32).pow(2).sum(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, s, best)
    q = torch.round(w32 / best[:, None]).clamp(-127, 127).to(torch.int8).contiguous()
    return Int8Weight(q, best.to(torch.bfloat16), best)


def int4_codes(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes 0..15 [N, K] int32 and per-group scale and min [N, K/group] float32.

    Each group starts from its min-max grid; then, a few times, the scale and min are refit by
    least squares to the codes they gave (w ≈ q * scale + min) and the codes redrawn, keeping
    a group's new grid only where its squared error is lower (as llama.cpp's Q4_K search
    does in spirit): a group's extremes may then be clipped by a fraction of a step for a
    finer grid over the rest. On the default model's MLP weights: 23% less squared error
    than min-max; perplexity in docs/BENCHMARKS.md ("Lossless int8").
    """
    n, k = w.shape
    if k % group_size:
        raise ValueError(f"quantization: int4 group size {group_size} does not divide input width {k}")
    wg = w.to(torch.float32).reshape(n, k // group_size, group_size)
    lo, hi = wg.amin(dim=-1), wg.amax(dim=-1)
    scale = ((hi - lo) / 15.0).clamp(min=1e-10)

    def grid(s: torch.Tensor, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = torch.round((wg - m[..., None]) / s[..., None]).clamp(0, 15)
        return q, (q * s[..., None] + m[..., None] - wg).pow(2).sum(dim=-1)

    q, err = grid(scale, lo)
    w_mean = wg.mean(dim=-1)
    for _ in range(INT4_REFITS):
        qc = q - q.mean(dim=-1, keepdim=True)
        var = qc.pow(2).sum(dim=-1)
        s = torch.where(var > 0, (qc * (wg - w_mean[..., None])).sum(dim=-1) / var.clamp(min=1e-12), scale)
        s = s.clamp(min=1e-10)
        m = w_mean - s * q.mean(dim=-1)
        q_new, e = grid(s, m)
        better = e < err
        scale, lo, err = torch.where(better, s, scale), torch.where(better, m, lo), torch.where(better, e, err)
        q = torch.where(better[..., None], q_new, q)
    return q.to(torch.int32).reshape(n, k), scale, lo


def dequantize_int4_codes(q: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor, group_size: int) -> torch.Tensor:
    n, k = q.shape
    wg = q.reshape(n, k // group_size, group_size).to(torch.float32)
    return (wg * scale[..., None] + lo[..., None]).reshape(n, k)


def int4_inner_k_tiles(k: int) -> int:
    """The CUDA int4 layout packs K in tiles of 16 x inner_k_tiles (8, 4 or 2): the widest
    that divides K. 8 needs K % 128 == 0, which SmolLM2's hidden size of 576 is not."""
    for tiles in (8, 4, 2):
        if k % (16 * tiles) == 0:
            return tiles
    raise ValueError(f"quantization: int4 on CUDA needs an input width divisible by 32, got {k}")


def quantize_int4(w: torch.Tensor, group_size: int) -> Int4Weight:
    n, k = w.shape
    q, scale, lo = int4_codes(w, group_size)
    # The op computes (q - 8) * scale + zero, so zero = lo + 8 * scale; both in bf16 as it reads them.
    sz = torch.stack([scale, lo + 8 * scale], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
    if w.device.type == "cpu":
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), 2)
    else:  # the CUDA op takes two codes per byte, high nibble first
        u8 = ((q[:, ::2] << 4) | q[:, 1::2]).to(torch.uint8).contiguous()
        packed = torch.ops.aten._convert_weight_to_int4pack(u8, int4_inner_k_tiles(k))
    return Int4Weight(packed, sz, group_size, n, k)


