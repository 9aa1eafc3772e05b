"""api_proc's configuration: one frozen struct, made once at start (``from_engine`` for the
launcher's EngineConfig file) and never mutated. A field named as in EngineConfig is a view of
it (its default and, through from_engine, its value); the rest are the api's own. What only
the engine knows (max_model_len, vocab size) is read from its Pong, not stored here."""

from __future__ import annotations

import msgspec

from zeroserve.shared import env
from zeroserve.shared.config import DEFAULTS, CurveKeys, EngineConfig, view_of
from zeroserve.shared.ipc import client_keys


class ApiConfig(msgspec.Struct, frozen=True, kw_only=True):
    engine_address: (
        str | list[str]
    )  # tokenizer_proc ROUTER(s), ipc:// or tcp://; EngineClient spreads over them
    model_name: str  # the served name: what /v1/models lists and `model` must match
    host: str = DEFAULTS.host
    port: int = DEFAULTS.port
    curve: CurveKeys | None = DEFAULTS.curve  # CURVE keys when engine_address is tcp://
    index: int = 0  # which api process of the deployment (logs only)

    # auth: Bearer keys; empty = no auth. Exempt paths never need a key (probes, scrapes).
    api_keys: list[str] = DEFAULTS.api_keys
    auth_exempt_paths: list[str] = msgspec.field(default_factory=lambda: list(DEFAULTS.auth_exempt_paths))
    api_keys_file: str | None = DEFAULTS.api_keys_file  # tenants with their keys and limits (auth.py)
    admin_key: str | None = DEFAULTS.admin_key  # /admin exists only with one (admin.py)
    api_workers: int = DEFAULTS.api_workers  # per-tenant limits: each api process enforces 1/api_workers

    # audit trail (api_proc/audit): the store URL resolved from --audit-db and the state dir, or
    # None: off (an ApiConfig made by hand, as in tests, records nothing unless given one)
    audit_store: str | None = None
    state_dir: str = DEFAULTS.state_dir  # resolved by from_engine; the spool lives in STATE_DIR/audit-spool
    audit_content: str = DEFAULTS.audit_content
    audit_retention_days: float = DEFAULTS.audit_retention_days

    # limits on a request; over them is a 4xx before anything reaches the engine
    max_body_bytes: int = DEFAULTS.max_body_bytes
    max_n: int = DEFAULTS.max_n
    max_seqs_per_request: int = DEFAULTS.max_seqs_per_request  # prompts x n (also caps a prompt batch)
    max_stop_strings: int = 8
    max_stop_length: int = 256
    max_stop_token_ids: int = 64
    max_messages: int = 1024
    max_logprobs: int = 20
    tool_call_parser: str = DEFAULTS.tool_call_parser  # api_proc/tools.py

    # None: as many tokens as the context leaves (the brief's choice); 16 is OpenAI's legacy
    # default for /v1/completions. Chat always defaults to the rest of the context.
    default_completion_max_tokens: int | None = None

    # time: a request may wait this long in the engine's queue (GenerateRequest.queue_timeout_s);
    # the engine then finishes it with finish_reason "timeout". None: wait forever. Once it
    # runs, it is not cut short (a long generation may take longer than this).
    request_timeout_s: float | None = 600.0
    # an engine that says nothing about a running request for this long is presumed lost:
    # the request is aborted and answered 503 (the guard against a hang, not a deadline).
    engine_stall_timeout_s: float = 120.0
    retry_after_s: int = 1  # Retry-After on 429
    ping_interval_s: float = 1.0  # engine stats refresh for /metrics and max_model_len
    ping_timeout_s: float = 1.0
    # the EngineClient's: a tokenizer silent for heartbeat_timeout_s fails its requests with 503
    heartbeat_interval_s: float = DEFAULTS.heartbeat_interval_s
    heartbeat_timeout_s: float = DEFAULTS.heartbeat_timeout_s
    shutdown_timeout_s: float = 30.0  # SIGTERM: in-flight requests get this long to finish

    # prometheus multiprocess dir shared by every api process of one deployment (wiped by
    # the launcher at deployment start), or None for a single process' in-memory registry
    metrics_dir: str | None = None
    # the access log line of each request carries its prompt and output text (--log-prompts)
    log_prompts: bool = DEFAULTS.log_prompts
    # /metrics names start with "<prefix>:" (vllm: for vLLM's dashboards); the KV cache's settings
    # are reported as cache_config_info, as vLLM does
    metrics_prefix: str = DEFAULTS.metrics_prefix
    block_size: int = DEFAULTS.block_size
    kv_cache_dtype: str = DEFAULTS.kv_cache_dtype
    enable_prefix_caching: bool = DEFAULTS.enable_prefix_caching
    gpu_memory_utilization: float = DEFAULTS.gpu_memory_utilization
    # OpenTelemetry: the api span of each request, parent of the engine's (None: tracing off)
    otlp_traces_endpoint: str | None = DEFAULTS.otlp_traces_endpoint
    # the launcher's model registry (api_proc/versions.py); None: the one model, as version "v1"
    control_address: str | None = DEFAULTS.control_address

    @classmethod
    def from_engine(cls, config: EngineConfig, index: int = 0) -> ApiConfig:
        """The api process #index of a deployment. It talks to every tokenizer frontend (the
        client picks one per request id); keys from the config and ZEROSERVE_API_KEY both work."""
        from zeroserve.api_proc.audit.store import resolve_url

        keys = list(dict.fromkeys([*config.api_keys, *env.api_keys()]))
        state_dir = config.state_dir or env.state_dir()
        return view_of(
            config,
            cls,
            engine_address=config.tokenizer_addresses
            if config.num_tokenizers > 1
            else config.tokenizer_address(0),
            model_name=config.served_model_name,
            curve=client_keys(config.curve),  # the api only connects: no server secret
            index=index,
            api_keys=keys,
            auth_exempt_paths=list(config.auth_exempt_paths),
            metrics_dir=config.metrics_dir,
            admin_key=config.admin_key or env.admin_key(),
            state_dir=state_dir,
            audit_store=resolve_url(config.audit_db, state_dir),
        )
