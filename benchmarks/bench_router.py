"""The router against many fake replicas: prefix hit rate, load balance, TTFT and decision time
per policy, on one shared-prefix trace (no model, no sockets: a discrete-event simulation).

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/bench_router.py [--requests 100000]

The trace: ``--groups`` system prompts of ``--system-len`` tokens, each shared by many user
questions of ``--question-len`` tokens (group popularity uniform, or Zipf with ``--zipf S``),
arriving as a Poisson process sized to ``--load`` of the replicas' capacity when nothing hits.

Each fake replica: ``--concurrency`` requests served at once, a FIFO queue behind them, a
service time of ``--prefill-us`` per token not found in its prefix cache plus ``--decode-s``,
and a prefix cache of ``--kv-blocks`` blocks with LRU eviction (every cached block evictable:
the requests' own working blocks are not modelled). At each request's start it looks up the
prompt's leading blocks, inserts the rest and evicts; the KV events (stored / removed) reach
the router in batches every ``--flush-ms``, load reports (waiting, running, KV usage) every
100 ms, announces every second: what the real replicas publish, with no bus delay.

Measured per policy: prefix hit rate (prompt tokens found in the cache / prompt tokens),
balance (max / mean requests served per replica), TTFT (queue wait + uncached prefill) p50 /
p99, and the router's decision time per request (``route`` with the prompt's block hashes
given; hashing the prompt, done once per request by the tokenizer, is timed apart). Finally
prefix_aware runs again with ``--index-blocks`` more blocks (1M by default, spread over the
replicas) in its index from the start: the decision time with >= 1M indexed blocks.
"""

from __future__ import annotations

import argparse
import gc
import heapq
import random
import time
from collections import OrderedDict, deque

import numpy as np

from zeroserve.shared.messages import BlockRemoved, BlockStored, KVEventBatch, LoadReport, ReplicaAnnounce
from zeroserve.shared.prefix_hash import event_hash, hash_block, prompt_event_hashes, root_key
from zeroserve.tokenizer_proc.router import POLICIES, Router, RouterConfig

BS = 16


class Trace:
    """Requests as (arrival time, group, prompt tokens, block hashes); built once for every policy."""

    def __init__(self, args: argparse.Namespace) -> None:
        rng = random.Random(args.seed)
        self.args = args
        systems = [[rng.randrange(100, 50_000) for _ in range(args.system_len)] for _ in range(args.groups)]
        sys_keys = []  # the chain over each system prompt, continued per question below
        for tokens in systems:
            keys, parent = [], root_key(None)
            for i in range(0, len(tokens) - BS + 1, BS):
                parent = hash_block(parent, tokens[i : i + BS])
                keys.append(parent)
            sys_keys.append(keys)
        if args.zipf > 0:
            w = 1.0 / np.arange(1, args.groups + 1) ** args.zipf
            groups = np.random.default_rng(args.seed).choice(args.groups, size=args.requests, p=w / w.sum())
        else:
            groups = np.random.default_rng(args.seed).integers(0, args.groups, size=args.requests)
        miss_service = (args.system_len + args.question_len) * args.prefill_us * 1e-6 + args.decode_s
        rate = args.load * args.replicas * args.concurrency / miss_service
        self.rate = rate
        self.requests: list[tuple[float, int, list[int], list[int]]] = []
        t = 0.0
        assert args.system_len % BS == 0, "--system-len: a whole number of blocks, so questions chain on"
        for g in groups.tolist():
            t += rng.expovariate(rate)
            question = [rng.randrange(100, 50_000) for _ in range(args.question_len)]
            keys = sys_keys[g]
            parent = keys[-1] if keys else root_key(None)
            hashes = [event_hash(k) for k in keys]
            for i in range(0, len(question) - BS + 1, BS):
                parent = hash_block(parent, question[i : i + BS])
                hashes.append(event_hash(parent))
            self.requests.append((t, g, systems[g] + question, hashes))


class FakeReplica:
    def __init__(self, rid: str, kv_blocks: int, concurrency: int) -> None:
        self.rid = rid
        self.kv_blocks = kv_blocks
        self.concurrency = concurrency
        self.cache: OrderedDict[int, None] = OrderedDict()  # hash -> None, LRU first
        self.running = 0
        self.queue: deque[int] = deque()  # request indices
        self.events: list = []
        self.seq = 0
        self.served = 0
        self.load_seq = 0

    def start(self, hashes: list[int]) -> int:
        """Look up the prompt's leading blocks, insert the rest, evict LRU; blocks hit."""
        cache = self.cache
        hit = 0
        for h in hashes:
            if h not in cache:
                break
            cache.move_to_end(h)
            hit += 1
        new = hashes[hit:]
        for h in new:
            cache[h] = None
        removed = []
        while len(cache) > self.kv_blocks:
            h, _ = cache.popitem(last=False)
            removed.append(h)
        if removed:
            self.events.append(BlockRemoved(block_hashes=removed))
        if new:
            self.events.append(BlockStored(block_hashes=list(new)))
        return hit

    def flush(self, now: float) -> KVEventBatch | None:
        if not self.events:
            return None
        batch = KVEventBatch(replica_id=self.rid, seq=self.seq, ts=now, events=self.events)
        self.seq += 1
        self.events = []
        return batch


def announce(rid: str, kv_blocks: int) -> ReplicaAnnounce:
    return ReplicaAnnounce(replica_id=rid, model="sim", request_address="-", replay_address="-", block_size=BS,
                           num_kv_blocks=kv_blocks, max_model_len=1 << 20, started_at=0.0)  # fmt: skip


def simulate(policy: str, trace: Trace, pad_blocks: int = 0) -> dict:
    """One policy on the trace. ``pad_blocks``: the index starts with that many more blocks,
    spread over the replicas (content they hold besides the trace's, never requested), so the
    decisions are timed against an index of that size."""
    args = trace.args
    router = Router(policy, BS, RouterConfig(model="sim"))
    reps = [FakeReplica(f"r{i}", args.kv_blocks, args.concurrency) for i in range(args.replicas)]
    by_id = {r.rid: r for r in reps}
    rng = random.Random(1)
    for r in reps:
        router.on_announce(announce(r.rid, args.kv_blocks), 0.0)
        if pad_blocks:
            pad = [rng.getrandbits(63) for _ in range(-(-pad_blocks // len(reps)))]
            r.events.append(BlockStored(block_hashes=pad))
            router.on_kv_events(r.flush(0.0), 0.0)
    reqs = trace.requests
    n = len(reqs)
    hit_tokens = prompt_tokens = 0
    ttft = np.zeros(n)
    decide_ns = np.zeros(n, dtype=np.int64)  # thread CPU time: what the decision costs the process
    where: list[FakeReplica | None] = [None] * n
    # events: (time, kind, payload); kinds ordered so that at equal times completions free
    # slots before arrivals take them
    DONE, ARRIVE, FLUSH, REPORT = 0, 1, 2, 3
    heap: list[tuple[float, int, int]] = [(reqs[0][0], ARRIVE, 0)]
    flush_s, report_s = args.flush_ms / 1000, 0.1
    heapq.heappush(heap, (flush_s, FLUSH, 0))
    heapq.heappush(heap, (report_s, REPORT, 0))
    prefill_s, decode_s = args.prefill_us * 1e-6, args.decode_s
    next_announce = 1.0
    done = 0

    def begin(rep: FakeReplica, i: int, now: float) -> None:
        nonlocal hit_tokens, prompt_tokens
        arrival, _, tokens, hashes = reqs[i]
        hit = rep.start(hashes)
        cached = hit * BS
        hit_tokens += cached
        prompt_tokens += len(tokens)
        prefill = (len(tokens) - cached) * prefill_s
        ttft[i] = now - arrival + prefill
        rep.running += 1
        heapq.heappush(heap, (now + prefill + decode_s, DONE, i))

    perf = time.thread_time_ns
    while done < n:
        now, kind, i = heapq.heappop(heap)
        if kind == ARRIVE:
            _, _, tokens, hashes = reqs[i]
            t0 = perf()
            d = router.route(tokens, None, None, now, (), hashes)
            decide_ns[i] = perf() - t0
            rep = by_id[d.replica_id]
            where[i] = rep
            rep.served += 1
            if rep.running < rep.concurrency:
                begin(rep, i, now)
            else:
                rep.queue.append(i)
            if i + 1 < n:
                heapq.heappush(heap, (reqs[i + 1][0], ARRIVE, i + 1))
        elif kind == DONE:
            done += 1
            rep = where[i]
            rep.running -= 1
            if rep.queue:
                begin(rep, rep.queue.popleft(), now)
        elif kind == FLUSH:
            for rep in reps:
                batch = rep.flush(now)
                if batch is not None:
                    router.on_kv_events(batch, now)
            heapq.heappush(heap, (now + flush_s, FLUSH, 0))
        else:
            for rep in reps:
                rep.load_seq += 1
                router.on_load(LoadReport(replica_id=rep.rid, seq=rep.load_seq, waiting=len(rep.queue),
                                          running=rep.running, kv_usage=rep.running / rep.concurrency), now)  # fmt: skip
            if now >= next_announce:
                next_announce += 1.0
                for rep in reps:
                    router.on_announce(announce(rep.rid, args.kv_blocks), now)
            heapq.heappush(heap, (now + report_s, REPORT, 0))
    served = np.array([r.served for r in reps])
    return {
        "policy": policy,
        "hit_rate": hit_tokens / prompt_tokens,
        "balance": served.max() / served.mean(),
        "ttft_p50_ms": float(np.percentile(ttft, 50)) * 1e3,
        "ttft_p99_ms": float(np.percentile(ttft, 99)) * 1e3,
        "decide_p50_us": float(np.percentile(decide_ns, 50)) / 1e3,
        "decide_p99_us": float(np.percentile(decide_ns, 99)) / 1e3,
        "indexed_blocks": len(router._index),
        "router": router,
        "now": now,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=100_000)
    ap.add_argument("--replicas", type=int, default=64)
    ap.add_argument("--groups", type=int, default=1024, help="system prompts (shared-prefix groups)")
    ap.add_argument("--system-len", type=int, default=1024, help="tokens per system prompt (multiple of 16)")
    ap.add_argument("--question-len", type=int, default=128, help="tokens per user question")
    ap.add_argument("--zipf", type=float, default=0.0, help="group popularity skew (0: uniform)")
    ap.add_argument("--kv-blocks", type=int, default=16_384, help="prefix-cache blocks per replica")
    ap.add_argument("--concurrency", type=int, default=8, help="requests each replica serves at once")
    ap.add_argument("--prefill-us", type=float, default=200.0, help="service time per uncached prompt token")
    ap.add_argument("--decode-s", type=float, default=0.1, help="service time of the rest of a request")
    ap.add_argument("--load", type=float, default=0.7, help="offered load vs capacity when nothing hits")
    ap.add_argument("--flush-ms", type=float, default=20.0, help="KV event batch interval")
    ap.add_argument("--index-blocks", type=int, default=1_000_000,
                    help="prefix_aware again, its index padded by this many blocks: the decision time at scale")  # fmt: skip
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    t0 = time.perf_counter()
    trace = Trace(args)
    # the trace is static: keep the cyclic GC from walking its lists during timed decisions (a
    # tokenizer process holds no such heap; its GC pauses are not the router's)
    gc.freeze()
    print(f"trace: {args.requests} requests, {args.replicas} replicas, {args.groups} groups x "
          f"{args.system_len} + {args.question_len} tokens, {trace.rate:.0f} req/s "
          f"({time.perf_counter() - t0:.1f}s to build)")  # fmt: skip
    results = []
    for policy in args.policies.split(","):
        t0 = time.perf_counter()
        results.append(simulate(policy, trace))
        print(f"  {policy}: simulated in {time.perf_counter() - t0:.1f}s")
    print()
    print("decide: the router's CPU time per route() call (thread time: on a shared machine, wall time")
    print("also counts the time other processes held the core); index: blocks indexed at the end")
    print(f"{'policy':<14}{'hit rate':>9}{'max/mean':>9}{'TTFT p50':>10}{'TTFT p99':>10}"
          f"{'decide p50':>11}{'p99':>8}{'index':>10}")  # fmt: skip
    for r in results:
        print(f"{r['policy']:<14}{r['hit_rate']:>9.3f}{r['balance']:>9.2f}{r['ttft_p50_ms']:>8.0f}ms"
              f"{r['ttft_p99_ms']:>8.0f}ms{r['decide_p50_us']:>9.1f}us{r['decide_p99_us']:>6.1f}us"
              f"{r['indexed_blocks']:>10,}")  # fmt: skip
    base = next((r for r in results if r["policy"] == "round_robin"), None)
    pa = next((r for r in results if r["policy"] == "prefix_aware"), None)
    if base and pa:
        print(f"prefix_aware vs round_robin: hit rate x{pa['hit_rate'] / base['hit_rate']:.2f}, "
              f"TTFT p50 x{pa['ttft_p50_ms'] / base['ttft_p50_ms']:.2f}")  # fmt: skip
    if pa and args.index_blocks:
        t0 = time.perf_counter()
        big = simulate("prefix_aware", trace, pad_blocks=args.index_blocks)
        hash_ns = np.zeros(min(2_000, args.requests), dtype=np.int64)
        for j, (_, _, tokens, _) in enumerate(trace.requests[: len(hash_ns)]):
            t1 = time.thread_time_ns()
            prompt_event_hashes(tokens, BS, None)
            hash_ns[j] = time.thread_time_ns() - t1
        print(
            f"prefix_aware with the index padded to {big['indexed_blocks']:,} blocks over {args.replicas} "
            f"replicas (simulated in {time.perf_counter() - t0:.1f}s): decision p50 {big['decide_p50_us']:.1f}us, "
            f"p99 {big['decide_p99_us']:.1f}us (target < 50us); hit rate {big['hit_rate']:.3f}"
        )
        print(f"hashing a prompt ({(args.system_len + args.question_len) // BS} blocks; once per request, in the "
              f"tokenizer, not part of the decision): p50 {np.percentile(hash_ns, 50) / 1e3:.1f}us, "
              f"p99 {np.percentile(hash_ns, 99) / 1e3:.1f}us")  # fmt: skip


if __name__ == "__main__":
    main()
