"""Ray Serve request routers for the engine replicas: cache-aware, pow2 and round-robin.

They run in the process that holds the deployment handle (the HTTP server), on Ray Serve's
router event loop, through the public `ray.serve.request_router` API: `choose_replicas`
returns ranks of replicas (the first rank preferred; Ray then takes the least loaded
replica of a rank that accepts the request), `on_request_routed` says where a request went,
`on_request_completed` that it ended. The policy itself is `routing.py`'s, without Ray.

Shared by the three (`Tracking`): in-flight counts per replica (what the load term reads),
decisions by reason and replica, and a process-wide registry (`routing.routers_for`) through
which the HTTP side finds the live replicas for per-replica metrics. Ray Serve pickles this
module by value (a copy of its globals), so that registry lives in routing.py, which is
pickled by reference. `pow2` is Ray Serve's own
`PowerOfTwoChoicesRequestRouter` with that bookkeeping added, so the comparison is with
Ray's default behaviour.
"""
from __future__ import annotations

import itertools
import logging
import threading
from collections import Counter
from typing import Any

from ray.serve._private.request_router import PowerOfTwoChoicesRequestRouter
from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from . import routing
from .routing import CacheAwarePolicy, Choice, RouteKey

log = logging.getLogger("tuili.replicas")

def _key(pending_request: PendingRequest | None) -> RouteKey | None:
    if pending_request is None or not pending_request.args:
        return None
    first = pending_request.args[0]
    return first if isinstance(first, RouteKey) else None


class Tracking:
    """Bookkeeping shared by the routers; mixed in before Ray's RequestRouter."""

    def _init_tracking(self) -> None:
        self.in_flight: Counter = Counter()  # replica id string -> requests sent and not completed
        self.decisions: Counter = Counter()  # (reason, replica id string) -> count
        self._pending: dict[str, Choice] = {}  # internal request id -> the choice made for it
        self.lock = threading.Lock()
        name = self._deployment_id.name if self._deployment_id else "?"
        routing.register_router(name, self)

    def replica_ids(self) -> list[ReplicaID]:
        return list(self._replicas)

    def _remember(self, pending_request: PendingRequest | None, choice: Choice) -> None:
        if pending_request is not None:
            self._pending[pending_request.metadata.internal_request_id] = choice

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result) -> None:
        rid = replica_id.to_full_id_str()
        choice = self._pending.pop(pending_request.metadata.internal_request_id, None)
        reason = self.default_reason
        if choice is not None:
            reason = choice.reason if choice.replica == rid else "fallback"
        with self.lock:
            self.in_flight[rid] += 1
            self.decisions[reason, rid] += 1
        self._routed(_key(pending_request), rid)

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        rid = replica_id.to_full_id_str()
        with self.lock:
            if self.in_flight[rid] > 0:
                self.in_flight[rid] -= 1

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._forget(replica_id.to_full_id_str())

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        before = set(self._replicas)
        super().update_replicas(replicas)
        for gone in before - set(self._replicas):
            self._forget(gone.to_full_id_str())

    def _forget(self, rid: str) -> None:
        with self.lock:
            self.in_flight.pop(rid, None)

    def _routed(self, key: RouteKey | None, rid: str) -> None:
        pass

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            return {"in_flight": dict(self.in_flight), "decisions": dict(self.decisions)}


class CacheAwareRouter(Tracking, RequestRouter):
    """Prefix blocks held minus load, power of two choices when out of balance, sticky sessions."""

    default_reason = "prefix"

    def initialize_state(self, load_cost: int = 256, imbalance: int = 8, **_: Any) -> None:
        self._init_tracking()
        self.policy = CacheAwarePolicy(load_cost=load_cost, imbalance=imbalance)

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        by_id = {r.replica_id.to_full_id_str(): r for r in candidate_replicas}
        for rid, r in by_id.items():
            blocks = (r.routing_stats or {}).get("kv_blocks_total")
            if blocks:
                self.policy.index.set_capacity(rid, int(blocks))
        # calls streaming from each replica now, as the HTTP side counts them (exact, unlike the
        # routed - completed count when a completion callback is missed)
        serving = routing.started_counts(self._deployment_id.name if self._deployment_id else "?")
        load = {rid: serving.get(rid, 0) for rid in by_id}
        choice = self.policy.choose(_key(pending_request), list(by_id), load)
        self._remember(pending_request, choice)
        first = by_id[choice.replica]
        return [[first], [r for r in candidate_replicas if r is not first]]

    def _routed(self, key: RouteKey | None, rid: str) -> None:
        self.policy.routed(key, rid)

    def _forget(self, rid: str) -> None:
        super()._forget(rid)
        self.policy.forget(rid)


class RoundRobinRouter(Tracking, RequestRouter):
    """Each replica in turn, whatever it holds."""

    default_reason = "round-robin"

    def initialize_state(self, **_: Any) -> None:
        self._init_tracking()
        self._turn = itertools.count()

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        ordered = sorted(candidate_replicas, key=lambda r: r.replica_id.to_full_id_str())
        first = ordered[next(self._turn) % len(ordered)]
        self._remember(pending_request, Choice(first.replica_id.to_full_id_str(), "round-robin"))
        return [[first], [r for r in ordered if r is not first]]


class Pow2Router(Tracking, PowerOfTwoChoicesRequestRouter):
    """Ray Serve's default router (power of two choices on queue length), with the bookkeeping."""

    default_reason = "pow2"

    def initialize_state(self, **_: Any) -> None:
        self._init_tracking()


