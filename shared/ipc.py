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
from typing import Any, Generic, TypeVar

import msgspec
import zmq
import zmq.asyncio

from zeroserve.shared.config import CurveKeys

log = logging.getLogger(__name__)

T = TypeVar("T")

MAX_FRAME_BYTES = 64 * 1024 * 1024  # zmq drops the peer that sends a larger message


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
        except (msgspec.DecodeError, msgspec.ValidationError, ValueError, TypeError) as e:
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


def _secure(sock: zmq.Socket, curve: CurveKeys | None, server: bool) -> None:
    if curve is None:
        return
    if server:
        sock.curve_secretkey = curve.server_secret.encode()
        sock.curve_publickey = curve.server_public.encode()
        sock.curve_server = True
    else:
        sock.curve_secretkey = curve.client_secret.encode()
        sock.curve_publickey = curve.client_public.encode()
        sock.curve_serverkey = curve.server_public.encode()


def bind(ctx: zmq.Context, kind: int, address: str, curve: CurveKeys | None = None) -> zmq.Socket:
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME_BYTES)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    if kind == zmq.ROUTER:
        sock.setsockopt(zmq.ROUTER_MANDATORY, 0)  # a reply to a vanished peer is dropped, not raised
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
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
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


def recv_router(parts: list[bytes]) -> tuple[bytes, bytes] | None:
    """A ROUTER message is [identity, payload]; anything else is garbage."""
    if len(parts) != 2:
        return None
    return parts[0], parts[1]
