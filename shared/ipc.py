"""ZeroMQ plumbing shared by every process: run directories, sockets, CURVE, typed codecs.

A frame that does not decode as the socket's message union is counted, logged (rate
limited) and dropped: nothing received is ever executed, and no decode error escapes
into a process loop.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
import weakref
from typing import Any, Generic, TypeVar

import msgspec
import zmq
import zmq.asyncio

from zeroserve.shared.config import CurveKeys

log = logging.getLogger(__name__)

T = TypeVar("T")

MAX_FRAME_BYTES = 64 * 1024 * 1024  # zmq drops the peer that sends a larger message

# Messages one pipe (one peer, one direction, each end) holds before a send fails, so that a
# peer that stops reading costs bounded memory. Normal operation stays far below it: the
# busiest pipe, tokenizer -> one api process, carries one TextDelta per running request per
# step (scheduler -> tokenizer is one TokenDeltas message per step), so this is seconds of a
# full batch with the reader stalled; requests beyond it would be refused by admission anyway.
HWM = 20_000


class SendError(Exception):
    """``send_now`` could not queue a message."""


class PeerOverloaded(SendError):
    """The pipe to the peer is at its high-water mark: the peer stopped reading or cannot keep up."""


class PeerGone(SendError):
    """A mandatory ROUTER has no peer with this identity any more (it disconnected or died)."""


def make_run_dir(prefix: str = "zeroserve-") -> str:
    """A private directory (mode 0700) for ipc sockets, config and metrics."""
    base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    path = tempfile.mkdtemp(prefix=prefix, dir=base if os.access(base, os.W_OK) else None)
    os.chmod(path, 0o700)
    return path


class Codec(Generic[T]):
    """One encoder and one typed decoder for a socket's inbox type."""

    def __init__(self, inbox_type: Any, name: str):
        self.name = name
        self.encoder = msgspec.msgpack.Encoder()
        self.decoder = msgspec.msgpack.Decoder(inbox_type)
        self.bad_frames = 0
        self._last_log = 0.0

    def encode(self, msg: Any) -> bytes:
        return self.encoder.encode(msg)

    def decode(self, frame: bytes | zmq.Frame) -> T | None:
        try:
            return self.decoder.decode(frame)
        # RecursionError: msgspec's answer to arrays/maps nested thousands deep (in a field it
        # skips, say); a peer must not be able to end a process loop with one frame
        except (msgspec.DecodeError, msgspec.ValidationError, ValueError, TypeError, RecursionError) as e:
            self.drop(f"undecodable frame ({len(frame)} bytes): {e}")
            return None

    def drop(self, why: str) -> None:
        self.bad_frames += 1
        now = time.monotonic()
        if now - self._last_log > 5.0:  # a flood of garbage must not flood the log
            log.warning(
                "%s: dropped %d bad frame(s) so far; latest: %s", self.name, self.bad_frames, why[:200]
            )
            self._last_log = now

    def decode_routed(self, parts: list[bytes]) -> tuple[bytes, T] | None:
        """A ROUTER's [identity, payload] as (identity, message); anything else is dropped."""
        if len(parts) != 2:
            self.drop(f"{len(parts)} frame(s), not [identity, payload]")
            return None
        msg = self.decode(parts[1])
        return None if msg is None else (parts[0], msg)


# Every process reads its sockets through these three: the one place a bad frame is dropped.


async def receive(sock: zmq.asyncio.Socket, codec: Codec[T]) -> T:
    """The next message on a DEALER that decodes as the codec's inbox type."""
    while True:
        msg = codec.decode(await sock.recv(copy=True))
        if msg is not None:
            return msg


async def receive_routed(sock: zmq.asyncio.Socket, codec: Codec[T]) -> tuple[bytes, T]:
    """The next (sender identity, message) on a ROUTER that decodes as the codec's inbox type."""
    while True:
        got = codec.decode_routed(await sock.recv_multipart(copy=True))
        if got is not None:
            return got


def receive_blocking(sock: zmq.Socket, codec: Codec[T]) -> T:
    """``receive`` on a plain socket, for the worker: it has nothing else to do between steps."""
    while True:
        msg = codec.decode(sock.recv(copy=True))
        if msg is not None:
            return msg


_sync_views: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def has_unread(sock: zmq.Socket) -> bool:
    """Whether messages wait unread on ``sock``. A watcher checks this before calling a peer
    silent: with messages queued, it is this process that was late (its loop busy, the machine
    loaded), not the peer that went quiet."""
    return bool(sock.get(zmq.EVENTS) & zmq.POLLIN)


def send_now(sock: zmq.Socket, frames: list[bytes]) -> None:
    """Queue ``frames`` on ``sock`` at once, or raise ``PeerOverloaded`` (the pipe is at its
    high-water mark) or ``PeerGone`` (a mandatory ROUTER knows no such identity).

    An asyncio socket's own ``send`` would instead park the message in an unbounded Python
    queue (or, with NOBLOCK, hide the error in a future no one awaits), so this goes through
    a plain view of the same socket.
    """
    view = sock
    if isinstance(sock, zmq.asyncio.Socket):
        view = _sync_views.get(sock)
        if view is None:
            view = _sync_views[sock] = zmq.Socket.shadow(sock.underlying)
    try:
        view.send_multipart(frames, flags=zmq.NOBLOCK)
    except zmq.Again:
        raise PeerOverloaded("the peer is not reading (its queue is full)") from None
    except zmq.ZMQError as e:
        if e.errno == zmq.EHOSTUNREACH:
            raise PeerGone("the peer is gone") from None
        raise
    finally:
        if view is not sock:
            # ZMQ's fd is edge-triggered: a send on the plain view may consume the readiness
            # edge of a message that arrived meanwhile, and the asyncio socket's pending recv
            # would then never wake. Reading EVENTS through the asyncio socket reschedules it.
            sock.get(zmq.EVENTS)


def _secure(sock: zmq.Socket, curve: CurveKeys | None, server: bool) -> None:
    if curve is None:
        return
    if server:
        if not curve.server_secret:
            raise ValueError("these CURVE keys are a client's (no server secret): this process cannot bind")
        sock.curve_secretkey = curve.server_secret.encode()
        sock.curve_publickey = curve.server_public.encode()
        sock.curve_server = True
    else:
        sock.curve_secretkey = curve.client_secret.encode()
        sock.curve_publickey = curve.client_public.encode()
        sock.curve_serverkey = curve.server_public.encode()


def bind(
    ctx: zmq.Context, kind: int, address: str, curve: CurveKeys | None = None, mandatory: bool = False
) -> zmq.Socket:
    """A bound socket. ``mandatory`` (ROUTER): a reply to a peer that is gone, or whose pipe is
    full, fails (see ``send_now``) instead of vanishing, so the owner of its requests can be told."""
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME_BYTES)
    sock.setsockopt(zmq.SNDHWM, HWM)
    sock.setsockopt(zmq.RCVHWM, HWM)
    if kind == zmq.ROUTER:
        # otherwise a reply to a vanished peer, or to one at the high-water mark, is silently dropped
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1 if mandatory else 0)
    _secure(sock, curve, server=True)
    if address.startswith("ipc://"):
        path = address[len("ipc://") :]
        if os.path.exists(path):
            os.unlink(path)  # a stale socket file from a crashed predecessor
    sock.bind(address)
    return sock


def connect(
    ctx: zmq.Context, kind: int, address: str, curve: CurveKeys | None = None, identity: bytes | None = None
) -> zmq.Socket:
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME_BYTES)
    sock.setsockopt(zmq.SNDHWM, HWM)
    sock.setsockopt(zmq.RCVHWM, HWM)
    sock.setsockopt(zmq.RECONNECT_IVL, 100)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
    if identity is not None:
        sock.setsockopt(zmq.IDENTITY, identity)
    _secure(sock, curve, server=False)
    sock.connect(address)
    return sock


def start_authenticator(ctx: zmq.asyncio.Context, curve: CurveKeys | None) -> Any:
    """With CURVE on, admit only peers holding the configured client key."""
    if curve is None:
        return None
    from zmq.auth.asyncio import AsyncioAuthenticator

    auth = AsyncioAuthenticator(ctx)
    auth.start()
    allowed = {curve.client_public.encode()}

    class _Keys:
        def callback(self, domain: str, key: bytes) -> bool:
            return key in allowed

    auth.configure_curve_callback(domain="*", credentials_provider=_Keys())
    return auth


def new_curve_keys() -> CurveKeys:
    server_public, server_secret = zmq.curve_keypair()
    client_public, client_secret = zmq.curve_keypair()
    return CurveKeys(
        server_public=server_public.decode(),
        server_secret=server_secret.decode(),
        client_public=client_public.decode(),
        client_secret=client_secret.decode(),
    )


def client_keys(curve: CurveKeys | None) -> CurveKeys | None:
    """The keys of a process that only connects (api, batch client): the server secret blanked,
    so a process facing the network never holds the key that lets it impersonate the engine."""
    return None if curve is None else msgspec.structs.replace(curve, server_secret="")
