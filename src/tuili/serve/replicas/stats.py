"""Per-replica figures: fetched from each replica on demand, shown per replica and summed.

Decisions:
- The replicas are the ones the routers in this process know (`routers.routers_for`);
  each is asked for its stats through its Ray actor's `record_routing_stats` (the method
  Ray Serve itself polls), all at once, with a deadline. This happens when /metrics,
  /v1/stats or /health is asked (at most every `MIN_GAP_S`), not in the background, so an
  idle server does no work and a scrape sees figures a few milliseconds old.
- `/health` is 200 while at least one replica answers; a replica that does not answer is
  left out of the sums until it does (Ray Serve restarts it).
- Prometheus: the summed gauges keep their names (`tuili_kv_blocks_used{model}` ...), and
  `tuili_replica_*{model,replica}` give the same figures per replica, with the routing
  decisions by reason (`tuili_replica_route_decisions_total{model,reason,replica}`) and the
  calls, tokens and time to first token the HTTP side saw from each replica.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Iterable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .remote import RemoteEngine
from .routing import routers_for

log = logging.getLogger("tuili.replicas")

MIN_GAP_S = 0.2
DEADLINE_S = 2.0
SERVE_NAMESPACE = "serve"


class ReplicaStats:
    def __init__(self, engines: list[RemoteEngine]):
        self.engines = engines
        self._actors: dict[str, Any] = {}
        self._last = 0.0
        self._lock = asyncio.Lock()

    async def refresh(self, force: bool = False) -> None:
        async with self._lock:
            if not force and time.monotonic() - self._last < MIN_GAP_S:
                return
            await asyncio.gather(*(self._refresh(e) for e in self.engines))
            self._last = time.monotonic()

    async def _refresh(self, engine: RemoteEngine) -> None:
        ids: set[str] = set()
        for router in routers_for(engine.deployment):
            ids.update(r.to_full_id_str() for r in router.replica_ids())
        if not ids:
            return  # no router yet (no call made): keep the state as it is
        results = await asyncio.gather(*(self._ask(rid) for rid in sorted(ids)))
        stats = {rid: s for rid, s in zip(sorted(ids), results) if s is not None}
        engine.set_replica_stats(stats)
        engine.set_alive(any(s.get("alive") for s in stats.values()))

    async def _ask(self, rid: str) -> dict[str, Any] | None:
        import ray

        try:
            actor = self._actors.get(rid)
            if actor is None:
                actor = self._actors[rid] = ray.get_actor(rid, namespace=SERVE_NAMESPACE)
            return await asyncio.wait_for(actor.record_routing_stats.remote(), DEADLINE_S)
        except Exception as e:  # noqa: BLE001 - a replica that is gone or busy is left out
            self._actors.pop(rid, None)
            log.debug("replica %s did not answer: %s", rid, e)
            return None


def replica_rows(engine: RemoteEngine) -> list[dict[str, Any]]:
    """One row per replica for /v1/stats: its engine figures, what this side saw, how it was chosen."""
    decisions: dict[str, dict[str, int]] = {}
    in_flight: dict[str, int] = {}
    for router in routers_for(engine.deployment):
        snap = router.snapshot()
        for (reason, rid), n in snap["decisions"].items():
            decisions.setdefault(rid, {})
            decisions[rid][reason] = decisions[rid].get(reason, 0) + n
        for rid, n in snap["in_flight"].items():
            in_flight[rid] = in_flight.get(rid, 0) + n
    rows = []
    for rid, s in sorted(engine.replica_stats.items()):
        f = engine.replica_figures.get(rid, {})
        queries = s.get("prefix_query_tokens", 0)
        rows.append({
            "replica": rid, "pid": s.get("pid"), "node_id": s.get("node_id"), "host": s.get("host"),
            "torch_threads": s.get("torch_threads"), "alive": s.get("alive"),
            "running": s.get("running", 0), "waiting": s.get("waiting", 0), "in_flight": in_flight.get(rid, 0),
            "kv_blocks_used": s.get("kv_blocks_used", 0), "kv_blocks_total": s.get("kv_blocks_total", 0),
            "prefix_hit_tokens": s.get("prefix_hit_tokens", 0), "prefix_query_tokens": queries,
            "prefix_hit_rate": s.get("prefix_hit_tokens", 0) / queries if queries else None,
            "prefix_hit_tokens_by_tier": {t: s.get(f"prefix_hit_tokens_{t}", 0) for t in ("device", "host", "disk")},
            "calls": f.get("calls", 0), "output_tokens": f.get("tokens", 0),
            "ttft_mean_s": f["ttft_sum"] / f["ttft_count"] if f.get("ttft_count") else None,
            "route_decisions": decisions.get(rid, {}),
        })
    return rows


class ReplicaCollector:
    """Prometheus collector of the per-replica figures (registered in the app's registry)."""

    GAUGES = (("running", "Sequences running in the replica's engine"),
              ("waiting", "Sequences waiting in the replica's engine"),
              ("kv_blocks_used", "KV blocks in use in the replica"),
              ("kv_blocks_total", "KV blocks of the replica's pool"),
              ("prefix_hit_tokens", "Prompt tokens the replica served from its prefix cache"),
              ("prefix_query_tokens", "Prompt tokens the replica looked up in its prefix cache"),
              ("in_flight", "Calls the router has sent the replica and not seen end"),
              ("torch_threads", "torch's intra-op threads in the replica"))

    def __init__(self, engines_by_model: dict[str, RemoteEngine]):
        self.engines = engines_by_model

    def collect(self) -> Iterable:
        gauges = {k: GaugeMetricFamily(f"tuili_replica_{k}", doc, labels=["model", "replica"]) for k, doc in self.GAUGES}
        calls = CounterMetricFamily("tuili_replica_calls", "Calls answered by each replica", labels=["model", "replica"])
        tokens = CounterMetricFamily("tuili_replica_generation_tokens", "Tokens each replica generated",
                                     labels=["model", "replica"])
        ttft = GaugeMetricFamily("tuili_replica_ttft_mean_seconds", "Mean time to first token through each replica",
                                 labels=["model", "replica"])
        decisions = CounterMetricFamily("tuili_replica_route_decisions", "Replica choices by reason",
                                        labels=["model", "reason", "replica"])
        retries = CounterMetricFamily("tuili_replica_retries", "Calls sent again after a replica failed before "
                                      "their first delta", labels=["model"])
        for model, engine in self.engines.items():
            for row in replica_rows(engine):
                rid = row["replica"]
                for k, _ in self.GAUGES:
                    gauges[k].add_metric([model, rid], float(row.get(k) or 0))
                calls.add_metric([model, rid], row["calls"])
                tokens.add_metric([model, rid], row["output_tokens"])
                if row["ttft_mean_s"] is not None:
                    ttft.add_metric([model, rid], row["ttft_mean_s"])
                for reason, n in row["route_decisions"].items():
                    decisions.add_metric([model, reason, rid], n)
            retries.add_metric([model], engine.retries)
        yield from gauges.values()
        yield from (calls, tokens, ttft, decisions, retries)
