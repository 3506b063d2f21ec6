"""Which matrix product a bf16 or int8 linear takes at each row count, measured on the machine at hand.

A bf16 weight packed for the CPU kernel (`PackedWeight`) can also keep its plain form, so
that batches above some row count go through torch's matmul (oneDNN) instead. The crossover
depends on the CPU (AMX Xeon: torch wins above about 12 rows; AVX512-BF16 without AMX: the
packed product won up to 256; docs/BENCHMARKS.md, "Kernel paths"), so the first time a model
is prepared on a machine both are timed on one layer's weight shapes at the row counts a step
can have, and the result is kept beside the compiled kernels (`$TUILI_CACHE/kernels/<build
key>/`): redone when the CPU, torch, the kernels or the thread count change.

The packed product itself has two kernels on CPUs with AVX512-BF16 and no AMX: vdpbf16ps
(bf16 pairs in one instruction) and widening the packed weight to float32 for 16-wide FMAs.
Which is faster depends on the core (on the AVX512-BF16 Xeon one vdpbf16ps retires every
other cycle, two FMAs every cycle: widening wins 1.3-1.7x from 8 rows up), so the two are
timed first and products from the smallest row count at which widening keeps winning take
it (`widen_min_rows`, handed to the kernels with `set_bf16_widen_rows`; one setting per
process). Then the packed-vs-torch crossover is timed with that choice in place.

int8 products (scales per block of 32) have two kernels on CPUs with AMX: the VNNI tiles and
AMX tiles (`gemm_amx_a8`), with identical results; `int8_paths` times them the same way when
an int8 or int4 model is prepared and hands the row count from which AMX wins to the kernels
(`set_int8_amx_rows`; `TUILI_INT8_AMX_ROWS=N` fixes it, 0: never).

`TUILI_PACKED_MAX_ROWS=N` fixes the crossover (0: torch's matmul always, once a plain copy is
kept; large N: packed always), `TUILI_BF16_WIDEN_ROWS=N` the widening (0: never; N: from N
rows). With either set nothing is timed (the other keeps the rule from before measurement).
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

log = logging.getLogger("tuili.kernels")

# Row counts timed: decode batches (1-64) and prefill chunks (up to the default step budget).
ROW_GRID = (1, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
# Rows up to which a bf16 weight held in both forms takes the packed product when nothing could
# be measured (measured on an AVX512-BF16 Xeon before measurement was per machine); no widening.
PACKED_MAX_ROWS = 8
NEVER = 1 << 30  # packed_max_rows when the packed product won at every row count timed
_VERSION = 4
_choices: dict[str, "PathChoice"] = {}


@dataclass
class PathChoice:
    """The measured crossover: bf16 products of up to `packed_max_rows` rows take the packed
    kernel, larger ones torch's matmul (NEVER: the packed kernel always, and no plain copy of
    the weights is kept). `timings` holds (rows, packed ms, torch ms) as measured."""

    packed_max_rows: int
    source: str  # "measured", "cached", "env" or "default"
    timings: list[tuple[int, float, float]]
    widen_min_rows: int = NEVER  # packed bf16 products of at least this many rows widen to float32 FMAs
    widen_timings: list[tuple[int, float, float]] = field(default_factory=list)  # (rows, vdpbf16ps ms, widened ms)

    @property
    def keeps_dense(self) -> bool:
        return self.packed_max_rows < NEVER

    def path_for(self, rows: int) -> str:
        if rows > self.packed_max_rows:
            return "torch"
        return "packed (widened)" if rows >= self.widen_min_rows else "packed"

    def describe(self) -> str:
        widen = "" if self.widen_min_rows >= NEVER else f"; from {self.widen_min_rows} rows widened to float32 FMAs"
        if not self.keeps_dense:
            same = "; a row's sums do not depend on the row count" if bf16_rows_invariant(self) else ""
            return f"bf16 products: packed kernel at every row count{widen}{same} ({self.source})"
        return (f"bf16 products: packed kernel up to {self.packed_max_rows} rows{widen}, torch's matmul above "
                f"({self.source})")


def bf16_rows_invariant(choice: PathChoice | None = None) -> bool:
    """Whether a bf16 product gives a row the same bits however many rows share it: one tile kernel
    at every row count, never torch's (None: no plain copy kept, the kernels' current widening).
    AVX2: the widened tile; AVX512-BF16 without AMX: vdpbf16ps or widened throughout (each sums a
    row in one order at any tile height, checked bit for bit); AMX tiles were never checked."""
    from .kernels import cpu_kernels

    ext = cpu_kernels()
    if ext is None or not ext.gemm_available() or ext.gemm_amx_available() or (choice and choice.keeps_dense):
        return False
    widen = ext.bf16_widen_rows() if choice is None else choice.widen_min_rows
    return not ext.gemm_bf16_pairs() or widen <= 1 or widen >= NEVER


TIE = 1.03  # the packed product loses a row count only when it is more than 3% slower


def crossover(timings: list[tuple[int, float, float]]) -> int:
    """The largest row count up to which the packed product was never slower than torch's by
    more than TIE (NEVER: at every row count timed). Rows beyond the first loss go to torch."""
    best = 0
    for rows, packed_ms, torch_ms in sorted(timings):
        if packed_ms > torch_ms * TIE:
            return best
        best = rows
    return NEVER


def widen_from(timings: list[tuple[int, float, float]]) -> int:
    """The smallest row count from which widening was never slower than vdpbf16ps by more
    than TIE at any larger row count timed ((rows, vdpbf16ps ms, widened ms)); NEVER when it
    lost at the largest. The same rule picks where int8 products move to AMX tiles
    ((rows, VNNI ms, AMX ms))."""
    start = NEVER
    for rows, dp_ms, wide_ms in sorted(timings, reverse=True):
        if wide_ms > dp_ms * TIE:
            break
        start = rows
    return start


def _paired_ms(fa, fb, repeats: int) -> tuple[float, float, float]:
    """Times fa and fb alternately, at least `repeats` times each (up to 25 for calls under
    10 ms): (median ms of fa, of fb, and of the per-pair ratios fa / fb, which hold up on a
    busy machine better than two separate medians)."""
    t0 = time.perf_counter()
    fa()
    fb()  # warm-up
    first = (time.perf_counter() - t0) / 2
    repeats = max(repeats, min(25, int(0.01 / max(first, 1e-6))))
    ta, tb = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fa()
        t1 = time.perf_counter()
        fb()
        ta.append(t1 - t0)
        tb.append(time.perf_counter() - t1)
    ratios = sorted(a / b for a, b in zip(ta, tb))
    return (sorted(ta)[len(ta) // 2] * 1000, sorted(tb)[len(tb) // 2] * 1000, ratios[len(ratios) // 2])


def measure(shapes: list[tuple[int, int]], max_rows: int = ROW_GRID[-1], repeats: int = 5,
            budget_s: float = 4.0) -> list[tuple[int, float, float]]:
    """Times packed and torch bf16 products over `shapes` ([(out, in)], one layer's linears)
    at each row count of ROW_GRID up to `max_rows`: (rows, packed ms, torch ms), where torch's
    time is the packed time over the median ratio of paired timings. Stops early once the
    time budget is spent (large models): the rows not timed then follow the last winner."""
    from .kernels import cpu_kernels

    ext = cpu_kernels()
    gen = torch.Generator().manual_seed(0)
    dense = [(torch.randn(n, k, generator=gen) * 0.05).to(torch.bfloat16) for n, k in shapes]
    packed = [ext.pack_weight(w) for w in dense]
    empty = torch.empty(0)
    timings, start = [], time.perf_counter()
    for rows in ROW_GRID:
        if rows > max_rows:
            break
        xs = {k: (torch.randn(rows, k, generator=gen)).to(torch.bfloat16) for _, k in shapes}
        t_packed, _, ratio = _paired_ms(
            lambda: [ext.packed_linear(xs[w.shape[1]], p, w.shape[0], empty, empty, False)
                     for w, p in zip(dense, packed)],
            lambda: [F.linear(xs[w.shape[1]], w) for w in dense], repeats)
        timings.append((rows, round(t_packed, 3), round(t_packed / ratio, 3)))
        if time.perf_counter() - start > budget_s:
            break
    return timings


def _measure_switch(ext, gen: torch.Generator, shapes: list[tuple[int, int]], packed: list, set_rows,
                    repeats: int, budget_s: float) -> list[tuple[int, float, float]]:
    """Times the packed products of `packed` (one (weight, scales) per shape, as pack_weight
    made them) on bf16 rows with a kernel switch off (`set_rows(NEVER)`) and on (`set_rows(1)`),
    at each row count of ROW_GRID: (rows, off ms, on ms), the on time as the off time over the
    median ratio of paired timings. Leaves the switch off."""
    empty = torch.empty(0)

    def run(xs, rows):
        set_rows(rows)
        for (n, k), (p, scales) in zip(shapes, packed):
            ext.packed_linear(xs[k], p, n, scales, empty, False)

    timings, start = [], time.perf_counter()
    try:
        for rows in ROW_GRID:
            xs = {k: torch.randn(rows, k, generator=gen).to(torch.bfloat16) for _, k in shapes}
            t_off, _, ratio = _paired_ms(lambda: run(xs, NEVER), lambda: run(xs, 1), repeats)
            timings.append((rows, round(t_off, 3), round(t_off / ratio, 3)))
            if time.perf_counter() - start > budget_s:
                break
    finally:
        set_rows(NEVER)
    return timings


def measure_widen(shapes: list[tuple[int, int]], repeats: int = 5,
                  budget_s: float = 3.0) -> list[tuple[int, float, float]]:
    """Times the packed bf16 products over `shapes` with vdpbf16ps and widened to float32, at
    each row count of ROW_GRID: (rows, vdpbf16ps ms, widened ms). Leaves widening off."""
    from .kernels import cpu_kernels

    ext, gen = cpu_kernels(), torch.Generator().manual_seed(1)
    packed = [(ext.pack_weight((torch.randn(n, k, generator=gen) * 0.05).to(torch.bfloat16)), torch.empty(0))
              for n, k in shapes]
    return _measure_switch(ext, gen, shapes, packed, ext.set_bf16_widen_rows, repeats, budget_s)


def measure_int8_amx(shapes: list[tuple[int, int]], repeats: int = 5,
                     budget_s: float = 3.0) -> list[tuple[int, float, float]]:
    """Times the packed int8 products (scales per block of 32) over `shapes` on the VNNI / AVX2
    tiles and on AMX tiles, at each row count of ROW_GRID: (rows, VNNI ms, AMX ms). Leaves AMX
    off for int8."""
    from .kernels import cpu_kernels

    ext, gen = cpu_kernels(), torch.Generator().manual_seed(2)
    packed = [(ext.pack_weight(torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen)),
               torch.rand(-(-n // 16), -(-k // 32), 16, generator=gen) * 1e-3) for n, k in shapes]
    return _measure_switch(ext, gen, shapes, packed, ext.set_int8_amx_rows, repeats, budget_s)


def plausible(timings: list[tuple[int, float, float]]) -> bool:
    """Whether timings measured the products rather than the machine's load: on a quiet
    machine the largest row count timed (at least 64) takes several times as long as one row
    on both paths; when other processes hold the cores, every call takes about one
    scheduler time slice whatever its size."""
    if len(timings) < 2 or timings[-1][0] < 64:
        return False
    (_, p1, t1), (_, pn, tn) = timings[0], timings[-1]
    return pn >= 4 * p1 and tn >= 4 * t1


def _fallback(ext) -> int:
    """The rule that held before the crossover was measured: the packed product at every
    row count on AMX tiles, up to PACKED_MAX_ROWS rows otherwise."""
    return NEVER if ext.gemm_amx_available() else PACKED_MAX_ROWS


def _cache_file():
    from ..config import cache_dir
    from .kernels import _build_key

    return cache_dir() / "kernels" / _build_key() / "paths.json"


def _key(prefix: str, shapes: list[tuple[int, int]]) -> str:
    return f"{prefix}:threads={torch.get_num_threads()}:" + ",".join(f"{n}x{k}" for n, k in sorted(set(shapes)))


def _load_cache() -> dict:
    try:
        return json.loads(_cache_file().read_text())
    except (OSError, ValueError):
        return {}


def _store_cache(key: str, entry: dict) -> None:
    """Adds one entry to the cached choices (written whole, by rename: never seen half written)."""
    path = _cache_file()
    stored = _load_cache()
    stored[key] = entry
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(stored, indent=1))
        tmp.replace(path)
    except OSError as e:
        log.warning("could not cache the kernel path choice in %s: %s", path, e)


def _env_rows(name: str) -> int | None:
    env = os.environ.get(name)
    if env is None:
        return None
    try:
        value = int(env)
    except ValueError:
        raise ValueError(f"{name}: expected a number of rows, got {env!r}") from None
    if value < 0:
        raise ValueError(f"{name}: expected a number of rows >= 0, got {env!r}")
    return value


def _widen_applies(ext) -> bool:  # only where bf16 weights are pair-packed and AMX does not take them
    return bool(ext.gemm_bf16_pairs()) and not ext.gemm_amx_available()


def _use(ext, choice: PathChoice) -> PathChoice:
    if ext is not None and ext.gemm_available():
        ext.set_bf16_widen_rows(choice.widen_min_rows)
    return choice


def bf16_paths(shapes: list[tuple[int, int]] | None = None) -> PathChoice:
    """The kernel choices for these weight shapes on this machine and thread count, and
    hands the widening choice to the kernels: from TUILI_PACKED_MAX_ROWS /
    TUILI_BF16_WIDEN_ROWS, else from the cache, else measured now (a few seconds for a small
    model) and cached. Without shapes (or without the kernels), the rule that held before
    measurement existed: packed up to 8 rows, no widening."""
    from .kernels import cpu_kernels

    env_rows, env_widen = _env_rows("TUILI_PACKED_MAX_ROWS"), _env_rows("TUILI_BF16_WIDEN_ROWS")
    ext = cpu_kernels()
    if env_rows is not None or env_widen is not None:
        return _use(ext, PathChoice(PACKED_MAX_ROWS if env_rows is None else min(env_rows, NEVER), "env", [],
                                    NEVER if not env_widen else min(env_widen, NEVER)))
    if not shapes or ext is None or not ext.gemm_available():
        return _use(ext, PathChoice(PACKED_MAX_ROWS, "default", []))
    key = _key(f"v{_VERSION}", shapes)
    if key in _choices:
        return _use(ext, _choices[key])
    stored = _load_cache()
    if key in stored:
        entry = stored[key]
        choice = PathChoice(entry["packed_max_rows"], "cached", [tuple(t) for t in entry["timings"]],
                            entry.get("widen_min_rows", NEVER), [tuple(t) for t in entry.get("widen_timings", [])])
    else:
        widen, widen_timings = NEVER, []
        if _widen_applies(ext):
            log.info("timing the packed bf16 products with vdpbf16ps and widened to float32 at %s rows "
                     "(once per machine)...", ",".join(map(str, ROW_GRID)))
            widen_timings = measure_widen(sorted(set(shapes)))
            if plausible(widen_timings):
                widen = widen_from(widen_timings)
        ext.set_bf16_widen_rows(widen)
        log.info("timing the packed and torch bf16 products at %s rows (once per machine)...",
                 ",".join(map(str, ROW_GRID)))
        timings = measure(sorted(set(shapes)))
        if not plausible(timings) or (widen_timings and not plausible(widen_timings)):
            choice = PathChoice(_fallback(ext), "default: the machine was too busy to measure", timings)
            log.warning("kernel paths: timings did not grow with the row count (%s); the machine is "
                        "too busy to measure, so the fixed rule holds until the next start", timings[:4])
            _choices[key] = choice
            return _use(ext, choice)
        choice = PathChoice(crossover(timings), "measured", timings, widen, widen_timings)
        _store_cache(key, {k: v for k, v in asdict(choice).items() if k != "source"})
    _choices[key] = choice
    return _use(ext, choice)


# int8 products from this many rows run on AMX tiles when nothing was measured (the
# crossover against the VNNI tiles on the AMX Xeon, docs/BENCHMARKS.md, "int8 on AMX tiles").
INT8_AMX_ROWS = 16
_INT8_VERSION = 1


@dataclass
class Int8Choice:
    """int8 products (per-32 block scales) of at least `amx_min_rows` rows run on AMX tiles,
    fewer on the VNNI / AVX2 tiles (NEVER: AMX never). `timings` holds (rows, VNNI ms, AMX
    ms) as measured."""

    amx_min_rows: int
    source: str  # "measured", "cached", "env", "default" or "no AMX"
    timings: list[tuple[int, float, float]] = field(default_factory=list)

    def path_for(self, rows: int) -> str:
        return "packed (AMX)" if rows >= self.amx_min_rows else "packed"

    def describe(self) -> str:
        if self.amx_min_rows >= NEVER:
            return f"int8 products: VNNI / AVX2 tiles at every row count ({self.source})"
        return f"int8 products: AMX tiles from {self.amx_min_rows} rows, VNNI tiles below ({self.source})"


def int8_paths(shapes: list[tuple[int, int]] | None = None) -> Int8Choice:
    """Where the CPU has AMX: from which row count int8 products take the AMX tiles, from
    TUILI_INT8_AMX_ROWS (0: never), else the cache, else measured now against the VNNI tiles
    on these weight shapes (a few seconds) and cached beside the kernels; handed to the
    kernels (`set_int8_amx_rows`). Without shapes: INT8_AMX_ROWS."""
    from .kernels import cpu_kernels

    ext = cpu_kernels()
    if ext is None or not ext.gemm_available() or not ext.gemm_amx_int8_available():
        return Int8Choice(NEVER, "no AMX")
    env = _env_rows("TUILI_INT8_AMX_ROWS")
    key = _key(f"int8-v{_INT8_VERSION}", shapes or [])
    if env is not None:
        choice = Int8Choice(NEVER if not env else min(env, NEVER), "env")
    elif not shapes:
        choice = Int8Choice(INT8_AMX_ROWS, "default")
    elif key in _choices:
        choice = _choices[key]
    elif key in (stored := _load_cache()):
        choice = Int8Choice(stored[key]["amx_min_rows"], "cached", [tuple(t) for t in stored[key]["timings"]])
    else:
        log.info("timing the int8 products on VNNI and AMX tiles at %s rows (once per machine)...",
                 ",".join(map(str, ROW_GRID)))
        timings = measure_int8_amx(sorted(set(shapes)))
        if plausible(timings):
            choice = Int8Choice(widen_from(timings), "measured", timings)
            _store_cache(key, {"amx_min_rows": choice.amx_min_rows, "timings": timings})
        else:
            choice = Int8Choice(INT8_AMX_ROWS, "default: the machine was too busy to measure", timings)
            log.warning("kernel paths: int8 timings did not grow with the row count (%s); the fixed rule "
                        "holds until the next start", timings[:4])
    if shapes and env is None:
        _choices[key] = choice
    ext.set_int8_amx_rows(choice.amx_min_rows)
    return choice
