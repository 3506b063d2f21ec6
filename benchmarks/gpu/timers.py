"""Host-side timers for bench.py's profile part: wrap methods with perf_counter, and mark a
model call's start and end with CUDA events (its GPU span)."""
from __future__ import annotations

import statistics
import time
from typing import Any

import torch


class Timers:
    """Host time spent in chosen methods (perf_counter around the call, no device sync)."""

    def __init__(self) -> None:
        self.total: dict[str, float] = {}
        self.saved: list[tuple[Any, str, Any]] = []

    def restore(self) -> None:
        for obj, attr, own in reversed(self.saved):
            if own is None:
                delattr(obj, attr)  # the class's method shows through again
            else:
                setattr(obj, attr, own)
        self.saved.clear()

    def wrap(self, obj: Any, attr: str, name: str | None = None) -> None:
        fn = getattr(obj, attr)
        self.saved.append((obj, attr, vars(obj).get(attr)))
        key = name or attr
        self.total[key] = 0.0

        def timed(*a: Any, **k: Any) -> Any:
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.total[key] += time.perf_counter() - t
        setattr(obj, attr, timed)


class ForwardTimer:
    """The model call's host time and GPU span (CUDA events at its start and end)."""

    def __init__(self, model: torch.nn.Module, device: torch.device):
        self.cuda = device.type == "cuda"
        self.host: list[float] = []
        self.events: list[tuple[Any, Any]] = []
        self._t = 0.0
        self.handles = [model.register_forward_pre_hook(self.pre), model.register_forward_hook(self.post)]

    def pre(self, *_: Any) -> None:
        self._t = time.perf_counter()
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.events.append((ev, None))

    def post(self, *_: Any) -> None:
        self.host.append(time.perf_counter() - self._t)
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.events[-1] = (self.events[-1][0], ev)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    def host_ms(self) -> float:
        return 1e3 * statistics.median(self.host) if self.host else 0.0

    def gpu_ms(self) -> float | None:
        if not self.events:
            return None
        torch.cuda.synchronize()
        return round(statistics.median(a.elapsed_time(b) for a, b in self.events), 3)
