"""Prometheus metrics. Counters and histograms are fed by the routes; gauges are read from
each engine's stats snapshot when /metrics is scraped, so the engine loop never waits."""
from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest

from ..engine import TIER_MOVES, TIERS
from .models import ModelRegistry

if TYPE_CHECKING:
    from .router import Decision

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)
TOKEN_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        ProcessCollector(registry=r)  # process_resident_memory_bytes and friends, for soak runs
        self.requests = Counter("tuili_requests", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("tuili_prompt_tokens", "Prompt tokens processed", ["model"], registry=r)
        self.generation_tokens = Counter("tuili_generation_tokens", "Tokens generated", ["model"], registry=r)
        self.ttft = Histogram("tuili_time_to_first_token_seconds", "Time to first token", ["model"],
                              buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("tuili_time_per_output_token_seconds", "Time per output token after the first",
                              ["model"], buckets=TOKEN_BUCKETS, registry=r)
        self.e2e = Histogram("tuili_e2e_request_latency_seconds", "End-to-end request latency", ["model"],
                             buckets=LATENCY_BUCKETS, registry=r)
        self.finished = Counter("tuili_request_finished", "Finished requests by finish reason",
                                ["model", "finish_reason"], registry=r)
        # reason: explicit (the request named a model), classifier_fast, classifier_strong,
        # overflow (the classifier chose strong, but its estimated wait was too long).
        self.route_decisions = Counter("tuili_router_decisions", "Model choices by reason and model answering",
                                       ["reason", "model"], registry=r)
        self.route_seconds = Histogram("tuili_router_decision_seconds", "Time the router took to decide",
                                       buckets=(1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 5e-3, 0.025, 0.1,
                                                0.25, 1.0), registry=r)
        # The router's probe (the fast model's prefill): used, or fallen back to surface features.
        self.route_probes = Counter("tuili_router_probe", "Router decisions by the fast model's probe",
                                    ["outcome"], registry=r)
        g = lambda name, doc: Gauge(name, doc, ["model"], registry=r)  # noqa: E731
        self.running = g("tuili_requests_running", "Sequences running in the engine")
        self.waiting = g("tuili_requests_waiting", "Sequences waiting for admission")
        self.kv_used = g("tuili_kv_blocks_used", "KV cache blocks in use")
        self.kv_free = g("tuili_kv_blocks_free", "KV cache blocks free (including reusable cached ones)")
        self.preemptions = g("tuili_preemptions", "Sequences preempted since start")
        self.prefix_hits = g("tuili_prefix_cache_hit_tokens", "Prompt tokens served from the prefix cache")
        self.prefix_queries = g("tuili_prefix_cache_query_tokens", "Prompt tokens looked up in the prefix cache")
        self.prefix_hit_rate = g("tuili_prefix_cache_hit_rate", "Share of looked-up prompt tokens served from cache")
        self.kv = KVTierMetrics(r)
        # Speculative decoding: counters fed from the engines' running totals at each scrape.
        self.spec_drafted = Counter("tuili_spec_draft_tokens", "Draft tokens proposed by speculative decoding",
                                    ["model"], registry=r)
        self.spec_accepted = Counter("tuili_spec_accepted_tokens", "Draft tokens accepted by verification",
                                     ["model"], registry=r)
        self._spec_seen: dict[tuple[str, str], int] = {}
        self.constrained = Counter("tuili_constrained_requests", "Requests with an output constraint, by kind "
                                   "(json, json_object, regex, choice, grammar, tools: forced calls; "
                                   "tools_auto: calls parsed from free text; logit_bias)", ["model", "kind"],
                                   registry=r)
        self.mask_seconds = g("tuili_guided_mask_seconds", "Seconds the sampler spent on grammar masks and "
                              "matchers since start")
        self.mask_steps = g("tuili_guided_mask_steps", "Engine steps that masked constrained rows since start")
        self.mask_per_step = g("tuili_guided_mask_seconds_per_step", "Mean grammar mask time per masked step")
        self.grammar_compiles = g("tuili_guided_grammar_compiles", "Grammars compiled (cache misses) since start")

    def observe_request(self, model: str, prompt_tokens: int, completion_tokens: int, ttft: float | None,
                        e2e: float, finish_reasons: list[str]) -> None:
        self.prompt_tokens.labels(model).inc(prompt_tokens)
        self.generation_tokens.labels(model).inc(completion_tokens)
        self.e2e.labels(model).observe(e2e)
        if ttft is not None:
            self.ttft.labels(model).observe(ttft)
            if completion_tokens > 1:
                self.tpot.labels(model).observe((e2e - ttft) / (completion_tokens - 1))
        for reason in finish_reasons:
            self.finished.labels(model, reason or "unknown").inc()

    def observe_constrained(self, model: str, params, tools: bool) -> None:
        """Count a constrained request once (`params`: its SamplingParams; `tools`: it parses calls)."""
        g = params.guided
        if g is not None:
            self.constrained.labels(model, "tools" if g.field == "tools" else g.kind.replace("lark", "grammar")).inc()
        elif tools:
            self.constrained.labels(model, "tools_auto").inc()
        if params.logit_bias:
            self.constrained.labels(model, "logit_bias").inc()

    def observe_probe(self, outcome: str) -> None:
        self.route_probes.labels(outcome).inc()

    def observe_route(self, decision: "Decision") -> None:
        self.route_decisions.labels(decision.reason, decision.model).inc()
        if decision.reason != "explicit":
            self.route_seconds.observe(decision.seconds)

    def render(self, models: ModelRegistry) -> bytes:
        for m in models.all():
            s = m.engine.stats()
            self.running.labels(m.name).set(s["running"])
            self.waiting.labels(m.name).set(s["waiting"])
            self.kv_used.labels(m.name).set(s["kv_blocks_used"])
            self.kv_free.labels(m.name).set(s["kv_blocks_free"])
            self.preemptions.labels(m.name).set(s["preemptions"])
            self.prefix_hits.labels(m.name).set(s["prefix_hit_tokens"])
            self.prefix_queries.labels(m.name).set(s["prefix_query_tokens"])
            self.prefix_hit_rate.labels(m.name).set(s["prefix_hit_tokens"] / max(s["prefix_query_tokens"], 1))
            self.kv.set(m.name, s)
            self._count(self.spec_drafted, m.name, "spec_draft_tokens", s)
            self._count(self.spec_accepted, m.name, "spec_accepted_tokens", s)
            steps = s.get("guided_mask_steps", 0)
            self.mask_seconds.labels(m.name).set(s.get("guided_mask_seconds", 0.0))
            self.mask_steps.labels(m.name).set(steps)
            self.mask_per_step.labels(m.name).set(s.get("guided_mask_seconds", 0.0) / max(steps, 1))
            self.grammar_compiles.labels(m.name).set(s.get("guided_compiles", 0))
        return generate_latest(self.registry)

    def _count(self, counter: Counter, model: str, key: str, s: dict[str, int]) -> None:
        """Advance `counter` by what the engine's total for `key` gained since the last scrape."""
        total = s.get(key, 0)
        seen = self._spec_seen.get((model, key), 0)
        counter.labels(model).inc(max(total - seen, 0))
        self._spec_seen[(model, key)] = total


class KVTierMetrics:
    """Gauges of the KV tiers (device, host, disk), copied from Engine.stats() keys."""

    TIERS = TIERS
    MOVES = TIER_MOVES

    def __init__(self, r: CollectorRegistry) -> None:
        self.hits = Gauge("tuili_prefix_cache_hit_tokens_by_tier", "Prompt tokens served from each KV tier",
                          ["model", "tier"], registry=r)
        self.moved = Gauge("tuili_kv_blocks_moved", "KV blocks copied between tiers", ["model", "source", "destination"],
                           registry=r)
        self.evictions = Gauge("tuili_kv_evictions", "KV blocks evicted from each tier", ["model", "tier"], registry=r)
        self.blocks = Gauge("tuili_kv_tier_blocks", "KV blocks held by the host and disk tiers", ["model", "tier"],
                            registry=r)
        self.bytes = Gauge("tuili_kv_tier_bytes", "Bytes held by the host and disk tiers", ["model", "tier"], registry=r)
        self.disk_errors = Gauge("tuili_kv_disk_errors", "Corrupt, truncated or foreign disk blocks dropped", ["model"],
                                 registry=r)

    def set(self, model: str, s: dict[str, int]) -> None:
        for t in self.TIERS:
            self.hits.labels(model, t).set(s.get(f"prefix_hit_tokens_{t}", 0))
            self.evictions.labels(model, t).set(s.get(f"kv_evictions_{t}", 0))
        for a, b in self.MOVES:
            self.moved.labels(model, a, b).set(s.get(f"kv_blocks_moved_{a}_to_{b}", 0))
        for t in TIERS[1:]:
            self.blocks.labels(model, t).set(s.get(f"kv_{t}_blocks", 0))
            self.bytes.labels(model, t).set(s.get(f"kv_{t}_bytes", 0))
        self.disk_errors.labels(model).set(s.get("kv_disk_errors", 0))
