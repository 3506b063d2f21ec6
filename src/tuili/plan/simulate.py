"""tuili's scheduler replayed on the step model: continuous batching with chunked prefill.

Each step has a token budget. Decoding sequences take one token each first; prefills in
progress then take the next chunk that fits, in admission order; waiting requests are
admitted first come, first served while budget, `max_num_seqs` and the KV pool allow
(a request reserves its prompt plus output in the pool, so nothing is preempted). A
request's first token comes at the end of the step that computes its last prompt token;
after that it gets one token per step. The step's time comes from `StepModel`.

Two ways requests arrive, as `tuili bench serve` sends them: a closed loop of C clients
(each sends its next request when the previous one ends; all C start at once, which
makes the waves that set TTFT at high concurrency) or Poisson arrivals at a rate.
Bookkeeping is per event, not per sequence per step, so a run of thousands of steps with
hundreds of sequences takes milliseconds.
"""
from __future__ import annotations

import heapq
import random
from collections import defaultdict, deque
from dataclasses import dataclass, field

from .roofline import StepModel


@dataclass
class Request:
    prompt: int
    output: int
    sent: float = 0.0
    arrival: float = 0.0
    first: float = 0.0
    end: float = 0.0


@dataclass
class SimResult:
    requests: list[Request]
    duration: float
    steps: int
    max_running: int
    ttft: list[float] = field(default_factory=list)
    tpot: list[float] = field(default_factory=list)

    @property
    def output_tokens(self) -> int:
        return sum(r.output for r in self.requests)

    @property
    def output_tok_s(self) -> float:
        return self.output_tokens / self.duration if self.duration > 0 else 0.0

    @property
    def requests_per_s(self) -> float:
        return len(self.requests) / self.duration if self.duration > 0 else 0.0

    def percentile(self, name: str, p: float) -> float:
        values = sorted(getattr(self, name))
        if not values:
            return 0.0
        k = (len(values) - 1) * p / 100
        lo = int(k)
        hi = min(lo + 1, len(values) - 1)
        return values[lo] + (values[hi] - values[lo]) * (k - lo)


def draw_lengths(n: int, prompt: tuple[int, int], output: tuple[int, int], seed: int = 0) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    return [(rng.randint(*prompt), rng.randint(*output)) for _ in range(n)]


def simulate(model: StepModel, lengths: list[tuple[int, int]], *, concurrency: int | None = None,
             rate: float | None = None, max_num_seqs: int = 256, kv_tokens: float = float("inf"),
             seed: int = 0) -> SimResult:
    """Run every request through the scheduler; closed loop at `concurrency`, or Poisson at `rate`."""
    budget = model.hw.step_token_budget
    overhead = model.e.get("request_overhead_s", 0.0)
    reqs = [Request(p, o) for p, o in lengths]
    arrivals: list[tuple[float, int]] = []  # (time, index)
    if rate is not None:
        rng, t = random.Random(seed), 0.0
        for i, r in enumerate(reqs):
            r.sent = t
            arrivals.append((t + overhead / 2, i))
            t += rng.expovariate(rate)
    else:
        for i in range(min(concurrency or 1, len(reqs))):
            arrivals.append((overhead / 2, i))
    heapq.heapify(arrivals)
    next_closed = min(concurrency or 1, len(reqs))

    waiting: deque[int] = deque()
    prefilling: deque[list[int]] = deque()  # [index, tokens computed]
    finish_at: dict[int, list[int]] = defaultdict(list)
    dec_count, dec_ctx, reserved, running, max_running = 0, 0.0, 0, 0, 0
    now, step, done = 0.0, 0, 0
    while done < len(reqs):
        while arrivals and arrivals[0][0] <= now:
            _, i = heapq.heappop(arrivals)
            reqs[i].arrival = now if reqs[i].arrival == 0.0 else reqs[i].arrival
            waiting.append(i)
        if not running and not waiting:
            if not arrivals:
                break
            now = max(now, arrivals[0][0])
            continue
        left = budget - dec_count
        chunks: list[tuple[int, int]] = []
        completed: list[int] = []
        for entry in prefilling:
            if left <= 0:
                break
            i, computed = entry
            n = min(reqs[i].prompt - computed, left)
            chunks.append((n, computed))
            entry[1] += n
            left -= n
            if entry[1] == reqs[i].prompt:
                completed.append(i)
        while waiting and left > 0 and running < max_num_seqs:
            i = waiting[0]
            need = reqs[i].prompt + reqs[i].output
            if running and reserved + need > kv_tokens:
                break
            waiting.popleft()
            reserved += need
            running += 1
            n = min(reqs[i].prompt, left)
            chunks.append((n, 0))
            left -= n
            if n == reqs[i].prompt:
                completed.append(i)
            else:
                prefilling.append([i, n])
        max_running = max(max_running, running)
        now += model.step_time(dec_count, dec_ctx, chunks, dec_count + len(completed))
        dec_ctx += dec_count
        for i in finish_at.pop(step, ()):
            r = reqs[i]
            dec_count -= 1
            dec_ctx -= r.prompt + r.output
            done += 1
            running -= 1
            reserved -= r.prompt + r.output
            r.end = now + overhead / 2
            if rate is None and next_closed < len(reqs):
                heapq.heappush(arrivals, (r.end + overhead / 2, next_closed))
                reqs[next_closed].sent = r.end
                next_closed += 1
        while prefilling and prefilling[0][1] == reqs[prefilling[0][0]].prompt:
            prefilling.popleft()
        for i in completed:
            r = reqs[i]
            r.first = now + overhead / 2
            if r.output <= 1:
                r.end = r.first
                done += 1
                running -= 1
                reserved -= r.prompt + r.output
                if rate is None and next_closed < len(reqs):
                    heapq.heappush(arrivals, (r.end + overhead / 2, next_closed))
                    reqs[next_closed].sent = r.end
                    next_closed += 1
            else:
                dec_count += 1
                dec_ctx += r.prompt + 1
                finish_at[step + r.output - 1].append(i)
        step += 1
    start = min(r.sent for r in reqs)
    end = max(r.end for r in reqs)
    res = SimResult(reqs, end - start, step, max_running)
    res.ttft = [r.first - r.sent for r in reqs]
    res.tpot = [(r.end - r.first) / (r.output - 1) for r in reqs if r.output > 1]
    return res
