"""KV tiers behind the device pool: host memory, then local disk.

The block manager sees this module only through `LowerTiers` (block ids and hashes);
the runner's `read_blocks` / `write_blocks` are the only functions here that touch the
pool. Decisions:

- Write-back, inclusive: a block goes down a tier only when it is evicted from the tier
  above (device -> host -> disk), and a block brought back up keeps its lower copies, so
  evicting it again costs nothing when a copy already exists.
- Device evictions are batched: `on_evict` only records (block, hash) while the scheduler
  hands out blocks, and `flush` (called by the engine before the step runs, and before
  any restore) copies all of them to host in one gather. The pool is not written between
  the two, so the recorded blocks still hold their content.
- The host tier is a byte-bounded LRU of CPU buffers (pinned when the device is CUDA),
  allocated as blocks arrive, so an idle tier costs nothing. It is off by default
  (`kv_host_memory=0`): on a CPU device the pool is host memory already, and a larger
  `kv_cache_memory` buys the same with no copies; on CUDA, give it some GiB.
- Without a host tier, device evictions go straight to disk.
- `restore` serves host hits from memory and all disk hits in one batched read; it stops
  at the first block that is missing or bad, so a prefix is never restored with a hole.
- `close` saves what the device pool and host tier hold to disk (least recently used
  first, so the disk tier's LRU keeps the most recent) and waits for the writes, so a
  restarted engine starts warm.
"""
from __future__ import annotations

import logging
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch

from .disk_tier import DiskTier
from .kv_cache import TIERS

log = logging.getLogger("tuili.kv.tiers")

ReadBlocks = Callable[[list[int]], list[torch.Tensor]]
WriteBlocks = Callable[[list[int], list[torch.Tensor]], None]


class HostTier:
    """A byte-bounded LRU of block buffers in CPU memory."""

    def __init__(self, size_bytes: int, block_nbytes: int):
        self.capacity = size_bytes // block_nbytes if block_nbytes else 0
        self.block_nbytes = block_nbytes
        self.blocks: OrderedDict[bytes, torch.Tensor] = OrderedDict()

    def __contains__(self, h: bytes) -> bool:
        return h in self.blocks

    def __len__(self) -> int:
        return len(self.blocks)

    @property
    def bytes_used(self) -> int:
        return len(self.blocks) * self.block_nbytes

    def get(self, h: bytes) -> torch.Tensor | None:
        buf = self.blocks.get(h)
        if buf is not None:
            self.blocks.move_to_end(h)
        return buf

    def put(self, h: bytes, buf: torch.Tensor) -> list[tuple[bytes, torch.Tensor]]:
        """Store a block; returns the blocks evicted to make room (least recently used first)."""
        if self.capacity == 0:
            return [(h, buf)]
        self.blocks[h] = buf
        self.blocks.move_to_end(h)
        evicted = []
        while len(self.blocks) > self.capacity:
            evicted.append(self.blocks.popitem(last=False))
        return evicted


@dataclass
class TierStats:
    moved: Counter = field(default_factory=Counter)  # (source, destination) -> blocks
    evictions: Counter = field(default_factory=Counter)  # tier -> blocks evicted from it


class KVTiers:
    """Host and disk tiers behind one device pool (implements kv_cache.LowerTiers)."""

    def __init__(self, read_blocks: ReadBlocks, write_blocks: WriteBlocks, block_nbytes: int,
                 host_bytes: int = 0, disk: DiskTier | None = None):
        self.read_blocks = read_blocks
        self.write_blocks = write_blocks
        self.block_nbytes = block_nbytes
        self.host = HostTier(host_bytes, block_nbytes) if host_bytes >= block_nbytes else None
        self.disk = disk if disk is not None and disk.enabled else None
        self.stats = TierStats()
        self._evicted: dict[bytes, int] = {}  # hash -> device block, waiting for `flush`
        if self.host is not None:
            log.info("host KV tier: %d blocks of %d bytes", self.host.capacity, block_nbytes)

    @property
    def enabled(self) -> bool:
        return self.host is not None or self.disk is not None

    # ---- device evictions ----------------------------------------------------
    def on_evict(self, block: int, block_hash: bytes) -> None:
        self.stats.evictions["device"] += 1
        self._evicted[block_hash] = block

    def flush(self) -> None:
        """Copy the blocks evicted from the device since the last flush down one tier."""
        if not self._evicted:
            return
        todo = []
        for h, block in self._evicted.items():
            if self.host is not None and h in self.host:
                self.host.get(h)  # already there: refresh its place
            elif self.host is None and self.disk is not None and h in self.disk:
                self.disk.touch(h)
            else:
                todo.append((h, block))
        self._evicted.clear()
        if not todo:
            return
        buffers = self.read_blocks([b for _, b in todo])
        for (h, _), buf in zip(todo, buffers):
            if self.host is not None:
                self.stats.moved["device", "host"] += 1
                self._spill(self.host.put(h, buf))
            elif self.disk is not None and self.disk.put(h, buf):
                self.stats.moved["device", "disk"] += 1

    def _spill(self, evicted: Iterable[tuple[bytes, torch.Tensor]]) -> None:
        for h, buf in evicted:
            self.stats.evictions["host"] += 1
            if self.disk is not None and h not in self.disk and self.disk.put(h, buf):
                self.stats.moved["host", "disk"] += 1

    # ---- lookups and restores ------------------------------------------------
    def _holds(self, h: bytes) -> bool:
        return h in self._evicted or (self.host is not None and h in self.host) or \
            (self.disk is not None and h in self.disk)

    def lookup(self, hashes: list[bytes]) -> int:
        n = 0
        for h in hashes:
            if not self._holds(h):
                break
            n += 1
        return n

    def restore(self, blocks: list[int], hashes: list[bytes]) -> list[str]:
        # Take the host's buffers first: the flush below (of the blocks evicted to make room
        # for this restore) may push exactly these down to disk. Stored buffers never change.
        found: dict[bytes, tuple[torch.Tensor, str]] = {}
        self._from_host(hashes, found)
        self.flush()
        self._from_host(hashes, found)  # blocks that were waiting in the flush
        rest = [h for h in hashes if h not in found]
        if self.disk is not None and rest:
            found.update((h, (buf, "disk")) for h, buf in zip(rest, self.disk.get_many(rest)) if buf is not None)
        buffers, served = [], []
        for h in hashes:
            if h not in found:
                break
            buffers.append(found[h][0])
            served.append(found[h][1])
        self.write_blocks(blocks[:len(buffers)], buffers)
        for tier in served:
            self.stats.moved[tier, "device"] += 1
        return served

    def _from_host(self, hashes: list[bytes], found: dict[bytes, tuple[torch.Tensor, str]]) -> None:
        if self.host is None:
            return
        for h in hashes:
            buf = None if h in found else self.host.get(h)
            if buf is not None:
                found[h] = (buf, "host")

    # ---- reporting and shutdown ----------------------------------------------
    def snapshot(self) -> dict[str, int]:
        return tier_snapshot(self)

    def close(self, device_blocks: list[tuple[int, bytes]]) -> None:
        """Save device (`(block, hash)`, least recently used first) and host blocks to disk, then stop."""
        if self.disk is None:
            return
        self.flush()
        saved = 0
        if self.host is not None:
            for h, buf in list(self.host.blocks.items()):
                saved += h not in self.disk and self.disk.put(h, buf)
        todo = [(b, h) for b, h in device_blocks if h not in self.disk]
        for i in range(0, len(todo), 64):
            part = todo[i:i + 64]
            for (_, h), buf in zip(part, self.read_blocks([b for b, _ in part])):
                saved += self.disk.put(h, buf)
        if saved:
            log.info("saving %d KV blocks to %s for the next run", saved, self.disk.dir)
        self.disk.close()
        self.disk = None


# The block copies between tiers that Engine.stats() counts (kv_blocks_moved_<a>_to_<b>).
MOVES = (("device", "host"), ("host", "disk"), ("device", "disk"), ("host", "device"), ("disk", "device"))


def tier_snapshot(tiers: KVTiers | None) -> dict[str, int]:
    """Counters for Engine.stats(); all zero without tiers, so the keys are always there."""
    s = tiers.stats if tiers is not None else TierStats()
    host = tiers.host if tiers is not None else None
    disk = tiers.disk if tiers is not None else None
    out = {f"kv_blocks_moved_{a}_to_{b}": s.moved[a, b] for a, b in MOVES}
    out.update({f"kv_evictions_{t}": s.evictions[t] for t in TIERS[:2]})
    out["kv_evictions_disk"] = disk.stats.evictions if disk else 0
    out["kv_host_blocks"] = len(host) if host else 0
    out["kv_host_bytes"] = host.bytes_used if host else 0
    out["kv_disk_blocks"] = len(disk) if disk else 0
    out["kv_disk_bytes"] = disk.bytes_used if disk else 0
    out["kv_disk_errors"] = disk.stats.errors if disk else 0
    return out
