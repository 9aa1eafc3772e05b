"""CPU graphs of decode forwards: DecodeGraphs' static buffers, with each batch size's forward
recorded as its list of C++ kernel calls (kernels/cpu/graph.py) instead of a CUDA graph. A
small decode step then costs its kernels only: SmolLM2 q4 at batch 1 went from ~10 ms to
~5 ms a step on the 2-core dev VM (benchmarks/bench_model.py against --enforce-eager).

Unlike a GPU, a CPU pays for every padding row at full price (a batch-64 q4 decode step is
compute-bound: ~1.1 ms a row), so there is one graph per exact batch size, not per bucket:

- sizes 1..``record_at_start`` are recorded when the worker starts (each ~3 forwards);
- larger sizes, up to ``max_batch``, are recorded by the first decode step of that size
  (the step runs eagerly while it is recorded, so its result is the eager one), and checked
  by the second: that step runs eagerly and by replay, and uses the replay only from then on.

Every graph is checked before it is used: its replay on other inputs must equal the eager
forward bit for bit (same kernels, same order); recording itself refuses a forward that
computes outside the recordable kernels (another backend, a layout a kernel does not take,
tensor parallelism's collectives). Any refusal or mismatch turns the graphs off with a log
line saying why, and every step runs eagerly. All graphs share one activation arena (a step
replays one graph, and its output is read before the next step), grown when a larger batch
is recorded.
"""

from __future__ import annotations

import logging
import time

import torch

from zeroserve.gpu_worker.cuda_graphs import DecodeGraphs, Forward
from zeroserve.kernels.cpu.graph import CpuGraph, GraphUnsupported, record
from zeroserve.kernels.cpu.ops import in_range
from zeroserve.kernels.metadata import AttentionMetadata

log = logging.getLogger(__name__)

RECORD_AT_START = 8  # batch sizes recorded when the worker starts (~0.3 s for SmolLM2)


class CpuDecodeGraphs(DecodeGraphs):
    """Callable like the model's forward; replays a recorded CPU graph for decode-only
    batches of up to ``max_batch`` sequences, and runs anything else eagerly."""

    def __init__(
        self,
        forward: Forward,
        kv_caches: list[torch.Tensor],
        *,
        max_batch: int,
        max_blocks_per_seq: int,
        max_model_len: int,
        vocab_size: int,
        record_at_start: int = RECORD_AT_START,
    ):
        super().__init__(
            forward,
            kv_caches,
            max_batch=max_batch,
            max_blocks_per_seq=max_blocks_per_seq,
            max_model_len=max_model_len,
            hidden_size=0,
            dtype=torch.float32,
            device="cpu",
            buckets=list(range(1, max_batch + 1)),
            enabled=True,
        )
        self.vocab_size = vocab_size
        self.record_at_start = min(record_at_start, max_batch)
        self.unchecked: set[int] = set()  # recorded during serving, not yet checked against eager
        self.arena = torch.empty(0, dtype=torch.uint8)
        self.disabled_reason: str | None = None

    @property
    def active(self) -> bool:
        return self.disabled_reason is None

    # ------------------------------------------------------------------ recording

    @torch.inference_mode()
    def capture(self, warmup_runs: int = 1) -> None:
        """Record and check sizes 1..record_at_start (the first forward packs the weights)."""
        start = time.perf_counter()
        try:
            for batch in range(1, self.record_at_start + 1):
                self._pad(0)
                for _ in range(warmup_runs):
                    self.forward(*self._static_args(batch))
                self._record(batch)
                self._check_on_other_inputs(batch)
        except GraphUnsupported as exc:
            self._disable(str(exc))
            return
        finally:
            self._pad(0)
        self.capture_time_s = time.perf_counter() - start
        log.info(
            "recorded CPU decode graphs for batches 1..%d in %.2f s (%d kernel calls at batch 1); "
            "batches up to %d are recorded at their first decode step",
            self.record_at_start,
            self.capture_time_s,
            len(self.graphs[1]),
            self.max_batch,
        )

    def _static_args(self, batch: int) -> tuple:
        return self.input_ids[:batch], self.positions[:batch], self.kv_caches, self._meta(batch)

    def _record(self, batch: int) -> torch.Tensor | None:
        """Record the forward of ``batch`` rows of the static buffers; returns its output."""
        args = self._static_args(batch)
        graph, out = record(lambda: self.forward(*args), bind=False)
        if graph.arena_bytes > self.arena.numel():  # a larger batch: every graph moves to a new arena
            self.arena = torch.empty(graph.arena_bytes, dtype=torch.uint8)
            for other_batch, other in self.graphs.items():
                self._bind(other, other_batch)
        self.graphs[batch] = graph
        self._bind(graph, batch)
        return out

    def _bind(self, graph: CpuGraph, batch: int) -> None:
        graph.bind(self.arena)
        self.outputs[batch] = graph.output

    def _check_on_other_inputs(self, batch: int) -> None:
        """At start: the replay on inputs other than the recorded ones must equal the eager
        forward on them exactly. Writes K/V into the first blocks, which hold nothing yet."""
        num_blocks, block_size = self.kv_caches[0][0].shape[:2]
        width = min(self.max_blocks_per_seq, max(1, num_blocks // batch))
        span = min(self.max_model_len, width * block_size)
        gen = torch.Generator().manual_seed(batch)
        positions = torch.randint(0, span, (batch,), generator=gen)
        tables = (torch.arange(batch * width).view(batch, width) % num_blocks).to(torch.int32)
        rows = torch.arange(batch)
        slots = tables[rows, positions // block_size].to(torch.int64) * block_size + positions % block_size
        self.input_ids[:batch] = torch.randint(0, self.vocab_size, (batch,), generator=gen)
        self.positions[:batch] = positions
        self.seq_lens[:batch] = (positions + 1).to(torch.int32)
        self.block_tables[:batch, :width] = tables
        self.slot_mapping[:batch] = slots
        eager = self.forward(*self._static_args(batch))
        self.graphs[batch].replay()
        self._compare(batch, eager)

    def _compare(self, batch: int, eager: torch.Tensor) -> None:
        out = self.outputs[batch]
        if not torch.equal(out, eager):
            diff = (out - eager).abs().max().item()
            raise GraphUnsupported(
                f"the replay of batch {batch} differs from the eager forward (max |diff| {diff:.3g})"
            )

    def _disable(self, why: str) -> None:
        self.graphs.clear()
        self.outputs.clear()
        self.unchecked.clear()
        self.arena = torch.empty(0, dtype=torch.uint8)
        self.disabled_reason = why
        log.warning("CPU graphs off, decode steps run eagerly: %s", why)

    # ------------------------------------------------------------------ serving

    def _in_range(self, input_ids: torch.Tensor, positions: torch.Tensor) -> bool:
        """The bounds checks the eager wrappers make before each kernel, once for the step: a
        replay reads the embedding row and the rotary row these index, unchecked."""
        return in_range(input_ids, self.vocab_size) and in_range(positions, self.max_model_len)

    def __call__(
        self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list, meta: AttentionMetadata
    ) -> torch.Tensor:
        n = meta.num_seqs
        if not (
            self.active
            and kv_caches is self.kv_caches
            and meta.is_decode_only
            and input_ids.shape[0] == n
            and 0 < n <= self.max_batch
            and meta.block_tables.shape[1] <= self.max_blocks_per_seq
            and self._in_range(input_ids, positions)
        ):
            # (an id or position out of range runs eagerly, where the kernels' checks raise)
            return self.forward(input_ids, positions, kv_caches, meta)
        if n not in self.graphs:  # first step of this size: recorded as it runs
            self._load(input_ids, positions, meta)
            try:
                out = self._record(n)
            except GraphUnsupported as exc:
                self._disable(f"batch {n}: {exc}")
                return self.forward(input_ids, positions, kv_caches, meta)
            self.unchecked.add(n)
            return out
        if n in self.unchecked:  # second step of this size: eager and replay must agree
            eager = self.forward(input_ids, positions, kv_caches, meta)
            self._load(input_ids, positions, meta)
            self.graphs[n].replay()
            try:
                self._compare(n, eager)
            except GraphUnsupported as exc:
                self._disable(str(exc))
            else:
                self.unchecked.discard(n)
            return eager
        self._load(input_ids, positions, meta)
        self.graphs[n].replay()
        self.replays += 1
        return self.outputs[n]
