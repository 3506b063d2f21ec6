"""The block manager: a pool of KV blocks, block tables, reference counts and prefix hashes.

It sees only block ids and token counts, never tensors.

- Every block has a reference count. A block with count 0 sits in the free queue, which
  is ordered for eviction: blocks that hold no reusable content go to the front, blocks
  that hold a full, hashed block of tokens go to the back (least recently freed first).
- Prefix caching: a full block is named by a chained hash of its tokens and the hash of
  the block before it, salted with the model identity, dtype and block size. A new
  sequence reuses the blocks of its longest cached prefix; such a block is shared
  (count > 1) and never written, because only full blocks are reused and at least one
  token of every sequence is always computed.
- Taking a hashed block from the free queue for new content evicts its hash; an
  `on_evict` callback lets a lower tier keep a copy.
- Lower tiers (host memory, disk: `tiers.py`) sit behind the pool through the small
  `LowerTiers` interface of block ids and hashes, so this class stays tensor-free. When
  the device cache misses, `match_prefix` asks the lower tiers how many of the following
  blocks they hold, takes free device blocks for them and has the tiers copy them in
  (one batched restore). The restored blocks become ordinary cached blocks, so admission,
  sharing and eviction treat them like any other; the tier each came from is remembered
  until a sequence takes it, so hits are counted per tier (device, host, disk).
"""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from typing import Callable, Protocol

from .sequence import Sequence

TIERS = ("device", "host", "disk")


class LowerTiers(Protocol):
    """What the block manager needs from the tiers below the device pool."""

    def on_evict(self, block: int, block_hash: bytes) -> None:
        """`block` is about to be reused; keep a copy of its content under `block_hash`."""

    def lookup(self, hashes: list[bytes]) -> int:
        """How many of `hashes`, from the first on, a lower tier holds."""

    def restore(self, blocks: list[int], hashes: list[bytes]) -> list[str]:
        """Copy the content of `hashes` into device `blocks`; returns the tier that served each,
        for the leading run that succeeded (a corrupt or vanished block ends the run)."""


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def chain_hash(parent: bytes, tokens: list[int]) -> bytes:
    return hashlib.blake2b(parent + array("q", tokens).tobytes(), digest_size=16).digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 salt: bytes = b""):
        if num_blocks < 1:
            raise ValueError("num_blocks: the KV pool needs at least one block")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.root_hash = hashlib.blake2b(salt + block_size.to_bytes(4, "little"), digest_size=16).digest()
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[bytes | None] = [None] * num_blocks
        self.cached: dict[bytes, int] = {}
        self.free_queue: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self.on_evict: Callable[[int, bytes], None] | None = None
        self.tiers: LowerTiers | None = None
        self.restored_from: dict[int, str] = {}  # restored block -> its tier, until a sequence takes it
        self.prefix_hit_tokens = 0
        self.prefix_query_tokens = 0
        self.tier_hit_tokens = dict.fromkeys(TIERS, 0)

    # ---- queries -------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free_queue)

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        return max(cdiv(num_tokens, self.block_size) - len(seq.block_table), 0)

    def match_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks covering the longest prefix of `seq`, leaving at least one token to compute."""
        if not self.enable_prefix_caching:
            return []
        self._extend_hashes(seq, seq.num_tokens - 1)
        wanted = seq.block_hashes[: (seq.num_tokens - 1) // self.block_size]
        hits: list[int] = []
        i = 0
        while i < len(wanted):
            block = self.cached.get(wanted[i])
            if block is not None:
                hits.append(block)
                i += 1
                continue
            if self.tiers is None:
                break
            # A run of blocks missing from the device (the device may still hold later ones:
            # it evicts a sequence's last blocks first).
            j = i
            while j < len(wanted) and wanted[j] not in self.cached:
                j += 1
            restored = self._restore(hits, wanted[i:j])
            hits += restored
            if len(restored) < j - i:
                break
            i = j
        return hits

    def _restore(self, hits: list[int], missing: list[bytes]) -> list[int]:
        """Bring the leading run of `missing` that a lower tier holds into free device blocks."""
        assert self.tiers is not None
        n = self.tiers.lookup(missing)
        if n == 0:
            return []
        # The device hits must survive the allocations below: take them out of the free queue.
        parked = [b for b in hits if self.ref_counts[b] == 0]
        for b in parked:
            del self.free_queue[b]
        n = min(n, self.num_free_blocks)
        blocks = [self._pop_free() for _ in range(n)]
        served = self.tiers.restore(blocks, missing[:n]) if blocks else []
        for b, h, tier in zip(blocks, missing, served):
            self.cached[h] = b
            self.block_hash[b] = h
            self.restored_from[b] = tier
        for b in reversed(blocks[len(served):]):  # failed: back to the front, no content
            self.ref_counts[b] = 0
            self.free_queue[b] = None
            self.free_queue.move_to_end(b, last=False)
        for b in parked + blocks[:len(served)]:  # about to be used: most recently used end
            self.ref_counts[b] = 0
            self.free_queue[b] = None
        return blocks[:len(served)]

    def can_admit(self, seq: Sequence, hits: list[int], num_tokens: int) -> bool:
        """Whether `seq` can take `hits` and grow to cover `num_tokens`."""
        revived = sum(1 for b in hits if self.ref_counts[b] == 0)
        new = cdiv(num_tokens, self.block_size) - len(hits)
        return new + revived <= self.num_free_blocks

    # ---- changes -------------------------------------------------------------
    def admit(self, seq: Sequence, hits: list[int], num_tokens: int) -> None:
        """Give a sequence without blocks its prefix hits plus fresh blocks up to `num_tokens`."""
        assert not seq.block_table
        for b in hits:
            if self.ref_counts[b] == 0:
                del self.free_queue[b]
            self.ref_counts[b] += 1
            self.tier_hit_tokens[self.restored_from.pop(b, "device")] += self.block_size
        seq.block_table = list(hits)
        seq.num_computed_tokens = len(hits) * self.block_size
        self.prefix_query_tokens += seq.num_tokens
        self.prefix_hit_tokens += seq.num_computed_tokens
        self.grow(seq, num_tokens)

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        """Append fresh blocks until the table covers `num_tokens`; the caller checked there are enough."""
        need = self.blocks_needed(seq, num_tokens)
        if need > self.num_free_blocks:
            raise RuntimeError(f"KV pool exhausted: need {need} blocks, {self.num_free_blocks} free")
        for _ in range(need):
            seq.block_table.append(self._pop_free())

    def commit(self, seq: Sequence) -> None:
        """Register the full blocks whose KV is now computed, so later requests can reuse them."""
        if not self.enable_prefix_caching:
            return
        # Capped at the tokens the sequence holds: after a verification step its computed
        # count runs ahead of token_ids until the accepted drafts are appended, and a hash
        # must never cover a token that is not in token_ids (an unverified draft).
        full = min(seq.num_computed_tokens, seq.num_tokens) // self.block_size
        self._extend_hashes(seq, full * self.block_size)
        for i in range(full):
            block = seq.block_table[i]
            if self.block_hash[block] is not None:
                continue
            h = seq.block_hashes[i]
            if h not in self.cached:
                self.cached[h] = block
                self.block_hash[block] = h

    def shrink(self, seq: Sequence, num_tokens: int) -> None:
        """Give back the table's blocks past those covering `num_tokens` (blocks taken for
        draft tokens that were rejected). They hold no hashed content: front of the free queue."""
        keep = cdiv(num_tokens, self.block_size)
        while len(seq.block_table) > keep:
            block = seq.block_table.pop()
            self.ref_counts[block] -= 1
            assert self.ref_counts[block] == 0 and self.block_hash[block] is None, f"block {block} is shared"
            self.free_queue[block] = None
            self.free_queue.move_to_end(block, last=False)

    def free(self, seq: Sequence) -> None:
        """Drop the sequence's references; blocks reaching zero join the free queue (tail blocks first)."""
        for block in reversed(seq.block_table):
            self.ref_counts[block] -= 1
            assert self.ref_counts[block] >= 0, f"block {block} freed twice"
            if self.ref_counts[block] == 0:
                self.free_queue[block] = None
                if self.block_hash[block] is None:
                    self.free_queue.move_to_end(block, last=False)
        seq.block_table = []
        seq.num_computed_tokens = 0

    def reset_prefix_cache(self) -> None:
        for h, block in list(self.cached.items()):
            if self.ref_counts[block] == 0:
                del self.cached[h]
                self.block_hash[block] = None

    # ---- internals -----------------------------------------------------------
    def _pop_free(self) -> int:
        block, _ = self.free_queue.popitem(last=False)
        assert self.ref_counts[block] == 0
        h = self.block_hash[block]
        if h is not None:
            del self.cached[h]
            self.block_hash[block] = None
            self.restored_from.pop(block, None)
            if self.on_evict is not None:
                self.on_evict(block, h)
        self.ref_counts[block] = 1
        return block

    def _extend_hashes(self, seq: Sequence, upto_tokens: int) -> None:
        bs = self.block_size
        for i in range(len(seq.block_hashes), upto_tokens // bs):
            parent = seq.block_hashes[i - 1] if i else self.root_hash
            seq.block_hashes.append(chain_hash(parent, seq.token_ids[i * bs:(i + 1) * bs]))
