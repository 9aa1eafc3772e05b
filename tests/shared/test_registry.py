"""The registry bus with real sockets: a bus thread, publishers and subscribers, ipc and tcp +
CURVE; and a replica's publisher (announce, load, KV events, replay) on it."""

from __future__ import annotations

import asyncio
import socket
import tempfile
import time

import msgspec
import pytest
import zmq
import zmq.asyncio

from zeroserve.scheduler_proc.block_manager import BlockManager
from zeroserve.scheduler_proc.kv_events import ReplicaPublisher
from zeroserve.shared.config import EngineConfig
from zeroserve.shared.ipc import Codec, connect, new_curve_keys
from zeroserve.shared.messages import (
    AllBlocksCleared,
    BlockStored,
    KVEventBatch,
    KVReplayReply,
    KVReplayRequest,
    LoadReport,
    ReplayAnswer,
    ReplicaAnnounce,
    SchedulerStats,
    WorkerReady,
)
from zeroserve.shared.prefix_hash import prompt_event_hashes
from zeroserve.shared.registry import RegistryBus, RegistryPublisher, RegistrySubscriber

pytestmark = pytest.mark.timeout(120)

ANNOUNCE = ReplicaAnnounce(
    replica_id="r0", model="m", request_address="ipc:///x", replay_address="ipc:///y", block_size=16,
    num_kv_blocks=100, max_model_len=2048, started_at=1.0,
)  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def receive_while_publishing(pub: RegistryPublisher, subs: list[RegistrySubscriber], timeout_s: float = 10.0):
    """Publish ANNOUNCE until every subscriber got one (a SUB only hears what is published after
    its subscription has reached the publisher, through the bus); each one's first message."""
    got: dict[int, tuple[bytes, object]] = {}
    deadline = time.monotonic() + timeout_s
    while len(got) < len(subs) and time.monotonic() < deadline:
        pub.publish(b"announce", ANNOUNCE)
        for i, sub in enumerate(subs):
            if i not in got:
                msg = sub.receive_blocking(0.05)
                if msg is not None:
                    got[i] = msg
    return got


def test_an_announce_reaches_two_subscribers_and_a_bad_frame_is_dropped_and_counted():
    with tempfile.TemporaryDirectory() as d:
        pub_addr, sub_addr = f"ipc://{d}/registry-pub.sock", f"ipc://{d}/registry-sub.sock"
        bus = RegistryBus(pub_addr, sub_addr).start()
        ctx = zmq.Context()
        try:
            pub = RegistryPublisher(ctx, pub_addr)
            subs = [RegistrySubscriber(ctx, sub_addr) for _ in range(2)]
            got = receive_while_publishing(pub, subs)
            assert got == {0: (b"announce", ANNOUNCE), 1: (b"announce", ANNOUNCE)}
            for sub in subs:  # drain the extra announces
                while sub.receive_blocking(0.2) is not None:
                    pass
            raw = connect(ctx, zmq.PUB, pub_addr)
            time.sleep(0.3)  # the new publisher learns the subscriptions
            raw.send_multipart([b"load", b"\xc1 not msgpack"])
            raw.send_multipart([b"load", msgspec.msgpack.encode(["load", "r0", 1, -1, 0, 0.5])])
            raw.send_multipart([b"kv", b"one frame too many", b"x"])
            good = LoadReport(replica_id="r0", seq=2, waiting=1, running=2, kv_usage=0.5)
            raw.send_multipart([b"load", msgspec.msgpack.encode(good)])
            for sub in subs:
                assert sub.receive_blocking(5.0) == (b"load", good)
                assert sub.codec.bad_frames == 3
            raw.close(linger=0)
            pub.close()
            for sub in subs:
                sub.close()
        finally:
            ctx.term()
            bus.close()


def test_curve_on_tcp_refuses_peers_without_the_engines_key():
    keys, strangers = new_curve_keys(), new_curve_keys()
    port_in, port_out = free_port(), free_port()
    pub_addr, sub_addr = f"tcp://127.0.0.1:{port_in}", f"tcp://127.0.0.1:{port_out}"
    bus = RegistryBus(pub_addr, sub_addr, keys).start()
    ctx = zmq.Context()
    try:
        pub = RegistryPublisher(ctx, pub_addr, keys)
        member = RegistrySubscriber(ctx, sub_addr, keys)
        # right server key, but a client key the bus does not know: refused at the handshake
        outsider = RegistrySubscriber(ctx, sub_addr, msgspec.structs.replace(
            keys, client_public=strangers.client_public, client_secret=strangers.client_secret))  # fmt: skip
        assert receive_while_publishing(pub, [member]) == {0: (b"announce", ANNOUNCE)}
        for _ in range(20):
            pub.publish(b"announce", ANNOUNCE)
            time.sleep(0.02)
        assert outsider.receive_blocking(1.0) is None
        # a publisher without the key cannot inject anything either
        while member.receive_blocking(0.3) is not None:
            pass
        forger = RegistryPublisher(ctx, pub_addr, msgspec.structs.replace(
            keys, client_public=strangers.client_public, client_secret=strangers.client_secret))  # fmt: skip
        forged = msgspec.structs.replace(ANNOUNCE, replica_id="evil")
        for _ in range(20):
            forger.publish(b"announce", forged)
            time.sleep(0.05)
        assert member.receive_blocking(0.5) is None
        for s in (pub, member, outsider, forger):
            s.close()
    finally:
        ctx.term()
        bus.close()


def test_a_replica_publisher_announces_reports_publishes_events_and_replays():
    """The scheduler side on a real bus: what a router would hear, and a replay over its socket."""

    async def scenario(d: str) -> None:
        config = EngineConfig(model="m.gguf", served_model_name="m", run_dir=d, data_parallel_size=2)
        bus = RegistryBus(config.registry_publish_address, config.registry_subscribe_address).start()
        ctx = zmq.asyncio.Context()
        stats = SchedulerStats(num_running=2, num_waiting=3, kv_cache_usage=0.25, prefix_cache_hits=7,
                               prefix_cache_queries=9)  # fmt: skip
        replica = ReplicaPublisher(ctx, config, 1, lambda: stats, announce_interval_s=0.2)
        sub = RegistrySubscriber(ctx, config.registry_subscribe_address)
        task = asyncio.ensure_future(replica.run())
        try:
            blocks = BlockManager(num_blocks=8, block_size=4)
            ready = WorkerReady(rank=0, num_kv_blocks=8, block_size=4, max_model_len=64, vocab_size=10,
                                eos_token_ids=[2])  # fmt: skip
            replica.attach(blocks, ready)
            prompt = list(range(10, 22))
            keys = _keys(prompt)
            block_ids = blocks.allocate(3)
            seen: dict[bytes, list] = {b"announce": [], b"load": [], b"kv": []}
            deadline = time.monotonic() + 10

            def stored_seen() -> bool:  # the first kv batch may be another event (the attach's clear)
                return any(isinstance(e, BlockStored) for b in seen[b"kv"] for e in b.events)

            while time.monotonic() < deadline and not (seen[b"announce"] and seen[b"load"] and stored_seen()):
                if not stored_seen() and seen[b"announce"]:  # subscribed by now: key blocks after a step
                    for b, k in zip(block_ids, keys, strict=True):
                        blocks.cache_block(b, k)
                    replica.flush()
                try:
                    topic, msg = await asyncio.wait_for(sub.receive(), 0.2)
                except TimeoutError:
                    continue
                seen[topic].append(msg)
            a = seen[b"announce"][0]
            assert (a.replica_id, a.model, a.block_size, a.num_kv_blocks) == ("r1", "m", 4, 8)
            assert a.request_address == config.scheduler_address_of(1)
            assert a.replay_address == config.replay_address_of(1)
            load = seen[b"load"][0]
            assert (load.waiting, load.running, load.kv_usage, load.prefix_hits, load.prefix_queries) == (
                3, 2, 0.25, 7, 9)  # fmt: skip
            kv: list[KVEventBatch] = seen[b"kv"]
            stored = [e for b in kv for e in b.events if isinstance(e, BlockStored)]
            assert stored[-1].block_hashes == prompt_event_hashes(prompt, 4, None)
            # a router that missed everything asks the replay ROUTER from seq 0
            dealer = connect(ctx, zmq.DEALER, config.replay_address_of(1))
            codec: Codec = Codec(ReplayAnswer, "test")
            await dealer.send(codec.encode(KVReplayRequest(from_seq=0)))
            answer = codec.decode(await asyncio.wait_for(dealer.recv(), 10))
            assert isinstance(answer, KVReplayReply) and answer.replica_id == "r1"
            assert [b.seq for b in answer.batches] == list(range(kv[-1].seq + 1))
            assert answer.batches[-1] == kv[-1]
            await dealer.send(b"garbage")  # dropped by the replay ROUTER, which keeps answering
            await dealer.send(codec.encode(KVReplayRequest(from_seq=kv[-1].seq + 1)))
            answer = codec.decode(await asyncio.wait_for(dealer.recv(), 10))
            assert answer == KVReplayReply(replica_id="r1", batches=[])
            assert replica.replay_codec.bad_frames == 1
            # the worker is lost: one AllBlocksCleared, and no more announces or load reports
            replica.detach()
            after: list = []
            end = time.monotonic() + 0.8
            while time.monotonic() < end:
                try:
                    after.append(await asyncio.wait_for(sub.receive(), 0.1))
                except TimeoutError:
                    pass
            cleared = [i for i, (t, m) in enumerate(after) if t == b"kv" and m.events == [AllBlocksCleared()]]
            assert len(cleared) == 1, after
            # then silence: a replica without a worker cannot serve, and routers drop it within 1 s
            assert after[cleared[0] + 1 :] == []
            dealer.close(linger=0)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            replica.close()
            sub.close()
            ctx.term()
            bus.close()

    with tempfile.TemporaryDirectory() as d:
        asyncio.run(scenario(d))


def _keys(prompt: list[int]) -> list[bytes]:
    from zeroserve.shared.prefix_hash import hash_block, root_key

    keys, parent = [], root_key(None)
    for i in range(0, len(prompt), 4):
        parent = hash_block(parent, prompt[i : i + 4])
        keys.append(parent)
    return keys
