"""The engine's command-line flags, shared by `serve`, `deploy` and `batch`, and their EngineConfig."""

from __future__ import annotations

import argparse
import os

from zeroserve.shared.config import EngineConfig
from zeroserve.shared.ipc import make_run_dir, new_curve_keys
from zeroserve.shared.model_files import model_display_name, resolve_model


def add_engine_args(parser: argparse.ArgumentParser, with_model: bool = True) -> None:
    if with_model:
        parser.add_argument(
            "model",
            nargs="?",
            default=None,
            help="a .gguf file or a Hugging Face model folder (default: the packaged SmolLM2-135M-Instruct GGUF)",
        )
    g = parser.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address the HTTP API listens on (default 127.0.0.1)")
    g.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    g.add_argument(
        "--api-key",
        action="append",
        default=[],
        metavar="KEY",
        help="require 'Authorization: Bearer KEY' (repeatable; also ZEROSERVE_API_KEY, comma-separated)",
    )
    g.add_argument(
        "--api-workers",
        type=int,
        default=1,
        help="HTTP processes sharing the port via SO_REUSEPORT (default 1)",
    )
    g.add_argument("--num-tokenizers", type=int, default=1, help="tokenizer processes (default 1)")
    g.add_argument(
        "--served-model-name",
        default=None,
        help="model name in /v1/models and responses (default: from the file name)",
    )
    g.add_argument(
        "--max-n", type=int, default=16, help="largest n (choices per request) accepted (default 16)"
    )
    g = parser.add_argument_group("scheduler")
    g.add_argument("--max-model-len", type=int, default=0, help="context length (default: the model's)")
    g.add_argument("--max-num-seqs", type=int, default=128, help="sequences per step (default 128)")
    g.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=2048,
        help="tokens per step; longer prefills are chunked (default 2048)",
    )
    g.add_argument("--block-size", type=int, default=16, help="tokens per KV block (default 16)")
    g.add_argument(
        "--max-waiting-requests",
        type=int,
        default=4096,
        help="queued requests beyond which new ones get HTTP 429",
    )
    g.add_argument(
        "--max-waiting-tokens",
        type=int,
        default=4_000_000,
        help="queued prompt tokens beyond which new requests get HTTP 429",
    )
    g.add_argument("--no-prefix-caching", action="store_true", help="disable automatic prefix caching")
    g = parser.add_argument_group("worker")
    g.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    g.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="compute dtype (auto: float32 on CPU, bfloat16 on GPU)",
    )
    g.add_argument(
        "--kv-cache-dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="KV cache dtype (auto: the compute dtype); on CPU float16 halves the KV memory and the "
        "bytes decode attention reads, at ~1e-3 relative error in K/V",
    )
    g.add_argument(
        "--num-kv-blocks", type=int, default=0, help="KV blocks to allocate (default: sized from memory)"
    )
    g.add_argument(
        "--kv-cache-memory-gb", type=float, default=0.0, help="CPU: memory for the KV cache in GiB"
    )
    g.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=0.9,
        help="GPU: fraction of memory for weights + KV cache",
    )
    g.add_argument(
        "--kernel-backend",
        default=None,
        choices=["torch", "cpu", "triton"],
        help="kernel implementation (default: cpu on CPU, triton on CUDA)",
    )
    g.add_argument("--enforce-eager", action="store_true", help="GPU: do not capture CUDA graphs")
    g.add_argument(
        "--load-format",
        default="auto",
        choices=["auto", "dummy"],
        help="dummy: random weights at the model's shape",
    )
    g.add_argument(
        "--num-threads", type=int, default=0, help="CPU: torch threads in the worker (default: all cores)"
    )
    g.add_argument("--seed", type=int, default=0, help="seed for unseeded sampling")
    g = parser.add_argument_group("transport")
    g.add_argument(
        "--transport",
        default="ipc",
        choices=["ipc", "tcp"],
        help="ipc: unix sockets in a private run dir (default); tcp: CURVE-encrypted tcp",
    )
    g.add_argument("--bind-host", default="127.0.0.1", help="tcp transport: address internal sockets bind to")
    g.add_argument("--base-port", type=int, default=5550, help="tcp transport: first internal port")
    g.add_argument(
        "--run-dir",
        default=None,
        help="directory for sockets, config and metrics (default: a new private temp dir)",
    )


def default_device() -> str:
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "cpu"


def config_from_args(args: argparse.Namespace, run_dir: str | None = None) -> EngineConfig:
    """Resolve the model, its context length and vocabulary, and build the frozen config."""
    from zeroserve.gpu_worker.loader import load_model_config

    model = resolve_model(getattr(args, "model", None))
    model_cfg = load_model_config(model)
    max_model_len = args.max_model_len or model_cfg.max_position_embeddings
    if args.max_model_len and args.max_model_len > model_cfg.max_position_embeddings:
        raise SystemExit(
            f"--max-model-len {args.max_model_len} exceeds the model's context "
            f"({model_cfg.max_position_embeddings} tokens)"
        )
    run_dir = run_dir or args.run_dir or make_run_dir()
    os.makedirs(run_dir, mode=0o700, exist_ok=True)
    device = args.device or default_device()
    return EngineConfig(
        model=model,
        served_model_name=args.served_model_name or model_display_name(model),
        run_dir=os.path.abspath(run_dir),
        transport=args.transport,
        bind_host=args.bind_host,
        base_port=args.base_port,
        curve=new_curve_keys() if args.transport == "tcp" else None,
        num_tokenizers=args.num_tokenizers,
        api_workers=args.api_workers,
        block_size=args.block_size,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=max(args.max_num_batched_tokens, args.block_size),
        max_model_len=max_model_len,
        vocab_size=model_cfg.vocab_size,
        max_waiting_requests=args.max_waiting_requests,
        max_waiting_tokens=args.max_waiting_tokens,
        enable_prefix_caching=not args.no_prefix_caching,
        device=device,
        dtype=args.dtype,
        kv_cache_dtype=args.kv_cache_dtype,
        num_kv_blocks=args.num_kv_blocks,
        kv_cache_memory_gb=args.kv_cache_memory_gb,
        gpu_memory_utilization=args.gpu_memory_utilization,
        kernel_backend=args.kernel_backend,
        enforce_eager=args.enforce_eager,
        load_format=args.load_format,
        num_threads=args.num_threads,
        seed=args.seed,
        host=args.host,
        port=args.port,
        api_keys=list(args.api_key),  # ZEROSERVE_API_KEY is read by the api process itself
        max_n=args.max_n,
    )
