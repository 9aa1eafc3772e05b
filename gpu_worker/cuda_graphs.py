"""CUDA-graph capture and replay of decode forwards, for padded batch-size buckets.

A decode step of a small batch spends more time launching ~10 kernels per layer than
running them; a captured graph replays the whole forward with one launch. Graphs have fixed
shapes and fixed addresses, so each bucket (1, 2, 4, 8, 16, 24, ... max_batch) is captured
once over static input buffers, and a step of ``n`` sequences is copied into the smallest
bucket ``>= n``, padded::

    static buffers (bucket B):   input_ids [B]   positions [B]   slot_mapping [B] (-1: pad)
                                 seq_lens [B] (pad rows: 1)      block_tables [B, W]
                                 query_start_loc [B+1] = 0..B
    replay -> static hidden [B, H]; rows n..B-1 are padding and dropped

Attention reads host ints from the metadata to size its grid: the graph is captured with
``max_seq_len = max_model_len`` (splits past a sequence's end exit at once), and
``max_query_len = 1``; the data-dependent values all live in the static tensors.

Hooking it into ModelRunner (after the KV cache is allocated, on CUDA, unless enforce_eager)::

    self.graphs = DecodeGraphs(self.model.forward, self.kv_caches, max_batch=min(256, max_num_seqs),
                               max_blocks_per_seq=-(-max_model_len // block_size),
                               max_model_len=max_model_len, hidden_size=cfg.hidden_size,
                               dtype=self.dtype, device=self.device)
    self.graphs.capture()
    self.forward = self.graphs        # same signature; falls back to eager when it cannot run

The caller must not reuse a returned hidden tensor after the next replay (it is a view of
the static output). On a CPU device ``capture`` does nothing and every call runs eagerly.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Sequence

import torch

from zeroserve.kernels.metadata import AttentionMetadata

log = logging.getLogger(__name__)

Forward = Callable[[torch.Tensor, torch.Tensor, list, AttentionMetadata], torch.Tensor]


def default_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then every 8 up to 256, then every 32 (vLLM's spacing): padding waste
    stays under 8 rows where batches are common."""
    sizes = [b for b in (1, 2, 4) if b < max_batch]
    sizes += list(range(8, min(max_batch, 256) + 1, 8))
    sizes += list(range(288, max_batch + 1, 32))
    if not sizes or sizes[-1] != max_batch:
        sizes.append(max_batch)
    return sorted(set(sizes))


class DecodeGraphs:
    """Callable like the model's forward; replays a captured graph for decode-only batches."""

    def __init__(
        self,
        forward: Forward,
        kv_caches: list[torch.Tensor],
        *,
        max_batch: int,
        max_blocks_per_seq: int,
        max_model_len: int,
        hidden_size: int,
        dtype: torch.dtype,
        device: torch.device | str,
        buckets: Sequence[int] | None = None,
        enabled: bool | None = None,
    ):
        self.forward, self.kv_caches = forward, kv_caches
        self.device = torch.device(device)
        self.enabled = self.device.type == "cuda" if enabled is None else enabled
        self.max_model_len, self.hidden_size, self.dtype = max_model_len, hidden_size, dtype
        self.buckets = sorted(buckets) if buckets else default_buckets(max_batch)
        self.max_batch = self.buckets[-1]
        self.max_blocks_per_seq = max_blocks_per_seq
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.pool = None
        self.replays = 0
        self.capture_time_s = 0.0
        if self.enabled:
            b, dev = self.max_batch, self.device
            self.input_ids = torch.zeros(b, dtype=torch.int64, device=dev)
            self.positions = torch.zeros(b, dtype=torch.int64, device=dev)
            self.slot_mapping = torch.full((b,), -1, dtype=torch.int64, device=dev)
            self.seq_lens = torch.ones(b, dtype=torch.int32, device=dev)
            self.block_tables = torch.zeros((b, max_blocks_per_seq), dtype=torch.int32, device=dev)
            self.query_start_loc = torch.arange(b + 1, dtype=torch.int32, device=dev)

    # ------------------------------------------------------------------ capture

    def _meta(self, batch: int) -> AttentionMetadata:
        """Metadata over the first ``batch`` rows of the static buffers."""
        return AttentionMetadata(
            query_start_loc=self.query_start_loc[: batch + 1],
            seq_lens=self.seq_lens[:batch],
            block_tables=self.block_tables[:batch],
            slot_mapping=self.slot_mapping[:batch],
            max_query_len=1,
            max_seq_len=self.max_model_len,
            query_lens_host=[1] * batch,
            seq_lens_host=[self.max_model_len] * batch,
        )

    @torch.inference_mode()
    def capture(self, warmup_runs: int = 2) -> None:
        """Capture every bucket, largest first (smaller graphs then fit in its memory pool).

        Padding rows (seq_len 1, slot -1) stand in for real data: they read block 0 and
        write nothing, so capture never touches live KV blocks.
        """
        if not self.enabled:
            return
        start = time.perf_counter()
        self._pad(0)
        with self._capture_stream() as stream:
            for batch in reversed(self.buckets):
                meta = self._meta(batch)
                args = (self.input_ids[:batch], self.positions[:batch], self.kv_caches, meta)
                for _ in range(warmup_runs):  # JIT-compile kernels and settle the allocator
                    self.forward(*args)
                self.graphs[batch], self.outputs[batch] = self._capture_one(args, stream)
        self.capture_time_s = time.perf_counter() - start
        log.info(
            "captured %d decode graphs (batch %d..%d) in %.1f s",
            len(self.graphs),
            self.buckets[0],
            self.buckets[-1],
            self.capture_time_s,
        )

    @contextlib.contextmanager
    def _capture_stream(self):
        """A side stream for warmup and capture (capturing on the default stream is an error)."""
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            yield stream
        torch.cuda.current_stream(self.device).wait_stream(stream)
        torch.cuda.synchronize(self.device)

    def _capture_one(self, args: tuple, stream) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, stream=stream):
            out = self.forward(*args)
        if self.pool is None:
            self.pool = graph.pool()
        return graph, out

    # ------------------------------------------------------------------ replay

    def _load(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> None:
        """The step's inputs into the first rows of the static buffers."""
        n, width = meta.num_seqs, meta.block_tables.shape[1]
        self.input_ids[:n].copy_(input_ids, non_blocking=True)
        self.positions[:n].copy_(positions, non_blocking=True)
        self.slot_mapping[:n].copy_(meta.slot_mapping, non_blocking=True)
        self.seq_lens[:n].copy_(meta.seq_lens, non_blocking=True)
        self.block_tables[:n, :width].copy_(meta.block_tables, non_blocking=True)

    def _pad(self, first: int, last: int | None = None) -> None:
        """Rows ``first..last`` of the static buffers as padding: write nothing, read one token
        of block 0."""
        self.slot_mapping[first:last].fill_(-1)
        self.seq_lens[first:last].fill_(1)
        self.block_tables[first:last, 0].zero_()

    def bucket_for(self, num_seqs: int) -> int | None:
        for b in self.buckets:
            if b >= num_seqs:
                return b
        return None

    def can_replay(self, input_ids: torch.Tensor, meta: AttentionMetadata) -> bool:
        return (
            bool(self.graphs)
            and meta.is_decode_only
            and input_ids.shape[0] == meta.num_seqs
            and meta.max_seq_len <= self.max_model_len
            and meta.block_tables.shape[1] <= self.max_blocks_per_seq
            and self.bucket_for(meta.num_seqs) in self.graphs
        )

    def __call__(
        self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list, meta: AttentionMetadata
    ) -> torch.Tensor:
        if not self.can_replay(input_ids, meta) or kv_caches is not self.kv_caches:
            return self.forward(input_ids, positions, kv_caches, meta)
        n = meta.num_seqs
        batch = self.bucket_for(n)
        self._load(input_ids, positions, meta)
        if batch > n:
            self._pad(n, batch)
        self.graphs[batch].replay()
        self.replays += 1
        return self.outputs[batch][:n]
