"""KV tiers without a model: host LRU, disk files (checksums, restart, size bound, lock) and
the block manager restoring spilled blocks through a fake pool of byte buffers."""
import logging

import pytest
import torch

from tuili.engine.disk_tier import HEADER, DiskTier
from tuili.engine.kv_cache import BlockManager
from tuili.engine.sequence import Sequence
from tuili.engine.tiers import HostTier, KVTiers
from tuili.sampling import SamplingParams

NB = 256  # payload bytes of a fake block
FP = b"fingerprint-0001"


def payload(i: int) -> torch.Tensor:
    return torch.full((NB,), i % 251, dtype=torch.uint8)


def h(i: int) -> bytes:
    return i.to_bytes(16, "little")


def files(disk: DiskTier) -> list:
    return sorted(p for p in disk.dir.rglob("*.kvb"))


def test_host_tier_is_a_byte_bounded_lru():
    host = HostTier(3 * NB + 10, NB)
    assert host.capacity == 3
    for i in range(3):
        assert host.put(h(i), payload(i)) == []
    host.get(h(0))  # 0 is now the most recent
    evicted = host.put(h(3), payload(3))
    assert [k for k, _ in evicted] == [h(1)]
    assert h(0) in host and h(1) not in host and host.bytes_used == 3 * NB


def test_disk_roundtrip_pending_reads_and_restart(tmp_path):
    disk = DiskTier(tmp_path, 10 * (NB + HEADER.size), FP, NB)
    for i in range(4):
        assert disk.put(h(i), payload(i))
    # Served from disk or from the pending buffer, whichever the writer has reached.
    got = disk.get_many([h(i) for i in range(5)])
    assert [g is None for g in got] == [False] * 4 + [True]
    assert all(torch.equal(g, payload(i)) for i, g in enumerate(got[:4]))
    disk.close()
    assert len(files(disk)) == 4
    again = DiskTier(tmp_path, 10 * (NB + HEADER.size), FP, NB)
    assert len(again) == 4 and h(2) in again
    assert torch.equal(again.get_many([h(2)])[0], payload(2))
    again.close()
    # Another fingerprint (model, dtype, block size ...) looks elsewhere and sees nothing.
    other = DiskTier(tmp_path, 10 * (NB + HEADER.size), b"fingerprint-0002", NB)
    assert len(other) == 0 and other.get_many([h(2)]) == [None]
    other.close()


def test_disk_size_bound_is_never_exceeded_and_oldest_go_first(tmp_path):
    bound = 5 * (NB + HEADER.size) + 100
    disk = DiskTier(tmp_path, bound, FP, NB)
    def on_disk():  # the writer thread may evict a file between listing and stat: it then holds no bytes
        total = 0
        for p in disk.dir.rglob("*"):
            if p.name != "lock":
                try:
                    total += p.stat().st_size if p.is_file() else 0
                except FileNotFoundError:
                    pass
        return total

    for i in range(40):  # a burst: writes queue up faster than they land
        disk.put(h(1000 + i), payload(i))
        assert on_disk() <= bound and disk.bytes_used <= bound
    disk.drain()
    assert on_disk() <= bound and len(files(disk)) <= 5
    for i in range(12):  # one at a time: strict least-recently-used order
        disk.put(h(i), payload(i))
        assert on_disk() <= bound
        disk.drain()
    disk.close()
    assert len(files(disk)) == 5
    again = DiskTier(tmp_path, bound, FP, NB)
    assert set(again.index) == {h(i) for i in range(7, 12)}
    again.close()
    # A smaller bound on restart drops the oldest files at once.
    small = DiskTier(tmp_path, 2 * (NB + HEADER.size), FP, NB)
    assert set(small.index) == {h(10), h(11)} and len(files(small)) == 2
    small.close()


def test_corrupt_truncated_and_foreign_files_are_dropped_and_logged(tmp_path, caplog):
    disk = DiskTier(tmp_path, 10 * (NB + HEADER.size), FP, NB)
    for i in range(4):
        disk.put(h(i), payload(i))
    disk.close()
    path = {p.name[:-4]: p for p in files(disk)}
    corrupt, foreign = path[h(0).hex()], path[h(1).hex()]
    data = bytearray(corrupt.read_bytes())
    data[HEADER.size + 7] ^= 0xFF
    corrupt.write_bytes(bytes(data))
    foreign.write_bytes(path[h(3).hex()].read_bytes())  # a valid file under another block's name
    truncated = path[h(2).hex()]
    truncated.write_bytes(truncated.read_bytes()[:100])
    with caplog.at_level(logging.WARNING, logger="tuili.kv.disk"):
        again = DiskTier(tmp_path, 10 * (NB + HEADER.size), FP, NB)
        got = again.get_many([h(0), h(1), h(2), h(3)])
    assert got[0] is None and got[1] is None and got[2] is None and torch.equal(got[3], payload(3))
    text = caplog.text
    assert "checksum mismatch" in text and "foreign header" in text and "truncated" in text
    assert again.stats.errors == 3 and len(files(again)) == 1
    assert again.get_many([h(0)]) == [None]  # dropped for good: logged once
    assert text.count(h(0).hex()) == 1
    again.close()


def test_second_process_on_the_same_dir_runs_without_disk(tmp_path, caplog):
    first = DiskTier(tmp_path, 1 << 20, FP, NB)
    with caplog.at_level(logging.WARNING, logger="tuili.kv.disk"):
        second = DiskTier(tmp_path, 1 << 20, FP, NB)
    assert first.enabled and not second.enabled and "in use by another process" in caplog.text
    assert not second.put(h(1), payload(1))
    first.close()


class FakePool:
    """Device blocks as byte buffers: what the runner's read_blocks / write_blocks do to tensors."""

    def __init__(self, num_blocks: int):
        self.data = [torch.zeros(NB, dtype=torch.uint8) for _ in range(num_blocks)]

    def read(self, blocks):
        return [self.data[b].clone() for b in blocks]

    def write(self, blocks, buffers):
        for b, buf in zip(blocks, buffers):
            self.data[b].copy_(buf)


def run(bm: BlockManager, pool: FakePool, tiers: KVTiers, tokens: list[int], rid: str) -> Sequence:
    """Admit a sequence, 'compute' its blocks (content = a function of the block's hash), free it."""
    s = Sequence(rid, 0, tokens, SamplingParams(max_tokens=1))
    hits = bm.match_prefix(s)
    bm.admit(s, hits, s.num_tokens)
    tiers.flush()
    for i, b in enumerate(s.block_table[len(hits):len(s.block_hashes)], start=len(hits)):
        pool.data[b].copy_(content(s.block_hashes[i]))
    for i, b in enumerate(s.block_table[:len(hits)]):  # restored blocks hold the right content
        assert torch.equal(pool.data[b], content(s.block_hashes[i]))
    s.num_computed_tokens = s.num_tokens
    bm.commit(s)
    bm.free(s)
    return s


def content(block_hash: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(block_hash * (NB // 16)), dtype=torch.uint8)


def tiered(tmp_path, num_blocks: int, host_blocks: int = 0):
    """A block manager over a fake pool of num_blocks blocks of 4 tokens, with a host tier of
    host_blocks blocks and a disk tier of 100 under it."""
    pool = FakePool(num_blocks)
    bm = BlockManager(num_blocks=num_blocks, block_size=4)
    disk = DiskTier(tmp_path, 100 * (NB + HEADER.size), FP, NB)
    tiers = KVTiers(pool.read, pool.write, NB, host_blocks * NB, disk)
    bm.tiers, bm.on_evict = tiers, tiers.on_evict
    return pool, bm, disk, tiers


@pytest.mark.parametrize("host_blocks", [0, 2])
def test_block_manager_spills_down_and_restores_per_tier(tmp_path, host_blocks):
    pool, bm, disk, tiers = tiered(tmp_path, 6, host_blocks)
    a = list(range(17))  # 4 full blocks + 1 token
    run(bm, pool, tiers, a, "a")
    # Another prompt takes the whole pool: a's blocks leave the device, last block first,
    # so with 2 host blocks the first two land in host memory and the last two on disk.
    run(bm, pool, tiers, list(range(100, 121)), "x")
    assert not any(hh in bm.cached for hh in Sequence("a", 0, a, SamplingParams()).block_hashes)
    before = dict(bm.tier_hit_tokens)
    run(bm, pool, tiers, a + [99, 98], "a2")
    got = {t: bm.tier_hit_tokens[t] - before[t] for t in before}
    assert sum(got.values()) == 16
    assert got["device"] == 0
    assert got["host"] == 4 * host_blocks and got["disk"] == 16 - 4 * host_blocks
    snap = tiers.snapshot()
    assert snap["kv_blocks_moved_disk_to_device"] * 4 == got["disk"]
    assert snap["kv_evictions_device"] > 0
    disk.close()


def test_failed_restore_leaves_the_rest_to_compute(tmp_path):
    pool, bm, disk, tiers = tiered(tmp_path, 6)
    a = list(range(17))
    seq_a = run(bm, pool, tiers, a, "a")
    for j in range(3):
        run(bm, pool, tiers, list(range(100 * (j + 1), 100 * (j + 1) + 21)), f"x{j}")
    disk.drain()
    victim = disk._path(seq_a.block_hashes[1])
    victim.write_bytes(victim.read_bytes()[:-1] + b"\x00")  # corrupt the second block
    s = Sequence("a2", 0, a + [1], SamplingParams(max_tokens=1))
    hits = bm.match_prefix(s)
    assert len(hits) == 1  # block 0 from disk, block 1 corrupt: blocks 1.. are recomputed
    assert bm.num_free_blocks == 6
    disk.close()


def test_tier_sizes_are_validated_and_metrics_exported():
    from tuili.config import EngineConfig
    from tuili.serve.metrics import Metrics

    with pytest.raises(ValueError, match="kv_host_memory"):
        EngineConfig(kv_host_memory="lots")
    with pytest.raises(ValueError, match="kv_disk_size"):
        EngineConfig(kv_disk_size="-1GiB")

    class Served:
        name = "m"

        class engine:
            @staticmethod
            def stats():
                return {"running": 0, "waiting": 0, "kv_blocks_used": 0, "kv_blocks_free": 4, "preemptions": 0,
                        "prefix_hit_tokens": 30, "prefix_query_tokens": 40, "prefix_hit_tokens_disk": 20,
                        "kv_blocks_moved_host_to_disk": 3, "kv_disk_bytes": 4096}

    class Registry:
        def all(self):
            return [Served()]

    text = Metrics().render(Registry()).decode()
    assert 'tuili_prefix_cache_hit_tokens_by_tier{model="m",tier="disk"} 20.0' in text
    assert 'tuili_kv_blocks_moved{destination="disk",model="m",source="host"} 3.0' in text
    assert 'tuili_kv_tier_bytes{model="m",tier="disk"} 4096.0' in text
    assert 'tuili_prefix_cache_hit_rate{model="m"} 0.75' in text


def test_unusable_disk_dir_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ValueError, match="kv_disk_dir: cannot use"):
        DiskTier(blocker / "sub", 1 << 20, FP, NB)


def test_restore_fills_a_hole_between_device_blocks(tmp_path):
    """Device holds blocks 0 and 2 of a prefix, block 1 is on disk: all three are reused."""
    pool, bm, disk, tiers = tiered(tmp_path, 8)
    a = run(bm, pool, tiers, list(range(13)), "a")  # blocks 0, 1, 2 hashed
    b1 = a.block_hashes[1]
    block1 = bm.cached[b1]
    # Evict only block 1: move it to the front of the free queue and take one block.
    bm.free_queue.move_to_end(block1, last=False)
    bm.free_queue.move_to_end(next(b for b in bm.free_queue if bm.block_hash[b] is None and b != block1))
    x = Sequence("x", 0, [500, 501], SamplingParams(max_tokens=1))
    bm.admit(x, [], 2)
    tiers.flush()
    assert b1 not in bm.cached and a.block_hashes[0] in bm.cached and a.block_hashes[2] in bm.cached
    s = Sequence("a2", 0, list(range(13)) + [7], SamplingParams(max_tokens=1))
    hits = bm.match_prefix(s)
    assert len(hits) == 3 and bm.cached[b1] == hits[1]
    assert torch.equal(pool.data[hits[1]], content(b1))
    bm.admit(s, hits, s.num_tokens)
    assert bm.tier_hit_tokens["disk"] == 4
    bm.free(s)
    bm.free(x)
    # The bookkeeping stays consistent while everything is evicted again.
    run(bm, pool, tiers, list(range(900, 931)), "y")
    # The index and the blocks agree both ways: each cached block holds its key's hash, and
    # each hashed block is the one cached under its hash.
    assert bm.cached and all(bm.block_hash[blk] == hh for hh, blk in bm.cached.items())
    assert all(bm.cached.get(hh) == blk for blk, hh in enumerate(bm.block_hash) if hh is not None)
    assert len(bm.cached) == sum(hh is not None for hh in bm.block_hash)
    disk.close()
