"""Weight-only low precision: int8 per output channel and int4 in groups along the input.

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

Where the CPU kernels are built and `tuili.device.weight_packing` says so, weights are instead repacked
for `model/csrc/gemm.cpp`. Its int8 and int4 products quantize the activations too, per
block of 32 inputs (`int8_activations`), and multiply int8 bytes exactly in int32: the
weights are what is stored; the activations' rounding is part of the measured quality
loss (tests/test_quant.py, docs/BENCHMARKS.md).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import INT4_GROUP_SIZES, QUANT_MODES, parse_quantization  # noqa: F401 - re-exported
from ..device import weight_packing
from .kernels import cpu_kernels

_NONE = torch.empty(0)
# Rows up to which a bf16 weight held in both forms takes the packed product on a CPU with
# native bf16: measured crossover with torch's matmul about 12 rows (docs/BENCHMARKS.md).
PACKED_MAX_ROWS = 8
# Above this many rows a CPU without native bf16 runs int8 weights as a dequantized float32
# matmul (the int8 op with bf16 activations falls behind float32 GEMM there).
DEQUANT_MIN_ROWS = 128
INT8_CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)


class _Features:
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
class Int4Weight(_Features):
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


@dataclass
class PackedWeight(_Features):
    """A bfloat16 or int8 weight repacked once for the CPU product of `model/csrc/gemm.cpp`
    (panels of 16 output columns; bf16 widened to float32 in registers, int8 multiplied by
    int8 activations). Where it is used: `tuili.device.weight_packing`."""

    packed: torch.Tensor  # bf16 [ceil(N/16), K, 16] (pairs of inputs with AVX512-BF16); int8 [ceil(N/16), K32/4, 16, 4]
    scales: torch.Tensor  # [N] float32 for int8 (w = q * scale), empty for bfloat16
    out_features: int
    in_features: int
    # bf16 on a CPU with native bf16: the plain weight too, for torch's matmul above
    # PACKED_MAX_ROWS rows, where it is faster (prefill); empty otherwise
    dense: torch.Tensor = _NONE

    def nbytes(self) -> int:
        return (self.packed.numel() * self.packed.element_size() + self.scales.numel() * 4
                + self.dense.numel() * self.dense.element_size())

    def matmul(self, x: torch.Tensor, slow_bf16: bool = True, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.dense.numel() and x.shape[0] > PACKED_MAX_ROWS:
            return F.linear(x, self.dense, bias)
        return cpu_kernels().packed_linear(x, self.packed, self.out_features,
                                           self.scales, _NONE if bias is None else bias, False)


@dataclass
class PackedInt4Weight(_Features):
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


QuantWeight = Int8Weight | Int4Weight | PackedWeight | PackedInt4Weight
PACKED_TYPES = (PackedWeight, PackedInt4Weight)


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
    """Codes 0..15 [N, K] int32 and per-group scale and min [N, K/group] float32."""
    n, k = w.shape
    if k % group_size:
        raise ValueError(f"quantization: int4 group size {group_size} does not divide input width {k}")
    wg = w.to(torch.float32).reshape(n, k // group_size, group_size)
    lo, hi = wg.amin(dim=-1), wg.amax(dim=-1)
    scale = ((hi - lo) / 15.0).clamp(min=1e-10)
    q = torch.round((wg - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32)
    return q.reshape(n, k), scale, lo


def dequantize_int4_codes(q: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor, group_size: int) -> torch.Tensor:
    n, k = q.shape
    wg = q.reshape(n, k // group_size, group_size).to(torch.float32)
    return (wg * scale[..., None] + lo[..., None]).reshape(n, k)


def quantize_int4(w: torch.Tensor, group_size: int) -> Int4Weight:
    n, k = w.shape
    q, scale, lo = int4_codes(w, group_size)
    # The op computes (q - 8) * scale + zero, so zero = lo + 8 * scale; both in bf16 as it reads them.
    sz = torch.stack([scale, lo + 8 * scale], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
    if w.device.type == "cpu":
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), 2)
    else:  # the CUDA op takes two codes per byte, high nibble first
        u8 = ((q[:, ::2] << 4) | q[:, 1::2]).to(torch.uint8).contiguous()
        packed = torch.ops.aten._convert_weight_to_int4pack(u8, 8)
    return Int4Weight(packed, sz, group_size, n, k)


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


def quantize(w: torch.Tensor, mode: str, group_size: int) -> torch.Tensor | QuantWeight:
    if mode == "int8":
        return quantize_int8(w)
    if mode == "int4":
        return quantize_int4(w, group_size)
    return w


def weight_nbytes(w: torch.Tensor | QuantWeight) -> int:
    if isinstance(w, torch.Tensor):
        return w.numel() * w.element_size()
    return w.nbytes()


# The projection weights of a decoder layer, as every model class here names them.
LINEARS = ("qkv_weight", "o_weight", "gate_up_weight", "down_weight")


def quantize_model(model: torch.nn.Module, mode: str, group: int) -> None:
    """Weight-only quantization of every linear layer, the output head included (a tied
    head gets its own quantized copy; the embedding lookup keeps the full-precision table)."""
    _convert_linears(model, lambda w: quantize(w, mode, group), f"quantizing to {mode}")


def packing_plan(device: torch.device) -> tuple[bool, bool]:
    """(pack, keep_dense_bf16) on `device`, as `tuili.device.weight_packing` decides it from
    what the CPU kernels were built with here."""
    ext = cpu_kernels() if device.type == "cpu" else None
    gemm = ext is not None and ext.gemm_available()
    return weight_packing(device, gemm, gemm and ext.gemm_amx_available())


def pack_weight(w: torch.Tensor | QuantWeight, keep_dense: bool = False) -> torch.Tensor | QuantWeight:
    """bf16 tensors and int8 weights become PackedWeight (a bf16 one keeping the plain tensor
    too when keep_dense); anything else is returned as is."""
    if isinstance(w, torch.Tensor) and w.dtype is torch.bfloat16 and w.dim() == 2:
        return PackedWeight(cpu_kernels().pack_weight(w), _NONE, w.shape[0], w.shape[1],
                            w.contiguous() if keep_dense else _NONE)
    if isinstance(w, Int8Weight):
        return PackedWeight(cpu_kernels().pack_weight(w.q), w.scales_f32.contiguous(), w.q.shape[0], w.q.shape[1])
    return w


def prepare_linears(model: torch.nn.Module, quantization: tuple[str, int]) -> None:
    """After loading: quantize the linear layers if asked and, on a CPU that benefits, hold
    bf16, int8 and int4 weights in the CPU kernel's packed forms (the output head too; the
    embedding lookup keeps its own table)."""
    mode, group = quantization
    packing, dense = packing_plan(model.device)
    if mode == "int4" and packing:  # straight to the packed codes
        _convert_linears(model, lambda w: quantize_int4_packed(w, group), f"quantizing to {mode}")
        return
    if mode != "none":
        quantize_model(model, mode, group)
    if packing:
        _convert_linears(model, lambda w: pack_weight(w, dense), None)


def _convert_linears(model: torch.nn.Module, convert, desc: str | None) -> None:
    from tqdm import tqdm

    layers = tqdm(model.layers, desc=desc, unit="layer", leave=False) if desc else model.layers
    for layer in layers:
        for name in LINEARS:
            setattr(layer, name, convert(getattr(layer, name)))
    model.lm_head = convert(model.lm_head)


def model_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of all weights as held in memory (a tied, unquantized head is counted once)."""
    total = sum(weight_nbytes(getattr(layer, n)) for layer in model.layers for n in LINEARS)
    total += sum(weight_nbytes(layer.qkv_bias) for layer in model.layers if layer.qkv_bias is not None)
    total += sum(p.numel() * p.element_size() for p in model.parameters())
    total += weight_nbytes(model.embed)
    if model.lm_head is not model.embed:
        total += weight_nbytes(model.lm_head)
    return total
