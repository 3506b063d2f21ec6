"""The routing policy among engine replicas, as plain data and functions (no Ray here).

Decisions:
- The router tracks what it sent where: each request carries the chained hashes of its
  prompt's full blocks (`block_hashes`, computed on the HTTP side where the token ids are
  known), and the replica a request went to is assumed to hold those blocks afterwards
  (`PrefixIndex`, an LRU per replica bounded by that replica's KV blocks). Replicas are
  not asked what they hold: asking costs a round trip per request and the answer is stale
  by the time it arrives; the guess is wrong only after an eviction, and then the cost is
  one prefill, the same as a random choice.
- Score of a replica = prompt tokens it holds (leading blocks only: a prefix is usable
  only without a hole) - `load_cost` tokens per request it has in flight. The best score
  wins; a request that matches nowhere goes to the least loaded replica.
- Out of balance (in-flight counts differ by more than `imbalance`): power of two choices
  over the candidates, as Ray Serve's default router does, so one hot prefix cannot pile
  every request on one replica.
- Sessions (the request's `user` field or `X-Session-Id` header) stick to the replica that
  served them while it is among the candidates, not out of balance, and no other replica
  holds more of the prompt: a conversation's own history lives where its session does, so
  stickiness decides when the index knows nothing better; a returning user's request under
  a shared prompt held elsewhere (a tenant's system prompt) goes to the prompt.
- Every choice names its reason (session, prefix, least-loaded, imbalance, pow2,
  round-robin), counted per replica in the metrics.
"""
from __future__ import annotations

import random
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Hashable, Sequence

_ROUTERS: dict[str, list] = {}  # deployment name -> the request routers made in this process
_ROUTERS_LOCK = threading.Lock()


def register_router(deployment: str, router) -> None:
    with _ROUTERS_LOCK:
        _ROUTERS.setdefault(deployment, []).append(router)


def routers_for(deployment: str) -> list:
    with _ROUTERS_LOCK:
        return list(_ROUTERS.get(deployment, []))


_STARTED: dict[str, dict] = {}  # deployment name -> replica id -> calls streaming from it now


def started(deployment: str, replica: str, delta: int) -> None:
    """The HTTP side counts the calls each replica is serving (+1 when it starts, -1 at the end)."""
    with _ROUTERS_LOCK:
        d = _STARTED.setdefault(deployment, {})
        d[replica] = max(d.get(replica, 0) + delta, 0)


def started_counts(deployment: str) -> dict:
    with _ROUTERS_LOCK:
        return dict(_STARTED.get(deployment, {}))


REASONS = ("session", "prefix", "least-loaded", "imbalance", "pow2", "round-robin", "fallback")


def block_hashes(ids: Sequence[int], block_size: int, max_blocks: int = 512) -> tuple[int, ...]:
    """Chained hashes of the full blocks of a prompt (Python's tuple hash of ints is not salted)."""
    out: list[int] = []
    h = 0
    for start in range(0, min(len(ids) // block_size, max_blocks) * block_size, block_size):
        h = hash((h, tuple(ids[start:start + block_size])))
        out.append(h)
    return tuple(out)


@dataclass(frozen=True)
class RouteKey:
    """What a router needs to know about a request; passed as the first argument of the call."""

    hashes: tuple[int, ...] = ()
    block_size: int = 16
    session: str | None = None

    def __repr__(self) -> str:  # short in Ray's logs
        return f"RouteKey(blocks={len(self.hashes)}, session={self.session!r})"


class PrefixIndex:
    """Per replica, the block hashes it was sent, least recently used first."""

    def __init__(self, default_capacity: int = 65536):
        self.default_capacity = default_capacity
        self.blocks: dict[Hashable, OrderedDict[int, None]] = {}
        self.capacity: dict[Hashable, int] = {}

    def match(self, replica: Hashable, hashes: Sequence[int]) -> int:
        """How many leading blocks of `hashes` the replica holds."""
        held = self.blocks.get(replica)
        if not held:
            return 0
        n = 0
        for h in hashes:
            if h not in held:
                break
            n += 1
        return n

    def add(self, replica: Hashable, hashes: Sequence[int]) -> None:
        held = self.blocks.setdefault(replica, OrderedDict())
        for h in hashes:
            held[h] = None
            held.move_to_end(h)
        cap = self.capacity.get(replica, self.default_capacity)
        while len(held) > cap:
            held.popitem(last=False)

    def set_capacity(self, replica: Hashable, blocks: int) -> None:
        if blocks > 0:
            self.capacity[replica] = blocks

    def drop(self, replica: Hashable) -> None:
        self.blocks.pop(replica, None)
        self.capacity.pop(replica, None)


@dataclass
class Choice:
    replica: Hashable
    reason: str
    matched_blocks: int = 0


@dataclass
class CacheAwarePolicy:
    load_cost: int = 256  # prompt tokens one request in flight is worth
    imbalance: int = 8  # in-flight difference that switches to power of two choices
    max_sessions: int = 100_000
    index: PrefixIndex = field(default_factory=PrefixIndex)
    sessions: OrderedDict = field(default_factory=OrderedDict)
    rng: random.Random = field(default_factory=random.Random)

    def choose(self, key: RouteKey | None, replicas: Sequence[Hashable], load: dict) -> Choice:
        loads = {r: load.get(r, 0) for r in replicas}
        low, high = min(loads.values()), max(loads.values())
        balanced = high - low <= self.imbalance
        if key is not None and key.session is not None and balanced:
            r = self.sessions.get(key.session)
            if r in loads:
                # A session stays where its conversation is, unless another replica holds more of
                # this prompt (a user's next request under a prefix that lives elsewhere).
                held = self.index.match(r, key.hashes)
                if held >= max(self.index.match(x, key.hashes) for x in replicas):
                    return Choice(r, "session", held)
        if not balanced:
            pair = self.rng.sample(list(replicas), 2) if len(replicas) > 1 else list(replicas)
            r = min(pair, key=lambda x: loads[x])
            return Choice(r, "imbalance", self.index.match(r, key.hashes) if key else 0)
        hashes = key.hashes if key is not None else ()
        block = key.block_size if key is not None else 0
        matched = {r: self.index.match(r, hashes) for r in replicas}
        order = list(replicas)
        self.rng.shuffle(order)  # ties are broken at random, not by replica order
        if max(matched.values(), default=0) > 0:
            r = max(order, key=lambda x: (matched[x] * block - self.load_cost * loads[x], -loads[x]))
            if matched[r] > 0:
                return Choice(r, "prefix", matched[r])
        r = min(order, key=lambda x: loads[x])
        return Choice(r, "least-loaded", 0)

    def routed(self, key: RouteKey | None, replica: Hashable) -> None:
        """The request went to `replica`: it now holds the prompt's blocks and the session."""
        if key is None:
            return
        self.index.add(replica, key.hashes)
        if key.session is not None:
            self.sessions[key.session] = replica
            self.sessions.move_to_end(key.session)
            while len(self.sessions) > self.max_sessions:
                self.sessions.popitem(last=False)

    def forget(self, replica: Hashable) -> None:
        self.index.drop(replica)
        for s in [s for s, r in self.sessions.items() if r == replica]:
            del self.sessions[s]
