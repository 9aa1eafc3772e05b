"""gpu_worker/cuda_graphs.DecodeGraphs on CPU: bucketing, padding and the replay path.

A real capture needs CUDA; here a stand-in "graph" replays by running the forward again on
the same static buffers, which is exactly what a captured graph does. The forward is a
one-layer attention step through the Triton kernels (interpreted), so padded rows (slot -1,
seq_len 1) and the capture-time ``max_seq_len = max_model_len`` go through the real kernels.
"""

from __future__ import annotations

import contextlib

import torch

from zeroserve.gpu_worker.cuda_graphs import DecodeGraphs, default_buckets
from zeroserve.kernels.metadata import AttentionMetadata
from zeroserve.kernels.triton import ops as tri

torch.set_num_threads(2)
HQ, HKV, D, BS, MAX_LEN = 4, 2, 64, 16, 64


class ReplayByRerun:
    def __init__(self, fn, out):
        self.fn, self.out = fn, out

    def replay(self):
        self.out.copy_(self.fn())


class CpuDecodeGraphs(DecodeGraphs):
    @contextlib.contextmanager
    def _capture_stream(self):
        yield None

    def _capture_one(self, args, stream):
        out = self.forward(*args).clone()
        return ReplayByRerun(lambda: self.forward(*args), out), out


def attention_step(embed):
    """forward(input_ids, positions, kv_caches, meta): write K/V of the ids, attend."""

    def forward(input_ids, positions, kv_caches, meta):
        x = embed[input_ids] + positions.unsqueeze(-1).to(embed.dtype) / 100  # (T, Hq*D)
        q = x.view(-1, HQ, D)
        kv = x[:, : HKV * D].view(-1, HKV, D)
        tri.write_kv(kv, -kv, kv_caches[0][0], kv_caches[0][1], meta.slot_mapping)
        return tri.paged_attention(q, kv_caches[0][0], kv_caches[0][1], meta, D**-0.5).flatten(1)

    return forward


def test_default_buckets():
    assert default_buckets(1) == [1]
    assert default_buckets(20) == [1, 2, 4, 8, 16, 20]
    buckets = default_buckets(512)
    assert buckets[:5] == [1, 2, 4, 8, 16] and 256 in buckets and buckets[-1] == 512
    assert all(b - a <= 32 for a, b in zip(buckets, buckets[1:]))


def test_replay_pads_to_a_bucket_and_matches_eager():
    gen = torch.Generator().manual_seed(0)
    embed = torch.randn(50, HQ * D, generator=gen)
    forward = attention_step(embed)
    caches = {name: [torch.zeros(2, 12, BS, HKV, D)] for name in ("graph", "eager")}
    for c in caches.values():  # some context already in the cache
        c[0].normal_(generator=torch.Generator().manual_seed(1))
    graphs = CpuDecodeGraphs(
        forward,
        caches["graph"],
        max_batch=4,
        max_blocks_per_seq=MAX_LEN // BS,
        max_model_len=MAX_LEN,
        hidden_size=HQ * D,
        dtype=torch.float32,
        device="cpu",
        buckets=[1, 4],
        enabled=True,
    )
    before = caches["graph"][0].clone()
    graphs.capture(warmup_runs=1)
    assert torch.equal(caches["graph"][0], before)  # capture wrote nothing (all slots -1)
    assert sorted(graphs.graphs) == [1, 4]

    # 3 sequences decode: bucket 4, one padding row
    seq_lens, tables = [20, 5, 33], [[3, 7], [1], [0, 2, 9]]
    slots = [tables[i][(n - 1) // BS] * BS + (n - 1) % BS for i, n in enumerate(seq_lens)]
    meta = AttentionMetadata.build([1, 1, 1], seq_lens, tables, slots)
    ids, pos = torch.tensor([4, 8, 15]), torch.tensor([n - 1 for n in seq_lens])
    with torch.inference_mode():  # as in ModelRunner.execute
        out = graphs(ids, pos, caches["graph"], meta)
    expected = forward(ids, pos, caches["eager"], meta)
    assert graphs.replays == 1 and out.shape == expected.shape
    torch.testing.assert_close(out, expected, atol=2e-3, rtol=2e-3)
    assert torch.equal(caches["graph"][0], caches["eager"][0])  # same K/V written, padding wrote nothing

    # a prefill is not a decode batch: eager fallback, no replay
    meta = AttentionMetadata.build([2], [2], [[5]], [80, 81])
    with torch.inference_mode():
        graphs(torch.tensor([1, 2]), torch.tensor([0, 1]), caches["graph"], meta)
    assert graphs.replays == 1
