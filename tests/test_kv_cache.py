"""Block manager: allocation, reference counts, freeing, prefix reuse and eviction order."""
import pytest

from tuili.engine.kv_cache import BlockManager
from tuili.engine.sequence import Sequence
from tuili.sampling import SamplingParams


def seq(tokens, rid="r"):
    return Sequence(rid, 0, list(tokens), SamplingParams(max_tokens=4))


def admitted(bm: BlockManager, tokens, rid="r", computed: bool = False) -> Sequence:
    """A sequence of `tokens` admitted into `bm` without prefix hits; with `computed`, its
    tokens are marked computed and its full blocks published to the prefix cache."""
    s = seq(tokens, rid)
    bm.admit(s, [], s.num_tokens)
    if computed:
        s.num_computed_tokens = s.num_tokens
        bm.commit(s)
    return s


def test_admit_allocates_blocks_to_cover_tokens():
    bm = BlockManager(num_blocks=8, block_size=4)
    assert bm.can_admit(seq(range(10)), [], 10)
    s = admitted(bm, range(10))
    assert len(s.block_table) == 3
    assert bm.num_free_blocks == 5
    assert all(bm.ref_counts[b] == 1 for b in s.block_table)
    bm.grow(s, 12)  # still inside the third block
    assert len(s.block_table) == 3
    bm.grow(s, 13)
    assert len(s.block_table) == 4 and bm.num_free_blocks == 4


def test_free_returns_every_block_and_detects_double_free():
    bm = BlockManager(num_blocks=4, block_size=4)
    s = admitted(bm, range(9))
    table = list(s.block_table)
    bm.free(s)
    assert bm.num_free_blocks == 4 and s.block_table == []
    assert all(bm.ref_counts[b] == 0 for b in table)
    s.block_table = table
    with pytest.raises(AssertionError):
        bm.free(s)


def test_grow_beyond_pool_raises():
    bm = BlockManager(num_blocks=2, block_size=4)
    s = admitted(bm, range(4))
    assert not bm.can_admit(seq(range(20)), [], 20)
    with pytest.raises(RuntimeError):
        bm.grow(s, 16)


def test_prefix_blocks_are_shared_and_refcounted():
    bm = BlockManager(num_blocks=10, block_size=4)
    a = admitted(bm, range(13), "a", computed=True)  # three full blocks published
    b = seq(list(range(12)) + [99, 98], "b")
    hits = bm.match_prefix(b)
    assert hits == a.block_table[:3]
    bm.admit(b, hits, b.num_tokens)
    assert b.num_computed_tokens == 12
    assert [bm.ref_counts[x] for x in hits] == [2, 2, 2]
    assert b.block_table[3] not in a.block_table
    bm.free(a)
    assert [bm.ref_counts[x] for x in hits] == [1, 1, 1]
    bm.free(b)
    assert bm.num_free_blocks == 10


def test_prefix_match_leaves_one_token_to_compute():
    bm = BlockManager(num_blocks=10, block_size=4)
    a = admitted(bm, range(8), computed=True)
    same = seq(range(8), "b")
    assert bm.match_prefix(same) == a.block_table[:1]  # the last block is recomputed


def test_different_salt_or_tokens_do_not_match():
    bm = BlockManager(num_blocks=10, block_size=4, salt=b"model-a")
    a = admitted(bm, range(9), computed=True)
    assert bm.match_prefix(seq([1, 0, 2, 3, 4, 5, 6, 7, 8])) == []
    # The same tokens hash alike under the same salt and differently under another, so a
    # tier shared between engines (the disk) never hands one model's blocks to another.
    same = admitted(BlockManager(num_blocks=10, block_size=4, salt=b"model-a"), range(9), computed=True)
    other = admitted(BlockManager(num_blocks=10, block_size=4, salt=b"model-b"), range(9), computed=True)
    assert len(a.block_hashes) == 2 and same.block_hashes == a.block_hashes
    assert not set(other.block_hashes) & set(a.block_hashes)


def test_freed_cached_blocks_are_reused_then_evicted_lru():
    bm = BlockManager(num_blocks=4, block_size=4)
    evicted = []
    bm.on_evict = lambda block, h: evicted.append(block)
    a = admitted(bm, range(9), computed=True)
    cached_blocks = a.block_table[:2]
    bm.free(a)
    # A later identical prompt revives the cached blocks from the free queue.
    b = seq(range(9), "b")
    hits = bm.match_prefix(b)
    assert hits == cached_blocks
    assert bm.can_admit(b, hits, 9)
    bm.admit(b, hits, 9)
    bm.free(b)
    # Unhashed blocks are handed out before cached ones; then the cached ones are evicted.
    c = admitted(bm, range(100, 116), "c")
    assert set(c.block_table) == set(range(4))
    assert sorted(evicted) == sorted(cached_blocks)
    assert bm.cached == {}


def test_disabled_prefix_caching_never_matches():
    bm = BlockManager(num_blocks=4, block_size=4, enable_prefix_caching=False)
    a = admitted(bm, range(9), computed=True)
    assert bm.cached == {} and all(h is None for h in bm.block_hash)
    bm.free(a)
    assert bm.match_prefix(seq(range(9), "b")) == []
