"""The api process: ``run_api(config)`` (blocking) or ``python -m zeroserve.api_proc --config
FILE --index N``.

aiohttp on uvloop, listening with SO_REUSEPORT so that several api processes share one
port (the kernel spreads connections over them). ``handler_cancellation=True`` makes aiohttp
cancel a handler whose client disconnected, which closes its engine streams and so sends
Abort, non-streaming requests included. SIGTERM/SIGINT: /ready turns 503, the socket stops
accepting, in-flight requests get ``shutdown_timeout_s`` to finish, then the process exits 0.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiohttp import web

from zeroserve.api_proc.app import create_app
from zeroserve.api_proc.config import ApiConfig
from zeroserve.api_proc.serving import STATE

log = logging.getLogger("zeroserve.api")


async def serve_app(app: web.Application, config: ApiConfig) -> web.AppRunner:
    """Start serving app on config.host:port with the production runner settings."""
    runner = web.AppRunner(
        app,
        handler_cancellation=True,
        shutdown_timeout=config.shutdown_timeout_s,
        access_log=log if log.isEnabledFor(logging.DEBUG) else None,
    )
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port, reuse_port=True, backlog=1024)
    await site.start()
    return runner


class ApiProcess:
    """The actor run by shared.proc_main.run_actor: run() serves until cancelled, drain()
    is the graceful part of a stop."""

    def __init__(self, config: ApiConfig, client: Any = None):
        self.config = config
        self.client = client
        self.app: web.Application | None = None
        self.runner: web.AppRunner | None = None
        self._cleaned = False

    async def run(self) -> None:
        if self.client is None:
            from zeroserve.shared.client import EngineClient

            self.client = EngineClient(
                self.config.engine_address,
                curve=self.config.curve,
                heartbeat_interval_s=self.config.heartbeat_interval_s,
                heartbeat_timeout_s=self.config.heartbeat_timeout_s,
            )
        await self.client.start()
        try:
            self.app = create_app(self.config, self.client)
            self.runner = await serve_app(self.app, self.config)
            log.info(
                "api %d serving %s on http://%s:%d (engine at %s)",
                self.config.index,
                self.config.model_name,
                self.config.host,
                self.config.port,
                self.config.engine_address,
            )
            await asyncio.Event().wait()
        finally:
            await self._cleanup()
            await self.client.close()

    async def drain(self) -> None:
        if self.app is not None:
            self.app[STATE].monitor.draining = True
        await self._cleanup()

    async def _cleanup(self) -> None:
        if self.runner is not None and not self._cleaned:
            self._cleaned = True
            await self.runner.cleanup()  # stop accepting, wait for in-flight handlers, then cancel


def run_api(config: ApiConfig) -> None:
    """Serve the API until SIGTERM/SIGINT; exits the process (code 0) when done."""
    from zeroserve.shared.proc_main import run_actor

    run_actor(f"api-{config.index}", lambda: ApiProcess(config))


def main(argv: list[str] | None = None) -> None:
    from zeroserve.shared.proc_main import parse_proc_args

    engine_config, args = parse_proc_args("api", argv)
    run_api(ApiConfig.from_engine(engine_config, args.index))
