"""`zeroserve bench serve|sweep`: argument parsing and the top of a run.

Registered by launcher/cli.py with `add_parser(subparsers)`; `run(args)` returns the exit code
(0 when at least one request succeeded, 1 when none did, 2 for a bad setup).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys

from zeroserve.launcher.bench.client import OPTIONAL_FIELDS


def _int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected integers separated by commas, e.g. 1,4,16"
        ) from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected positive integers, e.g. 1,4,16")
    return values


def _float_list(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected numbers separated by commas, e.g. 50,90,99"
        ) from None
    if not values or not all(0 <= v <= 100 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: percentiles must lie in [0, 100]")
    return values


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="model id to request (default: the first id of GET /v1/models)")
    p.add_argument("--endpoint", choices=("completions", "chat"), default="completions")
    p.add_argument(
        "--dataset", default="random", help="random | chat | shared-prefix | jsonl:PATH (default: random)"
    )
    p.add_argument(
        "--input-len",
        type=int,
        default=256,
        help="prompt tokens (random), user-turn tokens (chat) or question tokens after the prefix "
        "(shared-prefix)",
    )
    p.add_argument("--output-len", type=int, default=128, help="output tokens asked per request")
    p.add_argument("--range-ratio", type=float, default=0.0, help="random lengths uniform in len*(1±r)")
    p.add_argument("--num-system-prompts", type=int, default=4, help="chat: distinct shared system prompts")
    p.add_argument("--system-prompt-len", type=int, default=256, help="chat: tokens per system prompt")
    p.add_argument("--turns", type=int, default=3, help="chat: user turns per conversation")
    p.add_argument(
        "--num-groups",
        type=int,
        default=4,
        help="shared-prefix: distinct prefixes (each a group of requests)",
    )
    p.add_argument("--prefix-len", type=int, default=512, help="shared-prefix: tokens per shared prefix")
    p.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer to size prompts: a path (HF folder, tokenizer.json, GGUF), 'words' "
        "(one word = one token), or auto (default: the served model when it is local)",
    )
    p.add_argument(
        "--goodput",
        default=None,
        metavar="ttft:MS,tpot:MS,itl:MS,e2el:MS",
        help="SLOs for goodput (itl bounds every inter-token gap of a request)",
    )
    p.add_argument("--percentiles", type=_float_list, default=(50, 90, 99), help="default 50,90,99")
    p.add_argument("--num-warmups", type=int, default=1, help="untimed requests sent first (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--api-key", default=None, help="Bearer key (default: ZEROSERVE_API_KEY's first key)")
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request (default 600)")
    p.add_argument(
        "--no-ignore-eos",
        action="store_true",
        help="do not send ignore_eos/min_tokens: let outputs stop at EOS",
    )
    p.add_argument("--output-json", metavar="FILE", help="write every figure as JSON")
    p.add_argument("--plot", metavar="FILE.png", help="write charts as PNG")
    p.add_argument("--disable-tqdm", action="store_true", help="no progress bar")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add `bench` (with `serve` and `sweep`) to the `zeroserve` sub-command parsers."""
    bench = subparsers.add_parser("bench", help="benchmark an OpenAI-compatible server")
    sub = bench.add_subparsers(dest="bench_command", required=True)

    serve = sub.add_parser("serve", help="drive one server with streaming requests and measure it")
    serve.add_argument("--base-url", required=True, help="e.g. http://127.0.0.1:8000")
    serve.add_argument("--num-prompts", type=int, default=100)
    serve.add_argument("--max-concurrency", type=int, default=None, help="requests in flight at most")
    serve.add_argument(
        "--request-rate", type=float, default=math.inf, help="requests/s (default: all at once)"
    )
    serve.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of arrivals: 1 = Poisson")
    _add_common(serve)

    sweep = sub.add_parser("sweep", help="the serve benchmark over several concurrencies and servers")
    sweep.add_argument(
        "--target", action="append", required=True, metavar="NAME=URL", help="repeat per server"
    )
    sweep.add_argument("--concurrency", type=_int_list, default=[1, 4, 16, 64], help="default 1,4,16,64")
    sweep.add_argument(
        "--num-prompts", type=int, default=None, help="per level (default: 4 x concurrency, >= 8)"
    )
    _add_common(sweep)
    return bench


def _config(args, base_url: str):
    from zeroserve.launcher.bench.metrics import parse_goodput
    from zeroserve.launcher.bench.runner import ServeConfig

    api_key = args.api_key
    if api_key is None:
        from zeroserve.shared.env import api_keys

        api_key = (api_keys() or [None])[0]
    for name in ("input_len", "output_len", "num_system_prompts", "turns", "num_groups", "prefix_len"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    return ServeConfig(
        base_url=base_url,
        model=args.model,
        endpoint=args.endpoint,
        num_prompts=getattr(args, "num_prompts", None) or 100,
        max_concurrency=getattr(args, "max_concurrency", None),
        request_rate=getattr(args, "request_rate", math.inf),
        burstiness=getattr(args, "burstiness", 1.0),
        dataset=args.dataset,
        input_len=args.input_len,
        output_len=args.output_len,
        range_ratio=args.range_ratio,
        num_system_prompts=args.num_system_prompts,
        system_prompt_len=args.system_prompt_len,
        turns=args.turns,
        num_groups=args.num_groups,
        prefix_len=args.prefix_len,
        goodput=parse_goodput(args.goodput),
        percentiles=tuple(args.percentiles),
        num_warmups=args.num_warmups,
        seed=args.seed,
        temperature=args.temperature,
        api_key=api_key,
        request_timeout=args.request_timeout,
        tokenizer=args.tokenizer,
        fields=tuple(f for f in OPTIONAL_FIELDS if not (args.no_ignore_eos and f != "stream_options")),
        disable_tqdm=args.disable_tqdm,
    )


def run(args) -> int:
    """Run `bench serve` or `bench sweep` from parsed arguments; returns the exit code."""
    from zeroserve.launcher.bench import report

    try:
        if args.bench_command == "serve":
            cfg = _config(args, args.base_url)
            from zeroserve.launcher.bench.runner import run_serve

            result = asyncio.run(run_serve(cfg))
            print(report.format_summary(result))
            ok = result["completed"] > 0
        else:
            from zeroserve.launcher.bench.sweep import parse_target, run_sweep

            targets = [parse_target(t) for t in args.target]
            cfg = _config(args, targets[0][1])
            result = asyncio.run(run_sweep(targets, args.concurrency, cfg, args.num_prompts))
            print(report.format_sweep(result))
            ok = any(run["completed"] for t in result["targets"] for run in t["runs"])
    except (ValueError, RuntimeError, OSError) as e:
        print(f"zeroserve bench: error: {e}", file=sys.stderr)
        return 2
    if args.output_json:
        report.write_json(args.output_json, result)
        print(f"wrote {args.output_json}", file=sys.stderr)
    if args.plot:
        from zeroserve.launcher.bench import plots

        (plots.plot_serve if args.bench_command == "serve" else plots.plot_sweep)(result, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    """`python -m zeroserve.launcher.bench.cli bench serve ...` until launcher/cli.py registers it."""
    parser = argparse.ArgumentParser(prog="zeroserve")
    add_parser(parser.add_subparsers(dest="command", required=True))
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
