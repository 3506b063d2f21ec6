"""Weights repacked once for the CPU kernels' matrix products (`model/csrc/gemm.cpp`).

bf16 and int8 weights become `PackedWeight` (panels of 16 output columns), int4 weights
`PackedInt4Weight` (two codes per byte, float32 scale and min per group and column). The
int8 and int4 products quantize the activations too, per block of 32 inputs
(`int8_activations` is the reference), and multiply int8 bytes exactly in int32: the
weights are what is stored; the activations' rounding is part of the measured quality
loss (tests/test_quant.py, docs/BENCHMARKS.md). Whether weights are packed at all is
decided in `tuili.device.weight_packing`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .kernels import cpu_kernels
from .paths import PACKED_MAX_ROWS, bf16_paths
from .quant_ops import Int8Weight, FeatureShape, int4_codes

log = logging.getLogger("tuili.kernels")
_NONE = torch.empty(0)


@dataclass
class PackedWeight(FeatureShape):
    """A bfloat16 or int8 weight repacked once for the CPU product of `model/csrc/gemm.cpp`
    (panels of 16 output columns; bf16 widened to float32 in registers, int8 multiplied by
    int8 activations). Where it is used: `tuili.device.weight_packing`."""

    packed: torch.Tensor  # bf16 [ceil(N/16), K, 16] (pairs of inputs with AVX512-BF16); int8 [ceil(N/16), K32/4, 16, 4]
    scales: torch.Tensor  # [N] float32 for int8 (w = q * scale), empty for bfloat16
    out_features: int
    in_features: int
    # bf16 on a CPU with native bf16 where torch's matmul was measured faster above some row
    # count (model/paths.py): the plain weight too, taken above `max_rows` rows; empty otherwise
    dense: torch.Tensor = _NONE
    max_rows: int = PACKED_MAX_ROWS

    def nbytes(self) -> int:
        return (self.packed.numel() * self.packed.element_size() + self.scales.numel() * 4
                + self.dense.numel() * self.dense.element_size())

    def matmul(self, x: torch.Tensor, slow_bf16: bool = True, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.dense.numel() and x.shape[0] > self.max_rows:
            return F.linear(x, self.dense, bias)
        return cpu_kernels().packed_linear(x, self.packed, self.out_features,
                                           self.scales, _NONE if bias is None else bias, False)


@dataclass
class PackedInt4Weight(FeatureShape):
    """int4 codes for the CPU product of `model/csrc/gemm.cpp` (`packed_linear_q4`): panels of
    16 output columns, two codes per byte, and float32 scale and min per (group, column)
    with w = q * scale + min. Scale and zero are rounded to bf16 first, exactly as
    `Int4Weight` holds them, so both int4 paths compute with the same weights."""

    codes: torch.Tensor  # [ceil(N/16), K/4, 32] uint8 (layout: gemm.cpp, tile_q4a8)
    scales: torch.Tensor  # [ceil(N/16), K / group, 16] float32
    mins: torch.Tensor  # same shape
    group_size: int
    out_features: int
    in_features: int

    def nbytes(self) -> int:
        return self.codes.numel() + 2 * self.scales.numel() * 4

    def matmul(self, x: torch.Tensor, slow_bf16: bool = True, bias: torch.Tensor | None = None) -> torch.Tensor:
        return cpu_kernels().packed_linear_q4(x, self.codes, self.scales, self.mins, self.out_features,
                                              self.group_size, _NONE if bias is None else bias, False)



def quantize_int4_packed(w: torch.Tensor, group_size: int) -> PackedInt4Weight:
    n, k = w.shape
    q, scale, lo = int4_codes(w, group_size)
    s_b = scale.to(torch.bfloat16).float()
    z_b = (lo + 8 * scale).to(torch.bfloat16).float()
    panels = -(-n // 16)
    pad = panels * 16 - n

    def panelize(t: torch.Tensor) -> torch.Tensor:  # [N, C] -> [panels, C, 16]
        return F.pad(t, (0, 0, 0, pad)).view(panels, 16, -1).transpose(1, 2).contiguous()

    # [panels, K/4, 16 columns, 4 inputs]: byte i of a 4-input step = column i // 4 (low
    # nibble) and column 8 + i // 4 (high nibble), input i % 4 (gemm.cpp, tile_q4a8)
    qp = panelize(q).view(panels, k // 4, 4, 16).transpose(2, 3)
    codes = (qp[:, :, :8, :] | (qp[:, :, 8:, :] << 4)).reshape(panels, k // 4, 32).to(torch.uint8).contiguous()
    return PackedInt4Weight(codes, panelize(s_b), panelize(z_b - 8 * s_b), group_size, n, k)


def int8_activations(x: torch.Tensor) -> torch.Tensor:
    """x [M, K] as the CPU int8 and int4 products compute with it (gemm.cpp, quantize_rows):
    per row and block of 32 inputs, round(x * 127 / absmax) * absmax / 127, in float64. The
    reference for tests; the kernels never materialize it."""
    rows, k = x.shape
    k32 = -(-k // 32) * 32
    blocks = F.pad(x.float(), (0, k32 - k)).view(rows, -1, 32)
    amax = blocks.abs().amax(dim=2, keepdim=True)
    inv = torch.where(amax > 0, torch.tensor(127.0) / amax, torch.zeros(()))
    q = (blocks * inv).round().clamp(-127, 127)
    return (q.double() * (amax.double() / 127)).view(rows, k32)[:, :k]



def bf16_dense_rows(shapes: list[tuple[int, int]]) -> int | None:
    """For a model whose layers have these bf16 weight shapes: the row count above which
    torch's matmul beats the packed product here (measured once per machine, model/paths.py),
    or None when the packed product wins at every row count (no plain copy is kept)."""
    choice = bf16_paths(shapes)
    log.info("kernel paths: %s", choice.describe())
    return choice.packed_max_rows if choice.keeps_dense else None


def pack_weight(w: Any, keep_dense: bool | int | None = False) -> Any:
    """bf16 tensors and int8 weights become PackedWeight; anything else is returned as is.
    A bf16 one keeps the plain tensor too when `keep_dense` is truthy: True for products of
    more than PACKED_MAX_ROWS rows, a number for more than that many rows."""
    if isinstance(w, torch.Tensor) and w.dtype is torch.bfloat16 and w.dim() == 2:
        keep = keep_dense is not None and keep_dense is not False
        max_rows = PACKED_MAX_ROWS if keep_dense is True or not keep else int(keep_dense)
        return PackedWeight(cpu_kernels().pack_weight(w), _NONE, w.shape[0], w.shape[1],
                            w.contiguous() if keep else _NONE, max_rows)
    if isinstance(w, Int8Weight):
        return PackedWeight(cpu_kernels().pack_weight(w.q), w.scales_f32.contiguous(), w.q.shape[0], w.q.shape[1])
    return w


