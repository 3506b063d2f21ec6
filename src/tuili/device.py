"""Where the model runs and which arithmetic it takes: device, dtype and the CPU kernel paths.

This module is the one place that makes these choices. Everything else receives them as
arguments or asks the functions here, so the same code runs on `cpu` and `cuda`, and a
CPU path is picked from what this machine has (probed once, cached for the process),
never from a constant tuned on one CPU.

The environment switches it reads (the README's "Switches" lists them too):

- `TUILI_KERNELS=0`: do not build or load the compiled CPU kernels (`model/kernels.py`);
  everything runs on PyTorch's own ops. Default: use them wherever they build.
- `TUILI_PACKED=auto|0|1`: whether weights are repacked for the kernels' matrix products
  (`model/csrc/gemm.cpp`). `auto` (default) follows `weight_packing` below; `1` packs every
  weight and never keeps a second, plain bf16 copy; `0` never packs.
- `TUILI_AMX=0`: bf16 and int8 products, the decode attention's bf16 scores and the prefill
  attention do not use AMX tiles on a CPU that has them (the AVX512-BF16 and VNNI tiles take
  every row count; prefill chunks go to torch's flash attention). The compiled
  kernel reads this switch itself, at each call, because it picks the tile loop; `amx_allowed`
  is its Python reading.
- `TUILI_PACKED_MAX_ROWS=N`: bf16 products of up to N rows take the packed kernel, larger
  ones torch's matmul (on the plain copy). Unset: measured once per machine, `model/paths.py`.
- `TUILI_BF16_WIDEN_ROWS=N`: packed bf16 products of at least N rows widen the weight to
  float32 FMAs instead of vdpbf16ps (0: never; AVX512-BF16 without AMX). Unset: measured with
  the crossover above, `model/paths.py`.
- `TUILI_INT8_AMX_ROWS=N`: on CPUs with AMX, int8 products of at least N rows run on AMX
  tiles instead of the VNNI tiles (0: never). Unset: measured once per machine, `model/paths.py`.
- `TUILI_HUGEPAGES=0`: the packed weights and the KV cache stay in ordinary memory instead of
  mappings that ask Linux for 2 MB pages (`model/hugepages.py`; `huge_pages_wanted`).

It imports nothing from `tuili.model`: the kernels report what they were built with
(`gemm_available`, `gemm_amx_available`) and the policy here takes those as arguments.
"""
from __future__ import annotations

import functools
import os
import re

import torch

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}
PACKING_SWITCH_VALUES = ("auto", "0", "1")


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """`auto` picks CUDA when present, else CPU; asking for CUDA where there is none is a ValueError."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device: unknown value {device!r}; use auto, cpu or cuda (cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {device} was asked for, but this PyTorch build sees no CUDA device")
    return dev


@functools.cache
def _probe_fast_bf16() -> bool:
    cap = torch.backends.cpu.get_cpu_capability()
    if cap in ("AVX512_BF16", "AMX"):
        return True
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return bool(re.search(r"\b(avx512_bf16|amx_bf16)\b", flags))


@functools.cache
def cpu_has_avx512() -> bool:
    """Whether the CPU has any AVX-512 (the kernels, built with -march=native, then use it)."""
    try:
        with open("/proc/cpuinfo") as f:
            return bool(re.search(r"\bavx512", f.read()))
    except OSError:
        return torch.backends.cpu.get_cpu_capability() not in ("DEFAULT", "AVX2")


def cpu_has_fast_bf16() -> bool:
    """True when the CPU has native bfloat16 matmul (AVX512-BF16 or AMX); probed once.

    Without it, oneDNN emulates bfloat16 and a matmul runs several times slower
    than in float32 (measured 7x on an AVX2-only EPYC); `auto` then takes bf16 only where the
    compiled products run it (`resolve_dtype`).
    """
    return _probe_fast_bf16()


def cpu_bf16_is_slow(device: torch.device) -> bool:
    """Whether bf16 arithmetic on `device` is emulated (a CPU without native bf16): callers
    then run large matmuls and attention in float32 and cast back."""
    return device.type == "cpu" and not cpu_has_fast_bf16()


def resolve_dtype(dtype: str | torch.dtype, device: torch.device, packed_products: bool = False) -> torch.dtype:
    """`auto`: bfloat16 on CUDA, on CPUs with native bf16, and on other CPUs where the compiled
    products take bf16 weights (`packed_products`: the engine asks `tuili.model.quant.packing_plan`;
    they widen each bf16 weight to float32 in registers, so the model reads half the bytes at the
    same float32 arithmetic); float32 otherwise (torch's emulated bf16 matmul, and code that runs
    without tuili's products, such as the transformers baseline). On the AVX2-only EPYC bf16 with
    the kernels decoded 3.7x and served 1.5-2x the float32 model's tokens per second
    (docs/BENCHMARKS.md, "The AVX2 EPYC again")."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16
        return torch.bfloat16 if cpu_has_fast_bf16() or packed_products else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"dtype: unknown value {dtype!r}; use auto, float32, bfloat16 or float16")
    return _DTYPES[dtype]


def kernels_enabled() -> bool:
    """TUILI_KERNELS: the compiled CPU kernels may be built and used (unless it is 0)."""
    return os.environ.get("TUILI_KERNELS", "1") != "0"


def packing_switch() -> str:
    """TUILI_PACKED: auto (the default), 0 or 1; anything else is a ValueError."""
    value = os.environ.get("TUILI_PACKED", "auto")
    if value not in PACKING_SWITCH_VALUES:
        raise ValueError(f"TUILI_PACKED: expected auto, 0 or 1, got {value!r}")
    return value


def amx_allowed() -> bool:
    """TUILI_AMX: AMX tiles may be used where the CPU has them (unless it is 0). The C++
    product reads the same variable (gemm.cpp, gemm_amx_available)."""
    return os.environ.get("TUILI_AMX", "1") != "0"


def huge_pages_wanted(device: torch.device) -> bool:
    """TUILI_HUGEPAGES: large CPU buffers (packed weights, the KV cache) ask for 2 MB pages
    (unless it is 0); whether Linux lends them is `model/hugepages.py`'s `available`."""
    return device.type == "cpu" and os.environ.get("TUILI_HUGEPAGES", "1") != "0"


def weight_packing(device: torch.device, gemm_built: bool, amx_tiles: bool) -> tuple[bool, bool]:
    """(pack, dense_candidate): whether weights are repacked for the CPU products of
    `model/csrc/gemm.cpp`, and whether bf16 weights may keep their plain form beside the
    packed one for torch's matmul on large row counts.

    `gemm_built`: the kernels are loaded and have the products (AVX2); `amx_tiles`: the
    products may run on AMX tiles here. Packing is faster at every row count for int8 and
    int4, and for bf16 on a CPU without native bf16 (docs/BENCHMARKS.md, "CPU matrix
    products"). On a CPU with native bf16 (AVX512-BF16, with or without AMX) torch's matmul
    may win on large batches; whether it does, and from how many rows, is measured on the
    machine when a model is prepared (`tuili.model.paths`), and the plain copy is kept only
    if it pays. TUILI_PACKED=1 packs without the plain copy; 0 never packs.
    """
    switch = packing_switch()
    if device.type != "cpu" or switch == "0" or not gemm_built:
        return False, False
    return True, switch == "auto" and cpu_has_fast_bf16()
