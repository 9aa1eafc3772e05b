"""The prefix-cache block key: one implementation, used by the scheduler's block manager (which
blocks it can reuse) and by the tokenizer's router (which replica holds a prompt's blocks).

A *full* block of ``block_size`` tokens is keyed by a strong hash chained over its parent
block's key and its own token ids, so a key names the whole prefix up to the end of the block.
The chain starts at a root key derived from the request's ``cache_salt`` (a fixed root without
one), so two tenants with different salts never share a block, and a router never sends one
tenant's prompt to where another's prefix is cached.

KV events carry ``event_hash(key)``: the key's first 8 bytes as a signed int64 (msgpack's
native integer; vLLM's events carry ints too). A collision only misroutes a request, since
the scheduler matches on the full 32-byte key.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence

_ROOT_KEY = hashlib.blake2b(b"zeroserve.prefix-cache.root", digest_size=32).digest()


def root_key(cache_salt: str | None) -> bytes:
    """The parent key of a request's first block: fixed, or derived from its cache salt."""
    if not cache_salt:
        return _ROOT_KEY
    return hashlib.blake2b(b"zeroserve.prefix-cache.salt:" + cache_salt.encode(), digest_size=32).digest()


def hash_block(parent_key: bytes, token_ids: Sequence[int] | memoryview) -> bytes:
    """Key of one full block: blake2b-256 over the parent key (32 bytes) and the int64 token ids
    (a list, or a memoryview of an ``array("q")``: hashed as is, no conversion).

    The parent key has a fixed length, so the byte string is unambiguous. Python's ``hash()``
    would be salted per process and weak against crafted collisions; this key is neither.
    """
    h = hashlib.blake2b(parent_key, digest_size=32)
    h.update(token_ids if isinstance(token_ids, memoryview) else array("q", token_ids))
    return h.digest()


def event_hash(key: bytes) -> int:
    """The int a KV event carries for a block key."""
    return int.from_bytes(key[:8], "little", signed=True)


def prompt_event_hashes(token_ids: Sequence[int], block_size: int, cache_salt: str | None) -> list[int]:
    """``event_hash`` of every full block of a prompt, first block first (what a router looks up)."""
    out: list[int] = []
    parent = root_key(cache_salt)
    tokens = memoryview(array("q", token_ids))  # converted once, sliced without copies
    from_bytes = int.from_bytes
    for start in range(0, len(tokens) - block_size + 1, block_size):
        parent = hash_block(parent, tokens[start : start + block_size])
        out.append(from_bytes(parent[:8], "little", signed=True))
    return out
