"""The `zeroserve` console script: one sub-command per way of using the engine."""

from __future__ import annotations

import argparse
import importlib
import logging
import runpy
import sys

from zeroserve.shared.proc_main import setup_logging

# sub-command -> module with add_parser(subparsers) and run(args) -> int
COMMANDS = {
    "generate": "zeroserve.launcher.generate",
    "bench": "zeroserve.launcher.bench.cli",
    "batch": "zeroserve.launcher.batch",
    "deploy": "zeroserve.launcher.deploy",
    "usage": "zeroserve.launcher.usage",
    "models": "zeroserve.launcher.models_cli",
}
PROC_ROLES = ("api", "tokenizer", "scheduler", "worker", "registry")


def add_serve_parser(sub) -> None:
    from zeroserve.launcher.engine_args import add_engine_args

    p = sub.add_parser(
        "serve",
        help="serve a model behind the OpenAI-compatible HTTP API",
        description="Start every zeroserve process on this machine and serve MODEL over HTTP.",
    )
    add_engine_args(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zeroserve", description="zeroserve: an LLM serving engine")
    sub = parser.add_subparsers(dest="command", required=True)
    add_serve_parser(sub)
    proc = sub.add_parser("proc", help="run one engine process (what supervisord/systemd units call)")
    proc.add_argument("role", choices=PROC_ROLES)
    proc.add_argument("rest", nargs=argparse.REMAINDER, help="--config FILE [--index N]")
    for module in COMMANDS.values():
        try:
            importlib.import_module(module).add_parser(sub)
        except ImportError:
            pass  # a command whose module is not present in this build
    sub.add_parser("version", help="print the version")
    return parser


def run_proc(role: str, rest: list[str]) -> int:
    """Run a role's package as __main__ with its own arguments (as `python -m` would)."""
    from zeroserve.launcher.supervisor import ROLES

    sys.argv = [f"zeroserve proc {role}", *rest]
    runpy.run_module(ROLES[role], run_name="__main__", alter_sys=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "proc":
        return run_proc(args.role, args.rest)
    setup_logging("launcher", getattr(args, "log_format", "text"))
    logging.getLogger().setLevel(logging.INFO)
    if args.command == "version":
        from importlib.metadata import version

        print(version("zeroserve"))
        return 0
    if args.command == "serve":
        from zeroserve.launcher.supervisor import engine_config, serve

        return serve(*engine_config(args))
    return importlib.import_module(COMMANDS[args.command]).run(args)


if __name__ == "__main__":
    sys.exit(main())
