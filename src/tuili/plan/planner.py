"""What the planner answers for one model on one kind of hardware.

`plan_one` sizes the memory (weights, KV per token and for the batch, activations, the
largest batch the KV pool holds, and how many sequences' KV the host and disk tiers keep
for prefix reuse), predicts the workload with the scheduler replay of simulate.py (closed
loop at a concurrency, as `tuili bench serve` drives a server), and, for a traffic target
(requests/s or tokens/day), finds the highest request rate one replica sustains within
the SLOs and the replicas and accelerators that takes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from .hardware import Hardware
from .roofline import StepModel
from .shapes import ModelShape
from .simulate import SimResult, draw_lengths, simulate

MAX_NUM_SEQS = 256  # tuili's EngineConfig.max_num_seqs default


@dataclass
class Workload:
    prompt: tuple[int, int] = (100, 300)
    output: tuple[int, int] = (128, 128)
    concurrency: int | None = None
    requests_per_s: float | None = None  # the whole traffic
    slo_ttft: float | None = None
    slo_tpot: float | None = None
    slo_percentile: float = 50
    num_requests: int | None = None
    seed: int = 0

    @property
    def mean_prompt(self) -> float:
        return sum(self.prompt) / 2

    @property
    def mean_output(self) -> float:
        return sum(self.output) / 2


@dataclass
class Options:
    quantization: str = "none"
    kv_cache_dtype: str = "auto"
    count: int | None = None  # accelerators per replica; None: the fewest that fit
    kv_cache_memory: int | None = None
    kv_host_memory: int = 0
    kv_disk_size: int = 0
    price_per_hour: float | None = None  # per accelerator


@dataclass
class Plan:
    hardware: str
    hardware_name: str
    count: int
    memory: dict[str, Any]
    max_batch: int
    concurrency: int
    ttft_s_p50: float
    ttft_s_p99: float
    tpot_s_p50: float
    tpot_s_p99: float
    output_tok_s: float
    bound: dict[str, str]
    replicas: int = 1
    accelerators: int = 1
    replica_requests_per_s: float | None = None
    meets_slo: bool | None = None
    cost_per_million_output_tokens: float | None = None
    calibrated: bool = False
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


def memory_breakdown(shape: ModelShape, hw: Hardware, opts: Options, count: int, workload: Workload) -> dict[str, Any]:
    weights = shape.weight_bytes(opts.quantization, hw.int4_bytes_per_param)
    kv_token = shape.kv_bytes_per_token(opts.kv_cache_dtype)
    budget = hw.step_token_budget
    # Per step: the residual stream and attention/MLP intermediates of the budget's rows
    # (16-bit), and float32 logits of the rows that sample.
    act = budget * (4 * shape.hidden_size + 2 * shape.intermediate_size * max(1, shape.experts_per_token)) * 2
    act += min(budget, MAX_NUM_SEQS) * shape.vocab_size * 4
    if opts.kv_cache_memory is not None:
        pool = opts.kv_cache_memory
    elif hw.kv_cache_memory is not None:
        pool = hw.kv_cache_memory
    else:
        pool = hw.memory_bytes * count * hw.memory_utilization - weights - act * count
    seq_tokens = workload.mean_prompt + workload.mean_output
    conc = workload.concurrency or 1
    fits = pool > 0 and weights + act <= hw.memory_bytes * count * (1.0 if hw.kv_cache_memory else hw.memory_utilization)
    return {
        "weights_bytes": int(weights), "weights_bytes_per_accelerator": int(weights / count),
        "kv_bytes_per_token": kv_token, "kv_bytes_per_sequence": int(kv_token * seq_tokens),
        "kv_bytes_for_batch": int(kv_token * seq_tokens * conc), "activations_bytes": int(act),
        "kv_pool_bytes": int(max(pool, 0)), "kv_pool_tokens": int(max(pool, 0) // kv_token),
        "memory_bytes": int(hw.memory_bytes * count), "fits": fits,
        "tier_sequences": {"device": int(max(pool, 0) // (kv_token * seq_tokens)),
                           "host": int(opts.kv_host_memory // (kv_token * seq_tokens)),
                           "disk": int(opts.kv_disk_size // (kv_token * seq_tokens))},
    }


def fewest_accelerators(shape: ModelShape, hw: Hardware, opts: Options, workload: Workload) -> int | None:
    """The smallest power of two (up to the hardware's max) whose memory holds the weights
    and KV for the workload's concurrency (16 sequences when none is given)."""
    want = max(workload.concurrency or 16, 1)
    n = 1
    while n <= hw.max_count:
        mem = memory_breakdown(shape, hw, opts, n, workload)
        if mem["fits"] and mem["tier_sequences"]["device"] >= min(want, 16):
            return n
        n *= 2
    return None


def run_closed(model: StepModel, workload: Workload, concurrency: int, max_batch: int, kv_tokens: float,
               num_requests: int | None = None) -> SimResult:
    n = num_requests or workload.num_requests or max(16, 4 * concurrency)
    lengths = draw_lengths(n, workload.prompt, workload.output, workload.seed)
    return simulate(model, lengths, concurrency=concurrency, max_num_seqs=min(MAX_NUM_SEQS, max(1, max_batch)),
                    kv_tokens=kv_tokens)


def phase_bounds(model: StepModel, workload: Workload, batch: int) -> dict[str, str]:
    ctx = workload.mean_prompt + workload.mean_output / 2
    budget = model.hw.step_token_budget
    return {"prefill": model.bound(0, 0.0, [(budget, 0)], 1), "decode": model.bound(batch, batch * ctx, [], batch)}


def meets(sim: SimResult, workload: Workload) -> bool:
    p = workload.slo_percentile
    ok = True
    if workload.slo_ttft is not None:
        ok &= sim.percentile("ttft", p) <= workload.slo_ttft
    if workload.slo_tpot is not None:
        ok &= sim.percentile("tpot", p) <= workload.slo_tpot
    return ok


def replica_rate(model: StepModel, workload: Workload, max_batch: int, kv_tokens: float) -> tuple[float, SimResult | None]:
    """Highest request rate (req/s) one replica serves within the SLOs, by bisection over
    Poisson-arrival replays; its saturation rate (closed loop at the largest batch) when no
    SLO is given; 0 when even a trickle misses them."""
    sat = run_closed(model, workload, min(max_batch, MAX_NUM_SEQS), max_batch, kv_tokens,
                     num_requests=3 * min(max_batch, MAX_NUM_SEQS))
    if workload.slo_ttft is None and workload.slo_tpot is None:
        return sat.requests_per_s, sat
    n = 120
    lengths = draw_lengths(n, workload.prompt, workload.output, workload.seed)
    seqs = min(MAX_NUM_SEQS, max(1, max_batch))

    def trial(rate: float) -> SimResult:
        return simulate(model, lengths, rate=rate, max_num_seqs=seqs, kv_tokens=kv_tokens, seed=workload.seed)

    lo, hi = 0.0, sat.requests_per_s
    best = None
    low = trial(hi / 100)
    if not meets(low, workload):
        return 0.0, low
    lo, best = hi / 100, low
    for _ in range(6):
        mid = (lo + hi) / 2
        sim = trial(mid)
        if meets(sim, workload):
            lo, best = mid, sim
        else:
            hi = mid
    return lo, best


def plan_one(shape: ModelShape, hw: Hardware, opts: Options, workload: Workload) -> Plan:
    """The plan for one kind of hardware. For a traffic target without --count, the fewest
    accelerators that fit and twice that are both tried when the KV pool limits the batch,
    and the one needing fewer accelerators in all wins."""
    fewest = opts.count or fewest_accelerators(shape, hw, opts, workload)
    plan = _plan_at(shape, hw, opts, workload, fewest)
    if (opts.count is None and fewest and workload.requests_per_s is not None and 2 * fewest <= hw.max_count
            and plan.max_batch < MAX_NUM_SEQS):
        wider = _plan_at(shape, hw, opts, workload, 2 * fewest)
        if wider.replicas and (not plan.replicas or wider.accelerators < plan.accelerators):
            return wider
    return plan


def _plan_at(shape: ModelShape, hw: Hardware, opts: Options, workload: Workload, count: int | None) -> Plan:
    notes: list[str] = []
    if count is None:
        count = hw.max_count
        notes.append(f"weights and KV do not fit in {hw.max_count} x {hw.name}")
    model = StepModel(shape, hw, opts.quantization, opts.kv_cache_dtype, count)
    mem = memory_breakdown(shape, hw, opts, count, workload)
    if not mem["fits"]:
        notes.append("the weights do not fit in memory")
    max_batch = max(mem["tier_sequences"]["device"], 0)
    if max_batch < 1:
        max_batch = 1
        notes.append("the KV pool holds less than one sequence of the workload")
    kv_tokens = float(mem["kv_pool_tokens"]) or 1.0
    conc = workload.concurrency or min(max_batch, MAX_NUM_SEQS)
    if not mem["fits"]:  # nothing to time: report the memory and stop
        return Plan(hardware=hw.key, hardware_name=hw.name, count=count, memory=mem, max_batch=0, concurrency=0,
                    ttft_s_p50=0.0, ttft_s_p99=0.0, tpot_s_p50=0.0, tpot_s_p99=0.0, output_tok_s=0.0,
                    bound=phase_bounds(model, workload, 1), replicas=0, accelerators=0, meets_slo=False,
                    calibrated=hw.calibrated, notes=notes)
    if workload.concurrency and workload.concurrency > max_batch:
        notes.append(f"concurrency {workload.concurrency} exceeds the {max_batch} sequences the KV pool holds: the rest wait")
    sim = run_closed(model, workload, conc, max_batch, kv_tokens)
    plan = Plan(hardware=hw.key, hardware_name=hw.name, count=count, memory=mem, max_batch=max_batch,
                concurrency=conc, ttft_s_p50=sim.percentile("ttft", 50), ttft_s_p99=sim.percentile("ttft", 99),
                tpot_s_p50=sim.percentile("tpot", 50), tpot_s_p99=sim.percentile("tpot", 99),
                output_tok_s=sim.output_tok_s, bound=phase_bounds(model, workload, conc), accelerators=count,
                calibrated=hw.calibrated, notes=notes)
    if workload.slo_ttft is not None or workload.slo_tpot is not None:
        plan.meets_slo = meets(sim, workload)
    tok_s = plan.output_tok_s
    if workload.requests_per_s is not None:
        rate, rsim = replica_rate(model, workload, max_batch, kv_tokens)
        plan.replica_requests_per_s = rate
        if rate <= 0:
            plan.replicas = 0
            plan.accelerators = 0
            plan.meets_slo = False
            notes.append("the SLOs are missed even at a trickle of requests")
        else:
            plan.replicas = max(1, math.ceil(workload.requests_per_s / rate - 1e-9))
            plan.accelerators = plan.replicas * count
            plan.meets_slo = True
            tok_s = workload.requests_per_s * workload.mean_output / plan.replicas
            if rsim is not None:
                plan.ttft_s_p50, plan.ttft_s_p99 = rsim.percentile("ttft", 50), rsim.percentile("ttft", 99)
                plan.tpot_s_p50, plan.tpot_s_p99 = rsim.percentile("tpot", 50), rsim.percentile("tpot", 99)
                plan.output_tok_s = rsim.output_tok_s
                plan.concurrency = rsim.max_running
                plan.bound = phase_bounds(model, workload, max(1, plan.concurrency))
    if opts.price_per_hour is not None and tok_s > 0 and plan.accelerators:
        plan.cost_per_million_output_tokens = opts.price_per_hour * count / 3600 / tok_s * 1e6
    return plan


def sweep(shape: ModelShape, hw: Hardware, opts: Options, workload: Workload, concurrencies: list[int]) -> list[Plan]:
    """Plans at several concurrencies (for --plot)."""
    out = []
    for c in concurrencies:
        w = Workload(**{**workload.__dict__, "concurrency": c, "requests_per_s": None})
        out.append(plan_one(shape, hw, opts, w))
    return out
