"""BlockManager on its own: keys, ref counts, all-or-nothing allocation, eviction order."""

from __future__ import annotations

import pytest

from zeroserve.scheduler_proc.block_manager import BlockManager, hash_block, root_key


def test_block_keys_chain_over_parent_and_salt():
    k0 = hash_block(root_key(None), [1, 2, 3, 4])
    assert isinstance(k0, bytes) and len(k0) == 32
    assert k0 == hash_block(root_key(None), [1, 2, 3, 4]), "keys must be deterministic across calls"
    assert k0 != hash_block(root_key(None), [1, 2, 3, 5])
    # the same tokens under another parent (another prefix) are another block
    assert hash_block(k0, [5, 6, 7, 8]) != hash_block(hash_block(root_key(None), [9, 2, 3, 4]), [5, 6, 7, 8])
    assert root_key("tenant-a") != root_key("tenant-b") != root_key(None)
    assert root_key("") == root_key(None), "an empty salt is no salt"
    # token ids are hashed as int64, so large ids do not alias small ones
    assert hash_block(k0, [2**40]) != hash_block(k0, [0])


def test_allocate_is_all_or_nothing_and_refs_count():
    bm = BlockManager(num_blocks=4, block_size=4)
    a = bm.allocate(3)
    assert a == [0, 1, 2] and bm.num_free_blocks == 1
    assert bm.allocate(2) is None and bm.num_free_blocks == 1, "a failed allocation must change nothing"
    bm.cache_block(0, b"k0")
    # a prefix hit on block 0 shares it: ref count 2
    assert bm.allocate(1, prefix=[0]) == [3]
    assert bm.ref_cnt == [2, 1, 1, 1]
    bm.free([0, 3])
    bm.free(a)
    assert bm.ref_cnt == [0, 0, 0, 0] and bm.num_free_blocks == 4
    bm.check_invariants([0, 0, 0, 0])
    with pytest.raises(AssertionError, match="freed more often"):
        bm.free([1])


def test_cached_free_prefix_block_counts_against_the_pool():
    bm = BlockManager(num_blocks=3, block_size=4)
    blocks = bm.allocate(3)
    bm.cache_block(blocks[0], b"k0")
    bm.free(blocks)  # block 0 cached-free, 1 and 2 free
    # reviving block 0 and taking 3 fresh ones needs 4 blocks: refused, nothing touched
    assert bm.allocate(3, prefix=[0]) is None
    assert bm.ref_cnt == [0, 0, 0] and bm.num_cached_blocks == 1
    assert bm.allocate(2, prefix=[0]) == [2, 1] and bm.ref_cnt == [1, 1, 1]  # freed tail first
    bm.check_invariants([1, 1, 1])


def test_unkeyed_blocks_go_first_then_lru_evicts_tail_first():
    bm = BlockManager(num_blocks=6, block_size=4)
    a = bm.allocate(3)  # [0, 1, 2] a request's table
    b = bm.allocate(3)  # [3, 4, 5] another
    for i, block in enumerate(a):
        bm.cache_block(block, f"a{i}".encode())
    bm.cache_block(b[0], b"b0")  # b's blocks 4, 5: partial / unkeyed
    bm.free(a)  # cached-free, in eviction order 2, 1, 0 (tail first)
    bm.free(b)  # 5, 4 free (unkeyed); 3 cached-free after a's
    assert bm.num_free_blocks == 6
    assert bm.take(2) == [5, 4], "unkeyed blocks must be used before evicting cached ones"
    assert bm.take(1) == [2] and bm.num_evictions == 1, "then the least recently freed, a's tail first"
    assert bm.find_cached_prefix([b"a0", b"a1", b"a2"], 3) == [0, 1], "a's first two blocks survive"
    assert bm.take(3) == [1, 0, 3]
    assert bm.num_cached_blocks == 0
    bm.check_invariants([1] * 6)


def test_touching_a_cached_free_block_moves_it_to_the_lru_tail():
    bm = BlockManager(num_blocks=3, block_size=4)
    blocks = bm.allocate(3)
    for i, block in enumerate(blocks):
        bm.cache_block(block, f"k{i}".encode())
    bm.free([0])
    bm.free([1])
    bm.free([2])  # LRU order 0, 1, 2
    assert bm.allocate(0, prefix=[0]) == []  # a hit on 0 ...
    bm.free([0])  # ... and its release make 0 the most recent
    assert bm.take(3) == [1, 2, 0]


def test_duplicate_key_keeps_first_block_and_find_stops_at_first_miss():
    bm = BlockManager(num_blocks=4, block_size=4)
    x, y = bm.allocate(2)
    assert bm.cache_block(x, b"same") and not bm.cache_block(y, b"same")
    assert bm.block_key[y] is None
    bm.cache_block(bm.allocate(1)[0], b"third")
    assert bm.find_cached_prefix([b"same", b"missing", b"third"], 3) == [x]
    assert bm.find_cached_prefix([b"same"], 0) == []


def test_uncache_and_reset_return_cached_free_blocks_to_free():
    bm = BlockManager(num_blocks=3, block_size=4)
    blocks = bm.allocate(3)
    for i, block in enumerate(blocks):
        bm.cache_block(block, f"k{i}".encode())
    bm.free(blocks[1:])
    bm.uncache([blocks[2]])
    assert bm.find_cached_prefix([b"k0", b"k1"], 2) == [0, 1]
    assert bm.find_cached_prefix([b"k2"], 1) == []
    bm.reset_prefix_cache()
    assert bm.num_cached_blocks == 0 and bm.num_free_blocks == 2
    bm.check_invariants([1, 0, 0])


def test_prefix_caching_disabled_never_keys_or_hits():
    bm = BlockManager(num_blocks=2, block_size=4, enable_prefix_caching=False)
    (block,) = bm.allocate(1)
    assert not bm.cache_block(block, b"k")
    assert bm.find_cached_prefix([b"k"], 1) == []
