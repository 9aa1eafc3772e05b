"""ModelRunner: one model, its paged KV cache, and one step at a time.

    runner = ModelRunner(RunnerConfig(model=path, device="cpu"))
    result = runner.execute(plan)       # StepPlan -> StepResult

A step: apply the plan's diffs to the per-request state (input_batch.RequestStates), build
flat inputs, run the model, compute logits only for the rows that sample, sample, append
each sampled token to its request. The forward is a pure function of (input_ids, positions,
kv_caches, attention metadata) -> hidden states, which is what CUDA-graph capture of decode
batches hooks into (``self.forward``).

Tensor parallel (``ModelRunner(config, tp=...)``, gpu_worker/parallel.py): every rank runs
``execute`` on the same plan with its shard of the model; rank 0 samples from the gathered
logits and broadcasts the ids, so every rank's requests hold the same tokens. Only rank 0's
StepResult is sent on. ``tp=None`` is the single-process path, with no collective anywhere.
"""

from __future__ import annotations

import functools
import logging
import time
from collections import Counter

import msgspec
import torch

from zeroserve.gpu_worker.grammar import GrammarBook, tokenizer_info
from zeroserve.gpu_worker.input_batch import PlanError, RequestStates, build_inputs
from zeroserve.gpu_worker.kv_cache import (
    DEFAULT_CPU_KV_CACHE_GB,
    KVCacheSpec,
    allocate_kv_cache,
    cpu_num_blocks,
    cuda_num_blocks,
)
from zeroserve.gpu_worker.loader import (
    ModelConfig,
    ReadStats,
    checkpoint_format,
    load_checkpoint,
    load_model_config,
)
from zeroserve.gpu_worker.models import build_model
from zeroserve.gpu_worker.models.layers import Linear
from zeroserve.gpu_worker.parallel import TensorParallel, check_tp_size, kv_head_range, tensor_shards
from zeroserve.gpu_worker.pooling import PoolingDefault, pool, take_pooling_rows
from zeroserve.gpu_worker.quantization import (
    DTYPES,
    CheckpointFacts,
    available_modes,
    cpu_flags,
    gguf_kernel_types,
    resolve_dtype,
    resolve_quantization,
)
from zeroserve.gpu_worker.sampler import Sampler, SamplingBatch, make_generator
from zeroserve.kernels import get_kernels
from zeroserve.kernels.metadata import AttentionMetadata
from zeroserve.kernels.quantized import GGUFWeight
from zeroserve.shared import env
from zeroserve.shared.config import DEFAULTS, EngineConfig, view_of
from zeroserve.shared.messages import StepPlan, StepResult

__all__ = ["ModelRunner", "PlanError", "RunnerConfig", "resolve_dtype"]

log = logging.getLogger(__name__)


class RunnerConfig(msgspec.Struct, frozen=True, kw_only=True):
    """The worker's view of EngineConfig: every field is EngineConfig's of the same name
    (default included), except ``model``, which may be left out here."""

    model: str | None = None  # GGUF file or HF folder; None = the packaged SmolLM2 GGUF
    dtype: str = DEFAULTS.dtype  # auto: float32 on CPU (no fast bf16 there), bfloat16 on GPU
    kv_cache_dtype: str = DEFAULTS.kv_cache_dtype  # auto: the compute dtype; CPU: 16-bit, read as fp32
    device: str = DEFAULTS.device
    block_size: int = DEFAULTS.block_size
    num_kv_blocks: int = DEFAULTS.num_kv_blocks  # explicit size of the KV cache; 0: from memory
    kv_cache_memory_gb: float = DEFAULTS.kv_cache_memory_gb  # CPU: 0 = 2 GiB; GPU: overrides utilization
    gpu_memory_utilization: float = DEFAULTS.gpu_memory_utilization
    max_model_len: int = DEFAULTS.max_model_len  # 0: the model's max_position_embeddings
    max_num_batched_tokens: int = DEFAULTS.max_num_batched_tokens
    max_num_seqs: int = DEFAULTS.max_num_seqs
    kernel_backend: str | None = DEFAULTS.kernel_backend  # "torch" | "cpu" | "triton"; None: by device
    quantization: str = DEFAULTS.quantization  # auto | none | int8 | q4 | fp8 (gpu_worker/quantization.py)
    enforce_eager: bool = DEFAULTS.enforce_eager  # GPU: no CUDA graphs
    load_format: str = DEFAULTS.load_format  # auto | hf | gguf | dummy (random weights, config from the file)
    num_threads: int = DEFAULTS.num_threads  # CPU: torch intra-op threads; 0 = torch's default (all cores)
    seed: int = DEFAULTS.seed
    pooling: str = DEFAULTS.pooling  # embeddings: auto | last | mean | cls (gpu_worker/pooling.py)

    @classmethod
    def from_engine(cls, config: EngineConfig) -> RunnerConfig:
        return view_of(config, cls)


def weight_formats(model: torch.nn.Module, mode: str) -> str:
    """What the projections (packed: qkv, gate_up) run in, by format and count: "Q4_1 x120,
    Q8_0 x1", "int8 x121". Read before the first step, from the weights, not the handles."""
    formats: Counter[str] = Counter()
    for layer in model.modules():
        if isinstance(layer, Linear) and layer.weight is not None:
            w = layer.weight
            if isinstance(w, GGUFWeight):
                formats[w.type_name] += 1
            elif mode in ("int8", "fp8", "bf16") and w.dim() == 2 and w.dtype == torch.float32:
                formats[mode] += 1
            else:
                formats[str(w.dtype).removeprefix("torch.")] += 1
    return ", ".join(f"{name} x{n}" for name, n in sorted(formats.items(), key=lambda kv: (-kv[1], kv[0])))


class ModelRunner:
    def __init__(self, config: RunnerConfig, tp: TensorParallel | None = None):
        from zeroserve.shared.model_files import resolve_model

        start = time.perf_counter()
        self.config, self.tp = config, tp
        self.device = torch.device(config.device)
        if self.device.type == "cpu":
            env.set_cpu_thread_env()
            if config.num_threads > 0:
                torch.set_num_threads(config.num_threads)
        elif self.device.type == "cuda" and self.device.index is not None:
            torch.cuda.set_device(self.device)
        torch.manual_seed(config.seed)
        path = resolve_model(config.model)
        backend = get_kernels(config.kernel_backend, str(self.device)).name
        kernel_types = gguf_kernel_types(backend)
        # an embedding is compared with its reference model's: auto keeps an encoder's float weights
        encoder = checkpoint_format(path) == "hf" and load_model_config(path).is_encoder
        choice = resolve_quantization(
            "none" if encoder and config.quantization == "auto" else config.quantization,
            config.dtype,
            self.device,
            CheckpointFacts.of(path, config.load_format),
            cpu_flags(),
            available_modes(backend),
            kernel_types,
            torch.cuda.get_device_capability(self.device) if self.device.type == "cuda" else None,
        )
        if choice.warning:
            log.warning("%s", choice.reason)
        self.quantization, self.dtype = choice.mode, choice.dtype
        self.ops = get_kernels(backend, str(self.device), quantization=choice.mode)

        slices = None
        if tp is not None:  # refused before any tensor is read when the sizes do not divide
            header = load_model_config(path)
            check_tp_size(header, tp.world_size)
            slices = tensor_shards(header, tp.rank, tp.world_size)
        self.read_stats = ReadStats()
        self.model_config: ModelConfig
        self.model_config, weights = load_checkpoint(
            path,
            dtype=self.dtype,
            device=self.device,
            load_format=config.load_format,
            seed=config.seed,
            keep_quantized=(True if kernel_types is None else kernel_types) if choice.mode == "q4" else False,
            slices=slices,
            stats=self.read_stats,
        )
        cfg = self.model_config
        self.max_model_len = config.max_model_len or cfg.max_position_embeddings
        if self.max_model_len > cfg.max_position_embeddings:
            raise ValueError(
                f"max_model_len={self.max_model_len} is more than the model's max_position_embeddings="
                f"{cfg.max_position_embeddings}; lower --max-model-len"
            )
        self.model = build_model(cfg, self.ops, self.max_model_len, tp)
        self.model.load_weights(weights, self.device)
        self.model.train(False)  # inference only (no dropout layers anyway)
        # "quantization q4 (auto: GGUF Q4_1 blocks, avx512_vnni): Q4_1 x120, Q8_0 x1 on cpu kernels"
        self.quantization_summary = (
            f"quantization {choice.mode} ({choice.reason}): {weight_formats(self.model, choice.mode)} "
            f"on {self.ops.name} kernels"
        )
        self.vocab_size = cfg.vocab_size
        self.eos_token_ids = list(cfg.eos_token_ids)
        self.block_size = config.block_size

        self.kv_dtype = self._kv_cache_dtype()
        kv_heads = cfg.num_key_value_heads
        if tp is not None:
            kv0, kv1 = kv_head_range(kv_heads, tp.rank, tp.world_size)
            kv_heads = kv1 - kv0
        self.kv_spec = KVCacheSpec(
            cfg.num_hidden_layers, kv_heads, cfg.head_dim, config.block_size, self.kv_dtype
        )
        self.num_kv_blocks = self._size_kv_cache()
        if tp is not None:  # the scheduler plans for rank 0's count: every rank must hold it
            self.num_kv_blocks = tp.min_int(self.num_kv_blocks, self.device)
        if self.num_kv_blocks < 1:
            raise RuntimeError(
                f"no room for the KV cache ({self.kv_spec.bytes_per_block} bytes per block); raise "
                "kv_cache_memory_gb / gpu_memory_utilization or use a smaller model"
            )
        if self.num_kv_blocks * self.block_size < self.max_model_len:
            log.warning(
                "the KV cache holds %d tokens: max_model_len lowered from %d",
                self.num_kv_blocks * self.block_size,
                self.max_model_len,
            )
            self.max_model_len = self.num_kv_blocks * self.block_size
        # an encoder attends over each step's own q/k/v (models/bert.py): no cache to hold
        self.kv_caches = (
            [] if cfg.is_encoder else allocate_kv_cache(self.kv_spec, self.num_kv_blocks, self.device)
        )
        self.requests = RequestStates(
            self.num_kv_blocks,
            self.block_size,
            self.max_model_len,
            lambda seed: make_generator(seed, self.device),
        )
        self.sampler = Sampler(self.ops)
        self.pooling = PoolingDefault.of(cfg, config.pooling)  # embedding requests' default pooling
        self.model_path = path
        self.grammar: GrammarBook | None = None  # constrained decoding: made at the first such request
        # forward(input_ids, positions, kv_caches, meta) -> hidden; captured decode graphs take
        # its place (same signature, eager fallback for other batches): CUDA graphs on a GPU,
        # recorded kernel calls (cpu_graphs.py) with the C++ CPU kernels
        self.forward = self.model.forward
        self.graphs_off_reason: str | None = None  # why recording refused the forward, if it did
        # collectives are not captured: a tensor-parallel rank runs eagerly
        if not config.enforce_eager and tp is None and not cfg.is_encoder:
            if self.device.type == "cuda":
                self._capture_cuda_graphs()
            elif self.device.type == "cpu" and self.ops.name == "cpu":
                self._record_cpu_graphs()
        self.load_time_s = time.perf_counter() - start
        log.info(
            "model ready in %.1f s: %s, %s on %s, %d KV blocks of %d tokens (%.1f MiB, %s), %s; %s",
            self.load_time_s,
            cfg.architecture,
            str(self.dtype).removeprefix("torch."),
            self.device,
            self.num_kv_blocks,
            self.block_size,
            0 if cfg.is_encoder else self.num_kv_blocks * self.kv_spec.bytes_per_block / 2**20,
            str(self.kv_dtype).removeprefix("torch."),
            self.quantization_summary,
            self.graphs_summary,
        )

    @property
    def graphs_summary(self) -> str:
        """How decode steps run: replayed graphs (which batches) or eagerly (and why)."""
        graphs = getattr(self.forward, "graphs", None)
        if graphs and self.device.type == "cuda":
            return f"decode steps of {min(graphs)}..{max(graphs)} sequences replay CUDA graphs"
        if graphs:
            return (
                f"decode steps of 1..{self.forward.max_batch} sequences replay CPU graphs (recorded kernel "
                f"calls; batches 1..{self.forward.record_at_start} recorded at start, larger ones at first use)"
            )
        reason = self.graphs_off_reason
        if reason is None:
            if self.config.enforce_eager:
                reason = "--enforce-eager"
            elif self.device.type == "cpu" and self.ops.name != "cpu":
                reason = f"the {self.ops.name} kernels are not recordable (CPU graphs need the C++ kernels)"
            else:
                reason = "not captured here (tensor parallel, or an encoder)"
        return f"every step runs eagerly: {reason}"

    # ------------------------------------------------------------------ setup

    def _kv_cache_dtype(self) -> torch.dtype:
        name = self.config.kv_cache_dtype
        if name == "auto":
            # a quantized CPU step spends as long in attention as in the projections; fp16 K/V
            # halve the bytes it streams. --quantization none stays fp32 (bit-exact with HF).
            if self.device.type == "cpu" and self.quantization != "none":
                return torch.float16
            return self.dtype
        if name == "fp8":  # e4m3 at scale 1.0, written and read by the Triton kernels (kv_write.py)
            if self.device.type != "cuda" or torch.cuda.get_device_capability(self.device) < (8, 9):
                raise ValueError(
                    "kv_cache_dtype fp8 needs an NVIDIA GPU of compute capability 8.9 or newer (Ada, "
                    f"Hopper), not {self.device}; on a CPU use float16 or bfloat16 to halve the KV bytes"
                )
            return torch.float8_e4m3fn
        if name not in DTYPES:
            raise ValueError(
                f"kv_cache_dtype {name!r} is not supported; choose auto, {', '.join(DTYPES)}, fp8 (GPU)"
            )
        kv_dtype = DTYPES[name]
        if kv_dtype != self.dtype and self.device.type != "cpu":
            raise ValueError(
                f"kv_cache_dtype {name} differs from the compute dtype {str(self.dtype).removeprefix('torch.')}: "
                "only the CPU kernels read a KV cache of another dtype; use --kv-cache-dtype auto on GPU"
            )
        return kv_dtype

    def _size_kv_cache(self) -> int:
        c = self.config
        if self.model_config.is_encoder:  # no KV memory: the blocks only count max_num_seqs full inputs
            return c.max_num_seqs * -(-self.max_model_len // self.block_size)
        if c.num_kv_blocks:  # None or 0: size from memory
            return c.num_kv_blocks
        memory_gb = c.kv_cache_memory_gb or None
        if self.device.type == "cuda":
            self._profile_run()
            return cuda_num_blocks(
                self.kv_spec,
                self.device,
                c.gpu_memory_utilization,
                memory_gb,
                c.max_num_seqs,
                self.max_model_len,
            )
        if self.tp is not None:  # the budget is the replica's: each rank holds 1/N of the heads
            memory_gb = (memory_gb or DEFAULT_CPU_KV_CACHE_GB) / self.tp.world_size
        return cpu_num_blocks(self.kv_spec, memory_gb, c.max_num_seqs, self.max_model_len)

    def _capture_cuda_graphs(self) -> None:
        from zeroserve.gpu_worker.cuda_graphs import DecodeGraphs

        graphs = DecodeGraphs(
            self.model.forward,
            self.kv_caches,
            max_batch=min(256, self.config.max_num_seqs),
            max_blocks_per_seq=-(-self.max_model_len // self.block_size),
            max_model_len=self.max_model_len,
            hidden_size=self.model_config.hidden_size,
            dtype=self.dtype,
            device=self.device,
        )
        with torch.inference_mode():
            graphs.capture()
        self.forward = graphs

    def _record_cpu_graphs(self) -> None:
        from zeroserve.gpu_worker.cpu_graphs import CpuDecodeGraphs

        graphs = CpuDecodeGraphs(
            self.model.forward,
            self.kv_caches,
            max_batch=min(256, self.config.max_num_seqs),
            max_blocks_per_seq=-(-self.max_model_len // self.block_size),
            max_model_len=self.max_model_len,
            vocab_size=self.model_config.vocab_size,
        )
        graphs.capture()
        if graphs.active:
            self.forward = graphs
        self.graphs_off_reason = graphs.disabled_reason

    def reset(self) -> None:
        """Forget every request (the worker calls this after a failed step; the scheduler
        starts over). The KV cache keeps its contents; the scheduler owns which blocks mean what."""
        self.requests.clear()
        if self.grammar is not None:
            self.grammar.clear()

    @torch.inference_mode()
    def _profile_run(self) -> None:
        """A forward over max_num_batched_tokens tokens (and their logits) with a throwaway
        cache, so the allocator's peak shows what activations need."""
        num_tokens = min(self.config.max_num_batched_tokens, self.max_model_len * self.config.max_num_seqs)
        num_seqs = max(1, min(self.config.max_num_seqs, num_tokens))
        query_lens = [num_tokens // num_seqs + (i < num_tokens % num_seqs) for i in range(num_seqs)]
        bs = self.block_size
        blocks_per_seq = [-(-n // bs) for n in query_lens]
        caches = allocate_kv_cache(self.kv_spec, sum(blocks_per_seq), self.device)
        tables, slots, first = [], [], 0
        for n, nb in zip(query_lens, blocks_per_seq):
            tables.append(list(range(first, first + nb)))
            slots.extend((first + p // bs) * bs + p % bs for p in range(n))
            first += nb
        meta = AttentionMetadata.build(query_lens, query_lens, tables, slots, self.device)
        ids = torch.zeros(num_tokens, dtype=torch.int64, device=self.device)
        positions = torch.cat([torch.arange(n, device=self.device) for n in query_lens])
        torch.cuda.reset_peak_memory_stats(self.device)
        hidden = self.model(ids, positions, caches, meta)
        self.model.compute_logits(hidden[:num_seqs])
        del caches, hidden

    # ------------------------------------------------------------------ step

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> StepResult:
        """Run one step. Raises PlanError (state unchanged) for a plan that does not match the
        worker's state; the worker process turns any exception into StepResult.error."""
        start = time.perf_counter()
        scheduled = self.requests.apply(plan)
        grammar = self._grammar(plan)
        if not scheduled:
            return StepResult(plan.step_id, [], [], None, time.perf_counter() - start)
        pooling_rows = take_pooling_rows(scheduled)  # embedding requests: pooled, not sampled
        inputs = build_inputs(scheduled, self.block_size, self.device)
        # masks of constrained rows are computed on a thread while the forward runs
        constrained = grammar.prepare(inputs.sampling) if grammar is not None else None
        hidden = self.forward(inputs.input_ids, inputs.positions, self.kv_caches, inputs.meta)
        token_ids: list[int] = []
        logprobs = None
        if inputs.sampling:
            logits = self.model.compute_logits(hidden.index_select(0, inputs.logits_indices))
            if self.tp is None:
                token_ids, logprobs = self._sample(logits, inputs.sampling, constrained)
            else:  # rank 0 has the gathered logits; every rank needs the ids for its next inputs
                if logits is not None:
                    token_ids, logprobs = self._sample(logits, inputs.sampling, constrained)
                token_ids = self.tp.broadcast_ids(token_ids, len(inputs.sampling), self.device)
        dead_ends = constrained.finish(token_ids) if constrained is not None else []
        pooled = pool(hidden, pooling_rows, self.pooling) if pooling_rows else []
        RequestStates.advance(scheduled, token_ids)
        return StepResult(
            step_id=plan.step_id,
            request_ids=[s.request_id for s in inputs.sampling],
            sampled_token_ids=token_ids,
            logprobs=logprobs,
            step_time_s=time.perf_counter() - start,
            dead_ends=dead_ends,
            pooled=pooled,
        )

    def _grammar(self, plan: StepPlan) -> GrammarBook | None:
        """The constrained-decoding book, synced with the plan; None until a constrained request
        arrives, and on tensor-parallel ranks > 0 (rank 0 samples for the group)."""
        if self.grammar is None:
            if (self.tp is not None and self.tp.rank != 0) or not any(n.params.structured for n in plan.new):
                return None
            info = functools.partial(tokenizer_info, self.model_path, self.vocab_size, self.eos_token_ids)
            self.grammar = GrammarBook(info, self.vocab_size, self.ops)
        self.grammar.sync(plan)
        return self.grammar

    def _sample(self, logits: torch.Tensor, states, constrained=None) -> tuple[list[int], list | None]:
        if constrained is not None:  # the grammar's -inf before anything reads the logits
            constrained.mask(logits)
        batch = SamplingBatch.build(
            [s.params for s in states],
            [s.token_ids[: s.num_prompt_tokens] for s in states],
            [s.token_ids[s.num_prompt_tokens :] for s in states],
            [s.generator for s in states],
            self.eos_token_ids,
            self.device,
        )
        out = self.sampler.sample(logits, batch)
        wants_logprobs = any(s.params.logprobs is not None for s in states)
        return out.token_ids, (list(out.logprobs) if wants_logprobs else None)

    # ------------------------------------------------------------------ introspection

    @property
    def num_requests(self) -> int:
        """Requests the worker holds state for (tests: finished_ids frees them)."""
        return len(self.requests)
