"""What every process does at start: arguments, logging, dying with its parent, the event loop,
and turning SIGTERM/SIGINT into a graceful stop (exit code 0)."""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import logging
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

from zeroserve.shared import env, logs
from zeroserve.shared.config import EngineConfig, read_config

log = logging.getLogger("zeroserve")


def parse_proc_args(role: str, argv: list[str] | None = None) -> tuple[EngineConfig, argparse.Namespace]:
    parser = argparse.ArgumentParser(prog=f"zeroserve proc {role}")
    parser.add_argument(
        "--config",
        required=True,
        help="the engine config file (JSON) written by `zeroserve serve` or `zeroserve deploy`",
    )
    parser.add_argument(
        "--index",
        type=int,
        default=0,
        help="which instance of this role (tokenizer / api number, worker rank)",
    )
    parser.add_argument(
        "--replica",
        type=int,
        default=0,
        help="scheduler / worker: which engine replica it belongs to (0 .. data_parallel_size-1)",
    )
    args = parser.parse_args(argv)
    name = role if args.index == 0 else f"{role}-{args.index}"
    name = name if args.replica == 0 else f"{name} r{args.replica}"
    setup_logging(name)  # text until the config says otherwise: reading it may fail, and that is logged
    config = read_config(args.config)
    setup_logging(name, config.log_format)
    return config, args


def setup_logging(role: str, log_format: str = "text") -> None:
    """Every line of this process goes to stderr as ``log_format`` (shared/logs.py) names it."""
    logs.configure(role, env.log_level(), log_format)


def die_with_parent() -> None:
    """Linux: get SIGTERM when the parent dies, so no child outlives the launcher."""
    if os.environ.get("ZEROSERVE_NO_PDEATHSIG") or not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        if os.getppid() == 1:  # the parent died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)
    except OSError:
        pass


def run_actor(role: str, factory: Callable[[], Any]) -> None:
    """Run ``factory().run()`` on uvloop; SIGTERM/SIGINT -> ``drain()`` if it has one, then exit 0."""
    die_with_parent()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass

    async def main() -> None:
        actor = factory()
        loop = asyncio.get_running_loop()
        task = asyncio.ensure_future(actor.run())
        stopping = False

        async def stop() -> None:
            drain = getattr(actor, "drain", None)
            if drain is not None:
                await drain()
            task.cancel()

        def on_signal(signum: int) -> None:
            nonlocal stopping
            if stopping:
                return
            stopping = True
            log.info("%s got %s: stopping", role, signal.Signals(signum).name)
            asyncio.ensure_future(stop())

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal, sig)
        try:
            await task
        except asyncio.CancelledError:
            pass
        close = getattr(actor, "close", None)
        if close is not None:
            close()

    asyncio.run(main())
    log.info("%s stopped", role)
    sys.exit(0)
