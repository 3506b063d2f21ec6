"""Large CPU buffers on 2 MB pages: the packed weights and the KV cache.

With 4 KB pages a decode step at batch 32 of the default model touches about 66,000 pages
of weights and 57,000 of K/V (blocks of 16 tokens placed anywhere in the pool), each a
translation the TLB does not hold; on 2 MB pages the same bytes lie on about 250 pages.
Linux lends them to memory that asks for them (`madvise(MADV_HUGEPAGE)`; transparent huge
pages in `madvise` mode, the usual default, give them to nobody else). Measured on the
Zen 5 EPYC (benchmarks/decode_step.py, docs/BENCHMARKS.md): a decode step
at batch 32 1.02-1.05x faster. Where the kernel lends none (THP `never`, another OS, a
fragmented machine) the buffers are ordinary memory and everything works the same.

`Arena` is one mapping that tensors are copied into or laid out in (the packed weights: one
arena for the model, so small weights share pages; one for a runner's K/V caches);
`arena_for` makes one where it pays. TUILI_HUGEPAGES=0 (`tuili.device.huge_pages_wanted`) keeps plain allocations.
"""
from __future__ import annotations

import mmap
import re
from pathlib import Path

import torch

PAGE = 2 << 20
_ALIGN = 64  # each tensor in an arena starts on a cache line


def thp_mode() -> str:
    """The kernel's transparent-huge-page mode (always, madvise or never), '' when unknown."""
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return ""
    m = re.search(r"\[(\w+)\]", text)
    return m.group(1) if m else ""


def available() -> bool:
    """Whether a mapping can ask for huge pages here (Linux with THP not `never`)."""
    return hasattr(mmap, "MADV_HUGEPAGE") and thp_mode() in ("always", "madvise")


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


class Arena:
    """One anonymous mapping of at least `nbytes`, 2 MB aligned and asking for huge pages;
    `take` copies tensors into it one after another."""

    def __init__(self, nbytes: int):
        size = _round_up(max(nbytes, 1), PAGE)
        self._map = mmap.mmap(-1, size + PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self._map.madvise(mmap.MADV_HUGEPAGE)
        raw = torch.frombuffer(self._map, dtype=torch.uint8)  # holds a reference to the mapping
        start = (-raw.data_ptr()) % PAGE
        self._raw = raw[start:start + size]
        self._used = 0

    @property
    def nbytes(self) -> int:
        return self._raw.numel()

    @property
    def used(self) -> int:
        """Bytes handed out so far (the last tensor's end)."""
        return self._used

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised tensor in the next free stretch (zeros when never written)."""
        nbytes = _tensor_bytes(shape, dtype)
        start = _round_up(self._used, _ALIGN)
        if start + nbytes > self.nbytes:
            raise ValueError(f"arena of {self.nbytes} bytes is full ({start} used, {nbytes} asked)")
        self._used = start + nbytes
        return self._raw[start:start + nbytes].view(dtype).view(shape)

    def take(self, t: torch.Tensor) -> torch.Tensor:
        """A copy of `t` (contiguous, same shape and dtype) in the arena."""
        out = self.empty(tuple(t.shape), t.dtype)
        out.copy_(t)
        return out


def _tensor_bytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    n = 1
    for s in shape:
        n *= s
    return n * dtype.itemsize


def _layout_bytes(layout: list[tuple[tuple[int, ...], torch.dtype]]) -> int:
    """Bytes an arena needs for tensors of these (shape, dtype), each starting on a cache line."""
    return sum(_round_up(_tensor_bytes(shape, dtype), _ALIGN) for shape, dtype in layout)


def arena_bytes(tensors: list[torch.Tensor]) -> int:
    """Bytes an arena needs to take all of `tensors`."""
    return _layout_bytes([(tuple(t.shape), t.dtype) for t in tensors])


def arena_for(layout: list[tuple[tuple[int, ...], torch.dtype]]) -> Arena | None:
    """An arena for tensors of these (shape, dtype), or None where huge pages are not to be
    had here or would not pay (less than one 2 MB page in all)."""
    nbytes = _layout_bytes(layout)
    return Arena(nbytes) if available() and nbytes >= PAGE else None


def process_huge_bytes() -> int:
    """Bytes of this process's memory on transparent huge pages now (0 when unknown)."""
    try:
        text = Path("/proc/self/smaps_rollup").read_text()
    except OSError:
        return 0
    m = re.search(r"AnonHugePages:\s+(\d+) kB", text)
    return int(m.group(1)) * 1024 if m else 0
