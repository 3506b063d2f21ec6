"""`python -m tuili.bench.machine`: the machine's own limits, measured with torch.

Memory read bandwidth (sum over a 256 MiB tensor), matrix-vector bandwidth (one row
times a 49152x576 matrix, the default model's lm_head), and matmul throughput on a large
square shape (as F.linear, the model's path), in float32 and bfloat16. Medians of several runs.
"""
from __future__ import annotations

import json
import statistics
import time

import torch
import torch.nn.functional as F


def median_time(fn, repeats: int = 7) -> float:
    """Median wall time in seconds of `repeats` calls of fn, after one unmeasured call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure() -> dict[str, float]:
    big = torch.randn(64 * 2**20)
    out = {"threads": torch.get_num_threads(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
           "read_GBps": big.numel() * 4 / median_time(big.sum) / 1e9}
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).removeprefix("torch.")
        w = torch.randn(49152, 576).to(dtype)
        x = torch.randn(1, 576).to(dtype)
        out[f"gemv_{name}_GBps"] = w.numel() * w.element_size() / median_time(lambda: F.linear(x, w)) / 1e9
        a = torch.randn(1024, 1024).to(dtype)
        out[f"matmul_{name}_GFLOPs"] = 2 * 1024**3 / median_time(lambda: F.linear(a, a), 3) / 1e9
    return out


if __name__ == "__main__":
    print(json.dumps({k: round(v, 1) if isinstance(v, float) else v for k, v in measure().items()}))
