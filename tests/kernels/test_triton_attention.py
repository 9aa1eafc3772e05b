"""Triton paged attention (decode split-K, extend, dispatch) against the torch reference.

Runs in the Triton interpreter (see conftest.py): shapes are tiny but odd, and every case
puts a sequence's blocks in shuffled physical order so that block tables really matter.
"""

from __future__ import annotations

import random

import pytest
import torch

from zeroserve.kernels import get_kernels
from zeroserve.kernels.metadata import AttentionMetadata
from zeroserve.kernels.reference import ops as ref
from zeroserve.kernels.triton.attention_decode import choose_split_len, decode_attention
from zeroserve.kernels.triton.attention_extend import extend_attention

torch.set_num_threads(2)
BLOCK_SIZE = 16


def paged_batch(query_lens, seq_lens, hq, hkv, head_dim, dtype=torch.float32, seed=0):
    """Random q and a random paged KV cache holding every sequence's full context."""
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    blocks_per_seq = [-(-n // BLOCK_SIZE) for n in seq_lens]
    num_blocks = sum(blocks_per_seq) + 2  # spare blocks: garbage a wrong table would read
    physical = list(range(num_blocks))
    rng.shuffle(physical)
    tables, start = [], 0
    for n in blocks_per_seq:
        tables.append(physical[start : start + n])
        start += n
    shape = (num_blocks, BLOCK_SIZE, hkv, head_dim)
    k_cache = torch.randn(shape, generator=gen).to(dtype)
    v_cache = torch.randn(shape, generator=gen).to(dtype)
    q = torch.randn((sum(query_lens), hq, head_dim), generator=gen).to(dtype)
    meta = AttentionMetadata.build(query_lens, seq_lens, tables, [-1] * sum(query_lens))
    return q, k_cache, v_cache, meta


def assert_close(out, expected, atol=2e-3):
    assert out.shape == expected.shape and out.dtype == expected.dtype
    torch.testing.assert_close(out.float(), expected.float(), atol=atol, rtol=atol)


# ----------------------------------------------------------------------------------- decode

DECODE_CASES = [
    # (head_dim, hq, hkv, seq_lens, split_len): split_len None = the automatic choice
    (64, 2, 2, [1], None),
    (128, 6, 2, [15, 63, 300], 64),  # several splits per sequence, reduce kernel
    (64, 3, 1, [300, 1, 15], None),  # automatic split (small batch: many splits)
    (128, 2, 2, [63, 1, 300], 1024),  # one split: direct write, no reduce
]


@pytest.mark.parametrize("head_dim,hq,hkv,seq_lens,split_len", DECODE_CASES)
def test_decode_matches_reference(head_dim, hq, hkv, seq_lens, split_len):
    q, k_cache, v_cache, meta = paged_batch([1] * len(seq_lens), seq_lens, hq, hkv, head_dim)
    scale = head_dim**-0.5
    out = decode_attention(
        q, k_cache, v_cache, meta.block_tables, meta.seq_lens, meta.max_seq_len, scale, split_len=split_len
    )
    assert_close(out, ref.paged_attention(q, k_cache, v_cache, meta, scale))


def test_decode_seventeen_sequences_and_a_padding_row():
    """17 rows of mixed lengths; a CUDA-graph padding row (seq_len 0) must come out as zeros."""
    rng = random.Random(1)
    seq_lens = [rng.choice([1, 15, 63]) for _ in range(16)] + [300]
    q, k_cache, v_cache, meta = paged_batch([1] * 17, seq_lens, 3, 1, 64, seed=1)
    expected = ref.paged_attention(q, k_cache, v_cache, meta, 0.125)
    out = decode_attention(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, 300, 0.125, split_len=128)
    assert_close(out, expected)

    padded_lens = meta.seq_lens.clone()
    padded_lens[3] = 0
    out = decode_attention(q, k_cache, v_cache, meta.block_tables, padded_lens, 300, 0.125, split_len=128)
    assert torch.equal(out[3], torch.zeros_like(out[3]))
    keep = [i for i in range(17) if i != 3]
    assert_close(out[keep], expected[keep])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_decode_half_precision_cache(dtype):
    q, k_cache, v_cache, meta = paged_batch([1, 1], [63, 20], 6, 2, 64, dtype=dtype, seed=2)
    out = decode_attention(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, 63, 0.125, split_len=64)
    assert_close(out, ref.paged_attention(q, k_cache, v_cache, meta, 0.125), atol=2e-2)


def test_split_choice_fills_the_gpu_without_empty_splits():
    # one long sequence: many splits; a big batch: a single split (no reduce pass)
    assert choose_split_len(1, 8, 4096, 64, 132) == 128
    assert choose_split_len(256, 8, 4096, 64, 132) == 4096
    for seqs, ctx in [(1, 1), (3, 300), (17, 63), (64, 2048)]:
        split = choose_split_len(seqs, 8, ctx, 64, 132)
        assert split % 64 == 0 and split >= 64
        assert -(-ctx // split) * split - ctx < split  # the last split is never empty


# ----------------------------------------------------------------------------------- extend

EXTEND_CASES = [
    # (head_dim, hq, hkv, query_lens, seq_lens): prefix = seq_len - query_len is cached
    (64, 2, 2, [5, 1, 17], [5, 15, 63]),  # fresh prefill, a decode row, a chunk after a prefix
    (128, 6, 2, [17, 63, 1], [300, 63, 1]),  # long cached prefix, full prefill, 1-token context
]


@pytest.mark.parametrize("head_dim,hq,hkv,query_lens,seq_lens", EXTEND_CASES)
def test_extend_matches_reference(head_dim, hq, hkv, query_lens, seq_lens):
    q, k_cache, v_cache, meta = paged_batch(query_lens, seq_lens, hq, hkv, head_dim, seed=3)
    scale = head_dim**-0.5
    out = extend_attention(
        q, k_cache, v_cache, meta.query_start_loc, meta.seq_lens, meta.block_tables, meta.max_query_len, scale
    )
    assert_close(out, ref.paged_attention(q, k_cache, v_cache, meta, scale))


def test_extend_seventeen_ragged_sequences_with_gqa3():
    rng = random.Random(4)
    seq_lens = [rng.choice([1, 15, 40]) for _ in range(17)]
    query_lens = [rng.randint(1, n) for n in seq_lens]
    q, k_cache, v_cache, meta = paged_batch(query_lens, seq_lens, 3, 1, 64, seed=4)
    out = extend_attention(
        q, k_cache, v_cache, meta.query_start_loc, meta.seq_lens, meta.block_tables, meta.max_query_len, 0.125
    )
    assert_close(out, ref.paged_attention(q, k_cache, v_cache, meta, 0.125))


def test_extend_bf16_cache():
    q, k_cache, v_cache, meta = paged_batch([9, 4], [30, 4], 2, 2, 64, dtype=torch.bfloat16, seed=5)
    out = extend_attention(
        q, k_cache, v_cache, meta.query_start_loc, meta.seq_lens, meta.block_tables, meta.max_query_len, 0.125
    )
    assert_close(out, ref.paged_attention(q, k_cache, v_cache, meta, 0.125), atol=2e-2)


# ----------------------------------------------------------------------------------- dispatch


def test_paged_attention_after_write_kv_like_a_model_step():
    """Through get_kernels("triton"): write this step's K/V via slot mapping, then attend.

    Step 1 prefills two sequences (one with a cached prefix); step 2 decodes both; the
    outputs must equal the reference run on its own copy of the cache.
    """
    kernels = get_kernels("triton")
    hq, hkv, d = 6, 2, 64
    gen = torch.Generator().manual_seed(6)
    tables = [[5, 2, 7], [0, 3]]
    caches = {
        name: (torch.zeros(8, BLOCK_SIZE, hkv, d), torch.zeros(8, BLOCK_SIZE, hkv, d))
        for name in ("tri", "ref")
    }
    for k_cache, v_cache in caches.values():  # a cached prefix of 20 tokens for sequence 0
        k_cache[5], v_cache[5] = torch.ones(BLOCK_SIZE, hkv, d), -torch.ones(BLOCK_SIZE, hkv, d)
        k_cache[2, :4], v_cache[2, :4] = 0.5, 0.25

    def slots(seq, positions):
        return [tables[seq][p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in positions]

    steps = [
        # (query_lens, seq_lens, slot mapping, padded with one -1 token in step 2)
        ([13, 17], [33, 17], slots(0, range(20, 33)) + slots(1, range(17))),
        ([1, 1, 1], [34, 18, 0], slots(0, [33]) + slots(1, [17]) + [-1]),
    ]
    for query_lens, seq_lens, slot_mapping in steps:
        num_tokens = sum(query_lens)
        k = torch.randn(num_tokens, hkv, d, generator=gen)
        v = torch.randn(num_tokens, hkv, d, generator=gen)
        q = torch.randn(num_tokens, hq, d, generator=gen)
        rows = tables + [[0]] * (len(query_lens) - len(tables))
        meta = AttentionMetadata.build(query_lens, seq_lens, rows, slot_mapping)
        kernels.write_kv(k, v, *caches["tri"], meta.slot_mapping)
        ref.write_kv(k, v, *caches["ref"], meta.slot_mapping)
        assert torch.equal(caches["tri"][0], caches["ref"][0])
        assert torch.equal(caches["tri"][1], caches["ref"][1])
        out = kernels.paged_attention(q, *caches["tri"], meta, 0.125)
        live = sum(1 for n in seq_lens if n > 0)  # the padding row has no reference answer
        expected_meta = AttentionMetadata.build(
            query_lens[:live], seq_lens[:live], tables, slot_mapping[:live]
        )
        expected = ref.paged_attention(q[: sum(query_lens[:live])], *caches["ref"], expected_meta, 0.125)
        assert_close(out[: expected.shape[0]], expected)
