"""The hardware catalog (catalog.json) and `local`, this machine as measured.

Every catalog figure carries its source in the same file. `local` takes its bandwidth and
matmul rate from `python -m tuili.bench.machine` (run in a subprocess once, then cached in
`<tuili cache>/plan/local.json`), and its efficiency factors from `tuili plan --calibrate`,
stored per weight format in the same file. Efficiencies are fractions of the peaks plus
fixed costs per step, per sequence in a step and per request (HTTP, tokenizing).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import cache_dir

CATALOG = Path(__file__).parent / "catalog.json"
EFFICIENCY_KEYS = ("weight_bw", "kv_bw", "matmul", "step_overhead_s", "seq_overhead_s", "chunk_overhead_s",
                   "request_overhead_s", "allreduce_latency_s", "serve_step_overhead_s")

_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20,
          "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40}


def parse_size(value: str | int | float) -> int:
    """'2GiB' -> 2147483648, as `tuili.config.parse_size` (which imports torch with its module)."""
    if isinstance(value, (int, float)):
        return int(value)
    m = _SIZE_RE.match(str(value))
    unit = (m.group(2) or "").lower() if m else None
    if not m or unit not in _UNITS:
        raise ValueError(f"size: cannot parse {value!r}; write it like 512MiB or 2GiB")
    return int(float(m.group(1)) * _UNITS[unit])


@dataclass
class Hardware:
    key: str
    name: str
    kind: str
    memory_bytes: float
    bandwidth: float  # bytes/s, one accelerator
    bf16_flops: float  # FLOP/s, dense
    int8_ops: float
    interconnect: float  # bytes/s each way, for tensor parallelism
    max_count: int
    step_token_budget: int
    efficiency: dict[str, Any]  # per quantization ("none", "int8", "int4") -> factors
    memory_utilization: float = 0.9
    kv_cache_memory: int | None = None  # a fixed KV pool (tuili's 1GiB default on `local`)
    int4_bytes_per_param: float = 0.5313
    sources: dict[str, str] = field(default_factory=dict)
    calibrated: bool = False

    def eff(self, quantization: str) -> dict[str, float]:
        """Efficiency factors for one weight format (calibrated ones where present)."""
        base = {k: v for k, v in self.efficiency.items() if k in EFFICIENCY_KEYS}
        return {**base, **self.efficiency.get("by_quantization", {}).get(quantization, {})}

    def matmul_rate(self, quantization: str) -> float:
        """int8 weights multiply int8 activations (tuili's CPU kernels, W8A8 on GPUs); int4
        weights are widened to 16 bits (AWQ/GPTQ-style kernels)."""
        return self.int8_ops if quantization == "int8" else self.bf16_flops


def load_catalog() -> dict[str, Any]:
    return json.loads(CATALOG.read_text())


def catalog_keys() -> list[str]:
    return list(load_catalog()["hardware"]) + ["local"]


def get(key: str, measure: bool = True) -> Hardware:
    """One catalog entry; `local` measures this machine unless cached (or returns the
    cached figures only, raising LookupError, when measure is False)."""
    cat = load_catalog()
    defaults = cat["defaults"]
    if key == "local":
        entry = dict(cat["local"])
        local = local_figures(measure)
        entry.update(memory_GB=local["memory_GB"], bandwidth_GBps=local["read_GBps"],
                     bf16_TFLOPs=local["matmul_bfloat16_GFLOPs"] / 1000,
                     int8_TOPs=local.get("int8_GOPs", local["matmul_bfloat16_GFLOPs"]) / 1000, interconnect_GBps=0)
        calib = local.get("calibration") or {}
        entry["efficiency"] = {**entry.get("efficiency", {}), **calib.get("common", {}),
                               "by_quantization": calib.get("by_quantization", {})}
        entry["calibrated"] = bool(calib)
    elif key in cat["hardware"]:
        entry = cat["hardware"][key]
    else:
        raise KeyError(f"unknown hardware {key!r}; known: {', '.join(catalog_keys())}")
    eff = {**defaults["efficiency"], **entry.get("efficiency", {})}
    return Hardware(
        key=key, name=entry["name"], kind=entry["kind"], memory_bytes=entry["memory_GB"] * 1e9,
        bandwidth=entry["bandwidth_GBps"] * 1e9, bf16_flops=entry["bf16_TFLOPs"] * 1e12,
        int8_ops=entry["int8_TOPs"] * 1e12, interconnect=entry.get("interconnect_GBps", 0) * 1e9,
        max_count=entry.get("max_count", 8),
        step_token_budget=entry.get("step_token_budget", defaults["step_token_budget"]), efficiency=eff,
        memory_utilization=entry.get("memory_utilization", defaults["memory_utilization"]),
        kv_cache_memory=parse_size(entry["kv_cache_memory"]) if entry.get("kv_cache_memory") else None,
        int4_bytes_per_param=entry.get("int4_bytes_per_param", defaults["int4_bytes_per_param"]),
        sources={**defaults.get("sources", {}), **entry.get("sources", {})}, calibrated=entry.get("calibrated", False),
    )


# --- local: measured figures, cached -----------------------------------------------------

def cache_file() -> Path:
    """`<TUILI_CACHE or ~/.cache/tuili>/plan/local.json`."""
    root = cache_dir()
    return root / "plan" / "local.json"


def read_local() -> dict[str, Any] | None:
    path = cache_file()
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_local(data: dict[str, Any]) -> None:
    path = cache_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


def local_figures(measure: bool = True, refresh: bool = False) -> dict[str, Any]:
    data = read_local()
    if data and "read_GBps" in data and not refresh:
        return data
    if not measure:
        raise LookupError("local: not measured yet (run `tuili plan MODEL --hardware local` or --calibrate)")
    figures = measure_machine()
    data = {**(data or {}), **figures}
    write_local(data)
    return data


def measure_machine() -> dict[str, Any]:
    """`python -m tuili.bench.machine` in a subprocess (the planner itself never imports torch)."""
    out = subprocess.run([sys.executable, "-m", "tuili.bench.machine"], capture_output=True, text=True, check=True)
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    figures["memory_GB"] = _mem_total_gb()
    figures["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    figures["load_average"] = _load_average()
    return figures


def _mem_total_gb() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        pass
    return 16.0


def _load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None
