"""The launcher's end of the registry control channel (shared/control.py): a ROUTER at
``EngineConfig.control_address`` answering the api processes' RegistryWatch, VersionReport and
AdminCommand from the registry (launcher/model_registry.py), on the supervisor's event loop."""

from __future__ import annotations

import asyncio
import logging

import msgspec
import zmq
import zmq.asyncio

from zeroserve.launcher.model_registry import Registry
from zeroserve.shared.control import AdminCommand, RegistryUnchanged, RegistryWatch, ToLauncher, VersionReport
from zeroserve.shared.ipc import Codec, bind, receive_routed

log = logging.getLogger("zeroserve.launcher.control")


def control_address(run_dir: str) -> str:
    """ipc://RUN_DIR/control.sock: the api processes are on this machine whatever the transport."""
    return f"ipc://{run_dir}/control.sock"


class ControlServer:
    def __init__(self, address: str, registry: Registry):
        self.address = address
        self.registry = registry
        self.codec: Codec = Codec(ToLauncher, "control")
        self.encoder = msgspec.msgpack.Encoder()
        self.ctx = zmq.asyncio.Context.instance()
        self.sock = bind(self.ctx, zmq.ROUTER, address)

    async def run(self) -> None:
        while True:
            identity, msg = await receive_routed(self.sock, self.codec)
            try:
                reply = self.dispatch(msg)
            except Exception:  # one bad command must not end the launcher's control channel
                log.exception("the registry failed on %s", type(msg).__name__)
                continue
            if reply is not None:
                await self.sock.send_multipart([identity, self.encoder.encode(reply)])

    def dispatch(self, msg):
        registry = self.registry
        if isinstance(msg, RegistryWatch):
            if msg.epoch == registry.epoch:
                return RegistryUnchanged(registry.epoch)
            return registry.snapshot()
        if isinstance(msg, VersionReport):
            registry.on_report(msg)
            return None
        if isinstance(msg, AdminCommand):
            reply = registry.handle(msg)
            log.info(
                "admin %s %s%s -> %d",
                msg.op,
                msg.model or "",
                f"@{msg.version}" if msg.version else "",
                reply.status,
            )
            return reply
        return None

    def close(self) -> None:
        self.sock.close(linger=0)


async def serve_control(server: ControlServer) -> None:
    try:
        await server.run()
    except asyncio.CancelledError:
        server.close()
        raise
