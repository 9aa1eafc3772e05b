"""KV-cache blocks: ref counts, a free pool with LRU eviction, and automatic prefix caching.

The KV cache is ``num_blocks`` fixed-size blocks of ``block_size`` token slots. A request's
block table maps its token positions onto blocks (block_size 4 here)::

    tokens     t0 t1 t2 t3 | t4 t5 t6 t7 | t8 t9
    block table  [   7    ] [    2     ] [  9  . . ]      <- last block partly filled
    block keys   K0=H(root, t0..t3)   K1=H(K0, t4..t7)    (no key: partial blocks are never shared)

Prefix caching: a *full* block is keyed by a strong hash chained over its parent block's key
and its own token ids, so a key names the whole prefix up to the end of the block. The chain
starts at a root key derived from the request's ``cache_salt`` (a fixed root without one), so
two tenants with different salts never share a block and cannot probe each other's prompts by
timing. A new request walks its keys from the first block and takes the longest cached run.

Every block is in exactly one of three states::

    in use         ref_cnt > 0       held by one or more requests (shared prefix blocks: > 1)
    cached-free    ref_cnt == 0      still holds a keyed prefix; reusable on a hit, and evicted
                                     least-recently-freed first when fresh blocks run out
    free           ref_cnt == 0      no key; handed out before any cached block is evicted

Requests free their blocks tail first, so under pressure the end of a sequence is evicted
before its (more widely shared) beginning.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

# the key functions live in shared/ because the tokenizer's router computes the same keys
from zeroserve.shared.prefix_hash import hash_block, root_key

if TYPE_CHECKING:
    from zeroserve.scheduler_proc.kv_events import KVEventLog

__all__ = ["BlockManager", "hash_block", "root_key"]


class BlockManager:
    """Hands out KV blocks, counts references and keeps the prefix cache.

    It knows nothing about requests: callers keep their own block tables and pass the block
    ids back to ``free``. Allocation is all-or-nothing: ``allocate`` returns None and changes
    nothing when the pool cannot cover the request.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks ({num_blocks}) and block_size ({block_size}) must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_cnt: list[int] = [0] * num_blocks
        self.block_key: list[bytes | None] = [None] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))  # unkeyed, ref 0: handed out first
        self._cached_free: OrderedDict[int, None] = OrderedDict()  # keyed, ref 0: LRU, oldest first
        self._cached: dict[bytes, int] = {}  # key -> block holding that prefix
        self.num_evictions = 0
        # KV events for routers (kv_events.py): set by a scheduler publishing to a registry bus;
        # None (the single-replica default) costs one test per keyed or evicted block
        self.events: KVEventLog | None = None

    # ------------------------------------------------------------------ pool state

    @property
    def num_free_blocks(self) -> int:
        """Blocks a new allocation could take (free + cached-free)."""
        return len(self._free) + len(self._cached_free)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by requests (cached-free blocks count as unused)."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    # ------------------------------------------------------------------ prefix cache

    def find_cached_prefix(self, block_keys: Sequence[bytes], max_blocks: int) -> list[int]:
        """Blocks holding the longest cached run of ``block_keys[:max_blocks]`` (not touched)."""
        hits: list[int] = []
        if not self.enable_prefix_caching:
            return hits
        cached = self._cached
        for key in block_keys[:max_blocks]:
            block = cached.get(key)
            if block is None:
                break
            hits.append(block)
        return hits

    def cache_block(self, block: int, key: bytes) -> bool:
        """Register a full, computed (or being computed this step) block under its prefix key.

        When another block already holds the same prefix (two requests computed it in the
        same step, or a prompt that is a whole number of blocks recomputed its last one),
        the first one stays the cached copy and this block stays unkeyed.
        """
        if not self.enable_prefix_caching or key in self._cached:
            return False
        assert self.block_key[block] is None and self.ref_cnt[block] > 0, f"block {block} not fresh"
        self._cached[key] = block
        self.block_key[block] = key
        if self.events is not None:
            self.events.stored(key)
        return True

    def uncache(self, blocks: Iterable[int]) -> None:
        """Drop the prefix keys of ``blocks`` (their KV content is not valid, e.g. a failed step)."""
        for block in blocks:
            key = self.block_key[block]
            if key is None:
                continue
            self.block_key[block] = None
            if self._cached.get(key) == block:
                del self._cached[key]
                if self.events is not None:
                    self.events.removed(key)
            if block in self._cached_free:
                del self._cached_free[block]
                self._free.append(block)

    def reset_prefix_cache(self) -> None:
        """Forget every prefix key (the workers lost their KV cache, e.g. after a restart)."""
        events, self.events = self.events, None  # one AllBlocksCleared, not a removal per block
        try:
            self.uncache([b for b in range(self.num_blocks) if self.block_key[b] is not None])
        finally:
            self.events = events
        if events is not None:
            events.cleared()

    # ------------------------------------------------------------------ allocate / free

    def allocate(self, num_new: int, prefix: Sequence[int] = ()) -> list[int] | None:
        """Take a reference on the cached ``prefix`` blocks and hand out ``num_new`` fresh ones.

        Returns the fresh block ids (the caller's block table becomes prefix + fresh), or None,
        changing nothing, when free + cached-free blocks cannot cover both: touching a
        cached-free prefix block removes it from the pool, so it counts against the total.
        """
        ref_cnt = self.ref_cnt
        revived = 0
        for block in prefix:
            if ref_cnt[block] == 0:
                revived += 1
        if num_new + revived > len(self._free) + len(self._cached_free):
            return None
        for block in prefix:
            if ref_cnt[block] == 0:
                del self._cached_free[block]
            ref_cnt[block] += 1
        return self.take(num_new) if num_new else []

    def take(self, num_new: int) -> list[int] | None:
        """``num_new`` fresh blocks with ref count 1, free ones first, then LRU evictions."""
        free, cached_free = self._free, self._cached_free
        if num_new > len(free) + len(cached_free):
            return None
        out: list[int] = []
        ref_cnt = self.ref_cnt
        for _ in range(num_new):
            if free:
                block = free.popleft()
            else:
                block, _ = cached_free.popitem(last=False)
                key = self.block_key[block]
                del self._cached[key]  # type: ignore[index]
                self.block_key[block] = None
                self.num_evictions += 1
                if self.events is not None:
                    self.events.removed(key)  # type: ignore[arg-type]
            ref_cnt[block] = 1
            out.append(block)
        return out

    def free(self, blocks: Sequence[int]) -> None:
        """Drop one reference on each block, tail first; blocks reaching 0 return to the pool."""
        ref_cnt, block_key = self.ref_cnt, self.block_key
        for block in reversed(blocks):
            n = ref_cnt[block] - 1
            if n < 0:
                raise AssertionError(f"block {block} freed more often than allocated")
            ref_cnt[block] = n
            if n == 0:
                if block_key[block] is None:
                    self._free.append(block)
                else:
                    self._cached_free[block] = None

    # ------------------------------------------------------------------ checks (tests)

    def check_invariants(self, expected_refs: Sequence[int] | None = None) -> None:
        """Every block in exactly one state, keys and the cache map agree, refs never negative.

        ``expected_refs``: the ref count every block should have, as counted from the live
        block tables by the caller.
        """
        free, cached_free = list(self._free), list(self._cached_free)
        assert len(set(free)) == len(free), "a block is twice in the free queue"
        assert not set(free) & set(cached_free), "a block is both free and cached-free"
        for block in range(self.num_blocks):
            ref, key = self.ref_cnt[block], self.block_key[block]
            assert ref >= 0, f"block {block} has ref count {ref}"
            if expected_refs is not None:
                assert ref == expected_refs[block], (
                    f"block {block}: ref {ref}, tables hold {expected_refs[block]}"
                )
            if key is not None:
                assert self._cached.get(key) == block, f"block {block} keyed but not in the cache map"
        for block in free:
            assert self.ref_cnt[block] == 0 and self.block_key[block] is None, (
                f"free block {block} in use or keyed"
            )
        for block in cached_free:
            assert self.ref_cnt[block] == 0 and self.block_key[block] is not None, (
                f"cached-free block {block}"
            )
        for key, block in self._cached.items():
            assert self.block_key[block] == key, f"cache map points at block {block} with another key"
        in_use = sum(1 for r in self.ref_cnt if r > 0)
        assert in_use + len(free) + len(cached_free) == self.num_blocks, "a block is lost (leak)"
