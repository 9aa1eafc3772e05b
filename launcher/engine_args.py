"""The engine's command-line flags, shared by `serve`, `deploy` and `batch`, and their EngineConfig.

Every flag sets the EngineConfig field of the same name and takes that field's default
(``DEFAULTS``): ``FLAGS`` holds only what the struct cannot say, the words and the choices.
"""

from __future__ import annotations

import argparse
import os
from typing import Any, NamedTuple

from zeroserve.shared import env
from zeroserve.shared.config import DEFAULTS, EngineConfig
from zeroserve.shared.ipc import make_run_dir, new_curve_keys
from zeroserve.shared.model_files import model_display_name, resolve_model

# appended to a flag's help for --help; the README table shows the default in its own column
DEFAULT_NOTE = " (default: %(default)s)"
DTYPES = ("auto", "float32", "bfloat16", "float16")
# kernels/quantized.QUANTIZATIONS, written out so that parsing flags does not import torch
# (tests/gpu_worker/test_quantization.py checks they agree)
QUANTIZATIONS = ("auto", "none", "int8", "q4", "fp8")


class Flag(NamedTuple):
    field: str  # the EngineConfig field it sets; the flag is --field-name unless `flag` says otherwise
    help: str
    choices: tuple[str, ...] | None = None
    flag: str | None = None
    metavar: str | tuple[str, ...] | None = None
    resolved: bool = False  # no default on the command line: config_from_args works it out


FLAGS: dict[str, list[Flag]] = {
    "server": [
        Flag("host", "address the HTTP API listens on"),
        Flag("port", "HTTP port"),
        Flag(
            "api_keys",
            "require 'Authorization: Bearer KEY'; NAME:KEY names the tenant the key's requests are "
            "recorded under (a plain KEY gets key-<hash prefix>) (repeatable; also ZEROSERVE_API_KEY, "
            "comma-separated)",
            flag="--api-key",
            metavar="[NAME:]KEY",
        ),
        Flag("api_workers", "HTTP processes sharing the port via SO_REUSEPORT"),
        Flag("num_tokenizers", "tokenizer processes"),
        Flag(
            "data_parallel_size",
            "engine replicas (each a scheduler and its worker, with its own KV pool and prefix cache) behind "
            "the same API; on CPU the cores are split between them (--num-threads is then per replica)",
        ),
        Flag(
            "tensor_parallel_size",
            "worker processes per replica, each holding 1/N of every layer (one torch.distributed group: "
            "gloo on CPU, NCCL on GPU); N must divide the model's attention heads; on CPU each rank gets "
            "1/N of the replica's cores",
        ),
        Flag(
            "routing",
            "how tokenizers pick a replica: prefix_aware (the replica holding most of the prompt's leading "
            "KV blocks, unless loads are too uneven), least_loaded (fewest waiting*4 + running), "
            "round_robin; auto: prefix_aware with several replicas",
            ("auto", "prefix_aware", "least_loaded", "round_robin"),
        ),
        Flag(
            "served_model_name",
            "model name in /v1/models and responses (default: from the file name)",
            resolved=True,
        ),
        Flag("max_n", "largest n (choices per request) accepted"),
        Flag("max_seqs_per_request", "largest prompts x n fan-out one request may ask for; more is HTTP 400"),
        Flag(
            "priority_range",
            "request priority must lie in this range (both included); outside is HTTP 400",
            metavar=("MIN", "MAX"),
        ),
        Flag(
            "tool_call_parser",
            "how tool calls are read from the model's output (docs/tools.md): hermes (<tool_call>{json}"
            '</tool_call>, Hermes/Qwen) or llama3_json ({"name": ..., "parameters": ...}, Llama 3); '
            "also the format tools are described in when the chat template ignores them",
            ("hermes", "llama3_json"),
        ),
    ],
    "scheduler": [
        Flag("max_model_len", "context length; 0: the model's"),
        Flag("max_num_seqs", "sequences per step"),
        Flag("max_num_batched_tokens", "tokens per step; longer prefills are chunked"),
        Flag("block_size", "tokens per KV block"),
        Flag("max_waiting_requests", "queued requests beyond which new ones get HTTP 429"),
        Flag("max_waiting_tokens", "queued prompt tokens beyond which new requests get HTTP 429"),
        Flag("enable_prefix_caching", "disable automatic prefix caching", flag="--no-prefix-caching"),
        Flag(
            "priority_aging_s",
            "seconds of waiting worth one priority level, so low priorities never starve; "
            "0: strict (priority, arrival) order",
        ),
        Flag(
            "priority_deadline_ms",
            "a request of priority P that sends no deadline_ms gets MS (repeatable, one per priority "
            "class); it then ends with finish_reason timeout at MS, or is refused at once (429) when "
            "even an immediate start cannot meet it (a negative P: --priority-deadline-ms=-5:800)",
            metavar="P:MS",
        ),
        Flag(
            "target_itl_ms",
            "inter-token latency target: each step takes decodes first, then as many prefill tokens as "
            "keep its predicted time (a model learned from measured steps) under it; 0: off, the fixed "
            "--max-num-batched-tokens budget alone (on the 2-core CPU with SmolLM2, 175 cut the ITL p99 "
            "from ~1.2 s to ~0.2 s at C=64; docs/benchmarks.md)",
        ),
    ],
    "worker": [
        Flag("device", "cpu or cuda (default: cuda when available)", resolved=True),
        Flag(
            "dtype",
            "compute dtype (auto: float32 on CPU, bfloat16 on GPU); on a CPU, bfloat16 means bf16 weights "
            "with float32 activations where the CPU has avx512_bf16 or AMX, else float32 (the log says why)",
            DTYPES,
        ),
        Flag(
            "kv_cache_dtype",
            "KV cache dtype (auto: float16 on a CPU serving a quantized mode, else the compute dtype); on "
            "CPU float16 halves the KV memory and the bytes decode attention reads, at ~1e-3 relative "
            "error in K/V; fp8 (e4m3, scale 1.0): NVIDIA GPUs of compute capability 8.9+",
            (*DTYPES, "fp8"),
        ),
        Flag("num_kv_blocks", "KV blocks to allocate; 0: sized from memory"),
        Flag("kv_cache_memory_gb", "memory for the KV cache in GiB; 0: CPU 2 GiB, GPU from utilization"),
        Flag("gpu_memory_utilization", "GPU: fraction of memory for weights + KV cache"),
        Flag(
            "kernel_backend",
            "kernel implementation (default: cpu on CPU, triton on CUDA)",
            ("torch", "cpu", "triton"),
        ),
        Flag(
            "quantization",
            "weight format of the projections. none: the checkpoint's values in --dtype (float32: "
            "bit-exact with transformers); int8: int8 weights per output channel x int8 activations per "
            "token (CPU, fast with VNNI); q4: a GGUF file's own 4-bit/8-bit blocks, kept packed (CPU); "
            "fp8: e4m3 weights and activations (GPU, sm_89+); auto: on CPU the fastest mode that passes "
            "the quality bar here (q4 for a block-quantized GGUF, int8 for float weights, with VNNI; "
            "else none), on GPU none. --dtype bfloat16 on a CPU with avx512_bf16/AMX: bf16 weights",
            QUANTIZATIONS,
        ),
        Flag(
            "enforce_eager",
            "do not capture decode graphs (CUDA graphs on a GPU, recorded kernel calls on a CPU)",
        ),
        Flag("load_format", "dummy: random weights at the model's shape", ("auto", "dummy")),
        Flag(
            "num_threads",
            "CPU: torch threads in each worker; 0: ZEROSERVE_NUM_THREADS, else all cores (with "
            "--data-parallel-size N: each worker's 1/N share of them)",
        ),
        Flag("seed", "seed for unseeded sampling"),
        Flag(
            "pooling",
            "how /v1/embeddings turns a prompt's hidden states into one vector (docs/embeddings.md): auto: a "
            "sentence-transformers folder's own pooling and normalisation, else the last token; last, mean, "
            "cls: that, L2-normalised",
            ("auto", "last", "mean", "cls"),
        ),
        Flag("step_timeout_s", "a model step taking longer fails its requests and restarts the worker"),
    ],
    "observability": [
        Flag(
            "log_format",
            "log lines of every process: text, or json (one object a line: ts, level, logger, role, "
            "message, request_id when the line is about a request); one access line per request either way",
            ("text", "json"),
        ),
        Flag(
            "log_prompts",
            "put each request's prompt and output text in its access log line (off: token counts only)",
        ),
        Flag(
            "metrics_prefix",
            "prefix of every /metrics name: zeroserve:..., or vllm:... so that vLLM's dashboards, alerts "
            "and llm-d's scrapers read zeroserve unchanged",
            ("zeroserve", "vllm"),
        ),
        Flag(
            "otlp_traces_endpoint",
            "send OpenTelemetry traces (one per request, spans from every process it crosses, a client's "
            "W3C traceparent continued) to this OTLP/HTTP collector, e.g. http://localhost:4318/v1/traces "
            "(a URL without a path gets /v1/traces); also OTEL_EXPORTER_OTLP_TRACES_ENDPOINT. Off by default",
            metavar="URL",
        ),
        Flag(
            "collect_detailed_traces",
            "with --otlp-traces-endpoint: also a span per model step for each request in it (worker "
            "timings; costs time on every step)",
        ),
    ],
    "audit": [
        Flag(
            "api_keys_file",
            "tenants, their API keys and optional requests_per_minute / tokens_per_minute limits (TOML, or "
            "JSON when named .json; mode 0600 or stricter; see docs/audit.md)",
            metavar="FILE",
        ),
        Flag(
            "admin_key",
            "enable the admin API under /admin with this key (else ZEROSERVE_ADMIN_KEY; without one /admin "
            "is 404)",
            metavar="KEY",
        ),
        Flag(
            "audit_db",
            "where each request's audit record is stored: sqlite:///PATH (or a file path), postgresql://..., "
            "or off (default: STATE_DIR/audit.db)",
            metavar="URL",
            resolved=True,
        ),
        Flag(
            "audit_content",
            "text kept in each audit record: none, hash (SHA-256 of the prompt and of the output), full",
            ("none", "hash", "full"),
        ),
        Flag("audit_retention_days", "delete audit records older than this many days; 0: keep them"),
        Flag(
            "state_dir",
            "directory for state that outlives a run: the audit trail's SQLite file and spool (default: "
            "ZEROSERVE_STATE_DIR, else ~/.local/state/zeroserve)",
            metavar="DIR",
            resolved=True,
        ),
    ],
    "models": [
        Flag(
            "models_file",
            "serve the models and versions of this TOML file (docs/models.md) instead of one MODEL; each "
            "version is its own engine group with its own options; the registry is kept in STATE_DIR",
            flag="--models",
            metavar="FILE",
        ),
        Flag(
            "allow_fault_injection",
            "accept a version's `fault` (injected errors / latency, for testing canary rollback); off: refused",
        ),
        Flag(
            "model_drain_timeout_s",
            "unloading a version waits at most this long for its in-flight requests to finish",
        ),
    ],
    "transport": [
        Flag(
            "transport",
            "ipc: unix sockets in a private run dir; tcp: CURVE-encrypted tcp",
            ("ipc", "tcp"),
        ),
        Flag("bind_host", "tcp transport: address internal sockets bind to"),
        Flag("base_port", "tcp transport: first internal port"),
        Flag(
            "run_dir",
            "directory for sockets (DIR/tokenizer-0.sock, ...), config and metrics; created with mode 0700 "
            "if missing, otherwise it must be yours and not writable by group or others; at exit zeroserve "
            "removes only the files it made there, and DIR itself only if it created it "
            "(default: a new private temp dir)",
            resolved=True,
        ),
    ],
    "distributed": [
        Flag(
            "distributed_executor_backend",
            "where the replicas run: mp, processes on this machine; ray, Ray actors on a Ray cluster, "
            "each replica's TP group packed on one node, re-placed when its node is lost "
            "(pip install 'zeroserve[ray]'; docs/distributed.md)",
            ("mp", "ray"),
        ),
        Flag(
            "ray_address",
            "with ray: the cluster to join (HOST:PORT of `ray start --head`, auto, or ray://HOST:PORT); "
            "default: start a local one",
            metavar="ADDRESS",
        ),
    ],
}


def flag_kwargs(flag: Flag) -> dict[str, Any]:
    """add_argument's keywords for ``flag``: action and type follow the field's default."""
    default = None if flag.resolved else getattr(DEFAULTS, flag.field)
    if isinstance(default, bool):
        return {"dest": flag.field, "help": flag.help, "action": "store_false" if default else "store_true"}
    kw: dict[str, Any] = {"dest": flag.field, "help": flag.help, "metavar": flag.metavar}
    if isinstance(default, list):
        return {**kw, "action": "append", "default": list(default)}  # append mutates its default
    if isinstance(default, dict):  # KEY:VALUE, repeatable; config_from_args parses the pairs
        return {**kw, "action": "append", "default": []}
    if isinstance(default, tuple):  # one word per item: "-5,7" would read as a flag, "-5 7" does not
        kw.update(type=type(default[0]), nargs=len(default))
    else:
        kw.update(type=str if default is None else type(default), choices=flag.choices)
    if default is not None:
        kw["help"] += DEFAULT_NOTE
    return {**kw, "default": default}


def add_engine_args(parser: argparse.ArgumentParser, with_model: bool = True) -> None:
    if with_model:
        parser.add_argument(
            "model",
            nargs="?",
            default=None,
            help="a .gguf file or a Hugging Face model folder (default: the packaged SmolLM2-135M-Instruct GGUF)",
        )
    for title, flags in FLAGS.items():
        group = parser.add_argument_group(title)
        for flag in flags:
            group.add_argument(flag.flag or "--" + flag.field.replace("_", "-"), **flag_kwargs(flag))


def default_device() -> str:
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "cpu"


# numeric flags whose value 0 or below (POSITIVE) or below 0 (NON_NEGATIVE; 0 = "work it out")
# has no meaning: refused at the command line, before any process starts
POSITIVE = (
    "port", "num_tokenizers", "data_parallel_size", "tensor_parallel_size", "max_n", "max_seqs_per_request", "max_num_seqs",
    "max_num_batched_tokens", "block_size", "max_waiting_requests", "max_waiting_tokens", "step_timeout_s",
)  # fmt: skip
NON_NEGATIVE = (
    "api_workers",
    "max_model_len",
    "num_kv_blocks",
    "kv_cache_memory_gb",
    "num_threads",
    "priority_aging_s",
    "target_itl_ms",
    "audit_retention_days",
    "model_drain_timeout_s",
)


def parse_priority_deadlines(items: list[str], priority_range: tuple[int, int]) -> dict[int, float]:
    """['-10:60000', '0:5000'] -> {-10: 60000.0, 0: 5000.0}; SystemExit naming what is wrong."""
    out: dict[int, float] = {}
    for item in items:
        p, sep, ms = item.partition(":")
        try:
            priority, deadline = int(p), float(ms)
        except ValueError:
            raise SystemExit(
                f"--priority-deadline-ms {item!r}: write PRIORITY:MILLISECONDS, e.g. 0:30000"
            ) from None
        if not sep or not 0 < deadline < float("inf"):
            raise SystemExit(f"--priority-deadline-ms {item!r}: the deadline must be a positive number of ms")
        if not priority_range[0] <= priority <= priority_range[1]:
            raise SystemExit(
                f"--priority-deadline-ms {item!r}: priority {priority} is outside --priority-range "
                f"{priority_range[0]} {priority_range[1]}"
            )
        if priority in out:
            raise SystemExit(f"--priority-deadline-ms: priority {priority} is given twice")
        out[priority] = deadline
    return out


def traces_endpoint(args: argparse.Namespace) -> str | None:
    """--otlp-traces-endpoint, else OTEL_EXPORTER_OTLP_TRACES_ENDPOINT; checked before any process starts."""
    url = args.otlp_traces_endpoint or env.otlp_traces_endpoint()
    if url is not None and not url.startswith(("http://", "https://")):
        raise SystemExit(f"--otlp-traces-endpoint {url!r}: an OTLP/HTTP URL (http:// or https://) is needed")
    if args.collect_detailed_traces and url is None:
        raise SystemExit(
            "--collect-detailed-traces needs --otlp-traces-endpoint (or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT)"
        )
    return url


def _absolute_audit_db(audit_db: str) -> str:
    """A plain file path made absolute here: the api processes may run from another directory."""
    if audit_db in ("", "off") or "://" in audit_db:
        return audit_db
    return os.path.abspath(audit_db)


def check_audit_args(args: argparse.Namespace) -> None:
    """The keys (file mode, names, duplicates) and the audit store URL, refused before any process starts."""
    from zeroserve.api_proc.audit.store import StoreError, resolve_url
    from zeroserve.api_proc.auth import KeysError, build_tenants

    try:
        build_tenants(list(args.api_keys), args.api_keys_file)
    except KeysError as e:
        raise SystemExit(f"zeroserve: {e}") from None
    state = args.state_dir or env.state_dir()
    try:
        url = resolve_url(args.audit_db or "", state)
    except StoreError as e:
        raise SystemExit(f"zeroserve: {e}") from None
    if url is None:  # --audit-db off: nothing is kept in the state dir
        return
    try:  # the spool lives there whatever the store: an api process must not find out at start
        os.makedirs(state, mode=0o700, exist_ok=True)
        writable = os.access(state, os.W_OK | os.X_OK)
    except OSError as e:
        raise SystemExit(
            f"zeroserve: cannot create the state dir {state} ({e.strerror}); the audit trail keeps its "
            "spool there. Pass --state-dir DIR (or ZEROSERVE_STATE_DIR), or --audit-db off."
        ) from None
    if not writable:
        raise SystemExit(
            f"zeroserve: the state dir {state} is not writable; the audit trail keeps its spool there. "
            "Pass --state-dir DIR (or ZEROSERVE_STATE_DIR), or --audit-db off."
        )


def check_quantization(args: argparse.Namespace, model: str, device: str) -> None:
    """--quantization / --dtype combinations no machine of this kind serves, refused here."""
    from zeroserve.gpu_worker.quantization import CheckpointFacts, check_flags

    try:
        check_flags(args.quantization, args.dtype, device, CheckpointFacts.of(model, args.load_format))
    except ValueError as e:
        raise SystemExit(str(e)) from None


def check_distributed(args: argparse.Namespace) -> None:
    """Ray asked for where it is not installed, or a Ray address without Ray, refused here."""
    if args.distributed_executor_backend == "ray":
        import importlib.util

        if importlib.util.find_spec("ray") is None:
            raise SystemExit("--distributed-executor-backend ray needs Ray: pip install 'zeroserve[ray]'")
    elif args.ray_address is not None:
        raise SystemExit("--ray-address is for --distributed-executor-backend ray")


def default_context(model_cfg) -> int:
    """The context served without --max-model-len: the model's, or a sentence-transformers
    folder's max_seq_length (the length it was trained to embed; sentence-transformers cuts there)."""
    st = model_cfg.sentence_transformer
    if st is not None and st.max_seq_length:
        return min(st.max_seq_length, model_cfg.max_position_embeddings)
    return model_cfg.max_position_embeddings


def config_from_args(args: argparse.Namespace, run_dir: str | None = None) -> EngineConfig:
    """Resolve the model, its context length and vocabulary, and build the frozen config."""
    from zeroserve.gpu_worker.loader import load_model_config

    model, served_name = resolve_model(getattr(args, "model", None)), args.served_model_name
    models_file = getattr(args, "models_file", None)
    if models_file:  # the default model's stable version is what the config names (docs/models.md)
        from zeroserve.launcher.models_file import first_version

        if getattr(args, "model", None):
            raise SystemExit("zeroserve: give a MODEL or --models FILE, not both")
        models_file = os.path.abspath(models_file)
        served_name, model = first_version(models_file, args.allow_fault_injection)
    model_cfg = load_model_config(model)
    if args.max_model_len > model_cfg.max_position_embeddings:
        raise SystemExit(
            f"--max-model-len {args.max_model_len} exceeds the model's context "
            f"({model_cfg.max_position_embeddings} tokens)"
        )
    for field in POSITIVE:
        if getattr(args, field) <= 0:
            raise SystemExit(f"--{field.replace('_', '-')} must be > 0, got {getattr(args, field)}")
    if args.tensor_parallel_size > 1:
        from zeroserve.gpu_worker.parallel import check_tp_size

        try:
            check_tp_size(model_cfg, args.tensor_parallel_size)
        except ValueError as e:
            raise SystemExit(f"zeroserve: {e}") from None
    for field in NON_NEGATIVE:
        if getattr(args, field) < 0:
            raise SystemExit(f"--{field.replace('_', '-')} must be >= 0, got {getattr(args, field)}")
    if not 0 < args.gpu_memory_utilization <= 1:
        raise SystemExit(f"--gpu-memory-utilization must be in (0, 1], got {args.gpu_memory_utilization}")
    if args.priority_range[0] > args.priority_range[1]:
        raise SystemExit(f"--priority-range: MIN is above MAX in {args.priority_range}")
    check_quantization(args, model, args.device or default_device())
    check_audit_args(args)
    check_distributed(args)
    run_dir = run_dir or args.run_dir or make_run_dir()
    os.makedirs(run_dir, mode=0o700, exist_ok=True)
    values = {flag.field: getattr(args, flag.field) for flags in FLAGS.values() for flag in flags}
    values.update(
        model=model,
        served_model_name=served_name or model_display_name(model),
        models_file=models_file or None,
        run_dir=os.path.abspath(run_dir),
        curve=new_curve_keys() if args.transport == "tcp" else None,
        max_num_batched_tokens=max(args.max_num_batched_tokens, args.block_size),
        max_model_len=args.max_model_len or default_context(model_cfg),
        vocab_size=model_cfg.vocab_size,
        embedding_only=model_cfg.is_encoder,
        embedding_size=model_cfg.hidden_size,
        matryoshka_dimensions=model_cfg.matryoshka_dimensions,
        priority_aging_s=args.priority_aging_s or None,
        priority_range=tuple(args.priority_range),
        priority_deadline_ms=parse_priority_deadlines(args.priority_deadline_ms, tuple(args.priority_range)),
        device=args.device or default_device(),
        num_threads=args.num_threads or env.num_threads(),
        api_keys=list(args.api_keys),  # ZEROSERVE_API_KEY is read by the api process itself
        api_keys_file=os.path.abspath(args.api_keys_file) if args.api_keys_file else None,
        audit_db=_absolute_audit_db(args.audit_db or ""),
        state_dir=os.path.abspath(args.state_dir) if args.state_dir else "",
        otlp_traces_endpoint=traces_endpoint(args),
    )
    return EngineConfig(**values)
