"""Optional C++ kernels for the CPU, compiled once per machine with torch's cpp_extension.

The build needs a C++ compiler and ninja; it is tried once per process, on first use
(`make setup` triggers it ahead of time through `python -m tuili.model.kernels`), and the
result is kept under `$TUILI_CACHE/kernels/<cpu-and-torch-key>`, so a build made with
`-march=native` is never loaded on a different CPU or torch. If the build fails, or
`TUILI_KERNELS=0` is set (`tuili.device.kernels_enabled`), callers fall back to the pure-PyTorch path: same results up
to float rounding, only slower.
"""
from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import logging
import platform
import sys
import time
from pathlib import Path
from types import ModuleType

import torch

from ..config import cache_dir
from ..device import kernels_enabled

log = logging.getLogger("tuili.kernels")
_SOURCES = [Path(__file__).parent / "csrc" / name
            for name in ("bindings.cpp", "paged_attention.cpp", "prefill_attention.cpp", "prefill_attention_avx2.cpp",
                         "gemm.cpp", "fused.cpp", "decoder.cpp")]
_HEADERS = [Path(__file__).parent / "csrc" / name
            for name in ("vec.h", "kernels.h", "attention_bf16.h", "tile_f32.h", "decode_reference.h")]
# -ffp-contract=off: a * b + c is never fused into one rounding, so the fused element-wise
# steps round as PyTorch's ops do (the matrix products use explicit FMA instructions).
_CFLAGS = ["-O3", "-march=native", "-fopenmp", "-ffp-contract=off"]
_ext: ModuleType | None = None
_tried = False


def _build_key() -> str:
    h = hashlib.sha256()
    for src in _SOURCES + _HEADERS:
        h.update(src.read_bytes())
    h.update(" ".join(_CFLAGS).encode())
    h.update(torch.__version__.encode())
    h.update(platform.machine().encode())
    try:
        with open("/proc/cpuinfo") as f:
            h.update(next((line for line in f if line.startswith("flags")), "").encode())
    except OSError:
        pass
    return h.hexdigest()[:16]


def _load_built(path: Path) -> ModuleType | None:
    """The extension from an earlier build under the same key (sources, flags, torch, CPU), imported
    directly. torch's `load` would run ninja first, and ninja rebuilds everything when another
    ninja made the build (the venv's pip ninja and a system one hash command lines differently:
    a 2-minute rebuild at every start that alternates between them). None: no such build, or it
    does not import (a build killed while linking), and torch's `load` rebuilds it."""
    if not path.exists():
        return None
    try:
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    except Exception as e:  # noqa: BLE001 - a broken build: rebuild it
        log.warning("CPU kernels: %s does not load (%s); rebuilding", path.name, str(e).splitlines()[0][:200])
        return None


def cpu_kernels() -> ModuleType | None:
    """The compiled extension, or None when it is disabled or cannot be built here."""
    global _ext, _tried
    if _tried:
        return _ext
    _tried = True
    if not kernels_enabled():
        return None
    key = _build_key()
    build_dir = cache_dir() / "kernels" / key
    build_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    try:
        from torch.utils.cpp_extension import load

        # torch's own build lock is a plain file that a killed build leaves behind, and the
        # next build would wait on it forever. Our flock dies with its process: whoever
        # holds it is the only builder, so any torch lock file still there is stale.
        with open(build_dir / "tuili.lock", "w") as guard:
            fcntl.flock(guard, fcntl.LOCK_EX)
            (build_dir / "lock").unlink(missing_ok=True)
            _ext = _load_built(build_dir / f"tuili_cpu_{key}.so")
            if _ext is not None:
                return _ext
            fresh = not any(build_dir.glob("*.so"))
            if fresh:
                log.info("compiling the CPU kernels (once per machine)...")
            _ext = load(name=f"tuili_cpu_{key}", sources=[str(s) for s in _SOURCES],
                        build_directory=str(build_dir), extra_cflags=_CFLAGS,
                        extra_ldflags=["-fopenmp"], verbose=False)
            if fresh:
                log.info("compiled the CPU kernels in %.1f s", time.perf_counter() - start)
    except Exception as e:  # noqa: BLE001 - any build failure means: use the PyTorch path
        log.warning("CPU kernels unavailable, using the PyTorch path: %s", str(e).splitlines()[0][:200])
        _ext = None
    return _ext


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sys.exit(0 if cpu_kernels() is not None else 1)
