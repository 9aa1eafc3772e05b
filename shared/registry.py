"""The registry bus: replicas publish who they are, their load and their KV events; every
router subscribes. A forwarder, nothing more: it keeps no state, so it can restart at will
(replicas announce every second, and routers replay KV events they missed).

    replica (scheduler_proc) PUB --connect--> [XSUB  bus  XPUB] <--connect-- SUB router (tokenizer_proc)
      topics (first frame): b"announce" ReplicaAnnounce, b"load" LoadReport, b"kv" KVEventBatch

Only the bus's address is well known (``registry_address`` in the engine config): an ipc
path in the run dir, or ``tcp://host:port`` with the engine's CURVE keys, so a replica on
another host needs nothing but that address and the keys. The bus binds two sockets derived
from it (EngineConfig.registry_publish_address / registry_subscribe_address): publishers
connect to the first, subscribers to the second.

Run it as its own role, ``zeroserve proc registry --config FILE``, or in a thread
(``RegistryBus(...).start()``, as tests do).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

import msgspec
import zmq

from zeroserve.shared.config import CurveKeys
from zeroserve.shared.ipc import Codec, bind, client_keys, connect, receive_routed
from zeroserve.shared.messages import RegistryInbox

log = logging.getLogger("zeroserve.registry")

TOPIC_ANNOUNCE, TOPIC_LOAD, TOPIC_KV = b"announce", b"load", b"kv"
TOPICS = (TOPIC_ANNOUNCE, TOPIC_LOAD, TOPIC_KV)
# a subscriber that stops reading loses messages beyond this (PUB drops, never blocks the
# replica); the routers notice the gap in KV event seqs and replay
BUS_HWM = 100_000


class RegistryBus:
    """The XSUB <-> XPUB forwarder, in a thread of its own (zmq.proxy blocks).

    With ``curve`` (tcp) both sockets are CURVE servers and only peers holding the engine's
    client key get in: a replica or router without it is refused at the handshake.
    """

    def __init__(self, publish_address: str, subscribe_address: str, curve: CurveKeys | None = None) -> None:
        self.publish_address, self.subscribe_address = publish_address, subscribe_address
        self.ctx = zmq.Context()
        self.auth: Any = None
        if curve is not None:
            from zmq.auth.thread import ThreadAuthenticator

            self.auth = ThreadAuthenticator(self.ctx)
            self.auth.start()
            allowed = {curve.client_public.encode()}

            class _Keys:
                def callback(self, domain: str, key: bytes) -> bool:
                    return key in allowed

            self.auth.configure_curve_callback(domain="*", credentials_provider=_Keys())
        self.xsub = bind(self.ctx, zmq.XSUB, self.publish_address, curve)
        self.xpub = bind(self.ctx, zmq.XPUB, self.subscribe_address, curve)
        for sock in (self.xsub, self.xpub):
            sock.setsockopt(zmq.SNDHWM, BUS_HWM)
            sock.setsockopt(zmq.RCVHWM, BUS_HWM)
        self._control_address = f"inproc://registry-control-{id(self)}"
        self._control = self.ctx.socket(zmq.PAIR)
        self._control.bind(self._control_address)
        self._thread: threading.Thread | None = None

    def start(self) -> RegistryBus:
        self._thread = threading.Thread(target=self._run, name="registry-bus", daemon=True)
        self._thread.start()
        log.info(
            "registry bus: publishers -> %s, subscribers -> %s", self.publish_address, self.subscribe_address
        )
        return self

    def _run(self) -> None:
        control = self.ctx.socket(zmq.PAIR)
        control.connect(self._control_address)
        try:
            zmq.proxy_steerable(self.xsub, self.xpub, None, control)
        except zmq.ContextTerminated:
            pass
        finally:
            control.close(linger=0)

    def close(self) -> None:
        if self._thread is not None:
            self._control.send(b"TERMINATE")
            self._thread.join(timeout=5)
            self._thread = None
        for sock in (self._control, self.xsub, self.xpub):
            sock.close(linger=0)
        if self.auth is not None:
            self.auth.stop()
        self.ctx.term()


class RegistryPublisher:
    """A replica's PUB socket on the bus. ``publish`` never blocks: the bus drops what a slow
    subscriber cannot take, and sequence numbers let it notice."""

    def __init__(self, ctx: zmq.Context, publish_address: str, curve: CurveKeys | None = None) -> None:
        self.sock = connect(ctx, zmq.PUB, publish_address, client_keys(curve))
        self.sock.setsockopt(zmq.SNDHWM, BUS_HWM)
        self.encoder = msgspec.msgpack.Encoder()

    def publish(self, topic: bytes, msg: msgspec.Struct) -> None:
        try:
            self.sock.send_multipart([topic, self.encoder.encode(msg)], flags=zmq.NOBLOCK)
        except zmq.Again:
            pass  # PUB drops at the high-water mark rather than raising; kept for other transports

    def close(self) -> None:
        self.sock.close(linger=0)


class RegistrySubscriber:
    """A router's SUB socket on the bus: (topic, message) pairs; a frame that does not decode as
    a ``RegistryInbox`` message is dropped and counted in ``codec.bad_frames``."""

    def __init__(
        self,
        ctx: zmq.Context,
        subscribe_address: str,
        curve: CurveKeys | None = None,
        topics: tuple[bytes, ...] = TOPICS,
    ) -> None:
        self.sock = connect(ctx, zmq.SUB, subscribe_address, client_keys(curve))
        self.sock.setsockopt(zmq.RCVHWM, BUS_HWM)
        for topic in topics:
            self.sock.setsockopt(zmq.SUBSCRIBE, topic)
        self.codec: Codec = Codec(RegistryInbox, "registry.subscriber")

    async def receive(self) -> tuple[bytes, Any]:
        """The next (topic, message), on a zmq.asyncio context."""
        return await receive_routed(self.sock, self.codec)

    def receive_blocking(self, timeout_s: float) -> tuple[bytes, Any] | None:
        """The next (topic, message), or None after ``timeout_s`` (plain zmq context)."""
        deadline_ms = int(timeout_s * 1000)
        while self.sock.poll(deadline_ms):
            got = self.codec.decode_routed(self.sock.recv_multipart())
            if got is not None:
                return got
        return None

    def close(self) -> None:
        self.sock.close(linger=0)


class RegistryProcess:
    """The role ``zeroserve proc registry``: the bus, until SIGTERM."""

    def __init__(self, publish_address: str, subscribe_address: str, curve: CurveKeys | None) -> None:
        self.bus = RegistryBus(publish_address, subscribe_address, curve).start()

    async def run(self) -> None:
        await asyncio.Event().wait()

    def close(self) -> None:
        self.bus.close()


def main(argv: list[str] | None = None) -> None:
    from zeroserve.shared.proc_main import parse_proc_args, run_actor

    config, _ = parse_proc_args("registry", argv)
    run_actor(
        "registry",
        lambda: RegistryProcess(
            config.registry_publish_address, config.registry_subscribe_address, config.curve
        ),
    )


if __name__ == "__main__":
    main()
