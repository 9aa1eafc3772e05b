"""Tensor parallelism: N worker ranks of one replica in one torch.distributed group.

Megatron-style sharding, as vLLM does it (each rank holds 1/N of every projection)::

    qkv_proj     column-parallel  rank r: its Hq/N query heads | its KV heads (Hkv/N, or one
                                  head replicated when N > Hkv) | the same V heads
    o_proj       row-parallel     rank r: the input columns of its query heads, then all-reduce
    gate_up_proj column-parallel  rank r: rows [r I/N, (r+1) I/N) of gate | the same of up
    down_proj    row-parallel     rank r: input columns [r I/N, (r+1) I/N), then all-reduce
    embed_tokens vocab-parallel   rank r: rows [r Vp, (r+1) Vp), Vp = ceil(V/N); ids outside -> 0, all-reduce
    lm_head      vocab-parallel   the same rows; logits gathered on rank 0, which samples
    norms        replicated

Only rank 0 talks to the scheduler. How the other ranks get each plan and join the group::

    rank 0  ROUTER tp-R.sock   <- RankHello   ranks 1..N-1 (DEALER)
                               -> GroupStart  (TCPStore port + generation), then torch.distributed init
                               -> every frame rank 0 receives from the scheduler, as received
    rank 0  PULL tp-hb-R.sock  <- Pong every heartbeat interval from each rank's heartbeat thread

After the forward, rank 0 samples and broadcasts the sampled ids (the others append them to
their requests, as rank 0 does). A rank that dies or goes silent ends the group (every rank
exits, see gpu_worker/proc.py); the supervisor starts all N again and a new GroupStart (a new
store, a new generation) forms a fresh group.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from datetime import timedelta

import torch
import torch.distributed as dist
import zmq

from zeroserve.gpu_worker.loader.config import ModelConfig
from zeroserve.gpu_worker.loader.sharding import TensorShard
from zeroserve.shared.config import EngineConfig
from zeroserve.shared.ipc import Codec, bind, connect
from zeroserve.shared.messages import GroupStart, RankHello, RankInbox

__all__ = ["GroupLink", "TensorParallel", "TensorShard", "check_tp_size", "tensor_shards"]

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- sharding (pure)


def check_tp_size(cfg: ModelConfig, world: int) -> None:
    """Raise ValueError, naming the numbers, when ``world`` ranks cannot split the model."""
    if world < 1:
        raise ValueError(f"--tensor-parallel-size must be >= 1, not {world}")
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    problems = []
    if heads % world:
        problems.append(f"its {heads} attention heads")
    if world <= kv and kv % world:
        problems.append(f"its {kv} KV heads")
    if world > kv and world % kv:
        problems.append(f"its {kv} KV heads (replicated: the size must be a multiple of them)")
    if cfg.intermediate_size % world:
        problems.append(f"its MLP width {cfg.intermediate_size}")
    if problems:
        sizes = [n for n in range(1, heads + 1) if heads % n == 0 and _fits(cfg, n)]
        raise ValueError(
            f"--tensor-parallel-size {world} does not divide {' and '.join(problems)} "
            f"({cfg.architecture}); sizes that work for this model: {', '.join(map(str, sizes))}"
        )


def _fits(cfg: ModelConfig, world: int) -> bool:
    kv = cfg.num_key_value_heads
    kv_ok = kv % world == 0 if world <= kv else world % kv == 0
    return cfg.num_attention_heads % world == 0 and kv_ok and cfg.intermediate_size % world == 0


def vocab_range(vocab_size: int, rank: int, world: int) -> tuple[int, int]:
    """Rank's rows of the embedding and lm_head: [r Vp, min(V, (r+1) Vp)), Vp = ceil(V/N)."""
    per = -(-vocab_size // world)
    return min(vocab_size, rank * per), min(vocab_size, (rank + 1) * per)


def kv_head_range(num_kv_heads: int, rank: int, world: int) -> tuple[int, int]:
    """Rank's KV heads: a 1/N share, or (N > Hkv) the one head its query heads attend with."""
    if world <= num_kv_heads:
        per = num_kv_heads // world
        return rank * per, (rank + 1) * per
    head = rank // (world // num_kv_heads)
    return head, head + 1


def tensor_shards(cfg: ModelConfig, rank: int, world: int) -> dict[str, TensorShard]:
    """HF tensor name -> the slice rank ``rank`` of ``world`` loads; a name left out is loaded whole."""
    d = cfg.head_dim
    q_per = cfg.num_attention_heads // world
    kv0, kv1 = kv_head_range(cfg.num_key_value_heads, rank, world)
    i_per = cfg.intermediate_size // world
    v0, v1 = vocab_range(cfg.vocab_size, rank, world)
    q = TensorShard(0, rank * q_per * d, (rank + 1) * q_per * d)
    kv = TensorShard(0, kv0 * d, kv1 * d)
    mlp_rows = TensorShard(0, rank * i_per, (rank + 1) * i_per)
    out = {"model.embed_tokens.weight": TensorShard(0, v0, v1), "lm_head.weight": TensorShard(0, v0, v1)}
    for i in range(cfg.num_hidden_layers):
        a, m = f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp"
        for kind in ("weight", "bias"):
            out[f"{a}.q_proj.{kind}"] = q
            out[f"{a}.k_proj.{kind}"] = out[f"{a}.v_proj.{kind}"] = kv
        out[f"{a}.o_proj.weight"] = TensorShard(1, q.start, q.stop)
        out[f"{m}.gate_proj.weight"] = out[f"{m}.up_proj.weight"] = mlp_rows
        out[f"{m}.down_proj.weight"] = TensorShard(1, mlp_rows.start, mlp_rows.stop)
    return out


# --------------------------------------------------------------------------- the group at run time


class TensorParallel:
    """This rank's place in the group and the collectives the model calls. Every rank calls
    them in the same order (the same plan, the same layers), as torch.distributed requires.
    ``timings`` (benchmarks): when a dict, each collective adds its seconds under its name."""

    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size
        self.timings: dict[str, list[float]] | None = None

    def _timed(self, name: str, start: float) -> None:
        if self.timings is not None:
            self.timings.setdefault(name, []).append(time.perf_counter() - start)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of ``x`` over the ranks, in place (a row-parallel projection's partial sums)."""
        start = time.perf_counter()
        dist.all_reduce(x)
        self._timed("all_reduce", start)
        return x

    def gather_logits(self, local: torch.Tensor, vocab_size: int) -> torch.Tensor | None:
        """Each rank's logits [B, its vocab rows] -> [B, V] on rank 0 (None elsewhere). The last
        rank's shard may be shorter: every shard is padded to ceil(V/N) for the gather."""
        start = time.perf_counter()
        per = -(-vocab_size // self.world_size)
        if local.shape[1] < per:
            local = torch.nn.functional.pad(local, (0, per - local.shape[1]))
        local = local.contiguous()
        parts = [torch.empty_like(local) for _ in range(self.world_size)] if self.rank == 0 else None
        dist.gather(local, parts, dst=0)
        self._timed("gather_logits", start)
        return None if parts is None else torch.cat(parts, dim=1)[:, :vocab_size]

    def broadcast_ids(self, ids: list[int], count: int, device: torch.device) -> list[int]:
        """Rank 0's ``count`` sampled token ids to every rank."""
        start = time.perf_counter()
        t = torch.tensor(ids, dtype=torch.int64) if self.rank == 0 else torch.empty(count, dtype=torch.int64)
        t = t.to(device)
        dist.broadcast(t, src=0)
        self._timed("broadcast_ids", start)
        return ids if self.rank == 0 else t.tolist()

    def min_int(self, value: int, device: torch.device) -> int:
        """The smallest ``value`` over the ranks (the KV blocks every rank can hold)."""
        t = torch.tensor([value], dtype=torch.int64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return int(t.item())


class GroupLink:
    """Rank 0's side (ROUTER) or another rank's (DEALER) of the group socket, and the start of
    the torch.distributed group through it. Used from the main thread only."""

    HELLO_EVERY_S = 1.0

    def __init__(self, config: EngineConfig, replica: int, rank: int):
        self.config, self.replica, self.rank = config, replica, rank
        self.world_size = config.tensor_parallel_size
        self.ctx = zmq.Context()
        address = config.tp_group_address_of(replica)
        self.codec: Codec = Codec(RankInbox, f"worker-{rank}.group")
        self.peers: dict[int, bytes] = {}  # rank -> ROUTER identity (rank 0)
        if rank == 0:
            self.sock = bind(self.ctx, zmq.ROUTER, address, config.curve)
            self.hello_codec: Codec = Codec(RankHello, "worker-0.group")
        else:
            identity = f"rank-{rank}-{os.getpid()}".encode()
            self.sock = connect(self.ctx, zmq.DEALER, address, config.curve, identity)

    def start(self, device: torch.device, timeout_s: float) -> TensorParallel:
        """Meet the other ranks and start torch.distributed (gloo on CPU, NCCL on CUDA)."""
        if self.rank == 0:
            store, generation = self._gather_hellos()
        else:
            store, generation = self._await_start()
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend,
            store=dist.PrefixStore(generation, store),
            rank=self.rank,
            world_size=self.world_size,
            timeout=timedelta(seconds=timeout_s),
            **({"device_id": device} if device.type == "cuda" else {}),
        )
        self._store = store  # rank 0 serves it: it must live as long as the group
        log.info(
            "tensor-parallel rank %d of %d joined (%s, group %s)",
            self.rank,
            self.world_size,
            backend,
            generation,
        )
        return TensorParallel(self.rank, self.world_size)

    def _store_host(self) -> str:
        return self.config.bind_host if self.config.transport == "tcp" else "127.0.0.1"

    def _gather_hellos(self) -> tuple[dist.Store, str]:
        started, last_note = time.monotonic(), 0.0
        while len(self.peers) < self.world_size - 1:
            if self.sock.poll(1000):
                identity, frame = self.sock.recv_multipart()
                hello = self.hello_codec.decode(frame)
                if hello is not None and 0 < hello.rank < self.world_size:
                    self.peers[hello.rank] = identity  # a later hello (a restarted rank) replaces it
            waited = time.monotonic() - started
            if waited - last_note > 10:
                last_note = waited
                missing = sorted(set(range(1, self.world_size)) - set(self.peers))
                log.info("rank 0: waiting for tensor-parallel ranks %s (%.0fs)", missing, waited)
        host = self._store_host()
        store = dist.TCPStore(host, 0, self.world_size, is_master=True, wait_for_workers=False)
        generation = uuid.uuid4().hex
        start = GroupStart(
            store_host=host, store_port=store.port, generation=generation, world_size=self.world_size
        )
        frame = self.codec.encoder.encode(start)
        for identity in self.peers.values():
            self.sock.send_multipart([identity, frame])
        return store, generation

    def _await_start(self) -> tuple[dist.Store, str]:
        hello = Codec(RankHello, f"worker-{self.rank}.group").encoder.encode(
            RankHello(rank=self.rank, pid=os.getpid())
        )
        while True:  # again every second: a rank 0 that restarted never saw the first one
            self.sock.send(hello)
            if self.sock.poll(self.HELLO_EVERY_S * 1000):
                msg = self.codec.decode(self.sock.recv())
                if isinstance(msg, GroupStart):
                    if msg.world_size != self.world_size:
                        raise ValueError(
                            f"rank 0 runs a group of {msg.world_size} ranks, this rank was started for "
                            f"{self.world_size}: start every rank with the same config"
                        )
                    store = dist.TCPStore(msg.store_host, msg.store_port, self.world_size, is_master=False)
                    return store, msg.generation

    # ------------------------------------------------------------------ plans

    def forward(self, frame: bytes) -> None:
        """Rank 0: one frame, as received from the scheduler, to every other rank."""
        for identity in self.peers.values():
            self.sock.send_multipart([identity, frame], copy=False)

    def receive(self):
        """Another rank: the next StepPlan or WorkerExit rank 0 forwarded (blocks)."""
        while True:
            msg = self.codec.decode(self.sock.recv())
            if msg is not None and not isinstance(msg, GroupStart):
                return msg

    def close(self, linger_s: float = 0.0) -> None:
        """Close the socket; with ``linger_s``, first let what is queued (rank 0's last forward)
        leave, for up to that long."""
        self.sock.close(linger=int(linger_s * 1000))
        self.ctx.term()
