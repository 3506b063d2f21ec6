"""Low-precision weights of a loaded model: which form each linear layer's weight takes.

`prepare_linears` runs once after the weights are loaded: it quantizes to int8 or int4 if
asked (`quant_ops.py`, PyTorch's ops) and, where `tuili.device.weight_packing` says the CPU
kernels' products are faster here, repacks bf16, int8 and int4 weights for them
(`packed.py`). The weight classes and helpers of both files are re-exported here.

int8 for the CPU kernels (`quantize_int8_packed`) has one scale per output column and
block of 32 inputs, as llama.cpp's Q8_0: per column alone, a column's few large weights
set the step of all its others. Measured on the default model (docs/BENCHMARKS.md,
"Lossless int8"), with the activations' own blocks of 32 in both cases: per column +0.65%
(GPL-3 text) and +2.43% (shipped corpus) perplexity over bf16, per 32 -0.11% and +0.07%.
torch's op (`Int8Weight`, CUDA and no kernels) takes only per-column scales.
"""
from __future__ import annotations

import logging

import torch

from ..config import INT4_GROUP_SIZES, QUANT_MODES, parse_quantization  # noqa: F401 - re-exported
from ..device import cpu_has_avx512, huge_pages_wanted, weight_packing
from . import hugepages
from .kernels import cpu_kernels
from .paths import bf16_rows_invariant, int8_paths
from .packed import (PACKED_MAX_ROWS, bf16_dense_rows, PackedInt4Weight, PackedWeight, int8_activations,  # noqa: F401
                     pack_weight, quantize_int4_packed)
from .quant_ops import (DEQUANT_MIN_ROWS, INT8_CLIP_RATIOS, Int4Weight, Int8Weight,  # noqa: F401
                        dequantize_int4_codes, int4_codes, quantize_int4, quantize_int8)

log = logging.getLogger("tuili.kernels")
_EMPTY = torch.empty(0)

INT8_GROUP = 32  # inputs per int8 scale on the CPU kernels (gemm.cpp's activation block too)
QuantWeight = Int8Weight | Int4Weight | PackedWeight | PackedInt4Weight
PACKED_TYPES = (PackedWeight, PackedInt4Weight)


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


def int8_groups(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output column and block of 32 inputs: codes [N, K] int8 and
    scales [N, K32/32] float32 (K32: K rounded up to 32), w ≈ q * scale of its block."""
    n, k = w.shape
    k32 = -(-k // INT8_GROUP) * INT8_GROUP
    g = torch.nn.functional.pad(w.to(torch.float32), (0, k32 - k)).view(n, -1, INT8_GROUP)
    scale = (g.abs().amax(dim=-1) / 127.0).clamp(min=1e-12)
    q = torch.round(g / scale[..., None]).clamp(-127, 127).to(torch.int8).view(n, k32)[:, :k].contiguous()
    return q, scale


def dequantize_int8_groups(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    n, k = q.shape
    k32 = scale.shape[1] * INT8_GROUP
    wg = torch.nn.functional.pad(q.to(torch.float32), (0, k32 - k)).view(n, -1, INT8_GROUP) * scale[..., None]
    return wg.view(n, k32)[:, :k]


def quantize_int8_packed(w: torch.Tensor) -> PackedWeight:
    """int8 codes and per-(column, block of 32) scales in the CPU kernel's forms: codes as
    `pack_weight` lays out int8, scales [ceil(N/16), K32/32, 16] (panel-major, as gemm.cpp's
    int8 tiles read them; columns past N are zero)."""
    n, k = w.shape
    q, scale = int8_groups(w)
    panels = -(-n // 16)
    sp = torch.nn.functional.pad(scale, (0, 0, 0, panels * 16 - n)).view(panels, 16, -1).transpose(1, 2).contiguous()
    return PackedWeight(cpu_kernels().pack_weight(q), sp, n, k)


def packing_plan(device: torch.device) -> tuple[bool, bool]:
    """(pack, keep_dense_bf16) on `device`, as `tuili.device.weight_packing` decides it from
    what the CPU kernels were built with here."""
    ext = cpu_kernels() if device.type == "cpu" else None
    gemm = ext is not None and ext.gemm_available()
    return weight_packing(device, gemm, gemm and ext.gemm_amx_available())


def prepare_linears(model: torch.nn.Module, quantization: tuple[str, int]) -> None:
    """After loading: quantize the linear layers if asked and, on a CPU that benefits, hold
    bf16, int8 and int4 weights in the CPU kernel's packed forms (the output head too; the
    embedding lookup keeps its own table)."""
    mode, group = quantization
    packing, dense = packing_plan(model.device)
    if mode in ("int8", "int4") and packing:  # int8 products (int4 models: the head) on AMX from a measured row count
        log.info("kernel paths: %s", int8_paths([tuple(getattr(model.layers[0], n).shape) for n in LINEARS]).describe())
    if mode == "int4" and packing:  # straight to the packed codes
        _convert_linears(model, lambda w: quantize_int4_packed(w, group), f"quantizing to {mode}",
                         head=quantize_int8_packed)
    elif mode == "int8" and packing:  # scales per block of 32 (torch's op has per column only)
        _convert_linears(model, quantize_int8_packed, f"quantizing to {mode}")
    else:
        if mode != "none":
            quantize_model(model, mode, group)
        if packing:
            if dense and mode == "none":  # the measured crossover decides whether a plain copy pays
                dense = bf16_dense_rows([tuple(getattr(model.layers[0], n).shape) for n in LINEARS])
            _convert_linears(model, lambda w: pack_weight(w, dense), None)
    if packing and huge_pages_wanted(model.device):
        packed_to_huge_pages(model)


def packed_to_huge_pages(model: torch.nn.Module) -> int:
    """Move the packed weights' panels (bf16 and int8 panels, int4 codes) into one mapping on
    2 MB pages (model/hugepages.py); returns the bytes moved."""
    weights = [getattr(layer, n) for layer in model.layers for n in LINEARS] + [model.lm_head]
    fields = [(w, "packed") if isinstance(w, PackedWeight) else (w, "codes")
              for w in weights if isinstance(w, (PackedWeight, PackedInt4Weight))]
    tensors = [getattr(w, f) for w, f in fields]
    arena = hugepages.arena_for([(tuple(t.shape), t.dtype) for t in tensors])
    if arena is None:
        return 0
    for (w, f), t in zip(fields, tensors):
        setattr(w, f, arena.take(t.contiguous()))
    log.info("packed weights: %.0f MB in one mapping asking for 2 MB pages (THP %s; this process: %.0f MB on "
             "huge pages)", arena.used / 1e6, hugepages.thp_mode(), hugepages.process_huge_bytes() / 1e6)
    return arena.used


def _convert_linears(model: torch.nn.Module, convert, desc: str | None, head=None) -> None:
    from tqdm import tqdm

    layers = tqdm(model.layers, desc=desc, unit="layer", leave=False) if desc else model.layers
    for layer in layers:
        for name in LINEARS:
            setattr(layer, name, convert(getattr(layer, name)))
    model.lm_head = (head or convert)(model.lm_head)


def model_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of all weights as held in memory (a tied, unquantized head is counted once)."""
    total = sum(weight_nbytes(getattr(layer, n)) for layer in model.layers for n in LINEARS)
    total += sum(weight_nbytes(layer.qkv_bias) for layer in model.layers if layer.qkv_bias is not None)
    total += sum(p.numel() * p.element_size() for p in model.parameters())
    total += weight_nbytes(model.embed)
    if model.lm_head is not model.embed:
        total += weight_nbytes(model.lm_head)
    return total



def rows_invariant(model: torch.nn.Module) -> bool:
    """Whether every product of the model gives a row the same bits however many rows share
    the step: all linears (the head too) packed for the CPU kernels with no plain copy, each on
    kernels that are one and the same at every row count. bf16: `paths.bf16_rows_invariant`
    (AVX2, or AVX512-BF16 without AMX where one of its two kernels takes every row count).
    int8: each block's sum is exact in int32 and folded in one order (VNNI and AVX2 tiles).
    int4: its AVX2 tiles. float32 packed: only where the CPU has no AVX-512 (never checked
    there). Norms, rotary and decode attention work row by row, the float32 prefill-attention
    kernel row by row whatever the chunk; on AMX CPUs (their prefill attention, bf16 tiles)
    nothing was checked, so never there. Then verifying drafts cannot change a token
    (engine/speculative.py, `speculative=auto`); checked bit for bit in tests/test_kernels.py."""
    ext = cpu_kernels()
    if ext is None or not ext.gemm_available() or ext.gemm_amx_available():
        return False
    weights = [getattr(layer, n) for layer in model.layers for n in LINEARS] + [model.lm_head]
    if not all(isinstance(w, PACKED_TYPES) and not getattr(w, "dense", _EMPTY).numel() for w in weights):
        return False
    dtypes = {w.packed.dtype for w in weights if isinstance(w, PackedWeight)}
    return ((torch.bfloat16 not in dtypes or bf16_rows_invariant())
            and (torch.float32 not in dtypes or not cpu_has_avx512()))
